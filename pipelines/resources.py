"""One Dagster resource per external system."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Optional

import polars as pl
from dagster import (
    AssetExecutionContext,
    ConfigurableResource,
    InitResourceContext,
    InputContext,
    PipesSubprocessClient,
)
from dagster_polars import PolarsParquetIOManager
from dagster_polars.io_managers.parquet import _remap_fsspec_storage_options
from pydantic import PrivateAttr

from synth.llm import LLMClient, ResponseCache, make_backend

REPO_ROOT = Path(__file__).resolve().parent.parent


class LLMResource(ConfigurableResource):
    """The LLM every asset talks to: embedded SmolLM2 (default), an OpenAI-compatible server, or vLLM."""

    backend: str = "embedded"
    model: str = ""  # openai: model name; vllm: model path or id; embedded: optional GGUF path
    base_url: str = ""  # openai: e.g. http://127.0.0.1:8000/v1
    api_key: Optional[str] = None  # set through EnvVar("OPENAI_API_KEY")
    max_concurrency: int = 8
    timeout_s: float = 60.0
    max_retries: int = 4
    response_format: str = "auto"  # auto | json_schema | none
    cache_path: str = ".alignfoundry/llm_cache.sqlite"
    embedded_n_parallel: int = 8
    check_server: bool = True  # probe base_url when a run starts, so a dead server fails fast

    _backend: object = PrivateAttr(default=None)

    def setup_for_execution(self, context: InitResourceContext) -> None:
        # Fails before any asset body runs, naming the setting that is wrong.
        try:
            self._backend = make_backend(
                self.backend,
                model=self.model,
                base_url=self.base_url,
                api_key=self.api_key,
                timeout_s=self.timeout_s,
                max_retries=self.max_retries,
                response_format=self.response_format,
                n_parallel=self.embedded_n_parallel,
                check_server=self.check_server,
            )
        except (ValueError, ConnectionError, FileNotFoundError, ImportError) as e:
            raise type(e)(f"resource 'llm': {e}") from None

    def client(self) -> LLMClient:
        """A client with its own statistics, sharing the backend and the cache file."""
        if self._backend is None:
            raise RuntimeError("resource 'llm' used before setup")
        return LLMClient(self._backend, ResponseCache(self.cache_path), self.max_concurrency)


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


class TrainerResource(ConfigurableResource):
    """Where training runs: a local subprocess through Dagster Pipes by default.

    On a cluster, swap the client for dagster-k8s' PipesK8sClient with the same command.
    """

    python: str = sys.executable
    runs_dir: str = ".alignfoundry/runs"
    base_model: str = ""  # empty = the embedded SmolLM2-135M; else a local path or hub id
    extra_env: dict[str, str] = {}

    def run_dir(self, name: str) -> Path:
        path = Path(self.runs_dir) / name
        path.mkdir(parents=True, exist_ok=True)
        return path

    def launch(
        self,
        context: AssetExecutionContext,
        module: str,
        args: list[str],
        report_asset_key: str | None = None,
    ) -> Any:
        """Run `python -m module args` through Pipes; a multi-asset names the key it reports for."""
        command = [self.python, "-m", module, *args]
        if self.base_model:
            command += ["--model", self.base_model]
        context.log.info("launching: " + " ".join(command))
        return PipesSubprocessClient(cwd=str(REPO_ROOT), env=dict(self.extra_env)).run(
            command=command, context=context, extras={"report_asset_key": report_asset_key}
        )

    def launch_reported(
        self, context: AssetExecutionContext, module: str, args: list[str]
    ) -> dict[str, Any]:
        """`launch` for a single asset: the metadata the entry point reported, as plain values."""
        result = self.launch(context, module, args).get_materialize_result()
        return {k: v.value for k, v in result.metadata.items()}

    @staticmethod
    def flags(config: Any) -> list[str]:
        """A run config as `--key-name value` flags for the entry point's argparse."""
        return [
            x for k, v in config.model_dump().items() for x in (f"--{k.replace('_', '-')}", str(v))
        ]


class QualityResource(ConfigurableResource):
    """Where the quality layer keeps its state: LanceDB tables, Data Docs, exports."""

    home: str = ".alignfoundry"
    benchmark_files: list[
        str
    ] = []  # extra eval sets every training dataset is decontaminated against

    @property
    def lancedb_dir(self) -> Path:
        return Path(self.home) / "lancedb"

    @property
    def data_docs_dir(self) -> Path:
        return Path(self.home) / "data_docs"

    @property
    def exports_dir(self) -> Path:
        return Path(self.home) / "exports"

    def store(self):
        from quality.store import EmbeddingStore

        return EmbeddingStore(self.lancedb_dir)
