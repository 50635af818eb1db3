"""Processes die with their run: a Pipes child (training, evaluation) is stopped when its
step fails or times out, and dies when the step process is killed outright; the step
workers of a `dagster asset materialize` die when that CLI is killed with -9."""

import contextlib
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from sleeper_job import run

from conftest import materialize_cmd
from faulty_server import FaultyOpenAIServer

REPO = Path(__file__).resolve().parent.parent


def pids_with(marker: str) -> list[int]:
    """Processes whose command line carries `marker` (the sleeping child)."""
    out = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            except OSError:
                continue
            if f"time.sleep({marker})" in cmdline:
                out.append(int(entry.name))
    return out


def wait_for(predicate, timeout_s: float = 60.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.2)
    return False


def marker() -> str:
    return f"{random.randint(100000, 999999)}.25"


def test_a_step_that_times_out_stops_its_child(tmp_path):
    m = marker()
    result = run(m, str(tmp_path), fail_after_s=4)
    assert not result.success
    failure = " ".join(str(e.event_specific_data) for e in result.all_events if e.is_failure)
    assert "step timed out after 4s" in failure
    assert wait_for(lambda: not pids_with(m), 15), f"child {pids_with(m)} outlived its step"


def test_a_killed_step_process_takes_its_child_with_it(tmp_path):
    m = marker()
    worker = subprocess.Popen(
        [sys.executable, str(REPO / "tests" / "sleeper_job.py"), m, str(tmp_path)],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": f"{REPO}:{REPO / 'tests'}"},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        assert wait_for(lambda: bool(pids_with(m)), 90), "the child never started"
        os.kill(worker.pid, signal.SIGKILL)  # no handler runs: only the kernel can help
        worker.wait(10)
        assert wait_for(lambda: not pids_with(m), 15), f"child {pids_with(m)} outlived a kill -9"
    finally:
        for pid in pids_with(m):
            os.kill(pid, signal.SIGKILL)
        if worker.poll() is None:
            worker.kill()


def descendants(pid: int) -> set[int]:
    """Every process below `pid` (children, their children, ...), from /proc."""
    parents: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            parents.setdefault(ppid, []).append(int(entry.name))
    out, todo = set(), [pid]
    while todo:
        for child in parents.get(todo.pop(), []):
            out.add(child)
            todo.append(child)
    return out


def alive(pid: int) -> bool:
    try:
        state = (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"  # a zombie has exited: only its entry waits for a parent


@pytest.mark.slow
def test_kill_9_of_the_materialize_cli_takes_its_step_workers_with_it(tmp_path, cli_env):
    # Every role on a server that holds each request: the judged responses' step worker
    # sits calling the LLM when the CLI is killed, and must not go on calling it.
    with FaultyOpenAIServer("hang", hang_s=120) as server:
        env = {
            **cli_env,
            "ALIGNFOUNDRY_LLM_BACKEND": "openai",
            "ALIGNFOUNDRY_LLM_BASE_URL": server.base_url,
            "ALIGNFOUNDRY_LLM_MODEL": "faulty",
        }
        cli = subprocess.Popen(
            materialize_cmd(
                "seed_instructions,seed_instructions_rejected,judged_responses,judged_responses_rejected"
            ),
            cwd=REPO,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        workers: set[int] = set()
        try:
            assert wait_for(lambda: server.in_flight > 0, 180), "the step never called the LLM"
            workers = descendants(cli.pid)
            assert workers and cli.poll() is None, "the run ended before the kill"
            os.kill(cli.pid, signal.SIGKILL)
            cli.wait(10)
            assert wait_for(lambda: not any(alive(p) for p in workers), 20), (
                f"outlived the CLI: {[p for p in workers if alive(p)]}"
            )
            calls = server.requests
            time.sleep(2)
            assert server.requests == calls, "the LLM is still being called"
        finally:
            for p in descendants(cli.pid) | workers:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(p, signal.SIGKILL)
            if cli.poll() is None:
                cli.kill()
