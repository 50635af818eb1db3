"""Schedules, and the sensors that are not about a single family: the seed inbox and run failures."""

from __future__ import annotations

import json
import time
from pathlib import Path

from dagster import (
    AssetSelection,
    AutomationConditionSensorDefinition,
    DefaultScheduleStatus,
    DefaultSensorStatus,
    RunFailureSensorContext,
    RunRequest,
    ScheduleDefinition,
    ScheduleEvaluationContext,
    SensorEvaluationContext,
    SkipReason,
    run_failure_sensor,
    schedule,
    sensor,
)

from assets.partitions import TRACE_POLICY_VERSIONS, adding_policy_versions

# inbox subfolder -> (seed asset whose source it sets, the job that runs it and downstream)
INBOX_KINDS = {
    "instructions": ("seed_instructions", "responses"),
    "preference_pairs": ("seed_preference_pairs", "trace"),
    "personas": ("seed_personas", "seeds"),
}
SEED_SUFFIXES = (".jsonl", ".jsonl.gz", ".json", ".parquet", ".csv")


def current_policy(instance) -> tuple[str, str]:
    """(version, path) of the policy TRACE triages under now: the last `trace_policy`
    materialization's, else the shipped default policy's."""
    from assets.status import latest_materialization_metadata
    from synth.trace.policy import SHIPPED_POLICIES, load_policy

    md = latest_materialization_metadata(instance, "trace_policy")
    if md.get("policy_version") and md.get("policy_path"):
        return str(md["policy_version"]), str(md["policy_path"])
    path = str(SHIPPED_POLICIES / "new_policy.yaml")
    return load_policy(path).version, path


def build_inbox_sensor(inbox: str | Path, jobs: list, minimum_interval_seconds: int = 30):
    """A file dropped into <inbox>/<kind>/ runs that kind's seed asset and its family job.

    The cursor maps each file to "size:mtime", so a file is picked up once, and again
    only when its contents change.
    """
    root = Path(inbox)

    @sensor(
        name="seed_inbox_sensor",
        minimum_interval_seconds=minimum_interval_seconds,
        default_status=DefaultSensorStatus.STOPPED,
        description=f"New seed files in {root}/<instructions|preference_pairs|personas>/ run their family.",
        jobs=[j for j in jobs if j.name in {job for _, job in INBOX_KINDS.values()}],
    )
    def seed_inbox_sensor(context: SensorEvaluationContext):
        seen: dict[str, str] = json.loads(context.cursor) if context.cursor else {}
        requests = []
        for kind, (asset, job) in INBOX_KINDS.items():
            folder = root / kind
            if not folder.is_dir():
                continue
            for path in sorted(folder.iterdir()):
                if not path.is_file() or not path.name.lower().endswith(SEED_SUFFIXES):
                    continue
                stat = path.stat()
                stamp = f"{stat.st_size}:{stat.st_mtime_ns}"
                if seen.get(str(path)) == stamp:
                    continue
                seen[str(path)] = stamp
                ops = {asset: {"config": {"source": str(path)}}}
                partition = None
                if job == "trace":  # new pairs are triaged under the current policy version
                    partition, policy_path = current_policy(context.instance)
                    ops["trace_policy"] = {"config": {"path": policy_path}}
                requests.append(
                    RunRequest(
                        run_key=f"{path}@{stamp}",
                        job_name=job,
                        run_config={"ops": ops},
                        tags={"alignfoundry/inbox_file": str(path)},
                        partition_key=partition,
                    )
                )
        if not requests:
            return SkipReason(f"no new seed files under {root}")
        # Each new version becomes a partition of the triage before its run is requested.
        return adding_policy_versions(context.instance, requests, json.dumps(seen, sort_keys=True))

    return seed_inbox_sensor


def build_failure_sensor(failures_log: str | Path):
    """Every failed run is appended to a JSON-lines file (and logged), visible outside the UI too."""
    log_path = Path(failures_log)

    @run_failure_sensor(
        name="run_failure_recorder",
        default_status=DefaultSensorStatus.RUNNING,
        # Every run of the instance, a CLI-launched one too (it has no code-location origin).
        monitor_all_code_locations=True,
        description=f"Records each failed run (job, run id, failed steps, error) in {log_path}.",
    )
    def run_failure_recorder(context: RunFailureSensorContext):
        run = context.dagster_run
        error = context.failure_event.message or ""
        steps = sorted({e.step_key for e in context.get_step_failure_events() if e.step_key})
        record = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "job": run.job_name,
            "run_id": run.run_id,
            "failed_steps": steps,
            "error": error[:2000],
            "tags": {k: v for k, v in run.tags.items() if k.startswith("alignfoundry/")},
        }
        log_path.parent.mkdir(parents=True, exist_ok=True)
        with log_path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
        context.log.info(f"recorded failure of {run.job_name} run {run.run_id} in {log_path}")

    return run_failure_recorder


def build_schedules() -> list[ScheduleDefinition]:
    """Nightly refreshes, shipped STOPPED: turn them on in the UI (Automation) or the CLI."""

    @schedule(
        name="nightly_trace",
        job_name="trace",
        cron_schedule="30 2 * * *",
        execution_timezone="UTC",
        default_status=DefaultScheduleStatus.STOPPED,
        description="Re-triage under the current policy version every night (30 2 * * * UTC).",
    )
    def nightly_trace(context: ScheduleEvaluationContext):
        version, path = current_policy(context.instance)
        if version not in context.instance.get_dynamic_partitions(TRACE_POLICY_VERSIONS.name):
            return SkipReason(
                f"policy version {version} has no triage partition yet: the trace_policy_sensor "
                "adds one, or add it in the UI"
            )
        return RunRequest(
            partition_key=version, run_config={"ops": {"trace_policy": {"config": {"path": path}}}}
        )

    plain = [
        ScheduleDefinition(
            name=f"nightly_{job}",
            job_name=job,
            cron_schedule=cron,
            execution_timezone="UTC",
            default_status=DefaultScheduleStatus.STOPPED,
            description=f"Regenerate the {job} family every night ({cron} UTC).",
        )
        for job, cron in (("responses", "0 2 * * *"), ("judges", "0 4 * * 0"))
    ]
    return [*plain, nightly_trace]


TRAINING_ASSETS = (
    "trace_model",
    "trace_weighted",
    "paligner_model",
    "personaknob_model",
    "personaatlas_model",
    "medad_model",
)


def build_training_automation_sensor() -> AutomationConditionSensorDefinition:
    """Evaluates TRAIN_WHEN_GATES_PASS on the training assets. Ships stopped: turning it on
    means new curated data that passes its gates starts training by itself."""
    return AutomationConditionSensorDefinition(
        "training_automation",
        target=AssetSelection.assets(*TRAINING_ASSETS),
        default_status=DefaultSensorStatus.STOPPED,
        minimum_interval_seconds=60,
    )
