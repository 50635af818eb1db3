"""Sensors: a changed policy file adds its new version as a triage partition and requests
a TRACE run for it."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from dagster import RunRequest, SensorEvaluationContext, SkipReason, sensor

from assets.partitions import adding_policy_versions
from synth.trace.policy import PolicyError, load_policy


def build_policy_sensor(
    policy_files: Sequence[str | Path], job_name: str = "trace", minimum_interval_seconds: int = 30
):
    """Watch policy files; the cursor maps each file to the last version (content hash) triaged."""
    files = [str(Path(p)) for p in policy_files]

    @sensor(
        name="trace_policy_sensor",
        job_name=job_name,
        minimum_interval_seconds=minimum_interval_seconds,
        description="Requests a TRACE run when a watched policy file has a new version.",
    )
    def trace_policy_sensor(context: SensorEvaluationContext):
        seen: dict[str, str] = json.loads(context.cursor) if context.cursor else {}
        requests, problems = [], []
        for path in files:
            try:
                version = load_policy(path).version
            except PolicyError as e:
                problems.append(str(e))
                continue
            if seen.get(path) != version:
                seen[path] = version
                requests.append(
                    RunRequest(
                        run_key=f"{path}@{version}",
                        run_config={"ops": {"trace_policy": {"config": {"path": path}}}},
                        tags={"alignfoundry/policy_version": version},
                        partition_key=version,
                    )
                )
        if problems:
            context.log.warning("; ".join(problems))
        if not requests:
            return SkipReason(
                "no policy file changed" + (f" ({len(problems)} unreadable)" if problems else "")
            )
        # Each new version becomes a partition of the triage before its run is requested.
        return adding_policy_versions(context.instance, requests, json.dumps(seen, sort_keys=True))

    return trace_policy_sensor
