"""The production examples: instance YAML that Dagster's schema accepts, and the code location
loading with the production resource set without contacting anything."""

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
        "llm = defs.resources['llm']\n"
        "print(llm.backend, llm.base_url, llm.max_concurrency, len(repo.get_all_jobs()))\n"
        "print(defs.resources['trainer'].base_model)\n"
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
    first, second = proc.stdout.splitlines()[-2:]
    backend, url, concurrency, n_jobs = first.split()
    assert backend == "openai" and url == "http://vllm-router.alignfoundry.svc:8000/v1"
    assert concurrency == "64" and int(n_jobs) >= 6
    assert second == "/models/Qwen2.5-1.5B-Instruct"
    assert "sk-not-a-real-key" not in proc.stdout  # the key stays behind EnvVar
