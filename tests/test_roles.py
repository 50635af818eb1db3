"""Model roles: a model per job, configured from alignfoundry.yaml and the environment,
named in every record's provenance and in the metadata; and the reference judge."""

import json
import logging
import math

import polars as pl
import pytest
from dagster import DagsterInstance, materialize
from reference_server import Entry, ReferenceJudgeServer

from assets.resources import LLMResource, ParquetIOManager
from assets.responses import judged_responses_assets
from assets.seeds import seed_instructions
from assets.settings import ROLES, SettingsError, load_settings, role_summary
from pipelines.definitions import build_definitions, role_resources
from synth.llm import (
    GenerationParams,
    LLMClient,
    LLMRequest,
    PoolingRewardBackend,
    ResponseCache,
    judge,
    make_backend,
)
from synth.llm.backends import chat_body, detect_server
from synth.llm.reward import score_rewards
from synth.trace.policy import SHIPPED_POLICIES, load_policy
from synth.trace.triage import triage_pairs

# ---------------------------------------------------------------- configuration


def write_config(tmp_path, text: str) -> dict[str, str]:
    path = tmp_path / "alignfoundry.yaml"
    path.write_text(text)
    return {"ALIGNFOUNDRY_CONFIG": str(path)}


def test_no_file_means_the_embedded_model_in_every_role():
    s = load_settings({})
    assert set(s.roles) == set(ROLES)
    assert {r["backend"] for r in s.roles.values()} == {"embedded"}
    assert s.path == "" and s.families == {}


def test_file_then_environment_with_the_most_specific_winning(tmp_path):
    env = write_config(
        tmp_path,
        """
roles:
  default: {max_concurrency: 16}
  judge: {backend: openai, base_url: http://127.0.0.1:9/v1, model: big-judge, api_key_env: JUDGE_KEY}
  reward: {backend: pooling, base_url: http://127.0.0.1:9/v1, model: rm}
families:
  trace:
    trace_triage_assets: {limit: 7}
""",
    )
    env |= {"ALIGNFOUNDRY_LLM_TIMEOUT_S": "5", "ALIGNFOUNDRY_JUDGE_MODEL": "bigger-judge"}
    s = load_settings(env)
    judge_role, gen = s.roles["judge"], s.roles["generator"]
    assert judge_role["backend"] == "openai" and judge_role["model"] == "bigger-judge"
    assert judge_role.sources["model"] == "ALIGNFOUNDRY_JUDGE_MODEL"
    assert judge_role["max_concurrency"] == 16 and gen["max_concurrency"] == 16  # default block
    assert judge_role["timeout_s"] == 5.0 and gen["timeout_s"] == 5.0  # every-role variable
    assert gen["backend"] == "embedded" and s.roles["reward"]["backend"] == "pooling"
    assert s.op_config() == {"trace_triage_assets": {"limit": 7}}
    summary = role_summary(s, {"JUDGE_KEY": "sk-secret"})
    assert summary["judge"]["api_key"] == "set (JUDGE_KEY)"
    assert summary["generator"]["api_key"] == "unset (OPENAI_API_KEY)"
    assert "sk-secret" not in json.dumps(summary)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("roles:\n  judge: {modle: x}\n", "roles.judge: unknown setting 'modle'"),
        ("roles:\n  critic: {model: x}\n", "roles.critic is not a role"),
        (
            "roles:\n  judge: {max_concurrency: lots}\n",
            "roles.judge.max_concurrency: should be int",
        ),
        ("rolez: {}\n", "unknown section 'rolez'"),
        ("roles: [\n", "invalid YAML"),
    ],
)
def test_a_bad_file_is_refused_naming_the_setting(tmp_path, text, message):
    env = write_config(tmp_path, text)
    with pytest.raises(SettingsError, match=message.replace("(", r"\(")) as e:
        load_settings(env)
    assert str(tmp_path) in str(e.value) and "\n" not in str(e.value)


def test_a_bad_environment_value_names_the_variable():
    with pytest.raises(SettingsError, match="ALIGNFOUNDRY_JUDGE_CONCURRENCY: should be int"):
        load_settings({"ALIGNFOUNDRY_JUDGE_CONCURRENCY": "many"})


