"""UltraPrompt seeds: instructions and harmlessness prompts, tagged, selected for diversity.

- Instructions (Self-Instruct/Alpaca rows) are tagged by the rules in categories.yaml;
  the first human turn of a preference pair (HH-RLHF, PKU-SafeRLHF) is a harmlessness seed.
- Selection is embedding based: within each category, greedy farthest-point sampling on
  MiniLM vectors (start from the seed closest to the category's mean, then repeatedly take
  the seed least similar to everything taken). A seed not taken is rejected with the
  cosine to the closest taken seed, so near-copies go first.
- In each category every `heldout_every`-th taken seed is held out of the search: the
  P-Aligner evaluation rewrites those and nothing trained on them.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import polars as pl
from pydantic import BaseModel, ConfigDict

from synth.loaders import instruction_text
from synth.records import (
    PROVENANCE_DTYPE,
    Provenance,
    Rejected,
    content_id,
    frame,
    rejected_frame,
)
from synth.ultraprompt.principles import CATEGORIES, categorize

SEED_SCHEMA: dict[str, pl.DataType] = {
    "record_id": pl.Utf8(),
    "parent_ids": pl.List(pl.Utf8),
    "provenance": PROVENANCE_DTYPE,
    "instruction": pl.Utf8(),
    "category": pl.Utf8(),
    "category_rule": pl.Utf8(),
    "source_kind": pl.Utf8(),
    "split": pl.Utf8(),  # search | heldout
    "diversity_rank": pl.Int64(),  # order of selection within the category (0 = first)
    "nearest_taken_similarity": pl.Float64(),  # cosine to the closest seed taken before it
}


class SeedSelection(BaseModel):
    model_config = ConfigDict(frozen=True)

    per_category: int = 4  # seeds taken per category (fewer when a category has fewer)
    heldout_every: int = 3  # every 3rd taken seed per category is held out; 0 = none
    categories: list[str] = list(CATEGORIES)  # categories to take seeds from


def candidates(instructions: pl.DataFrame, pairs: pl.DataFrame) -> list[dict[str, Any]]:
    """Every input row as a tagged candidate, instructions first, then pair prompts."""
    out = []
    for r in instructions.iter_rows(named=True):
        text = instruction_text(r)
        category, rule = categorize(r["instruction"])
        out.append(
            {
                "parent": r["record_id"],
                "instruction": text,
                "category": category,
                "category_rule": rule,
                "source_kind": "instruction",
                "source": r.get("source", ""),
                "source_index": r.get("source_index"),
            }
        )
    for r in pairs.iter_rows(named=True):
        history = r.get("history") or []
        first = history[0]["content"] if history else r["prompt"]
        out.append(
            {
                "parent": r["record_id"],
                "instruction": first,
                "category": "harmlessness",
                "category_rule": "source: preference pair first human turn",
                "source_kind": "preference_pair",
                "source": r.get("source", ""),
                "source_index": r.get("source_index"),
            }
        )
    return out


def farthest_point_order(vectors: np.ndarray, k: int) -> tuple[list[int], list[float]]:
    """Indices of k rows in selection order, and each one's cosine to the closest earlier
    pick (1.0 for the first). Vectors are unit length."""
    n = len(vectors)
    if n == 0 or k <= 0:
        return [], []
    sims = vectors @ vectors.T
    first = int(np.argmax(sims.mean(axis=1)))
    order, nearest = [first], [1.0]
    closest = sims[first].copy()  # similarity of every row to its closest pick so far
    closest[first] = np.inf
    while len(order) < min(k, n):
        nxt = int(np.argmin(closest))
        order.append(nxt)
        nearest.append(float(closest[nxt]))
        closest = np.maximum(closest, sims[nxt])
        closest[order] = np.inf
    return order, nearest


def select_seeds(
    instructions: pl.DataFrame,
    pairs: pl.DataFrame,
    settings: SeedSelection = SeedSelection(),
    embedder: Callable[[Sequence[str]], np.ndarray] | None = None,
) -> tuple[pl.DataFrame, pl.DataFrame, int]:
    """(seeds, rejected, rows in)."""
    if embedder is None:
        from quality.embeddings import embed as embedder
    cands = candidates(instructions, pairs)
    vecs = embedder([c["instruction"] for c in cands]) if cands else np.empty((0, 384))
    kept, rejected = [], []
    prov = Provenance(backend="source", model="all-MiniLM-L6-v2").as_dict()
    for category in CATEGORIES:
        idx = [i for i, c in enumerate(cands) if c["category"] == category]
        if not idx:
            continue
        want = settings.per_category if category in settings.categories else 0
        order, nearest = farthest_point_order(vecs[idx], want)
        taken = [idx[j] for j in order]
        for rank, (i, sim) in enumerate(zip(taken, nearest, strict=True)):
            c = cands[i]
            heldout = settings.heldout_every > 0 and rank % settings.heldout_every == (
                settings.heldout_every - 1
            )
            kept.append(
                {
                    "record_id": content_id("ultraprompt_seed", c["parent"], c["instruction"]),
                    "parent_ids": [c["parent"]],
                    "provenance": prov,
                    "instruction": c["instruction"],
                    "category": category,
                    "category_rule": c["category_rule"],
                    "source_kind": c["source_kind"],
                    "split": "heldout" if heldout else "search",
                    "diversity_rank": rank,
                    "nearest_taken_similarity": round(sim, 6),
                }
            )
        taken_vecs = vecs[taken] if taken else None
        for i in sorted(set(idx) - set(taken)):
            c = cands[i]
            if taken_vecs is None:
                reason, detail = "category_not_selected", f"category {category!r} is not selected"
            else:
                sims = taken_vecs @ vecs[i]
                j = int(np.argmax(sims))
                reason = "not_selected_diverse"
                detail = (
                    f"{c['source_kind']} {c['parent']}: {category} quota "
                    f"{settings.per_category} filled; closest taken seed is "
                    f"{cands[taken[j]]['parent']} (cosine {float(sims[j]):.3f})"
                )
            rejected.append(
                Rejected(
                    record_id=content_id("ultraprompt_seed_rejected", c["parent"], reason),
                    stage="seed_selection",
                    reason=reason,
                    detail=detail,
                    parent_ids=[c["parent"]],
                    source=c["source"],
                    source_index=c["source_index"],
                    payload={"instruction": c["instruction"], "category": category},
                )
            )
    return frame(kept, SEED_SCHEMA), rejected_frame(rejected), len(cands)
