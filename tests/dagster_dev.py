"""`dagster dev` from workspace.yaml on 127.0.0.1, started and stopped as a whole process group."""

import contextlib
import os
import signal
import subprocess
import time
from pathlib import Path

import httpx

from conftest import DAGSTER_CLI, free_port

REPO = Path(__file__).resolve().parent.parent
ASSET_NODES = "{ assetNodes { assetKey { path } groupName } }"


@contextlib.contextmanager
def dagster_dev(env: dict[str, str], timeout_s: float = 120):
    """Yields (base_url, asset nodes) once the webserver serves the asset graph."""
    port = free_port()
    # A new session with default signal handling, so the whole group can be stopped.
    proc = subprocess.Popen(
        [str(DAGSTER_CLI), "dev", "-w", "workspace.yaml", "-h", "127.0.0.1", "-p", str(port)],
        cwd=REPO,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        nodes = None
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline and nodes is None:
            try:
                r = httpx.post(f"{url}/graphql", json={"query": ASSET_NODES}, timeout=5)
                data = r.json().get("data") if r.status_code == 200 else None
                if data and data.get("assetNodes"):
                    nodes = data["assetNodes"]
            except (httpx.HTTPError, ValueError):
                pass
            if nodes is None:
                time.sleep(0.5)
        assert nodes, "dagster dev did not serve the asset graph"
        yield url, nodes
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
