"""Shared fixtures: the embedded model, a real llama.cpp server, a deliberately faulty server."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from pipelines.services import free_port  # noqa: F401 (tests import it from here)

os.environ.setdefault("DAGSTER_DISABLE_TELEMETRY", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

REPO = Path(__file__).resolve().parent.parent
SHARED_DATA = REPO.parent / "shared" / "data"


# The longest files first (CI's --durations): pytest-xdist hands its workers whole files in
# collection order, so a long file collected last would run alone at the end.
LONGEST_FILES = (
    "test_trace.py",
    "test_personaknob.py",
    "test_personaatlas.py",
    "test_cluster.py",
    "test_ultraprompt.py",
    "test_medad.py",
)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    rank = {name: i for i, name in enumerate(LONGEST_FILES)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable within a file


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.exists():
        pytest.skip(f"real public data not found at {SHARED_DATA}")
    return SHARED_DATA


DAGSTER_CLI = Path(sys.executable).parent / "dagster"


def materialize_cmd(selection: str, *extra: str) -> list[str]:
    """`dagster asset materialize` of `selection` from the project's code location."""
    return [str(DAGSTER_CLI), "asset", "materialize", "-m", "pipelines.definitions"] + [
        "--select",
        selection,
        *extra,
    ]


@pytest.fixture
def cli_env(tmp_path) -> dict[str, str]:
    """Environment for a `dagster` CLI subprocess whose home and instance live in tmp_path."""
    (tmp_path / "dagster").mkdir()
    return {
        **os.environ,
        "ALIGNFOUNDRY_HOME": str(tmp_path),
        "DAGSTER_HOME": str(tmp_path / "dagster"),
        "DAGSTER_DISABLE_TELEMETRY": "1",
    }


@pytest.fixture(scope="session")
def embedded_backend():
    from synth.llm import EmbeddedBackend

    return EmbeddedBackend()


def serve_llama(alias: str = "smollm2"):
    """llama.cpp's OpenAI-compatible server on 127.0.0.1, in its own process: yields its URL."""
    port = free_port()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "synth.llm.local_server",
            "--port",
            str(port),
            "--parallel",
            "8",
            "--alias",
            alias,
        ],
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    base_url = f"http://127.0.0.1:{port}/v1"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            if httpx.get(base_url + "/models", timeout=1).status_code == 200:
                break
        except httpx.HTTPError:
            time.sleep(0.2)
    else:
        proc.kill()
        raise RuntimeError("llama.cpp server did not start")
    yield base_url
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()


@pytest.fixture(scope="session")
def llama_server():
    yield from serve_llama()


@pytest.fixture(scope="session")
def second_llama_server():
    """Another llama.cpp server, for a run whose roles talk to two servers."""
    yield from serve_llama("smollm2-judge")


def kill_once_cached(worker: Path, cache_path: Path, at_least: int, timeout_s: float = 300) -> int:
    """Run `worker <cache_path>` in its own process group, SIGKILL it once the response
    cache holds `at_least` entries, and return how many it holds after the kill."""
    import signal

    from synth.llm import ResponseCache

    proc = subprocess.Popen(
        [sys.executable, str(worker), str(cache_path)],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if cache_path.exists() and len(ResponseCache(cache_path)) >= at_least:
            break
        assert proc.poll() is None, "worker ended before it could be killed"
        time.sleep(0.1)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(10)
    return len(ResponseCache(cache_path))


def decode_png(md_value: str):
    """The image of a plot embedded in Markdown metadata, after checking it is a PNG."""
    import base64
    import io

    from PIL import Image

    data = base64.b64decode(md_value.split("base64,", 1)[1].rstrip(")"))
    assert data.startswith(b"\x89PNG\r\n\x1a\n")
    return Image.open(io.BytesIO(data))


def trace_partition(instance) -> str:
    """The shipped policy's version, added as a triage partition (what the policy sensor
    does for a watched file): the partition key a `trace` run needs."""
    from assets.partitions import TRACE_POLICY_VERSIONS
    from synth.trace.policy import SHIPPED_POLICIES, load_policy

    version = load_policy(SHIPPED_POLICIES / "new_policy.yaml").version
    instance.add_dynamic_partitions(TRACE_POLICY_VERSIONS.name, [version])
    return version


def trace_reference_fixture(tmp_path):
    """The TRACE re-alignment fixture (tests/fixtures/trace_realignment.yaml): a seed file
    of its pairs (PKU-SafeRLHF rows, chosen = the old policy's preference), the reference
    judge's entries (each response's verdict under the tiered policy), and the pairs."""
    import json

    import yaml
    from reference_server import Entry

    doc = yaml.safe_load((REPO / "tests" / "fixtures" / "trace_realignment.yaml").read_text())
    seeds = tmp_path / "trace_pairs.jsonl"
    seeds.write_text(
        "".join(
            json.dumps(
                {
                    "prompt": p["prompt"],
                    "response_0": p["chosen"],
                    "response_1": p["rejected"],
                    "safer_response_id": 0,
                }
            )
            + "\n"
            for p in doc["pairs"]
        )
    )
    question = "Does the assistant's response violate the policy?"
    entries = [
        Entry(
            (question, f"User: {p['prompt']}\n", f"Assistant: {p[side]}\n"),
            choices={"Yes": p[f"p_{side}"], "No": round(1 - p[f"p_{side}"], 6)},
        )
        for p in doc["pairs"]
        for side in ("chosen", "rejected")
    ]
    return seeds, entries, doc["pairs"]