def test_family_settings_become_the_default_run_config_of_the_family_jobs(tmp_path, monkeypatch):
    env = write_config(
        tmp_path, "families:\n  responses:\n    judged_responses_assets: {limit: 2}\n"
    )
    monkeypatch.setenv("ALIGNFOUNDRY_CONFIG", env["ALIGNFOUNDRY_CONFIG"])
    defs = build_definitions(tmp_path)
    # the seeds job does not run that op, and still resolves without its config
    assert "judged_responses_assets" not in defs.resolve_job_def("seeds").graph.node_dict
    job = defs.resolve_job_def("responses")
    result = job.execute_in_process(instance=DagsterInstance.ephemeral())
    assert result.success
    kept = pl.read_parquet(tmp_path / "storage" / "judged_responses.parquet")
    rejected = pl.read_parquet(tmp_path / "storage" / "judged_responses_rejected.parquet")
    assert kept.height + rejected.height == 2  # the file's limit, with no run config given

    write_config(tmp_path, "families:\n  responses:\n    judged_responsez: {limit: 2}\n")
    with pytest.raises(ValueError, match="'judged_responsez' is not an op"):
        build_definitions(tmp_path)


# ---------------------------------------------------------------- backends per role


def test_sampling_parameters_are_named_per_server_and_unknown_ones_dropped(caplog):
    req = LLMRequest.chat("hi", params=GenerationParams(repeat_penalty=1.3, max_tokens=5))
    assert chat_body(req, 0, False, "vllm")["repetition_penalty"] == 1.3
    assert "repeat_penalty" not in chat_body(req, 0, False, "vllm")
    assert chat_body(req, 0, False, "llamacpp")["repeat_penalty"] == 1.3
    dropped: set[str] = set()
    body = chat_body(req, 0, False, "openai", dropped)
    assert dropped == {"repeat_penalty"}
    assert not {"repeat_penalty", "repetition_penalty"} & set(body)
    assert detect_server({"data": [{"id": "m", "owned_by": "vllm"}]}) == "vllm"
    assert detect_server({"data": [{"id": "m", "owned_by": "llamacpp"}]}) == "llamacpp"
    assert detect_server({"data": [{"id": "gpt-4o", "owned_by": "system"}]}) == "openai"

    # an OpenAI-API server (as the reference judge says it is) gets no repeat penalty
    with ReferenceJudgeServer([Entry(("hello there",), reply="hi")]) as server:
        client = LLMClient(make_backend("openai", model="m", base_url=server.base_url))
        with caplog.at_level(logging.WARNING, logger="alignfoundry.llm"):
            (resp,) = client.generate(
                [LLMRequest.chat("hello there", params=GenerationParams(repeat_penalty=1.1))]
            )
        assert resp.ok and resp.text == "hi"
        assert client.backend.server == "openai"
        assert "has no sampling parameter 'repeat_penalty'" in caplog.text


def test_a_role_on_a_dead_url_fails_at_run_start_naming_the_role(tmp_path):
    dead = LLMResource(backend="openai", base_url="http://127.0.0.1:1/v1", model="m")
    defs = build_definitions(tmp_path, roles={"judge": dead})
    result = defs.resolve_job_def("responses").execute_in_process(
        instance=DagsterInstance.ephemeral(),
        run_config={"ops": {"judged_responses_assets": {"config": {"limit": 2}}}},
        raise_on_error=False,
    )
    assert not result.success
    message = " ".join(
        str(e.event_specific_data)
        for e in result.all_events
        if e.event_type_value.endswith("FAILURE")
    )
    assert "model role 'judge'" in message and "setting base_url" in message
    assert "127.0.0.1:1" in message
    assert not (tmp_path / "storage" / "judged_responses.parquet").exists()  # no body ran


def responses_run(tmp_path, generator: LLMResource, judge_role: LLMResource, limit: int):
    resources = {
        "io_manager": ParquetIOManager(base_dir=str(tmp_path / "storage")),
        "generator": generator,
        "judge": judge_role,
    }
    result = materialize(
        [seed_instructions.asset, judged_responses_assets.asset],
        resources=resources,
        run_config={"ops": {"judged_responses_assets": {"config": {"limit": limit}}}},
        instance=DagsterInstance.ephemeral(),
    )
    assert result.success
    (mat,) = [
        e.materialization
        for e in result.get_asset_materialization_events()
        if e.asset_key.path == ["judged_responses"]
    ]
    return {k: v.value for k, v in mat.metadata.items()}


