"""PersonaAtlas: schema and sampling rules, the noise plan against its configuration, the
recomputed checks catching broken tables, faults that reject with reasons, the PPOpt output
format, and the job end to end on the embedded model (SFT + GRPO and the win-rate eval)."""

import json
import math
from collections import Counter

import polars as pl
import pytest
from dagster import DagsterInstance
from reference_server import Entry, ReferenceJudgeServer

from pipelines.definitions import build_definitions
from quality.personaatlas import noise_effects, noise_report, persona_problems, turn_problems
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
    seen = [o for _, o in a]
    assert min(hamming(x, y) for i, x in enumerate(seen) for y in seen[i + 1 :]) >= 3
    # Distance between partial personas: an exposed vs an unexposed dimension differs.
    assert hamming({"a": "1", "b": "2"}, {"a": "1", "c": "2"}) == 2
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


def test_the_distractor_reads_intent_and_slots_and_writes_in_the_persona_s_voice():
    from synth.llm import GenerationParams
    from synth.personaatlas.noise import NoisePlan, distract_request, intent_request

    layers = load_noise()
    params = GenerationParams(temperature=0.9, max_tokens=48)
    ask = intent_request("Book a table for 4 at 7pm in Lyon.", params)
    assert ask.json_schema["required"] == ["intent", "slots"]
    plan = NoisePlan("incomplete_info", ("missing_slots",))
    intent = {"intent": "book a restaurant table", "slots": ["for 4", "at 7pm", "in Lyon"]}
    req = distract_request(
        "Book a table for 4 at 7pm in Lyon.", plan, layers, params, intent, "- tone: blunt"
    )
    text = req.messages[-1].content
    assert "It asks for: book a restaurant table. Its details: for 4; at 7pm; in Lyon." in text
    assert "The writer:\n- tone: blunt" in text and "drop a specific detail" in text
    # without an extraction the noise still applies, with nothing invented
    bare = distract_request("Book a table.", plan, layers, params).messages[-1].content
    assert "It asks for" not in bare and "The writer" not in bare


def test_restyled_lengths_follow_the_paper_s_normal_over_the_buckets():
    import random

    from synth.personaatlas.trajectories import LENGTH_WORDS, style_budget, target_length

    rng, s = random.Random(0), AtlasSettings()
    # the budget holds the bucket's upper word count, within the floor and the cap
    assert [style_budget(b, s) for b in LENGTH_WORDS] == [96, 96, 120, 225, 375]
    assert style_budget("very_long", AtlasSettings(style_max_tokens=200)) == 200
    got = Counter(target_length(rng, s) for _ in range(20000))
    # round(N(1.5, 1)) = k  <=>  k - 0.5 <= x < k + 0.5: Phi(-1), Phi(0) - Phi(-1), ...
    expected = [0.1587, 0.3413, 0.3413, 0.1359, 0.0228]
    for name, p in zip(LENGTH_WORDS, expected, strict=True):
        assert abs(got[name] / 20000 - p) < 0.012, (name, got)


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
        "noise_intent": "greet" if layer else "",
        "noise_slots": [],
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
        "style_length": "",
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


