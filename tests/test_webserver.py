"""`dagster dev` on 127.0.0.1 loads workspace.yaml and serves the asset graph."""

import os
import signal
import subprocess
import time
from pathlib import Path

import httpx

from conftest import DAGSTER_CLI, free_port

REPO = Path(__file__).resolve().parent.parent
QUERY = "{ assetNodes { assetKey { path } groupName } }"


def test_dagster_dev_serves_the_asset_graph(cli_env):
    port = free_port()
    # A new session with default signal handling, so the whole group can be stopped.
    proc = subprocess.Popen(
        [str(DAGSTER_CLI), "dev", "-w", "workspace.yaml", "-h", "127.0.0.1", "-p", str(port)],
        cwd=REPO,
        env=cli_env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        nodes = None
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                r = httpx.post(f"http://127.0.0.1:{port}/graphql", json={"query": QUERY}, timeout=5)
                data = r.json().get("data") if r.status_code == 200 else None
                if data and data.get("assetNodes"):
                    nodes = data["assetNodes"]
                    break
            except (httpx.HTTPError, ValueError):
                pass
            time.sleep(0.5)
        assert nodes, "dagster dev did not serve the asset graph"
        groups = {"/".join(n["assetKey"]["path"]): n["groupName"] for n in nodes}
        assert groups["seed_instructions"] == "seeds"
        assert groups["judged_responses"] == "responses"
        assert groups["judged_responses_rejected"] == "responses"
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