def test_two_servers_in_one_run_cached_per_role(tmp_path, llama_server, second_llama_server):
    cache = str(tmp_path / "cache.sqlite")

    def role(role_name: str, url: str, model: str) -> LLMResource:
        return LLMResource(
            role=role_name, backend="openai", base_url=url, model=model, cache_path=cache
        )

    gen = role("generator", llama_server, "smollm2")
    md = responses_run(tmp_path, gen, role("judge", second_llama_server, "smollm2-judge"), 4)
    assert md["role_generator"] == "openai:smollm2"
    assert md["role_judge"] == "openai:smollm2-judge"
    assert md["generator_calls"] == 4 and md["judge_calls"] >= 1
    kept = pl.read_parquet(tmp_path / "storage" / "judged_responses.parquet")
    for prov in kept["provenance"].to_list():
        assert prov["role"] == "generator" and prov["model"] == "smollm2"
        assert [(r["role"], r["model"]) for r in prov["roles"]] == [
            ("generator", "smollm2"),
            ("judge", "smollm2-judge"),
        ]
    judged = md["judge_calls"]

    again = responses_run(tmp_path, gen, role("judge", second_llama_server, "smollm2-judge"), 4)
    assert again["generator_calls"] == 0 and again["judge_calls"] == 0
    assert again["generator_cache_hits"] == 4 and again["judge_cache_hits"] == judged

    # another judge model: only the judge's calls are made again
    other = responses_run(tmp_path, gen, role("judge", second_llama_server, "judge-b"), 4)
    assert other["generator_calls"] == 0 and other["judge_calls"] == judged
    assert other["role_judge"] == "openai:judge-b"


def test_the_embedded_defaults_fill_every_role(tmp_path):
    resources = role_resources(tmp_path, load_settings({}))
    assert set(resources) == set(ROLES)
    assert all(r.backend == "embedded" and r.role == name for name, r in resources.items())
    assert {r.cache_path for r in resources.values()} == {str(tmp_path / "llm_cache.sqlite")}


def test_a_reward_model_role_on_the_pooling_api(tmp_path):
    entries = [
        Entry(("What is 2+2?", "4"), reward=2.5),
        Entry(("What is 2+2?", "5"), reward=-1.0),
    ]
    with ReferenceJudgeServer(entries) as server:
        cache = ResponseCache(tmp_path / "c.sqlite")
        client = LLMClient(
            make_backend("pooling", model="rm", base_url=server.base_url), cache, role="reward"
        )
        items = [("What is 2+2?", "4"), ("What is 2+2?", "5"), ("Capital of France?", "Paris")]
        scores = score_rewards(client, items)
        assert [s.value for s in scores[:2]] == [2.5, -1.0]
        assert all(s.method == "reward_model" for s in scores[:2])
        assert not scores[2].ok and scores[2].error == "http_404" and math.isnan(scores[2].value)
        assert server.requests["pooling"] == 3
        again = score_rewards(client, items[:2])  # cached: nothing sent
        assert [s.value for s in again] == [2.5, -1.0] and server.requests["pooling"] == 3
    assert isinstance(client.backend, PoolingRewardBackend)
    assert client.backend.url == server.base_url[: -len("/v1")] + "/pooling"


# ---------------------------------------------------------------- the reference judge


def test_the_reference_judge_answers_fixture_items_with_logprobs_and_refuses_the_rest():
    entries = [Entry(("Is the sky blue?",), choices={"Yes": 0.9, "No": 0.1})]
    with ReferenceJudgeServer(entries) as server:
        client = LLMClient(make_backend("openai", model="ref", base_url=server.base_url))
        known, unknown = judge(
            client,
            [LLMRequest.chat("Is the sky blue? Answer Yes or No."), LLMRequest.chat("Why?")],
        )
        assert known.method == "logprobs" and known.p("Yes") == pytest.approx(0.9)
        assert known.best == "Yes"
        assert not unknown.ok and unknown.error == "http_404"
        assert server.unknown == ["Why?"]


