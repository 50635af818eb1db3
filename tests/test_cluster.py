"""A production-like instance on one machine: PostgreSQL for run, event-log and schedule
storage, Redis as the Celery broker, two Celery workers (dagster-celery) as the executor.
One family job runs end to end there (generation, checks, the gate, training through
Pipes), its steps spread over both workers, a worker killed mid-step gives its step back,
and the rows are the ones the default instance makes.

The services are Debian's `postgresql` and `redis-server` (`make services` installs them);
where they are missing the test is skipped with the reason.
"""

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import polars as pl
import pytest
import yaml
from dagster import DagsterEventType, DagsterInstance, DagsterRunStatus

from pipelines import services
from pipelines.definitions import build_definitions, celery_config

from conftest import DAGSTER_CLI

REPO = Path(__file__).resolve().parent.parent
WHY_NOT = services.available()
pytestmark = [pytest.mark.slow, pytest.mark.skipif(bool(WHY_NOT), reason=WHY_NOT or "ok")]
CELERY = Path(sys.executable).parent / "dagster-celery"


@pytest.fixture
def cluster(tmp_path):
    info = services.start(tmp_path / "services")
    dagster_home = tmp_path / "dagster"
    dagster_home.mkdir()
    (dagster_home / "dagster.yaml").write_text(
        yaml.safe_dump({"storage": info["storage"], "telemetry": {"enabled": False}})
    )
    env = {
        **os.environ,
        "ALIGNFOUNDRY_HOME": str(tmp_path / "home"),
        "DAGSTER_HOME": str(dagster_home),
        "ALIGNFOUNDRY_EXECUTOR": "celery",
        "ALIGNFOUNDRY_CELERY_BROKER": info["broker"],
        "DAGSTER_DISABLE_TELEMETRY": "1",
        "PYTHONPATH": str(REPO),
        # dagster-celery starts `celery` from PATH
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
    }
    celery_yaml = tmp_path / "celery.yaml"
    celery_yaml.write_text(yaml.safe_dump({"execution": {"config": celery_config(info["broker"])}}))
    workers = [
        subprocess.Popen(
            [
                str(CELERY),
                "worker",
                "start",
                "-A",
                "dagster_celery.app",
                "-y",
                str(celery_yaml),
                "-n",
                f"w{k}",
                "--",
                "-c",
                "1",
            ],
            cwd=REPO,
            env=env,
            stdout=open(tmp_path / f"worker{k}.log", "wb"),  # noqa: SIM115 (the process owns it)
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        for k in (1, 2)
    ]
    try:
        yield env, workers, info
    finally:
        for w in workers:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(w.pid, signal.SIGKILL)
        services.stop(tmp_path / "services")


def trace_run(env: dict, tmp_path: Path, config: dict) -> subprocess.Popen:
    from synth.trace.policy import SHIPPED_POLICIES, load_policy

    version = load_policy(SHIPPED_POLICIES / "new_policy.yaml").version
    instance = DagsterInstance.from_config(env["DAGSTER_HOME"])
    instance.add_dynamic_partitions("trace_policy_versions", [version])
    run_config = tmp_path / "run.yaml"
    run_config.write_text(json.dumps(config))
    return subprocess.Popen(
        [
            str(DAGSTER_CLI),
            "job",
            "execute",
            "-m",
            "pipelines.definitions",
            "-j",
            "trace",
            "--tags",
            json.dumps({"dagster/partition": version}),
            "-c",
            str(run_config),
        ],
        cwd=REPO,
        env=env,
        stdout=open(tmp_path / "run.log", "wb"),  # noqa: SIM115 (the process owns it)
        stderr=subprocess.STDOUT,
    )


TRACE_CONFIG = {
    "ops": {
        "trace_triage_assets": {"config": {"threshold": 0.3, "review_margin": 0.01}},
        "trace_model_assets": {"config": {"max_steps": 2, "max_length": 128, "gold_batch_size": 6}},
        "trace_eval": {"config": {"max_new_tokens": 12, "max_length": 128}},
    }
}


def test_a_family_job_on_postgres_and_two_celery_workers(cluster, tmp_path):
    env, workers, info = cluster
    # The default instance first: its rows, and the LLM answers cached for the cluster run.
    default_home = tmp_path / "home"
    defs = build_definitions(default_home)
    from synth.trace.policy import SHIPPED_POLICIES, load_policy

    version = load_policy(SHIPPED_POLICIES / "new_policy.yaml").version
    local = DagsterInstance.ephemeral()
    local.add_dynamic_partitions("trace_policy_versions", [version])
    base = defs.resolve_job_def("trace").execute_in_process(
        instance=local, partition_key=version, run_config=TRACE_CONFIG, raise_on_error=False
    )
    assert base.success
    storage = default_home / "storage"
    expected = pl.read_parquet(storage / "trace_triage" / f"{version}.parquet").sort("pair_id")
    for p in ("trace_triage", "trace_curated.parquet", "trace_model.parquet", "trace_eval.parquet"):
        target = storage / p
        if target.is_dir():
            for f in target.iterdir():
                f.unlink()
        elif target.exists():
            target.unlink()

    # The same job from the CLI, on Postgres with Celery: kill one worker's pool process
    # while a step runs there.
    proc = trace_run(env, tmp_path, TRACE_CONFIG)
    instance = DagsterInstance.from_config(env["DAGSTER_HOME"])
    killed = None
    deadline = time.monotonic() + 900
    while proc.poll() is None and time.monotonic() < deadline:
        runs = instance.get_runs()
        if killed is None and runs:
            starts = instance.get_records_for_run(
                runs[0].run_id, of_type=DagsterEventType.STEP_START
            ).records
            model = [r for r in starts if r.event_log_entry.step_key == "trace_model_assets"]
            if model:  # the pool process running the training step: kill it outright
                time.sleep(3)
                killed = model[0].event_log_entry.dagster_event.pid
                os.kill(killed, signal.SIGKILL)
        time.sleep(0.5)
    assert proc.poll() is not None, "the run hung"
    log = (tmp_path / "run.log").read_text(errors="replace")
    assert instance.get_runs(), f"no run was recorded:\n{log[-3000:]}"
    (run,) = instance.get_runs()
    assert run.status == DagsterRunStatus.SUCCESS, log[-3000:]
    assert killed is not None, "the training step never started"
    records = instance.get_records_for_run(run.run_id).records
    steps = [
        r.event_log_entry
        for r in records
        if r.event_log_entry.dagster_event
        and r.event_log_entry.dagster_event.event_type == DagsterEventType.STEP_START
    ]
    hosts = {e.dagster_event.pid for e in steps}  # a step's process: a pool process of a worker
    assert len(hosts) >= 2, "every step ran in one process"
    # The killed step went back to the queue and ran again, in another process.
    model_pids = [e.dagster_event.pid for e in steps if e.step_key == "trace_model_assets"]
    assert len(model_pids) >= 2 and model_pids[-1] != killed, model_pids
    got = pl.read_parquet(storage / "trace_triage" / f"{version}.parquet").sort("pair_id")
    assert got.drop("provenance").equals(expected.drop("provenance"))
    assert (storage / "trace_model.parquet").exists()
