"""Decontamination: training records that match an evaluation item are dropped, naming the item.

A record is contaminated by an eval item when, on normalised text, (a) the texts are equal,
(b) they share a word n-gram (`ngram` words; an eval text shorter than that must appear
whole), or (c) their embeddings have cosine >= `cosine`. Every family registers its eval
sets in EVAL_SETS; users add benchmark files (JSON lines, JSON, Parquet, CSV).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from quality.dedup import normalise
from synth.loaders import read_source
from synth.trace.policy import EVAL_PROMPTS

# name -> file of every family's held-out evaluation prompts.
EVAL_SETS: dict[str, Path] = {"trace_eval_prompts": EVAL_PROMPTS}
TEXT_FIELDS = ("prompt", "instruction", "question", "query", "text", "input")


@dataclass(frozen=True, slots=True)
class EvalItem:
    eval_id: str  # "<set>:<id or row>"
    text: str


@dataclass(frozen=True, slots=True)
class Contamination:
    eval_id: str
    method: str  # exact | ngram | embedding
    score: float


def benchmark_files_from_env() -> list[str]:
    """ALIGNFOUNDRY_BENCHMARK_FILES: extra eval files, os.pathsep-separated."""
    listed = os.environ.get("ALIGNFOUNDRY_BENCHMARK_FILES", "")
    return [p for p in listed.split(os.pathsep) if p]


def load_eval_file(name: str, path: str | Path) -> list[EvalItem]:
    ds = read_source(str(path))
    field = next((f for f in TEXT_FIELDS if f in ds.column_names), None)
    if field is None:
        raise ValueError(
            f"benchmark file {path}: no text column (looked for {', '.join(TEXT_FIELDS)}; found {ds.column_names})"
        )
    ids = ds["id"] if "id" in ds.column_names else range(len(ds))
    return [
        EvalItem(f"{name}:{i}", t)
        for i, t in zip(ids, ds[field], strict=True)
        if isinstance(t, str) and t.strip()
    ]


def load_eval_items(extra_files: list[str] | None = None) -> list[EvalItem]:
    items: list[EvalItem] = []
    for name, path in EVAL_SETS.items():
        items += load_eval_file(name, path)
    for path in extra_files or []:
        items += load_eval_file(Path(path).name.split(".")[0], path)
    return items


def _ngrams(words: list[str], n: int) -> set[tuple[str, ...]]:
    return {tuple(words[i : i + n]) for i in range(len(words) - n + 1)}


def find_contamination(
    texts: list[str],
    vectors: np.ndarray,
    items: list[EvalItem],
    item_vectors: np.ndarray,
    ngram: int = 8,
    cosine: float = 0.9,
) -> dict[int, Contamination]:
    """{index of a contaminated text: the first matching eval item and how it matched}."""
    found: dict[int, Contamination] = {}
    if not items or not texts:
        return found
    norm_items = [normalise(it.text) for it in items]
    exact = {t: k for k, t in enumerate(norm_items)}
    gram_owner: dict[tuple[str, ...], int] = {}
    short: list[tuple[str, int]] = []
    for k, t in enumerate(norm_items):
        words = t.split()
        if len(words) < ngram:
            short.append((t, k))
        for g in _ngrams(words, ngram):
            gram_owner.setdefault(g, k)
    for i, text in enumerate(texts):
        t = normalise(text)
        if t in exact:
            found[i] = Contamination(items[exact[t]].eval_id, "exact", 1.0)
            continue
        hit = next((gram_owner[g] for g in _ngrams(t.split(), ngram) if g in gram_owner), None)
        if hit is None:
            padded = f" {t} "
            hit = next((k for s, k in short if s and f" {s} " in padded), None)
        if hit is not None:
            found[i] = Contamination(items[hit].eval_id, "ngram", 1.0)
    if len(item_vectors):
        sims = vectors @ item_vectors.T
        best = sims.argmax(axis=1)
        for i in np.nonzero(sims.max(axis=1) >= cosine)[0].tolist():
            if i not in found:
                k = int(best[i])
                found[i] = Contamination(items[k].eval_id, "embedding", float(sims[i, k]))
    return found