def test_an_unknown_item_becomes_a_rejected_record_with_its_reason():
    policy = load_policy(SHIPPED_POLICIES / "new_policy.yaml")
    pairs = pl.DataFrame(
        [
            {
                "record_id": "pair-known",
                "prompt": "How do I bake bread?",
                "chosen": "Mix flour, water, yeast and salt, knead, proof and bake.",
                "rejected": "I cannot help with that.",
            },
            {
                "record_id": "pair-unknown",
                "prompt": "What is a mortgage?",
                "chosen": "A loan secured by a property.",
                "rejected": "No.",
            },
        ]
    )
    entries = [
        Entry(("violate", "Mix flour, water, yeast"), choices={"Yes": 0.02, "No": 0.98}),
        Entry(("violate", "I cannot help with that."), choices={"Yes": 0.1, "No": 0.9}),
    ]
    with ReferenceJudgeServer(entries) as server:
        client = LLMClient(
            make_backend("openai", model="ref", base_url=server.base_url), role="judge"
        )
        result = triage_pairs(client, pairs, policy)
    assert result.triaged["pair_id"].to_list() == ["pair-known"]
    assert result.triaged["label"].to_list() == ["RETAIN"]
    (rej,) = result.rejected.to_dicts()
    assert rej["reason"] == "judge_http_404" and "pair-unknown" in rej["detail"]
    assert result.n_in == result.triaged.height + result.review.height + result.rejected.height


def test_every_asset_names_its_roles_as_documented():
    """docs/configuration.md's role table is what the assets declare, both ways."""
    import re
    from pathlib import Path

    defs = build_definitions()
    table = Path(__file__).resolve().parent.parent / "docs" / "configuration.md"
    documented: dict[str, set[str]] = {}
    for line in table.read_text().splitlines():
        m = re.match(r"\| `(\w+)` \| [^|]+ \| (.+) \|$", line)
        if m and m.group(1) in ROLES:
            documented[m.group(1)] = set(re.findall(r"`(\w+)`", m.group(2)))
    assert set(documented) == set(ROLES)
    declared: dict[str, set[str]] = {role: set() for role in ROLES}
    for a in defs.get_repository_def().assets_defs_by_key.values():
        keys = {k.to_user_string() for k in a.keys}
        for role in set(a.required_resource_keys) & set(ROLES):
            declared[role].add(
                min(keys & documented[role]) if keys & documented[role] else min(keys)
            )
    assert "llm" not in {
        k
        for a in defs.get_repository_def().assets_defs_by_key.values()
        for k in a.required_resource_keys
    }
    assert declared == documented


def test_a_partial_override_in_run_config_keeps_the_other_settings(
    tmp_path, monkeypatch, llama_server
):
    """Setting one field of a role in run config (here a timeout) keeps the backend, URL
    and model the environment gave it, and the metadata says which model answered."""
    monkeypatch.setenv("ALIGNFOUNDRY_GENERATOR_BACKEND", "openai")
    monkeypatch.setenv("ALIGNFOUNDRY_GENERATOR_BASE_URL", llama_server)
    monkeypatch.setenv("ALIGNFOUNDRY_GENERATOR_MODEL", "smollm2")
    defs = build_definitions(tmp_path)
    result = defs.resolve_job_def("responses").execute_in_process(
        instance=DagsterInstance.ephemeral(),
        run_config={
            "ops": {"judged_responses_assets": {"config": {"limit": 2}}},
            "resources": {"generator": {"config": {"timeout_s": 30.0}}},
        },
    )
    assert result.success
    (mat,) = [
        e.materialization
        for e in result.get_asset_materialization_events()
        if e.asset_key.path == ["judged_responses"]
    ]
    assert mat.metadata["role_generator"].value == "openai:smollm2"
    assert mat.metadata["generator_calls"].value == 2


def test_every_default_path_lives_under_the_home(tmp_path, monkeypatch):
    from assets.resources import QualityResource, TrainerResource

    monkeypatch.setenv("ALIGNFOUNDRY_HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)  # a checkout's .alignfoundry must never be picked up
    assert LLMResource().cache_file == str(tmp_path / "home" / "llm_cache.sqlite")
    assert TrainerResource().run_dir("x") == tmp_path / "home" / "runs" / "x"
    assert QualityResource().lancedb_dir == tmp_path / "home" / "lancedb"
    assert not (tmp_path / ".alignfoundry").exists()
