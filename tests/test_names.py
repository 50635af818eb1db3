"""Every asset key, asset check, op, job, sensor and schedule keeps its name: users' run history
and the UI find them by name. tests/fixtures/definition_names.json is the list as it stood
before assets/ became declarations; a rename shows here as a diff."""

import json
import subprocess
import sys
from pathlib import Path

from pipelines.definitions import build_definitions

NAMES = Path(__file__).parent / "fixtures" / "definition_names.json"


def definition_names(defs) -> dict[str, list[str]]:
    repo = defs.get_repository_def()
    graph = repo.asset_graph
    checks = []
    for key in graph.asset_check_keys:
        spec = graph.get_check_spec(key)
        checks.append(
            f"{key.asset_key.to_user_string()}:{key.name}" + (" blocking" if spec.blocking else "")
        )
    ops = {n for job in repo.get_all_jobs() for n in job.graph.node_dict}
    return {
        "assets": sorted(k.to_user_string() for k in graph.get_all_asset_keys()),
        "ops": sorted(ops),  # run config names them
        "checks": sorted(checks),
        "jobs": sorted(j.name for j in repo.get_all_jobs()),
        "sensors": sorted(s.name for s in repo.sensor_defs),
        "schedules": sorted(s.name for s in repo.schedule_defs),
    }


def test_every_name_is_what_it_was(tmp_path):
    now = definition_names(build_definitions(tmp_path))
    before = json.loads(NAMES.read_text())
    for kind in before:
        assert now[kind] == before[kind], f"{kind} changed: {set(now[kind]) ^ set(before[kind])}"


def test_assets_do_not_import_pipelines():
    """The family modules declare; pipelines/ wires them. Importing every asset module
    alone loads nothing from pipelines/."""
    code = (
        "import sys, importlib, pkgutil, assets\n"
        "for m in pkgutil.iter_modules(assets.__path__): importlib.import_module('assets.' + m.name)\n"
        "print(sorted(n for n in sys.modules if n == 'pipelines' or n.startswith('pipelines.')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout
