"""The policy sensor: cursor-based, one run request per new policy version."""

import json
import shutil

import pytest
from dagster import (
    AssetCheckEvaluation,
    AssetCheckSeverity,
    AssetKey,
    AssetMaterialization,
    AssetSelection,
    DagsterInstance,
    DefaultSensorStatus,
    RunRequest,
    SkipReason,
    build_sensor_context,
    evaluate_automation_conditions,
)

from pipelines.automation import TRAINING_ASSETS
from pipelines.definitions import build_definitions
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
    # The version becomes a triage partition, and the run triages that partition.
    assert req.partition_key == v1
    (added,) = first.dynamic_partitions_requests
    assert added.partitions_def_name == "trace_policy_versions" and list(added.partition_keys) == [
        v1
    ]

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
        and req2.partition_key == v2
    )
    assert [list(r.partition_keys) for r in second.dynamic_partitions_requests] == [[v2]]
    assert json.loads(second.cursor) == {str(policy): v2}


def test_unreadable_policy_is_skipped_not_fatal(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: [unclosed")
    result = evaluate(build_policy_sensor([bad]), None)
    assert isinstance(result, SkipReason) and "1 unreadable" in result.skip_message


def test_inbox_sensor_runs_the_matching_family_once_per_file_version(tmp_path):
    from pipelines.automation import build_inbox_sensor
    from pipelines.jobs import jobs

    sensor = build_inbox_sensor(tmp_path / "inbox", jobs)
    assert isinstance(evaluate(sensor, None), SkipReason)  # no inbox yet
    (tmp_path / "inbox" / "preference_pairs").mkdir(parents=True)
    (tmp_path / "inbox" / "instructions").mkdir()
    pairs = tmp_path / "inbox" / "preference_pairs" / "batch1.jsonl"
    shutil.copy(SHIPPED_POLICIES.parent.parent / "seeds" / "preference_pairs.jsonl", pairs)
    (tmp_path / "inbox" / "instructions" / "notes.txt").write_text("not a seed file")
    first = evaluate(sensor, None)
    (req,) = first.run_requests
    assert req.job_name == "trace"
    # New pairs are triaged under the current policy (the shipped one here), as its partition.
    shipped = SHIPPED_POLICIES / "new_policy.yaml"
    assert req.run_config == {
        "ops": {
            "seed_preference_pairs": {"config": {"source": str(pairs)}},
            "trace_policy": {"config": {"path": str(shipped)}},
        }
    }
    assert req.partition_key == load_policy(shipped).version
    assert isinstance(evaluate(sensor, first.cursor), SkipReason)  # seen, unchanged

    ins = tmp_path / "inbox" / "instructions" / "more.jsonl"
    ins.write_text(json.dumps({"instruction": "Name a colour."}) + "\n")
    with pairs.open("a") as f:  # a changed file is a new version
        f.write("\n")
    second = evaluate(sensor, first.cursor)
    assert sorted((r.job_name, r.tags["alignfoundry/inbox_file"]) for r in second.run_requests) == [
        ("responses", str(ins)),
        ("trace", str(pairs)),
    ]


def test_failed_runs_are_recorded(tmp_path):
    from dagster import build_run_status_sensor_context

    from pipelines.automation import build_failure_sensor
    from pipelines.definitions import build_definitions

    log = tmp_path / "failures.jsonl"
    sensor = build_failure_sensor(log)
    defs = build_definitions(tmp_path)
    with DagsterInstance.ephemeral() as instance:
        result = defs.resolve_job_def("seeds").execute_in_process(
            instance=instance,
            raise_on_error=False,
            run_config={
                "ops": {"seed_personas": {"config": {"source": str(tmp_path / "no.jsonl")}}}
            },
        )
        assert not result.success
        failure = next(e for e in result.all_events if e.event_type_value == "PIPELINE_FAILURE")
        context = build_run_status_sensor_context(
            sensor_name="run_failure_recorder",
            dagster_instance=instance,
            dagster_run=result.dagster_run,
            dagster_event=failure,
        ).for_run_failure()
        sensor(context)
    (record,) = [json.loads(line) for line in log.read_text().splitlines()]
    assert record["job"] == "seeds" and record["run_id"] == result.run_id
    assert record["failed_steps"] == ["seed_personas"]


@pytest.mark.parametrize("gate_passes", [False, True])
def test_training_waits_for_its_gates(tmp_path, gate_passes):
    # Upstream data is updated; training is requested only when the gate on it passed.
    defs = build_definitions(tmp_path)
    instance = DagsterInstance.ephemeral()
    graph = defs.resolve_asset_graph()
    targets = AssetSelection.assets(*TRAINING_ASSETS)
    first = evaluate_automation_conditions(defs=defs, instance=instance, asset_selection=targets)
    assert first.total_requested == 0  # nothing to train on yet
    gates = {
        "trace_model": ("trace_curated", "trace_curated_ready_for_training"),
        "paligner_model": ("ultraprompt_curated", "ultraprompt_curated_ready_for_training"),
        "personaknob_model": ("personaknob_pairs", "personaknob_pairs_ready_for_training"),
        "personaatlas_model": ("personaatlas_ppopt", "personaatlas_ppopt_ready_for_training"),
        "medad_model": ("medad_vqa", "medad_vqa_ready_for_training"),
    }
    for target, (gated, gate) in gates.items():
        parents = graph.get(AssetKey(target)).parent_keys
        assert AssetKey(gated) in parents
        for parent in parents:
            instance.report_runless_asset_event(AssetMaterialization(parent))
        # Every check on every parent passes, but the gate when gate_passes is False.
        for ck in [ck for ck in graph.asset_check_keys if ck.asset_key in parents]:
            instance.report_runless_asset_event(
                AssetCheckEvaluation(
                    asset_key=ck.asset_key,
                    check_name=ck.name,
                    passed=gate_passes or ck.name != gate,
                    severity=AssetCheckSeverity.ERROR,
                )
            )
    second = evaluate_automation_conditions(
        defs=defs, instance=instance, asset_selection=targets, cursor=first.cursor
    )
    requested = {k: second.get_num_requested(AssetKey(k)) for k in TRAINING_ASSETS}
    assert requested == {k: int(gate_passes) for k in TRAINING_ASSETS}
    sensor = defs.get_sensor_def("training_automation")
    assert sensor.default_status == DefaultSensorStatus.STOPPED


def test_a_failed_run_launched_from_the_dagster_cli_is_recorded(tmp_path, cli_env):
    """The sensor as the daemon ticks it, against a run that `dagster asset materialize`
    launched (such a run has no code-location origin): it is recorded."""
    import subprocess

    from dagster import build_sensor_context

    from pipelines.definitions import build_definitions

    from conftest import materialize_cmd

    defs = build_definitions(tmp_path)
    sensor = defs.get_sensor_def("run_failure_recorder")
    instance = DagsterInstance.from_config(cli_env["DAGSTER_HOME"])
    repo = defs.get_repository_def()
    # as the daemon ticks it: inside its code location's repository
    tick = dict(instance=instance, repository_def=repo, repository_name=repo.name)
    first = sensor.evaluate_tick(build_sensor_context(**tick))
    missing = tmp_path / "no.jsonl"
    config = tmp_path / "run.yaml"
    config.write_text(json.dumps({"ops": {"seed_personas": {"config": {"source": str(missing)}}}}))
    proc = subprocess.run(
        materialize_cmd("seed_personas,seed_personas_rejected", "-c", str(config)),
        env=cli_env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode != 0
    sensor.evaluate_tick(build_sensor_context(cursor=first.cursor, **tick))
    (record,) = [
        json.loads(line) for line in (tmp_path / "failures.jsonl").read_text().splitlines()
    ]
    assert record["job"] == "__ASSET_JOB" and record["failed_steps"] == ["seed_personas"]
    assert "no such file or folder" in record["error"] or record["error"]


def test_a_malformed_policy_beside_a_valid_one_costs_only_itself(tmp_path):
    from pipelines.sensors import build_policy_sensor
    from synth.trace.policy import SHIPPED_POLICIES, load_policy

    bad = tmp_path / "bad.yaml"
    bad.write_text(
        "name: x\ntitle: t\ndescription: d\ncategories:\n  - {id: a, name: A, tier: 1, description: d}\n"
        "exceptions: [be kind]\nrequirements: [no insults]\n"
    )
    good = SHIPPED_POLICIES / "strict.yaml"
    sensor = build_policy_sensor([str(bad), str(good)])
    with DagsterInstance.ephemeral() as instance:
        result = sensor(build_sensor_context(instance=instance))
    (request,) = result.run_requests
    assert request.partition_key == load_policy(good).version
    assert str(bad) not in json.loads(result.cursor)


def test_the_policy_command_names_the_field_on_one_line(tmp_path, cli_env):
    import subprocess

    from conftest import DAGSTER_CLI

    bad = tmp_path / "bad.yaml"
    bad.write_text(
        "name: x\ntitle: t\ndescription: d\ncategories:\n  - {id: a, name: A, tier: 1, description: d}\n"
        "exceptions: [be kind]\nrequirements: []\n"
    )
    alignfoundry = DAGSTER_CLI.parent / "alignfoundry"
    proc = subprocess.run(
        [str(alignfoundry), "policy", str(bad)], env=cli_env, capture_output=True, text=True
    )
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1
    assert "exceptions[0]: should be a mapping with id and text" in proc.stderr
    broken = tmp_path / "broken.yaml"
    broken.write_text("name: [unclosed\n  title: t\n")
    proc = subprocess.run(
        [str(alignfoundry), "policy", str(broken)], env=cli_env, capture_output=True, text=True
    )
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1
    assert "invalid YAML" in proc.stderr
