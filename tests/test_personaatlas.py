"""PersonaAtlas: schema and sampling rules, the noise plan against its configuration, the
recomputed checks catching broken tables, faults that reject with reasons, the PPOpt output
format, and the job end to end on the embedded model (SFT + GRPO and the win-rate eval)."""

import json
import math
from collections import Counter

import polars as pl
import pytest
from dagster import DagsterInstance

from pipelines.definitions import build_definitions
from quality.personaatlas import noise_report, persona_problems, turn_problems
from synth.llm import LLMClient, OpenAICompatBackend
from synth.loaders import load_instructions, load_personas
from synth.personaatlas.noise import NOISE_FILE, layer_shares, load_noise, plan_noise
from synth.personaatlas.personas import (
    SCHEMA_FILE,
    SchemaFileError,
    build_personas,
    hamming,
    load_schema,
    sample_personas,
)
from synth.personaatlas.ppopt import (
    parse_output,
    render_history,
    render_output,
    target_and_history,
)
from synth.personaatlas.trajectories import (
    TRAJECTORY_SCHEMA,
    AtlasSettings,
    synthesize_trajectories,
    target_turns,
)
from synth.records import frame

from conftest import decode_png
from faulty_server import FaultyOpenAIServer


def test_schema_has_33_dimensions_and_a_bad_file_names_the_entry(tmp_path):
    schema = load_schema()
    assert len(schema.dimensions) == 33 and 10 <= len(schema.constraints) < 33
    bad = tmp_path / "schema.yaml"
    bad.write_text(
        SCHEMA_FILE.read_text().replace("values: [terse, brief", "values: [terse, terse")
    )
    with pytest.raises(SchemaFileError, match=r"dimensions\.length_pref\.values: repeats"):
        load_schema(bad)
    bad.write_text(
        SCHEMA_FILE.read_text().replace(
            "tone_pref: {constraint: false", "tone_pref: {constraint: maybe"
        )
    )
    with pytest.raises(SchemaFileError, match=r"dimensions\.tone_pref\.constraint"):
        load_schema(bad)


def test_sampling_is_seeded_distinct_and_partially_observed():
    schema = load_schema()
    a = sample_personas(schema, 200, rate=0.7, min_distance=3, min_constraints=5, seed=7)
    assert a == sample_personas(schema, 200, rate=0.7, min_distance=3, min_constraints=5, seed=7)
    assert a != sample_personas(schema, 200, rate=0.7, min_distance=3, min_constraints=5, seed=8)
    fulls = [f for f, _ in a]
    assert min(hamming(x, y) for i, x in enumerate(fulls) for y in fulls[i + 1 :]) >= 3
    share = sum(len(o) for _, o in a) / (200 * len(schema.dimensions))
    assert 0.65 <= share <= 0.8, share  # 0.7 drawn, a little more from the constraint top-up
    assert min(sum(d in o for d in schema.constraints) for _, o in a) >= 5
    assert all(set(o) <= set(f) and all(f[d] == v for d, v in o.items()) for f, o in a)
    # Every persona must differ from every other on all dimensions: impossible for many.
    with pytest.raises(ValueError, match="min_distance"):
        sample_personas(schema, 50, min_distance=33, seed=0, max_tries=5)


def test_noise_plan_realises_the_configured_rate_and_layer_mix(tmp_path):
    layers = load_noise()
    plans = [plan_noise(layers, 0.25, 3, i, t) for i in range(1000) for t in range(4)]
    noised = [p for p in plans if p is not None]
    assert abs(len(noised) / len(plans) - 0.25) < 0.03
    mix = Counter(p.layer for p in noised)
    for layer, share in layer_shares(layers).items():
        assert abs(mix[layer] / len(noised) - share) < 0.04, (layer, mix)
    assert all(p.strategies for p in noised)
    strategies = {s.name for s in layers["incomplete_info"].strategies}
    assert all(set(p.strategies) <= strategies for p in noised if p.layer == "incomplete_info")
    assert plans == [plan_noise(layers, 0.25, 3, i, t) for i in range(1000) for t in range(4)]
    bad = tmp_path / "noise.yaml"
    bad.write_text(NOISE_FILE.read_text().replace("typos: {p: 0.25", "typos: {p: 1.5"))
    with pytest.raises(ValueError, match=r"layers\.surface_noise\.strategies\.typos\.p"):
        load_noise(bad)


def test_target_turns_stay_in_bounds():
    import random

    s = AtlasSettings()
    rng = random.Random(0)
    turns = [target_turns(rng, s) for _ in range(2000)]
    assert set(turns) <= {2, 3, 4, 5} and Counter(turns).most_common(1)[0][0] == 3


