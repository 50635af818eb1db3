"""One Dagster resource per external system."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, Optional

import polars as pl
from dagster import (
    AssetExecutionContext,
    ConfigurableResource,
    InitResourceContext,
    InputContext,
    OutputContext,
    PipesClientCompletedInvocation,
    PipesSubprocessClient,
    open_pipes_session,
)
from dagster._core.errors import DagsterPipesExecutionError
from dagster_polars import PolarsParquetIOManager
from dagster_polars.io_managers.parquet import _remap_fsspec_storage_options
from pydantic import PrivateAttr

from synth.llm import LLMClient, ResponseCache, make_backend

REPO_ROOT = Path(__file__).resolve().parent.parent


class LLMResource(ConfigurableResource):
    """One model role (generator, judge, reward, simulator, evaluator): the embedded
    SmolLM2 (default), an OpenAI-compatible server, a reward model behind vLLM's pooling
    API, or offline vLLM. Each role is its own resource, so each can be its own model."""

    role: str = "generator"
    backend: str = "embedded"
    model: str = (
        ""  # openai/pooling: model name; vllm: model path or id; embedded: optional GGUF path
    )
    base_url: str = ""  # openai/pooling: e.g. http://127.0.0.1:8000/v1
    api_key: Optional[str] = None  # set through EnvVar(...)
    server: str = "auto"  # llamacpp | vllm | openai | auto (asked from GET /models)
    max_concurrency: int = 8
    timeout_s: float = 60.0
    max_retries: int = 4
    # One request's total time, retries included; and when most recent calls find no
    # server, the rest are rejected at once (a hung server costs minutes, not hours).
    deadline_s: float = 180.0
    response_format: str = "auto"  # auto | json_schema | none
    cache_path: str = ""  # empty = $ALIGNFOUNDRY_HOME/llm_cache.sqlite
    cache_namespace: str = ""  # set to keep this role's cache entries apart
    embedded_n_parallel: int = 8
    check_server: bool = True  # probe base_url when a run starts, so a dead server fails fast

    _backend: object = PrivateAttr(default=None)
    _eff: dict = PrivateAttr(default_factory=dict)

    def effective(self) -> dict[str, Any]:
        """The settings this role runs with. A field left at its class default takes the
        role's value from alignfoundry.yaml and the environment: run config that sets one
        field (`resources: {judge: {config: {timeout_s: 3}}}`) rebuilds the resource from
        that field alone, and must not drop the backend, URL and model configured for it."""
        import os

        from assets.settings import ROLE_SETTINGS, load_settings

        configured = load_settings().roles.get(self.role)
        out = {}
        for name in ROLE_SETTINGS:
            if name == "api_key_env":
                continue
            value = getattr(self, name)
            if configured is not None and value == type(self).model_fields[name].default:
                value = configured[name]
            out[name] = value
        key = self.api_key
        if key is None and configured is not None:
            key = os.environ.get(configured["api_key_env"]) or None
        out["api_key"] = key
        return out

    def setup_for_execution(self, context: InitResourceContext) -> None:
        # Fails before any asset body runs, naming the role and the setting that is wrong.
        e = self._eff = self.effective()
        try:
            self._backend = make_backend(
                e["backend"],
                model=e["model"],
                base_url=e["base_url"],
                api_key=e["api_key"],
                timeout_s=e["timeout_s"],
                max_retries=e["max_retries"],
                response_format=e["response_format"],
                n_parallel=self.embedded_n_parallel,
                check_server=self.check_server,
                server=e["server"],
            )
        except (ValueError, ConnectionError, FileNotFoundError, ImportError) as err:
            raise type(err)(f"model role '{self.role}': {err}") from None

    @property
    def cache_file(self) -> str:
        """The response cache: the configured path, or the one under ALIGNFOUNDRY_HOME (never
        a path relative to wherever the process happens to run)."""
        from assets.settings import home_dir

        return self.cache_path or str(home_dir() / "llm_cache.sqlite")

    @property
    def label(self) -> str:
        """`kind:model` of what fills the role (known before setup)."""
        if self._backend is not None:
            return self._backend.identity
        return f"{self.backend}:{self.model or 'SmolLM2-135M-Instruct'}"

    def subprocess_spec(self) -> tuple[str, dict[str, str]]:
        """(JSON spec, environment) that rebuild this role in a training subprocess
        (`synth.llm.client_from_spec`); the API key travels in the environment only."""
        var = f"ALIGNFOUNDRY_ROLE_{self.role.upper()}_KEY"
        e = self._eff or self.effective()
        key = e.pop("api_key")
        spec = {"role": self.role, **e, "cache_path": self.cache_file}
        spec["api_key_var"] = var if key else ""
        return json.dumps(spec), ({var: key} if key else {})

    def client(self) -> LLMClient:
        """A client with its own statistics, sharing the backend and the cache file."""
        if self._backend is None:
            raise RuntimeError(f"model role '{self.role}' used before setup")
        e = self._eff
        return LLMClient(
            self._backend,
            ResponseCache(self.cache_file),
            e["max_concurrency"],
            role=self.role,
            cache_namespace=e["cache_namespace"],
            deadline_s=e["deadline_s"] or None,
        )


class ParquetIOManager(PolarsParquetIOManager):
    """dagster-polars' Parquet IO manager, reading with the polars 2 API.

    dagster-polars 0.27.12 (the newest release) passes `rechunk=` to `pl.scan_parquet`,
    which polars 2.0 removed; writing is unchanged. Drop this once dagster-polars catches up.
    """

    def scan_df_from_path(
        self, path: Any, context: InputContext, partition_key: str | None = None
    ) -> pl.LazyFrame:
        options = _remap_fsspec_storage_options(
            self.storage_options or getattr(path, "storage_options", None)
        )
        return pl.scan_parquet(str(path), storage_options=options)

    def write_df_to_path(self, context: OutputContext, df: pl.DataFrame, path: Any) -> None:
        """On a local disk, write beside the path and rename over it: jobs running at once
        (the demo's lanes, `dagster dev`) materialize the shared seed assets, and a step
        reading one must never see half a file (dagster-polars writes in place)."""
        if getattr(path, "protocol", "") not in ("", "file", "local"):
            return super().write_df_to_path(context, df, path)
        import os
        import threading

        target = Path(str(path))
        tmp = target.with_name(f".{target.name}.{os.getpid()}.{threading.get_ident()}.tmp")
        super().write_df_to_path(context, df, type(path)(str(tmp)))
        os.replace(tmp, target)


def _die_with_parent() -> None:
    """In the child, before exec: ask Linux to SIGKILL it when its parent dies (even by
    kill -9), so no training process outlives the step that launched it."""
    import contextlib
    import ctypes
    import signal

    # Not Linux: no such call, and the except clause in run() still stops the child.
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


class ChildStoppingPipesClient(PipesSubprocessClient):
    """Dagster's subprocess Pipes client, with the child's life tied to the step's.

    Dagster's own client signals the child only when the run is cancelled. Here the child
    is also stopped when the step fails or times out while waiting for it (SIGINT, then
    SIGKILL after `termination_timeout_seconds`), and dies with the step process if that
    is killed outright."""

    log_path: str = ""  # the child's stdout and stderr go here (else to ours)

    def run(  # ty: ignore[invalid-method-override]
        self,
        *,
        context: AssetExecutionContext,
        extras: Any = None,
        command: list[str],
        env: dict[str, str] | None = None,
        cwd: str | None = None,
    ) -> PipesClientCompletedInvocation:
        import os
        import signal
        import subprocess

        out = open(self.log_path, "ab") if self.log_path else None  # noqa: SIM115 (closed below)
        with open_pipes_session(
            context=context,
            context_injector=self.context_injector,
            message_reader=self.message_reader,
            extras=extras,
        ) as session:
            process = subprocess.Popen(
                command,
                cwd=cwd or self.cwd,
                env={**os.environ, **self.env, **(env or {}), **session.get_bootstrap_env_vars()},
                preexec_fn=_die_with_parent if sys.platform.startswith("linux") else None,
                stdout=out,
                stderr=subprocess.STDOUT if out else None,
            )
            try:
                if process.wait() != 0:
                    raise DagsterPipesExecutionError(
                        f"External execution process failed with code {process.returncode}"
                        + (f"; its output ends:\n{_tail(self.log_path)}" if out else "")
                    )
            except BaseException:
                if process.poll() is None:
                    context.log.info(f"[pipes] stopping the child process {process.pid}")
                    process.send_signal(signal.SIGINT)
                    try:
                        process.wait(timeout=self.termination_timeout_seconds)
                    except subprocess.TimeoutExpired:
                        process.kill()
                        process.wait()
                raise
            finally:
                if out is not None:
                    out.close()
        return PipesClientCompletedInvocation(session)


def _tail(path: str, lines: int = 25) -> str:
    try:
        return "\n".join(Path(path).read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no output)"


class TrainerResource(ConfigurableResource):
    """Where training runs: a local subprocess through Dagster Pipes by default.

    On a cluster, swap the client for dagster-k8s' PipesK8sClient with the same command.
    """

    python: str = sys.executable
    runs_dir: str = ""  # empty = $ALIGNFOUNDRY_HOME/runs
    base_model: str = ""  # empty = the embedded SmolLM2-135M; else a local path or hub id
    extra_env: dict[str, str] = {}
    stop_grace_s: float = 10.0  # after SIGINT, how long a child may take before SIGKILL

    def run_dir(self, name: str) -> Path:
        from assets.settings import home_dir

        path = Path(self.runs_dir or home_dir() / "runs") / name
        path.mkdir(parents=True, exist_ok=True)
        return path

    def launch(
        self,
        context: AssetExecutionContext,
        module: str,
        args: list[str],
        report_asset_key: str | None = None,
        env: dict[str, str] | None = None,
    ) -> Any:
        """Run `python -m module args` through Pipes; a multi-asset names the key it reports
        for; `env` adds variables (secrets go there, never into the logged command)."""
        command = [self.python, "-m", module, *args]
        if self.base_model:
            command += ["--model", self.base_model]
        log_path = self.run_dir("logs") / f"{module}-{context.run_id[:8]}.log"
        context.log.info("launching: " + " ".join(command) + f" (output: {log_path})")
        env = {**self.extra_env, **(env or {})}
        client = ChildStoppingPipesClient(
            cwd=str(REPO_ROOT), env=env, termination_timeout_seconds=self.stop_grace_s
        )
        client.log_path = str(log_path)
        return client.run(
            command=command, context=context, extras={"report_asset_key": report_asset_key}
        )

    def launch_reported(
        self,
        context: AssetExecutionContext,
        module: str,
        args: list[str],
        env: dict[str, str] | None = None,
    ) -> dict[str, Any]:
        """`launch` for a single asset: the metadata the entry point reported, as plain values."""
        result = self.launch(context, module, args, env=env).get_materialize_result()
        return {k: v.value for k, v in result.metadata.items()}

    @staticmethod
    def flags(config: Any) -> list[str]:
        """A run config as `--key-name value` flags for the entry point's argparse."""
        return [
            x for k, v in config.model_dump().items() for x in (f"--{k.replace('_', '-')}", str(v))
        ]


class QualityResource(ConfigurableResource):
    """Where the quality layer keeps its state: LanceDB tables, Data Docs, exports."""

    home: str = ""  # empty = $ALIGNFOUNDRY_HOME
    benchmark_files: list[
        str
    ] = []  # extra eval sets every training dataset is decontaminated against

    @property
    def root(self) -> Path:
        from assets.settings import home_dir

        return home_dir(self.home or None)

    @property
    def lancedb_dir(self) -> Path:
        return self.root / "lancedb"

    @property
    def data_docs_dir(self) -> Path:
        return self.root / "data_docs"

    @property
    def exports_dir(self) -> Path:
        return self.root / "exports"

    def store(self):
        from quality.store import EmbeddingStore

        return EmbeddingStore(self.lancedb_dir)
