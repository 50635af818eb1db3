"""Export a curated dataset as a Hugging Face `datasets` dataset with a generated card."""

from __future__ import annotations

import json
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import polars as pl

# Licences of the sources the loaders know: (Hugging Face licence id, description). A
# source not listed here is reported as unknown.
KNOWN_LICENCES = {
    "hh-rlhf": ("mit", "MIT (Anthropic HH-RLHF)"),
    "self-instruct": ("apache-2.0", "Apache-2.0 (Self-Instruct / Alpaca seed tasks)"),
    "seed_tasks": ("apache-2.0", "Apache-2.0 (Self-Instruct / Alpaca seed tasks)"),
    "persona-hub": ("cc-by-nc-sa-4.0", "CC BY-NC-SA 4.0, research use (Persona Hub)"),
    "pku-saferlhf": ("cc-by-nc-4.0", "CC BY-NC 4.0 (PKU-SafeRLHF)"),
    "synth/seeds": ("apache-2.0", "Apache-2.0 (written for alignfoundry)"),
}
UNKNOWN = ("unknown", "unknown: check the source")


def licence_of(source: str) -> tuple[str, str]:
    """(licence id, description) of a source path or dataset id; a source that carries its
    own licence is given as "name|licence id" (MedAD's allow-listed images)."""
    if "|" in source:
        name, lic = source.rsplit("|", 1)
        return lic.strip().lower(), lic.strip()
    low = source.lower().replace("\\", "/")
    return next((lic for key, lic in KNOWN_LICENCES.items() if key in low), UNKNOWN)


def card_licence(sources: list[str]) -> dict[str, Any]:
    """The card's `license` field: the sources' one licence, or `other` naming them all."""
    ids = sorted({licence_of(s)[0] for s in sources})
    if len(ids) == 1 and ids[0] != "unknown":
        return {"license": ids[0]}
    return {"license": "other", "license_name": "mixed: " + ", ".join(ids) if ids else "unknown"}


def source_name(source: str) -> str:
    """How a source is named in a card: a dataset id as it is, a local file by its name
    only (a card is shared; the path on the machine that made it is not its business)."""
    name = source.split("|", 1)[0]
    if "/" in name and not Path(name).exists() and not name.startswith(("/", ".")):
        return name  # a hub dataset id such as Anthropic/hh-rlhf
    parts = Path(name).parts
    if "synth" in parts and "seeds" in parts:
        return "synth/seeds/" + Path(name).name  # shipped with alignfoundry
    return Path(name).name


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
    # every upstream stage's dropped rows: stage -> {reason: count}
    upstream_rejected: dict[str, dict[str, int]] = field(default_factory=dict)
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
        **card_licence(info.sources),
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
    sources = (
        "\n".join(f"- `{source_name(s)}`: {licence_of(s)[1]}" for s in info.sources)
        or "- (none recorded)"
    )
    upstream = (
        "\n".join(
            f"| {stage} | {sum(r.values())} | "
            + (", ".join(f"{k} {v}" for k, v in sorted(r.items())) or "-")
            + " |"
            for stage, r in info.upstream_rejected.items()
        )
        or "| (no upstream stage dropped rows) | 0 | |"
    )
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

### Rows dropped upstream, by stage

| stage | rows | reasons |
|---|---|---|
{upstream}

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
    """save_to_disk at out_dir (`datasets.load_from_disk(out_dir)` opens it) with the card
    as its README.md; push_to_hub when a repo id, an HF token and network (HF_HUB_OFFLINE
    unset) are all configured. A binary `image` column becomes an Image feature."""
    import datasets

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    ds = datasets.Dataset.from_polars(df)
    if "image" in df.columns and df.schema["image"] == pl.Binary:
        ds = ds.cast_column("image", datasets.Image())
    ds.save_to_disk(str(out))
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