def _turn(t, assistant="an answer", layer=""):
    return {
        "turn": t,
        "user_clean": "hi",
        "user_text": "hi",
        "noise_layer": layer,
        "noise_strategies": ["typos"] if layer else [],
        "noise_error": "",
        "assistant": assistant,
        "assistant_model": "concise",
        "satisfied": False,
        "feedback": "more",
    }


def _trajectory(rid, turns, target=None):
    return {
        "record_id": rid,
        "parent_ids": ["p"],
        "provenance": None,
        "plan_index": 0,
        "persona_id": "p",
        "split": "train",
        "session": 0,
        "features": "{}",
        "observed": "{}",
        "query_id": "q",
        "original_query": "q",
        "initial_query": "q",
        "styled": False,
        "style_traits": [],
        "target_turns": target if target is not None else len(turns),
        "num_turns": len(turns),
        "turns": turns,
        "satisfaction": [False] * len(turns),
        "noised_turns": sum(bool(t["noise_layer"]) for t in turns),
    }


def test_checks_catch_empty_turns_bad_counts_and_skewed_noise():
    good = _trajectory("a", [_turn(0), _turn(1)])
    empty = _trajectory("b", [_turn(0), _turn(1, assistant="  ")])
    long = _trajectory("c", [_turn(t) for t in range(6)])
    short = _trajectory("d", [_turn(0), _turn(1)], target=3)
    # satisfied at the first turn of three: the dialogue ends there, which is right
    stopped = _trajectory("g", [{**_turn(0), "satisfied": True}], target=3)
    # satisfied at the first turn, yet a second turn followed
    went_on = _trajectory("h", [{**_turn(0), "satisfied": True}, _turn(1)], target=3)
    frames = frame([good, empty, long, short, stopped, went_on], TRAJECTORY_SCHEMA)
    problems = {}
    for p in turn_problems(frames, 2, 5):
        problems[p["record_id"]] = problems.get(p["record_id"], "") + p["problem"] + "; "
    assert set(problems) == {"b", "c", "d", "h"}
    assert "empty assistant turn" in problems["b"]
    assert "target 6 turns, outside [2, 5]" in problems["c"]
    assert "stopped at turn 2 of 3 without a satisfied verdict" in problems["d"]
    assert "satisfied at turn 0 but the dialogue went on" in problems["h"]
    shares = layer_shares(load_noise())
    # 40 messages, 10 noised, mixed like the configuration: within tolerance.
    layers = ["surface_noise"] * 5 + ["incomplete_info"] * 3 + ["semantic_ambiguity"] * 2
    mixed = [_turn(i, layer=layers[i] if i < 10 else "") for i in range(40)]
    ok = noise_report(frame([_trajectory("e", mixed)], TRAJECTORY_SCHEMA), 0.25, shares)
    assert ok["passed"] and ok["rate"]["observed"] == 0.25
    # Every message noised at a configured 0.25: far outside.
    skewed = [_turn(i, layer="surface_noise") for i in range(40)]
    bad = noise_report(frame([_trajectory("f", skewed)], TRAJECTORY_SCHEMA), 0.25, shares)
    assert not bad["passed"] and bad["rate"]["observed"] == 1.0


def test_the_target_is_the_session_with_fewest_turns_and_the_rest_is_history():
    def session(k, turns):
        return {"session": k, "num_turns": turns}

    # sessions 0..5 with turns 3 2 4 2 5 3: fewest is 2, the later of the tie is session 3
    sessions = [session(k, n) for k, n in enumerate([3, 2, 4, 2, 5, 3])]
    target, history = target_and_history(list(reversed(sessions)))
    assert target["session"] == 3
    # the latest four of the others, in session order
    assert [h["session"] for h in history] == [1, 2, 4, 5]
    target, history = target_and_history([session(0, 1), session(1, 3)])
    assert target["session"] == 0 and [h["session"] for h in history] == [1]


def test_the_user_simulator_reads_the_dialogue_so_far():
    from synth.llm import Message
    from synth.personaatlas.trajectories import USER_SIM_USER, render_dialogue

    dialogue = render_dialogue(
        [
            Message("user", "Plan a trip."),
            Message("assistant", "Where to?"),
            Message("user", "Rome"),
        ]
    )
    assert dialogue == "You: Plan a trip.\nAssistant: Where to?\nYou: Rome"
    text = USER_SIM_USER.format(dialogue=dialogue, reply="Three days in Rome...", turn=2, target=3)
    assert "You: Plan a trip." in text and "turn 2 of at most 3" in text


