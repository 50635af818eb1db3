"""The alignfoundry Dagster code location."""

from __future__ import annotations

import os
import sys
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
from assets.resources import LLMResource, ParquetIOManager, QualityResource, TrainerResource
from assets.settings import ROLES, Settings, home_dir, load_settings, policy_files
from pipelines.automation import (
    build_failure_sensor,
    build_inbox_sensor,
    build_schedules,
    build_training_automation_sensor,
)
from pipelines.jobs import jobs, jobs_with_settings
from pipelines.sensors import build_policy_sensor

# Each family module declares its steps and exports them as one Definitions.
FAMILY_MODULES = (
    seeds,
    responses,
    trace,
    ultraprompt,
    personaknob,
    personaatlas,
    medad,
    calibration,
)


def role_resources(home: Path, settings: Settings | None = None) -> dict[str, LLMResource]:
    """One LLM resource per model role, from alignfoundry.yaml and the environment; an API
    key only ever through EnvVar."""
    settings = settings or load_settings()
    out = {}
    for role, rs in settings.roles.items():
        key_var = rs["api_key_env"]
        out[role] = LLMResource(
            role=role,
            backend=rs["backend"],
            model=rs["model"],
            base_url=rs["base_url"],
            api_key=EnvVar(key_var) if os.environ.get(key_var) else None,
            server=rs["server"],
            max_concurrency=rs["max_concurrency"],
            timeout_s=rs["timeout_s"],
            max_retries=rs["max_retries"],
            deadline_s=rs["deadline_s"],
            response_format=rs["response_format"],
            cache_namespace=rs["cache_namespace"],
            cache_path=str(home / "llm_cache.sqlite"),
        )
    return out


def with_role(llm: LLMResource, role: str) -> LLMResource:
    """The same settings for another role. (A new resource: Dagster rebuilds a resource
    from its constructor arguments, so a pydantic copy would lose the change.)"""
    fields = {f: getattr(llm, f) for f in type(llm).model_fields if f != "role"}
    return type(llm)(**fields, role=role)


def every_role(llm: LLMResource) -> dict[str, LLMResource]:
    """The same model settings in every role (each resource still names its role)."""
    return {role: with_role(llm, role) for role in ROLES}


def build_definitions(
    home: str | Path | None = None,
    llm: LLMResource | None = None,
    roles: dict[str, LLMResource] | None = None,
) -> Definitions:
    """The code location. `llm` fills every model role; `roles` replaces single roles;
    otherwise the roles come from alignfoundry.yaml and the environment."""
    home = home_dir(home)
    settings = load_settings()
    models = every_role(llm) if llm is not None else role_resources(home, settings)
    models.update({role: with_role(r, role) for role, r in (roles or {}).items()})
    unknown = sorted(set(models) - set(ROLES))
    if unknown:
        raise ValueError(f"unknown model role {unknown[0]!r} (roles: {', '.join(ROLES)})")
    families = Definitions.merge(*(family.defs for family in FAMILY_MODULES))
    parts = dict(
        assets=list(families.assets or ()),
        asset_checks=list(families.asset_checks or ()),
        schedules=build_schedules(),
        resources={
            "io_manager": ParquetIOManager(base_dir=str(home / "storage")),
            **models,
            "quality": QualityResource(home=str(home)),
            "trainer": TrainerResource(
                runs_dir=str(home / "runs"),
                base_model=os.environ.get("ALIGNFOUNDRY_BASE_MODEL", ""),
            ),
        },
    )
    job_defs = jobs
    if settings.op_config():
        job_defs = jobs_with_settings(settings.op_config(), Definitions(**parts, jobs=jobs))
    return Definitions(
        **parts,
        executor=executor_from_env(),
        jobs=job_defs,
        sensors=[
            build_policy_sensor(policy_files()),
            build_inbox_sensor(home / "inbox", job_defs),
            build_failure_sensor(home / "failures.jsonl"),
            build_training_automation_sensor(),
        ],
    )


def executor_from_env():
    """The jobs' executor: Dagster's default (a process per step on this machine), or, with
    ALIGNFOUNDRY_EXECUTOR=celery, steps on Celery workers through the broker in
    ALIGNFOUNDRY_CELERY_BROKER (dagster-celery). A worker lost mid-step gives its step back
    to the queue (acks late, rejected on worker loss), so another worker runs it."""
    if os.environ.get("ALIGNFOUNDRY_EXECUTOR", "") != "celery":
        return None
    from dagster_celery import celery_executor

    broker = os.environ.get("ALIGNFOUNDRY_CELERY_BROKER", "redis://127.0.0.1:6379/0")
    return celery_executor.configured(celery_config(broker))


def celery_config(broker: str) -> dict:
    """The celery executor's config, the same for the run and for its workers (`-y FILE`)."""
    return {
        "broker": broker,
        "backend": broker,
        "config_source": {
            "task_acks_late": True,
            "task_reject_on_worker_lost": True,
            "worker_prefetch_multiplier": 1,
        },
    }


def _step_workers_die_with_their_run() -> None:
    """In a step worker of Dagster's multiprocess executor (a multiprocessing child of the
    run's process): die when that process dies, even by kill -9, instead of going on
    calling the LLM and writing the cache with nobody to report to."""
    import multiprocessing

    if multiprocessing.parent_process() is not None and sys.platform.startswith("linux"):
        from assets.resources import _die_with_parent

        _die_with_parent()


_step_workers_die_with_their_run()
defs = build_definitions()
