"""The production examples: instance YAML that Dagster's schema accepts, and the code location
loading with the production resource set without contacting anything."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from dagster._core.errors import DagsterInvalidConfigError
from dagster._core.instance.config import dagster_instance_config

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"


@pytest.mark.parametrize("name", ["dagster.k8s.yaml", "dagster.celery.yaml"])
def test_instance_examples_validate(tmp_path, name):
    shutil.copy(DEPLOY / name, tmp_path / "dagster.yaml")
    config, _ = dagster_instance_config(str(tmp_path))
    assert "postgres_db" in config["storage"]["postgres"]
    # the validation can fail: a misspelt key is refused
    text = (DEPLOY / name).read_text().replace("run_coordinator:", "run_cordinator:")
    (tmp_path / "dagster.yaml").write_text(text)
    with pytest.raises(DagsterInvalidConfigError):
        dagster_instance_config(str(tmp_path))


def test_definitions_load_with_the_production_resource_set(tmp_path):
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}
    for line in (DEPLOY / "production.env").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            key, value = line.split("=", 1)
            env[key] = value
    env["ALIGNFOUNDRY_HOME"] = str(tmp_path / "home")  # nothing may be written to /srv
    env["OPENAI_API_KEY"] = "sk-not-a-real-key"
    code = (
        "from pipelines.definitions import defs\n"
        "repo = defs.get_repository_def()\n"
        "r = defs.resources\n"
        "for role in ('generator', 'judge', 'reward', 'simulator', 'evaluator'):\n"
        "    m = r[role]\n"
        "    print(role, m.backend, m.base_url, m.model, m.max_concurrency, m.server)\n"
        "print(len(repo.get_all_jobs()), r['trainer'].base_model)\n"
        "import json\n"
        "ops = defs.resolve_job_def('trace').get_run_config_for_partition_key('v1')['ops']\n"
        "print(json.dumps(ops['trace_triage_assets']))\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        cwd=Path(__file__).resolve().parent.parent,
    )
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    roles = {line.split()[0]: line.split()[1:] for line in lines[-7:-2]}
    assert json.loads(lines[-1]) == {"config": {"limit": 20000, "seed": 42}}  # family settings
    router = "http://vllm-router.alignfoundry.svc:8000/v1"
    assert roles["generator"] == ["openai", router, "Qwen/Qwen2.5-7B-Instruct", "96", "vllm"]
    assert roles["judge"][1:4] == [
        "http://vllm-judge.alignfoundry.svc:8000/v1",
        "Qwen/Qwen2.5-72B-Instruct",
        "32",
    ]
    assert roles["evaluator"] == ["openai", "https://api.openai.com/v1", "gpt-4o", "16", "openai"]
    assert roles["reward"][0] == "pooling" and roles["simulator"][2] == "Qwen/Qwen2.5-32B-Instruct"
    n_jobs, base_model = lines[-2].split()
    assert int(n_jobs) >= 6 and base_model == "/models/Qwen2.5-1.5B-Instruct"
    assert "sk-not-a-real-key" not in proc.stdout  # the key stays behind EnvVar
