"""Partitions shared by assets, sensors and schedules."""

from dagster import DagsterInstance, DynamicPartitionsDefinition, RunRequest, SensorResult

# One partition per TRACE policy version (the file's content hash), added by the policy
# sensor when it sees a new version: the triage under every version is kept side by side,
# and curation and training follow the newest.
TRACE_POLICY_VERSIONS = DynamicPartitionsDefinition(name="trace_policy_versions")


def adding_policy_versions(
    instance: DagsterInstance, requests: list[RunRequest], cursor: str
) -> SensorResult:
    """A sensor's result that first adds, as triage partitions, the policy versions its run
    requests name and the instance does not have yet."""
    known = set(instance.get_dynamic_partitions(TRACE_POLICY_VERSIONS.name))
    new = sorted({r.partition_key for r in requests if r.partition_key} - known)
    return SensorResult(
        run_requests=requests,
        cursor=cursor,
        dynamic_partitions_requests=[TRACE_POLICY_VERSIONS.build_add_request(new)] if new else [],
    )
