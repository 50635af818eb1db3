"""Shared fixtures: the embedded model, a real llama.cpp server, a deliberately faulty server."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

os.environ.setdefault("DAGSTER_DISABLE_TELEMETRY", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

REPO = Path(__file__).resolve().parent.parent
SHARED_DATA = REPO.parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.exists():
        pytest.skip(f"real public data not found at {SHARED_DATA}")
    return SHARED_DATA


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


DAGSTER_CLI = Path(sys.executable).parent / "dagster"


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


@pytest.fixture(scope="session")
def llama_server():
    """llama.cpp's OpenAI-compatible server on 127.0.0.1, in its own process."""
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "synth.llm.local_server", "--port", str(port), "--parallel", "8"],
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
    from pipelines.partitions import TRACE_POLICY_VERSIONS
    from synth.trace.policy import SHIPPED_POLICIES, load_policy

    version = load_policy(SHIPPED_POLICIES / "new_policy.yaml").version
    instance.add_dynamic_partitions(TRACE_POLICY_VERSIONS.name, [version])
    return version
