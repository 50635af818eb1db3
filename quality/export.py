"""Export a curated dataset as a Hugging Face `datasets` dataset with a generated card."""

from __future__ import annotations

import json
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import polars as pl

# Licences of the sources the loaders know; a source not listed here is reported as unknown.
KNOWN_LICENCES = {
    "hh-rlhf": "MIT (Anthropic HH-RLHF)",
    "self-instruct": "Apache-2.0 (Self-Instruct / Alpaca seed tasks)",
    "seed_tasks": "Apache-2.0 (Self-Instruct / Alpaca seed tasks)",
    "persona-hub": "CC BY-NC-SA 4.0, research use (Persona Hub)",
    "pku-saferlhf": "CC BY-NC 4.0 (PKU-SafeRLHF)",
    "synth/seeds": "Apache-2.0 (written for alignfoundry)",
}


def licence_of(source: str) -> str:
    low = source.lower().replace("\\", "/")
    return next(
        (lic for key, lic in KNOWN_LICENCES.items() if key in low), "unknown: check the source"
    )


@dataclass(slots=True)
class CheckSummary:
    name: str
    passed: bool
    severity: str
    detail: str = ""


@dataclass(slots=True)
class DatasetCardInfo:
    family: str
    name: str
    description: str
    rows_in: int
    rejected: dict[str, int]  # reason -> count
    checks: list[CheckSummary] = field(default_factory=list)
    sources: list[str] = field(default_factory=list)
    dedup: dict[str, Any] = field(default_factory=dict)


def _size_category(n: int) -> str:
    for bound, label in ((1_000, "n<1K"), (10_000, "1K<n<10K"), (100_000, "10K<n<100K")):
        if n < bound:
            return label
    return "100K<n<1M" if n < 1_000_000 else "n>1M"


def _generators(df: pl.DataFrame) -> list[dict[str, Any]]:
    if "provenance" not in df.columns:
        return []
    seen = Counter(
        json.dumps(
            {k: p.get(k) for k in ("backend", "model", "template_id", "template_hash")},
            sort_keys=True,
        )
        for p in df["provenance"].to_list()
        if p
    )
    return [{**json.loads(k), "rows": n} for k, n in seen.most_common()]


def render_card(df: pl.DataFrame, info: DatasetCardInfo) -> str:
    from huggingface_hub import DatasetCardData

    data = DatasetCardData(
        pretty_name=info.name,
        size_categories=[_size_category(df.height)],
        tags=["alignfoundry", info.family, "alignment"],
        license="other",  # per-source licences are listed in the card body
    )
    schema = "\n".join(f"| `{c}` | `{t}` |" for c, t in df.schema.items())
    checks = (
        "\n".join(
            f"| {c.name} | {c.severity} | {'passed' if c.passed else 'FAILED'} | {c.detail} |"
            for c in info.checks
        )
        or "| (no check results recorded) | | | |"
    )
    rejected = (
        "\n".join(f"| {r} | {n} |" for r, n in sorted(info.rejected.items())) or "| (none) | 0 |"
    )
    gens = "\n".join(
        f"| {g['backend']} | {g['model']} | {g['template_id']} | {g['template_hash']} | {g['rows']} |"
        for g in _generators(df)
    )
    dedup = "\n".join(f"- {k}: {v}" for k, v in info.dedup.items()) or "- (not deduplicated)"
    sources = "\n".join(f"- `{s}`: {licence_of(s)}" for s in info.sources) or "- (none recorded)"
    return f"""---
{data.to_yaml()}
---

# {info.name}

{info.description}

Made by alignfoundry from the `{info.family}` family. Every row has a
stable `record_id`, its `parent_ids` and a `provenance` record of how it was generated.

## Counts

| rows in | kept | rejected |
|---|---|---|
| {info.rows_in} | {df.height} | {sum(info.rejected.values())} |

### Rejected rows by reason

| reason | rows |
|---|---|
{rejected}

## Deduplication and decontamination

{dedup}

## Checks

| check | severity | result | detail |
|---|---|---|---|
{checks}

## Schema

| column | type |
|---|---|
{schema}

## Generator provenance

| backend | model | template | template hash | rows |
|---|---|---|---|---|
{gens}

## Sources and licences

{sources}
"""


def export_dataset(
    df: pl.DataFrame,
    out_dir: str | Path,
    info: DatasetCardInfo,
    repo_id: str | None = None,
) -> dict[str, Any]:
    """save_to_disk under out_dir/data and a README.md card; push_to_hub when a repo id,
    an HF token and network (HF_HUB_OFFLINE unset) are all configured."""
    import datasets

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    ds = datasets.Dataset.from_polars(df)
    ds.save_to_disk(str(out / "data"))
    card = render_card(df, info)
    (out / "README.md").write_text(card, encoding="utf-8")
    pushed = False
    token = os.environ.get("HF_TOKEN")
    if repo_id and token and os.environ.get("HF_HUB_OFFLINE", "0") in ("", "0"):
        from huggingface_hub import DatasetCard

        ds.push_to_hub(repo_id, token=token)
        DatasetCard(card).push_to_hub(repo_id, token=token)
        pushed = True
    return {"path": str(out), "rows": ds.num_rows, "pushed_to_hub": pushed, "card": card}