def test_persona_checker_catches_twins_and_missing_constraints():
    schema = load_schema()
    (full, observed), (other, _) = sample_personas(schema, 2, seed=1)
    twin = dict(full, tone_pref="blunt" if full["tone_pref"] != "blunt" else "warm")
    personas = pl.DataFrame(
        {
            "record_id": ["x", "y", "z"],
            "features": [json.dumps(full), json.dumps(twin), json.dumps(other)],
            "observed": [json.dumps(observed), json.dumps(observed), json.dumps({})],
        }
    )
    problems = persona_problems(personas, schema, min_distance=3, min_constraints=5)
    assert {"record_id": "x", "problem": "differs from y on 1 dimensions"} in problems
    assert {"record_id": "z", "problem": "exposes 0 hard constraints"} in problems


def test_ppopt_output_format():
    text = render_output(" likes bullets ", "List three tips.")
    assert parse_output(text) == ("likes bullets", "List three tips.")
    # A completion cut off by its token budget still carries its rewrite.
    assert parse_output("<REASONING>terse</REASONING><PROMPT>Be brief about") == (
        "terse",
        "Be brief about",
    )
    assert parse_output("no tags at all") is None
    assert parse_output("<REASONING></REASONING><PROMPT>x</PROMPT>") is None
    session = {"turns": [_turn(0) | {"user_text": "hii", "user_clean": "hi"}]}
    assert "User: hii" in render_history([session], clean=False)
    assert "User: hi\n" in render_history([session], clean=True) + "\n"
    assert "an answer" not in render_history([session], clean=False)  # replies are masked


def test_faults_reject_with_reasons_and_lose_nothing(shared_data):
    hub = load_personas(str(shared_data / "persona-hub-personas.jsonl"), limit=3).kept
    queries = load_instructions(str(shared_data / "self-instruct-seed-tasks.jsonl"), limit=10).kept
    s = AtlasSettings(hub_personas=3, sampled_personas=2, queries_per_persona=2, max_turns=2)
    # The server answers plain text where JSON is asked for: every mapping is rejected.
    with FaultyOpenAIServer("ok") as server:
        backend = OpenAICompatBackend(server.base_url, "faulty", response_format="none")
        client = LLMClient(backend)
        personas, rejected, n_in = build_personas(client, hub, s.schema(), s)
        assert n_in == 5 and personas.height == 2 and rejected.height == 3
        assert set(rejected["reason"]) == {"mapping_invalid_json"}
        assert all(d.startswith("persona_hub record ") for d in rejected["detail"])
        kept, dropped, planned = synthesize_trajectories(client, personas, queries, s)
    # ... and every user-simulator verdict: each conversation is rejected at turn 0.
    assert planned == 4 and kept.height == 0 and dropped.height == 4
    assert set(dropped["reason"]) == {"user_sim_invalid_json"}
    assert all("turn 0: field verdict" in d for d in dropped["detail"])
    with FaultyOpenAIServer("server_error") as server:
        backend = OpenAICompatBackend(server.base_url, "faulty", max_retries=0)
        _, dropped, _ = synthesize_trajectories(LLMClient(backend), personas, queries, s)
        # Persona shards split the same plan: disjoint, and together the whole of it.
        sharded = [
            synthesize_trajectories(LLMClient(backend), personas, queries, s, shard=(k, 2))
            for k in range(2)
        ]
    assert set(dropped["reason"]) <= {"assistant_failed", "style_failed"} and dropped.height == 4
    parts = [set(d["source_index"]) for _, d, _ in sharded]
    assert not parts[0] & parts[1] and parts[0] | parts[1] == set(dropped["source_index"])
    assert [n for _, _, n in sharded] == [2, 2]


ATLAS = {
    "hub_personas": 1,
    "sampled_personas": 4,
    "queries_per_persona": 2,
    "turns_mean": 2.5,
    "max_turns": 3,
    "assistant_max_tokens": 64,
    "user_max_tokens": 64,
    # Personas 1 and 3 are held out, 0, 2 and 4 train: a persona whose conversation the
    # 135M simulator spoils (an unparseable verdict) still leaves enough of each.
    "heldout_every": 2,
    "noise_rate": 0.5,
}


