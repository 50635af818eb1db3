"""The `alignfoundry` console script: config, status and export against a real instance."""

import json
import subprocess
import sys
from pathlib import Path

import datasets
from dagster import DagsterInstance

from pipelines import cli
from pipelines.definitions import build_definitions

ALIGNFOUNDRY = Path(sys.executable).parent / "alignfoundry"


def test_errors_are_one_line_with_a_nonzero_exit(tmp_path, cli_env):
    proc = subprocess.run(
        [str(ALIGNFOUNDRY), "export", "nosuch", "--to", str(tmp_path / "x")],
        env=cli_env,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "alignfoundry: error: unknown family 'nosuch' (exportable: responses, trace, ultraprompt, personaknob, personaatlas, medad)"
    ]
    env = {k: v for k, v in cli_env.items() if k != "DAGSTER_HOME"}
    proc = subprocess.run([str(ALIGNFOUNDRY), "status"], env=env, capture_output=True, text=True)
    assert proc.returncode == 2 and "DAGSTER_HOME is not set" in proc.stderr
    proc = subprocess.run(
        [str(ALIGNFOUNDRY), "export", "trace", "--to", str(tmp_path / "x")],
        env=cli_env,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2 and "trace_curated has not been materialized" in proc.stderr


def test_config_status_and_export(tmp_path, cli_env, monkeypatch, capsys):
    for k in ("ALIGNFOUNDRY_HOME", "DAGSTER_HOME"):
        monkeypatch.setenv(k, cli_env[k])
    monkeypatch.setenv("ALIGNFOUNDRY_LLM_CONCURRENCY", "3")
    assert cli.main(["config", "--json"]) == 0
    cfg = json.loads(capsys.readouterr().out)
    assert cfg["home"] == str(tmp_path)
    assert {r["max_concurrency"] for r in cfg["roles"].values()} == {3}
    assert cfg["roles"]["judge"]["api_key"] in ("set (OPENAI_API_KEY)", "unset (OPENAI_API_KEY)")

    instance = DagsterInstance.get()
    result = (
        build_definitions(tmp_path)
        .resolve_job_def("responses")
        .execute_in_process(
            instance=instance,
            run_config={"ops": {"judged_responses_assets": {"config": {"limit": 3}}}},
        )
    )
    assert result.success
    assert cli.main(["status", "--json"]) == 0
    rows = {r["asset"]: r for r in json.loads(capsys.readouterr().out)}
    assert rows["seed_instructions"]["rows"] == 24
    curated = rows["responses_curated"]
    evaluations = [
        e for e in result.get_asset_check_evaluations() if e.asset_key.path == ["responses_curated"]
    ]
    assert len(evaluations) == 3  # accounted, integrity and drift suites
    assert curated["materialized"] != "never"
    assert sorted(curated["checks_failed"]) == sorted(
        e.asset_check_key.name for e in evaluations if not e.passed
    )
    assert curated["checks_passed"] == sum(e.passed for e in evaluations)
    assert rows["trace_model"]["materialized"] == "never"

    out = tmp_path / "exported"
    assert cli.main(["export", "responses", "--to", str(out)]) == 0
    assert "exported" in capsys.readouterr().out
    ds = datasets.load_from_disk(str(out))
    assert ds.num_rows == curated["rows"]
    assert "| responses_curated_accounted | ERROR | passed |" in (out / "README.md").read_text()


def test_policy_adds_its_version_as_a_triage_partition(tmp_path, cli_env):
    from assets.partitions import TRACE_POLICY_VERSIONS
    from synth.trace.policy import SHIPPED_POLICIES, load_policy

    policy = SHIPPED_POLICIES / "strict.yaml"
    version = load_policy(policy).version
    run = [str(ALIGNFOUNDRY), "policy", str(policy)]
    first = subprocess.run(run, env=cli_env, capture_output=True, text=True)
    assert first.returncode == 0, first.stderr
    assert f"version {version}: added as a partition" in first.stdout
    config = tmp_path / "policies" / f"{version}.yaml"
    assert f'"dagster/partition": "{version}"' in first.stdout and str(config) in first.stdout
    assert json.loads(config.read_text())["ops"]["trace_policy"]["config"]["path"] == str(policy)
    again = subprocess.run(run, env=cli_env, capture_output=True, text=True)
    assert "already a partition" in again.stdout
    instance = DagsterInstance.from_config(cli_env["DAGSTER_HOME"])
    assert instance.get_dynamic_partitions(TRACE_POLICY_VERSIONS.name) == [version]
    bad = subprocess.run(
        [str(ALIGNFOUNDRY), "policy", str(tmp_path / "none.yaml")],
        env=cli_env,
        capture_output=True,
        text=True,
    )
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "none.yaml" in bad.stderr


def test_every_hint_works_as_printed_and_the_export_opens(tmp_path, cli_env):
    """`export` on a family not yet made prints a command; every family's command is one
    that runs (its plan and config check out), and the responses one, run as printed,
    makes what `export` then writes as a dataset `load_from_disk` opens."""
    import re
    import shlex

    from pipelines.runner import FAMILIES

    def cli_run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [str(ALIGNFOUNDRY), *args], env=cli_env, capture_output=True, text=True, timeout=900
        )

    hints = {}
    for family in FAMILIES:
        proc = cli_run("export", family, "--to", str(tmp_path / family))
        assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1
        (hint,) = re.findall(r"run `([^`]+)` first", proc.stderr)
        hints[family] = shlex.split(hint)
        assert hints[family] == ["alignfoundry", "run", family]
        check = cli_run(*hints[family][1:], "--dry-run")
        assert check.returncode == 0, check.stderr
        assert check.stdout.startswith(f"{family}: job ")
    made = cli_run(*hints["responses"][1:], "--scale", "demo")
    assert made.returncode == 0, made.stderr
    assert "== responses: succeeded" in made.stdout and "checks:" in made.stdout
    out = tmp_path / "responses_export"
    exported = cli_run("export", "responses", "--to", str(out))
    assert exported.returncode == 0, exported.stderr
    ds = datasets.load_from_disk(str(out))
    card = (out / "README.md").read_text()
    assert ds.num_rows > 0 and "license: apache-2.0" in card
    assert str(tmp_path) not in card and "/work/" not in card  # no local paths in a card
    assert "| seed_instructions |" in card and "| judged_responses |" in card  # upstream drops
