"""Processes die with their run: a Pipes child (training, evaluation) is stopped when its
step fails or times out, and dies when the step process is killed outright."""

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

from sleeper_job import run

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