def test_the_noise_verifier_reads_dropped_slots_and_numbers_back_from_the_text():
    clean = "Book a table for 4 people at 7pm in Paris."
    slots = ["4 people", "7pm", "in Paris"]

    def noised(text, *strategies):
        turn = {**_turn(0, layer="incomplete_info"), "user_clean": clean, "user_text": text}
        return {**turn, "noise_strategies": list(strategies), "noise_slots": slots}

    def report(*turns):
        return noise_effects(frame([_trajectory("n", list(turns))], TRAJECTORY_SCHEMA))

    dropped = noised("book a table for 4 people in paris, the usual time", "missing_slots")
    vague = noised("Book a table for a few people at 7pm in Paris.", "vague_values")
    ok = report(dropped, vague, noised("table for 4 people at 7pm in paris", "punctuation"))
    assert ok["passed"] and ok["changed_share"] == 1.0
    assert ok["strategies"]["missing_slots"] == {"checked": 1, "shown": 1, "share": 1.0}
    assert ok["strategies"]["vague_values"]["shown"] == 1  # the 4 is gone
    # A distractor that only lower-cased the words dropped no slot and no number.
    kept = noised(clean.lower(), "missing_slots", "vague_values")
    weak = report(dropped, kept, kept)
    assert not weak["passed"] and weak["changed_share"] == 1.0
    assert weak["strategies"]["missing_slots"]["share"] == round(1 / 3, 4)
    assert weak["strategies"]["vague_values"] == {"checked": 2, "shown": 0, "share": 0.0}
    # One that sent the message back unchanged: under the changed share.
    copied = report(dropped, noised(clean, "typos"), noised(clean, "colloquial"))
    assert not copied["passed"] and copied["changed"] == 1 and "typos" not in copied["strategies"]


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
    # Twins on what they expose, though their unobserved features differ everywhere.
    twin_full = {
        d: next(v for v in dim.values if v != full[d]) for d, dim in schema.dimensions.items()
    }
    twin_full.update(observed)
    twin_full["tone_pref"] = "blunt" if full["tone_pref"] != "blunt" else "warm"
    twin = dict(observed, tone_pref=twin_full["tone_pref"])
    personas = pl.DataFrame(
        {
            "record_id": ["x", "y", "z", "w"],
            "features": [
                json.dumps(full),
                json.dumps(twin_full),
                json.dumps(other),
                json.dumps(other),
            ],
            "observed": [
                json.dumps(observed),
                json.dumps(twin),
                json.dumps({}),
                json.dumps(observed),
            ],
        }
    )
    problems = persona_problems(personas, schema, min_distance=3, min_constraints=5)
    assert {"record_id": "x", "problem": "differs from y on 1 dimensions"} in problems
    assert {"record_id": "z", "problem": "exposes 0 hard constraints"} in problems
    assert any(p["record_id"] == "w" and "not as drawn" in p["problem"] for p in problems)
    assert not any(p["record_id"] == "x" and "not as drawn" in p["problem"] for p in problems)


def test_ppopt_gate_blocks_histories_not_played_from_the_judged_persona():
    from assets.personaatlas import personaatlas_ppopt_ready_for_training

    schema = load_schema()
    (_, seen), (_, other) = sample_personas(schema, 2, seed=4)
    curated = pl.DataFrame(
        {
            "record_id": ["a1", "a2", "a3", "b1"],
            "persona_id": ["pa", "pa", "pa", "pb"],
            "observed": [json.dumps(seen)] * 3 + [json.dumps(other)],
        }
    )
    done = render_output("terse and exact", "Three short tips, bullets.")

    def rows(history, persona=schema.describe(seen)):
        return pl.DataFrame(
            {
                "record_id": ["r1", "r2"],
                "persona_id": ["pa", "pa"],
                "parent_ids": [["a1"], ["a1"]],
                "split": ["train", "train"],
                "persona": [persona, persona],
                "history_ids": [history, ["a2"]],
                "completion": [done, done],
            }
        )

    ok = personaatlas_ppopt_ready_for_training(rows(["a2", "a3"]), curated)
    assert ok.passed and ok.metadata["rows_with_bad_history"].value == 0
    # another persona's session, the target itself, an empty history
    for history in (["a2", "b1"], ["a1"], []):
        bad = personaatlas_ppopt_ready_for_training(rows(history), curated)
        assert not bad.passed and bad.metadata["rows_with_bad_history"].value == 1, history
    # the judges would grade against features the simulator never played (the full draw)
    full = dict(seen, **{d: dim.values[0] for d, dim in schema.dimensions.items() if d not in seen})
    leaked = personaatlas_ppopt_ready_for_training(rows(["a2"], schema.describe(full)), curated)
    assert not leaked.passed and leaked.metadata["rows_with_bad_history"].value == 2
    assert "other features" in leaked.metadata["history_problems"].value[0]["problem"]


def test_win_rates_leave_out_judge_failures_and_carry_a_wilson_interval():
    from quality.personaatlas import win_rates

    table = pl.DataFrame(
        {
            "model": ["trained"] * 5 + ["base"] * 2,
            "history": ["clean"] * 5 + ["none"] * 2,
            "format_ok": [True, True, True, False, True, True, True],
            "judge_failed": [False, False, False, False, True, True, True],
            "win": [True, True, False, False, False, False, False],
        }
    )
    rows = {r["model"]: r for r in win_rates(table).to_dicts()}
    t = rows["trained"]
    # 2 wins of 4 judged (the unformatted output loses; the failed judgement is left out)
    assert (t["n"], t["judge_failed"], t["win_rate"]) == (4, 1, 0.5)
    # Wilson at p=0.5, n=4: centred on 0.5, half-width z*sqrt(p(1-p)/n + z^2/4n^2)/(1+z^2/n)
    half = 1.96 * math.sqrt(0.25 / 4 + 1.96**2 / 64) / (1 + 1.96**2 / 4)
    assert (t["ci_low"], t["ci_high"]) == (round(0.5 - half, 4), round(0.5 + half, 4))
    b = rows["base"]
    assert (b["n"], b["judge_failed"], b["win_rate"], b["ci_low"], b["ci_high"]) == (
        0,
        2,
        None,
        0.0,
        1.0,
    )


