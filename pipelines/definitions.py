"""The alignfoundry Dagster code location."""

from __future__ import annotations

import os
from pathlib import Path

from dagster import Definitions, EnvVar

from assets import (
    calibration,
    medad,
    personaatlas,
    personaknob,
    responses,
    seeds,
    trace,
    ultraprompt,
)
from pipelines.automation import (
    build_failure_sensor,
    build_inbox_sensor,
    build_schedules,
    build_training_automation_sensor,
)
from pipelines.jobs import jobs
from pipelines.resources import LLMResource, ParquetIOManager, QualityResource, TrainerResource
from pipelines.sensors import build_policy_sensor
from synth.trace.policy import SHIPPED_POLICIES

DEFAULT_HOME = ".alignfoundry"


def home_dir(home: str | Path | None = None) -> Path:
    """Where Parquet, the LLM cache, LanceDB and the Dagster instance live."""
    return Path(home or os.environ.get("ALIGNFOUNDRY_HOME") or DEFAULT_HOME).expanduser().resolve()


def llm_from_env(home: Path) -> LLMResource:
    """The LLM resource from ALIGNFOUNDRY_LLM_* variables; the key only through EnvVar."""
    env = os.environ
    return LLMResource(
        backend=env.get("ALIGNFOUNDRY_LLM_BACKEND", "embedded"),
        model=env.get("ALIGNFOUNDRY_LLM_MODEL", ""),
        base_url=env.get("ALIGNFOUNDRY_LLM_BASE_URL", ""),
        api_key=EnvVar("OPENAI_API_KEY") if env.get("OPENAI_API_KEY") else None,
        max_concurrency=int(env.get("ALIGNFOUNDRY_LLM_CONCURRENCY", "8")),
        cache_path=str(home / "llm_cache.sqlite"),
    )


def policy_files() -> list[str]:
    """Policy files the TRACE sensor watches: ALIGNFOUNDRY_POLICY_FILES (os.pathsep-separated)."""
    listed = os.environ.get("ALIGNFOUNDRY_POLICY_FILES")
    return listed.split(os.pathsep) if listed else [str(SHIPPED_POLICIES / "new_policy.yaml")]


def build_definitions(
    home: str | Path | None = None, llm: LLMResource | None = None
) -> Definitions:
    home = home_dir(home)
    return Definitions(
        assets=[
            *seeds.assets,
            *responses.assets,
            *trace.assets,
            *ultraprompt.assets,
            *personaknob.assets,
            *personaatlas.assets,
            *medad.assets,
            *calibration.assets,
        ],
        asset_checks=[
            *seeds.checks,
            *responses.checks,
            *trace.checks,
            *ultraprompt.checks,
            *personaknob.checks,
            *personaatlas.checks,
            *medad.checks,
            *calibration.checks,
        ],
        jobs=jobs,
        sensors=[
            build_policy_sensor(policy_files()),
            build_inbox_sensor(home / "inbox", jobs),
            build_failure_sensor(home / "failures.jsonl"),
            build_training_automation_sensor(),
        ],
        schedules=build_schedules(),
        resources={
            "io_manager": ParquetIOManager(base_dir=str(home / "storage")),
            "llm": llm or llm_from_env(home),
            "quality": QualityResource(home=str(home)),
            "trainer": TrainerResource(
                runs_dir=str(home / "runs"),
                base_model=os.environ.get("ALIGNFOUNDRY_BASE_MODEL", ""),
            ),
        },
    )


defs = build_definitions()
