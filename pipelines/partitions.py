"""Partitions shared by assets, sensors and schedules."""

from dagster import DynamicPartitionsDefinition

# One partition per TRACE policy version (the file's content hash), added by the policy
# sensor when it sees a new version: the triage under every version is kept side by side,
# and curation and training follow the newest.
TRACE_POLICY_VERSIONS = DynamicPartitionsDefinition(name="trace_policy_versions")