def test_with_a_capable_optimizer_and_judge_history_aware_rewrites_beat_the_original():
    """The evaluation's logic, shown with the reference server (a TEST DOUBLE) playing a
    capable optimizer, assistant and judge for known items. Each held-out persona wants
    one answer format and says so in its history; the noise drops that cue from every
    other persona's noised history. A rewrite that carries the cue gets an answer in that
    format, which the judge prefers; a rewrite without it gets the same answer as the
    original. The judge favours position A, so only both orders give an honest 0.5 on a
    tie, and it answers nothing for persona 0, which is left out and counted."""
    from quality.personaatlas import win_rates
    from synth.llm import GenerationParams, LLMRequest
    from synth.llm.factory import make_backend
    from synth.personaatlas.ppopt import (
        POLICY_PROMPT,
        no_history_prompt,
        render_history,
        score_rewrites,
    )

    cues = ("bullet points", "one short paragraph", "numbered steps")
    n, entries, rows = 24, [], []
    for i in range(n):
        cue, query = cues[i % 3], f"How do I handle task {i} at work?"
        persona = f"- Preferred answer format (format_pref_primary): {cue}"
        turns = [
            {
                "user_clean": f"Answer me in {cue}, always.",
                "user_text": f"Answer me in {cue}, always.",
            }
        ]
        noised = [
            {"user_clean": t["user_clean"], "user_text": "pls just answr, u decide"} for t in turns
        ]
        sessions = {"clean": [{"turns": turns}], "noised": [{"turns": noised if i % 2 else turns}]}
        rows.append(
            {
                "record_id": f"r{i}",
                "persona_id": f"p{i}",
                "persona": persona,
                "query": query,
                "prompt": POLICY_PROMPT.format(
                    history=render_history(sessions["noised"], clean=False), query=query
                ),
                "prompt_clean": POLICY_PROMPT.format(
                    history=render_history(sessions["clean"], clean=True), query=query
                ),
            }
        )
        personal, generic = f"{query} Answer in {cue}.", f"{query} Please answer."
        mine, plain = f"ANSWER {i} in {cue}", f"ANSWER {i} plain"
        entries += [
            # the optimizer: the cue in the history makes it into the rewrite
            Entry(
                (f"New query: {query}", f"in {cue}"), reply=render_output(f"wants {cue}", personal)
            ),
            Entry((f"New query: {query}",), reply=render_output("nothing to go on", generic)),
            # the assistant answers what the prompt asks for
            Entry((personal,), reply=mine),
            Entry((query,), reply=plain),
        ]
        if not i:  # two equally good fixtures: the judge fails on persona 0 (HTTP 422)
            entries += [Entry((persona, f"User query:\n{query}", "Which response")) for _ in "ab"]
        else:  # the judge: the answer in the wanted format serves the user
            entries += [
                Entry(
                    (persona, f"Response A:\n{plain}\n", f"Response B:\n{mine}"),
                    choices={"B": 0.9, "A": 0.1},
                ),
                Entry(
                    (persona, f"Response A:\n{mine}\n", f"Response B:\n{plain}"),
                    choices={"A": 0.7, "B": 0.3},
                ),
                Entry(
                    (persona, f"Response A:\n{plain}\n", f"Response B:\n{plain}"),
                    choices={"A": 0.6, "B": 0.4},
                ),
            ]
    heldout = pl.DataFrame(rows)
    with ReferenceJudgeServer(entries) as server:
        client = LLMClient(
            make_backend("openai", model="reference", base_url=server.base_url, max_retries=0)
        )
        arms = [
            (f"{r['record_id']}|{h}", prompt)
            for r in rows
            for h, prompt in (
                ("noised", r["prompt"]),
                ("clean", r["prompt_clean"]),
                ("none", no_history_prompt(r["query"])),
            )
        ]
        params = GenerationParams(temperature=0.0, max_tokens=64)
        outs = client.generate([LLMRequest.chat(p, None, params) for _, p in arms])
        responses = [
            {"model": "trained", "prompt_id": k, "response": o.text}
            for (k, _), o in zip(arms, outs, strict=True)
        ]
        table = score_rewrites(client, heldout, responses, answer_client=client)
    summary = win_rates(table)
    print(summary)  # the README's numbers: pytest -k capable_optimizer -s
    rates = {r["history"]: r for r in summary.to_dicts()}
    for arm in ("clean", "noised", "none"):
        assert (rates[arm]["n"], rates[arm]["judge_failed"]) == (n - 1, 1), arm
    # every clean history carries the cue: 23 of 23 judged wins, the interval above 0.5
    assert rates["clean"]["win_rate"] == 1.0 and rates["clean"]["ci_low"] > 0.5
    # the noise took the cue from the odd personas: 11 wins of 23 (persona 0 is unjudged)
    assert rates["noised"]["win_rate"] == round(11 / 23, 4)
    assert rates["noised"]["ci_low"] < 0.5 < rates["clean"]["ci_low"]
    # with no history there is nothing to personalise: a tie each time, never a win
    assert rates["none"]["win_rate"] == 0.0 and rates["none"]["ci_high"] < 0.5
    ties = table.filter(pl.col("history") == "none", ~pl.col("judge_failed"))["p_better"]
    assert ties.to_list() == pytest.approx([0.5] * (n - 1))  # one order alone says 0.4
    assert len(server.unknown) == 6  # persona 0: three arms, two orders each


def test_the_ppopt_reward_and_the_sft_rl_split_by_hand():
    from train.ppopt import combined_reward, split_sft_rl

    # 0.3 x 0.75 + 0.7 x 0.6 = 0.225 + 0.42
    assert combined_reward(0.75, 0.6, 0.3, 0.7) == pytest.approx(0.645)
    assert combined_reward(math.nan, 0.6, 0.3, 0.7) is None
    assert combined_reward(0.75, math.nan, 0.3, 0.7) is None
    rows = [{"prompt": p, "i": i} for i, p in enumerate("abcdab")]
    sft, rl = split_sft_rl(rows, 0.5, seed=0)
    assert {r["prompt"] for r in sft}.isdisjoint({r["prompt"] for r in rl})
    assert len({r["prompt"] for r in rl}) == 2 and len(sft) + len(rl) == 6
    assert split_sft_rl(rows, 0.5, seed=0) == (sft, rl)
    # one distinct input cannot be split; a share of 1 still leaves SFT one input
    same = [{"prompt": "a"}] * 3
    assert split_sft_rl(same, 0.5, 0) == (same, same)
    assert len({r["prompt"] for r in split_sft_rl(rows, 1.0, 0)[0]}) == 1


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
    "style_max_tokens": 96,
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
    # one assistant model for the whole conversation (the paper locks it)
    assert all(len({t["assistant_model"] for t in ts}) == 1 for ts in trajectories["turns"])
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
    took = checks["personaatlas_noise_took_effect"].metadata
    assert took["noised"].value == noise["noised"].value  # the same turns, read back
    model = mats["personaatlas_model"]
    assert model["trainable_tensors_changed"].value > 0
    assert math.isfinite(model["final_sft_loss"].value)
    grpo = model["history"].value["grpo"]
    assert len(grpo) == 1 and 0.0 <= grpo[0]["reward"] <= 1.0 and "format_ok" in grpo[0]
    evaluation = pl.read_parquet(storage / "personaatlas_eval.parquet")
    heldout = ppopt.filter(pl.col("split") == "heldout").height
    assert evaluation.height == 6 * heldout  # base/trained x noised/clean/none
    assert set(zip(evaluation["model"], evaluation["history"], strict=True)) == {
        (m, h) for m in ("base", "trained") for h in ("noised", "clean", "none")
    }
    assert evaluation.filter(pl.col("format_ok"))["p_better"].is_between(0, 1).all()
    eval_md = mats["personaatlas_eval"]
    assert 0 <= eval_md["win_rate_trained_noised"].value <= 1
    low, high = eval_md["win_rate_intervals"].value["trained/noised"]
    assert 0 <= low <= eval_md["win_rate_trained_noised"].value <= high <= 1
    assert "history_gain_trained" in eval_md
    decode_png(eval_md["win_rates"].value)


def test_a_copied_template_is_out_of_format_and_a_failed_judge_drops_the_sample():
    from types import SimpleNamespace

    from synth.personaatlas.ppopt import teacher_problem
    from train.ppopt import ppopt_reward

    # a teacher output that repeats the placeholders is asked again, then rejected
    copied = SimpleNamespace(
        ok=True, parsed={"profile": "Profile.", "prompt": "rewritten prompt"}, text="{}"
    )
    assert teacher_problem(copied)[0] == "out_of_format"
    fine = SimpleNamespace(ok=True, parsed={"profile": "terse", "prompt": "Three tips."}, text="{}")
    assert teacher_problem(fine) == ("", "")

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
