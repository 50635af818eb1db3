"""UltraPrompt seeds: instructions and preference-pair prompts, categorised, selected for
diversity.

- A candidate's category (which principle group its search may use, beside helpfulness)
  is the source's own label when the row has one (a `category` column), else a
  classifier's: the judge role picks one of the five categories, read from the logprobs
  of its answer letter. A candidate the classifier gives no answer for is rejected with
  the reason `category_unclassified`. (No keyword default: a cooking question from a
  harmlessness dataset is not a harmlessness seed.)
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

from synth.llm import LLMClient, judge
from synth.llm.judge import JUDGE_PARAMS
from synth.loaders import instruction_text
from synth.records import (
    PROVENANCE_DTYPE,
    Provenance,
    Rejected,
    content_id,
    frame,
    rejected_frame,
)
from synth.templates import PromptTemplate
from synth.ultraprompt.principles import CATEGORIES

CATEGORY_LETTERS = dict(zip("ABCDE", CATEGORIES, strict=True))
CLASSIFY = PromptTemplate(
    id="ultraprompt_classify_seed",
    system="You sort requests that users send to an AI assistant. Answer with a single letter.",
    user=(
        "Request:\n{instruction}\n\nWhich kind of request is it?\n"
        "A) general helpfulness: advice, writing, explanation, everyday tasks\n"
        "B) harmlessness: it could lead to harm, or touches safety, ethics or privacy\n"
        "C) honesty: it asks for facts that must be true, or rests on a false premise\n"
        "D) coding and debugging\n"
        "E) math: calculation, word problems, proofs\n"
        "Answer with the letter only."
    ),
)


def classify(client: LLMClient, texts: list[str]) -> list[tuple[str | None, str]]:
    """(category or None, how it was decided) per text, from the client's answer letter."""
    scores = judge(
        client,
        [CLASSIFY.request(JUDGE_PARAMS, instruction=t) for t in texts],
        choices=tuple(CATEGORY_LETTERS),
    )
    out = []
    for sc in scores:
        if not sc.ok or sc.best is None:
            out.append((None, f"classifier failed: {sc.error}"))
        else:
            p = sc.probs[sc.best]
            out.append(
                (CATEGORY_LETTERS[sc.best], f"classifier: {sc.best} p={p:.2f} ({sc.method})")
            )
    return out


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


def candidates(
    instructions: pl.DataFrame, pairs: pl.DataFrame, client: LLMClient | None
) -> list[dict[str, Any]]:
    """Every input row as a candidate, instructions first, then pair prompts, each with
    its category: the row's own label, else the classifier's (None when it failed)."""
    out = []
    for r in instructions.iter_rows(named=True):
        out.append(_candidate(r, instruction_text(r), "instruction"))
    for r in pairs.iter_rows(named=True):
        history = r.get("history") or []
        first = history[0]["content"] if history else r["prompt"]
        out.append(_candidate(r, first, "preference_pair"))
    todo = [c for c in out if c["category"] is None]
    if todo and client is None:
        raise ValueError(
            f"{len(todo)} candidates have no category label and no classifier is given"
        )
    for c, (category, rule) in zip(
        todo, classify(client, [c["instruction"] for c in todo]) if todo else [], strict=True
    ):
        c["category"], c["category_rule"] = category, rule
    return out


def _candidate(row: dict[str, Any], text: str, kind: str) -> dict[str, Any]:
    label = row.get("category")
    own = label if label in CATEGORIES else None
    return {
        "parent": row["record_id"],
        "instruction": text,
        "category": own,
        "category_rule": "source label" if own else "",
        "source_kind": kind,
        "source": row.get("source", ""),
        "source_index": row.get("source_index"),
    }


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
    client: LLMClient | None = None,
) -> tuple[pl.DataFrame, pl.DataFrame, int]:
    """(seeds, rejected, rows in). `client` (the judge role) classifies the candidates
    whose source has no category label."""
    if embedder is None:
        from quality.embeddings import embed as embedder
    cands = candidates(instructions, pairs, client)
    vecs = embedder([c["instruction"] for c in cands]) if cands else np.empty((0, 384))
    kept, rejected = [], []
    for c in (c for c in cands if c["category"] is None):
        rejected.append(
            Rejected(
                record_id=content_id("ultraprompt_seed_rejected", c["parent"], "unclassified"),
                stage="seed_selection",
                reason="category_unclassified",
                detail=f"{c['source_kind']} {c['parent']}: {c['category_rule']}",
                parent_ids=[c["parent"]],
                source=c["source"],
                source_index=c["source_index"],
                payload={"instruction": c["instruction"]},
            )
        )
    if client is not None:
        prov = Provenance.of_client(client, CLASSIFY.id, template_hash=CLASSIFY.hash).as_dict()
    else:
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
