"""Bad settings and inputs fail fast, naming the setting, file or record, before any
partial output is written as if complete."""

import time

import pytest
from dagster import DagsterInstance

from assets.resources import LLMResource
from pipelines.definitions import build_definitions
from synth.llm import InvalidSchemaError, LLMClient, LLMRequest, OpenAICompatBackend

from conftest import free_port
from faulty_server import FaultyOpenAIServer


def failure_text(result) -> str:
    errors = (getattr(ev.event_specific_data, "error", None) for ev in result.all_events)
    return "\n".join(e.to_string() for e in errors if e is not None)


def run_responses(tmp_path, llm: LLMResource):
    defs = build_definitions(tmp_path, llm=llm)
    return defs.resolve_job_def("responses").execute_in_process(
        instance=DagsterInstance.ephemeral(), raise_on_error=False
    )


def test_unknown_backend_names_the_setting(tmp_path):
    result = run_responses(
        tmp_path, LLMResource(backend="gpt-in-a-box", cache_path=str(tmp_path / "c.sqlite"))
    )
    assert not result.success
    text = failure_text(result)
    assert "model role '" in text and "unknown LLM backend 'gpt-in-a-box' (setting backend)" in text
    assert not (tmp_path / "storage" / "judged_responses.parquet").exists()
    assert not (tmp_path / "storage" / "judged_responses_rejected.parquet").exists()


def test_server_that_does_not_answer_fails_fast(tmp_path):
    url = f"http://127.0.0.1:{free_port()}/v1"
    t = time.perf_counter()
    result = run_responses(
        tmp_path,
        LLMResource(
            backend="openai", base_url=url, model="m", cache_path=str(tmp_path / "c.sqlite")
        ),
    )
    assert not result.success
    assert time.perf_counter() - t < 60
    assert f"LLM server at {url} (setting base_url) does not answer" in failure_text(result)
    assert not (tmp_path / "storage" / "judged_responses.parquet").exists()


def test_missing_seed_file_names_the_file_and_writes_nothing(tmp_path):
    defs = build_definitions(tmp_path)
    missing = tmp_path / "nope" / "seeds.jsonl"
    result = defs.resolve_job_def("seeds").execute_in_process(
        instance=DagsterInstance.ephemeral(),
        run_config={"ops": {"seed_instructions": {"config": {"source": str(missing)}}}},
        raise_on_error=False,
    )
    assert not result.success
    assert f"seed source '{missing}': no such file or folder" in failure_text(result)
    assert not (tmp_path / "storage" / "seed_instructions.parquet").exists()
    assert not (tmp_path / "storage" / "seed_instructions_rejected.parquet").exists()


def test_invalid_json_schema_fails_before_any_call():
    with FaultyOpenAIServer("ok") as s:
        client = LLMClient(OpenAICompatBackend(s.base_url, "m"))
        good = LLMRequest.chat("fine")
        bad = LLMRequest.chat(
            "x", json_schema={"type": "object", "required": "name"}, template_id="persona_map"
        )
        with pytest.raises(
            InvalidSchemaError, match=r"request 1 \(template persona_map\): invalid JSON schema"
        ):
            client.generate([good, bad])
        assert s.requests == 0


def test_openai_backend_needs_url_and_model():
    from synth.llm import make_backend

    with pytest.raises(ValueError, match=r"setting base_url"):
        make_backend("openai", model="m")
    with pytest.raises(ValueError, match=r"setting model"):
        make_backend("openai", base_url="http://127.0.0.1:1/v1", check_server=False)