def _run_job(tmp_path, atlas, model=None):
    """What a user does: the `personaatlas_shards` backfill (a run per persona shard),
    then the `personaatlas` job. Returns (the job's result, every run's result)."""
    defs, instance = build_definitions(tmp_path), DagsterInstance.ephemeral()
    shards = defs.resolve_job_def("personaatlas_shards")
    shard_config = {
        "ops": {
            "personaatlas_persona_assets": {"config": atlas},
            "personaatlas_trajectory_shard_assets": {"config": atlas},
        }
    }
    runs = [
        shards.execute_in_process(instance=instance, partition_key=k, run_config=shard_config)
        for k in shards.partitions_def.get_partition_keys()
    ]
    result = defs.resolve_job_def("personaatlas").execute_in_process(
        instance=instance,
        raise_on_error=False,
        run_config={
            "ops": {
                # Ten SFT steps at a high rate: enough for the 135M model to start
                # writing the tags, so GRPO and the evaluation see some rewrites.
                "personaatlas_model": {
                    "config": model
                    or {
                        "sft_steps": 10,
                        "learning_rate": 2e-3,
                        "grpo_steps": 1,
                        "max_completion_length": 128,
                    }
                },
                "personaatlas_eval": {"config": {"max_new_tokens": 192, "answer_max_tokens": 48}},
            }
        },
    )
    return result, [*runs, result]


def test_failed_gate_stops_ppopt_training(tmp_path):
    # Every persona is held out: no teacher outputs, nothing to train on.
    atlas = {**ATLAS, "hub_personas": 0, "sampled_personas": 2, "max_turns": 2, "heldout_every": 1}
    result, _ = _run_job(tmp_path, atlas)
    checks = {e.asset_check_key.name: e for e in result.get_asset_check_evaluations()}
    gate = checks["personaatlas_ppopt_ready_for_training"]
    assert not gate.passed and gate.metadata["observed_train_rows"].value == 0
    assert checks["personaatlas_trajectories_accounted"].passed
    materialized = {e.asset_key.path[-1] for e in result.get_asset_materialization_events()}
    assert "personaatlas_ppopt" in materialized
    assert not materialized & {"personaatlas_model", "personaatlas_eval"}


def test_personaatlas_job_end_to_end(tmp_path):
    result, runs = _run_job(tmp_path, ATLAS)
    assert all(r.success for r in runs)
    checks = {e.asset_check_key.name: e for r in runs for e in r.get_asset_check_evaluations()}
    failed = {n for n, e in checks.items() if not e.passed}
    # WARN checks the 135M model may fail; every blocking check must pass.
    assert failed <= {
        "personaatlas_trajectories_drift_suite",
        "personaatlas_curated_drift_suite",
    }, failed
    assert result.success
    storage = tmp_path / "storage"
    personas = pl.read_parquet(storage / "personaatlas_personas.parquet")
    persona_rejects = pl.read_parquet(storage / "personaatlas_personas_rejected.parquet")
    assert personas.height + persona_rejects.height == 5
    trajectories = pl.read_parquet(storage / "personaatlas_trajectories.parquet")
    dropped = pl.read_parquet(storage / "personaatlas_trajectories_rejected.parquet")
    assert trajectories.height + dropped.height == 2 * personas.height
    assert trajectories["target_turns"].is_between(2, 3).all()
    # each dialogue ends at its first satisfied verdict, else at its target
    for r in trajectories.select("num_turns", "target_turns", "satisfaction").to_dicts():
        said = r["satisfaction"]
        ends = said.index(True) + 1 if True in said else r["target_turns"]
        assert r["num_turns"] == len(said) == min(ends, r["target_turns"])
    turns = [t for ts in trajectories["turns"].to_list() for t in ts]
    assert all(t["assistant"].strip() for t in turns)
    noised = [t for t in turns if t["noise_layer"]]
    assert noised and all(t["noise_strategies"] for t in noised)
    assert all(t["user_text"] != t["user_clean"] for t in noised)  # clean text kept beside it
    ppopt = pl.read_parquet(storage / "personaatlas_ppopt.parquet")
    train = ppopt.filter(pl.col("split") == "train")
    assert train.height >= 2 and all(parse_output(c) for c in train["completion"])
    assert all("[assistant reply hidden]" in p for p in ppopt["prompt"])

    mats = {
        e.asset_key.path[-1]: e.materialization.metadata
        for r in runs
        for e in r.get_asset_materialization_events()
    }
    coverage_png = decode_png(mats["personaatlas_personas"]["coverage_per_dimension"].value)
    assert coverage_png.height > coverage_png.width  # one bar per dimension
    decode_png(mats["personaatlas_trajectories"]["noise_mix"].value)
    noise = checks["personaatlas_noise_mix"].metadata
    assert noise["user_messages"].value == len(turns)
    model = mats["personaatlas_model"]
    assert model["trainable_tensors_changed"].value > 0
    assert math.isfinite(model["final_sft_loss"].value)
    grpo = model["history"].value["grpo"]
    assert len(grpo) == 1 and 0.0 <= grpo[0]["reward"] <= 1.0 and "format_ok" in grpo[0]
    evaluation = pl.read_parquet(storage / "personaatlas_eval.parquet")
    heldout = ppopt.filter(pl.col("split") == "heldout").height
    assert evaluation.height == 4 * heldout  # base/trained x noised/clean
    assert set(zip(evaluation["model"], evaluation["history"], strict=True)) == {
        (m, h) for m in ("base", "trained") for h in ("noised", "clean")
    }
    assert evaluation.filter(pl.col("format_ok"))["p_better"].is_between(0, 1).all()
    eval_md = mats["personaatlas_eval"]
    assert 0 <= eval_md["win_rate_trained_noised"].value <= 1
    decode_png(eval_md["win_rates"].value)


