"""What every dataset asset reports, and the checks every dataset asset gets."""

from __future__ import annotations

from typing import Any, TypeVar

import polars as pl
from dagster import (
    AssetCheckExecutionContext,
    AssetCheckResult,
    AssetCheckSeverity,
    AssetExecutionContext,
    MetadataValue,
)

from assets.status import latest_materialization_metadata
from synth.records import drop_counts

S = TypeVar("S")


def dataset_metadata(
    kept: pl.DataFrame, rejected: pl.DataFrame, n_in: int, **extra: Any
) -> dict[str, Any]:
    md: dict[str, Any] = {"rows_in": n_in, "kept": kept.height, "rejected": rejected.height}
    md.update(drop_counts(rejected))
    md.update(extra)
    if kept.height and "preview" not in md:  # a step may show its own preview
        md["preview"] = MetadataValue.md(markdown_table(preview_frame(kept)))
    return md


LINEAGE_COLUMNS = ("record_id", "parent_ids", "provenance")


def preview_frame(df: pl.DataFrame, rows: int = 5) -> pl.DataFrame:
    """The first rows as a person wants to read them: the family's content first, the
    record id last, parents and provenance left out (they are in the table itself)."""
    content = [c for c in df.columns if c not in LINEAGE_COLUMNS]
    tail = ["record_id"] if "record_id" in df.columns else []
    return df.select(content + tail).head(rows)


def llm_metadata(*clients: Any) -> dict[str, Any]:
    """Which model filled each role (`role_<name>`), each role's calls, cache hits and
    tokens (`<role>_calls`, ...), and the totals over every role (`llm_calls`, ...)."""
    from synth.llm import LLMStats

    total = LLMStats()
    md: dict[str, Any] = {}
    for c in (c for c in clients if c is not None):
        md[f"role_{c.role}"] = c.model_label
        md.update(c.stats.as_metadata(prefix=f"{c.role}_"))
        md[f"{c.role}_attempts"] = c.attempts
        for f in ("calls", "cache_hits", "cache_misses", "prompt_tokens", "completion_tokens"):
            setattr(total, f, getattr(total, f) + getattr(c.stats, f))
        total.wall_s = max(total.wall_s, c.stats.wall_s)
        total.errors.update(c.stats.errors)
    return {**total.as_metadata(), **md}


def rejected_metadata(rejected: pl.DataFrame) -> dict[str, Any]:
    md: dict[str, Any] = {"rejected": rejected.height, **drop_counts(rejected)}
    if rejected.height:
        md["examples"] = MetadataValue.md(
            markdown_table(rejected.select("reason", "detail").head(10))
        )
    return md


def markdown_table(df: pl.DataFrame, width: int = 80) -> str:
    def cell(v: Any) -> str:
        s = str(v).replace("\n", " ").replace("|", "\\|")
        return s if len(s) <= width else s[: width - 1] + "…"

    head = "| " + " | ".join(df.columns) + " |"
    rule = "|" + "---|" * len(df.columns)
    body = ["| " + " | ".join(cell(v) for v in row) + " |" for row in df.iter_rows()]
    return "\n".join([head, rule, *body])


def first_parents(df: pl.DataFrame) -> list[str]:
    """The parent record id of every row (derived rows have exactly one)."""
    return df["parent_ids"].list.first().to_list()


def run_settings(
    context: AssetExecutionContext | AssetCheckExecutionContext, asset: str, model: type[S]
) -> S:
    """The settings (a pydantic model) the asset's latest materialization ran with,
    from its `settings` metadata; the defaults when it has none."""
    md = latest_materialization_metadata(context.instance, asset)
    return model.model_validate_json(md["settings"]) if "settings" in md else model()


def shard_settings(
    context: AssetExecutionContext,
    asset: str,
    partitions: list[str],
    shards: dict[str, Any],
    model: type[S],
    how_to_fill: str,
) -> S:
    """The settings every partition of a sharded asset was made with (its `settings`
    metadata), before the shards are merged: an error naming the partitions when some are
    missing or were made with different settings."""
    missing = [p for p in partitions if p not in shards]
    if missing:
        raise ValueError(f"{asset} has no materialization for {', '.join(missing)}: {how_to_fill}")
    made = {
        p: latest_materialization_metadata(context.instance, asset, p).get("settings", "")
        for p in partitions
    }
    if len(set(made.values())) != 1:
        raise ValueError(
            f"{asset} partitions were made with different settings "
            f"({', '.join(f'{p}: {v}' for p, v in made.items())}): re-run them with one config"
        )
    return model.model_validate_json(next(iter(made.values())))


def rows_in(context: AssetCheckExecutionContext, asset: str) -> int | None:
    """`rows_in` that the asset reported when it was materialized."""
    value = latest_materialization_metadata(context.instance, asset).get("rows_in")
    return None if value is None else int(value)


def rate_result(observed: float, threshold: float, at_least: bool) -> AssetCheckResult:
    """A drift-like rate check: WARN severity, observed value and threshold reported."""
    passed = observed >= threshold if at_least else observed <= threshold
    return AssetCheckResult(
        passed=passed,
        severity=AssetCheckSeverity.WARN,
        metadata={
            "observed": round(observed, 4),
            "threshold": threshold,
            "rule": ">= threshold" if at_least else "<= threshold",
        },
    )
