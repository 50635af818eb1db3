"""The policy sensor: cursor-based, one run request per new policy version."""

import json
import shutil

from dagster import DagsterInstance, RunRequest, SkipReason, build_sensor_context

from pipelines.sensors import build_policy_sensor
from synth.trace.policy import SHIPPED_POLICIES, load_policy


def evaluate(sensor, cursor):
    with DagsterInstance.ephemeral() as instance:
        return sensor(build_sensor_context(instance=instance, cursor=cursor))


def test_policy_sensor_requests_a_run_per_new_version(tmp_path):
    policy = tmp_path / "policy.yaml"
    shutil.copy(SHIPPED_POLICIES / "strict.yaml", policy)
    sensor = build_policy_sensor([policy])

    first = evaluate(sensor, None)
    (req,) = first.run_requests
    v1 = load_policy(policy).version
    assert isinstance(req, RunRequest) and req.run_key == f"{policy}@{v1}"
    assert req.run_config == {"ops": {"trace_policy": {"config": {"path": str(policy)}}}}
    assert json.loads(first.cursor) == {str(policy): v1}

    # unchanged file: nothing to do, cursor kept
    assert isinstance(evaluate(sensor, first.cursor), SkipReason)

    # the policy shifts: a new version, a new run
    shutil.copy(SHIPPED_POLICIES / "new_policy.yaml", policy)
    second = evaluate(sensor, first.cursor)
    (req2,) = second.run_requests
    v2 = load_policy(policy).version
    assert (
        v2 != v1
        and req2.run_key == f"{policy}@{v2}"
        and req2.tags["alignfoundry/policy_version"] == v2
    )
    assert json.loads(second.cursor) == {str(policy): v2}


def test_unreadable_policy_is_skipped_not_fatal(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: [unclosed")
    result = evaluate(build_policy_sensor([bad]), None)
    assert isinstance(result, SkipReason) and "1 unreadable" in result.skip_message