def test_a_copied_template_is_out_of_format_and_a_failed_judge_drops_the_sample():
    from train.ppopt import ppopt_reward

    assert parse_output("<REASONING>profile</REASONING><PROMPT>rewritten prompt</PROMPT>") is None
    assert parse_output("<REASONING>Busy.</REASONING><PROMPT>The user's prompt.</PROMPT>") is None
    assert parse_output("<REASONING>busy</REASONING><PROMPT>Short tips</PROMPT>") == (
        "busy",
        "Short tips",
    )
    formatted = [{"role": "assistant", "content": render_output("busy", "Three short tips")}]
    with FaultyOpenAIServer("server_error") as server:
        client = LLMClient(OpenAICompatBackend(server.base_url, "faulty", max_retries=0))
        logged = {}
        rewards = ppopt_reward(client, 0.3, 0.7)(
            [formatted, [{"role": "assistant", "content": "no tags"}]],
            persona=["p"] * 2,
            query=["q"] * 2,
            log_metric=logged.__setitem__,
        )
    # no verdict is not a bad rewrite: TRL leaves a None out of the group's baseline
    assert rewards == [None, 0.0] and logged["judge_failed"] == 0.5


def test_ppopt_reward_and_win_rate_score_formatted_rewrites_and_zero_the_rest(
    embedded_backend, tmp_path
):
    from synth.llm import ResponseCache
    from synth.personaatlas.ppopt import (
        answer_requests,
        profile_scores,
        score_rewrites,
        task_scores,
    )
    from train.ppopt import ppopt_reward

    # The cache makes the reward's judge calls and the recomputation below the same calls.
    client = LLMClient(embedded_backend, ResponseCache(tmp_path / "cache.sqlite"))
    full, _ = sample_personas(load_schema(), 1, seed=3)[0]
    persona = load_schema().describe(full)
    query = "how do i get better sleep"
    rewrite = "Give me three short, practical tips for better sleep, as bullet points."
    completions = [
        [{"role": "assistant", "content": render_output("wants short bullet lists", rewrite)}],
        [{"role": "assistant", "content": "Sure! Here are some tips for sleeping."}],
    ]
    logged = {}
    rewards = ppopt_reward(client, 0.3, 0.7)(
        completions, persona=[persona] * 2, query=[query] * 2, log_metric=logged.__setitem__
    )
    assert rewards[1] == 0.0 and logged["format_ok"] == 0.5 and logged["judge_failed"] == 0
    profile = profile_scores(client, [persona], ["wants short bullet lists"])[0]
    original, rewritten = client.generate(answer_requests([query, rewrite]))
    task = task_scores(client, [persona], [query], [original.text], [rewritten.text], False)[0]
    assert 0 <= profile <= 1 and 0 <= task <= 1
    assert rewards[0] == pytest.approx(0.3 * profile + 0.7 * task)
    assert rewards[0] > 0
    # The evaluation: the same rewrite judged in both orders wins or not; no tags loses.
    heldout = pl.DataFrame(
        {"record_id": ["r"], "persona_id": ["p"], "persona": [persona], "query": [query]}
    )
    outputs = [
        {"model": "trained", "prompt_id": "r|noised", "response": completions[0][0]["content"]},
        {"model": "base", "prompt_id": "r|clean", "response": "Sure, here are tips."},
    ]
    table = score_rewrites(client, heldout, outputs, 128)
    both = task_scores(client, [persona], [query], [original.text], [rewritten.text])[0]
    trained, base = table.to_dicts()
    assert trained["format_ok"] and trained["p_better"] == pytest.approx(both)
    assert trained["win"] == (both > 0.5) and trained["history"] == "noised"
    assert not base["format_ok"] and base["p_better"] is None and not base["win"]
