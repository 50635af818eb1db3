"""Curation of a training dataset: exact dedup, decontamination, semantic near-dedup.

Input rows are kept or rejected exactly once. A kept row gains `cluster_id` (its own
record_id: it represents its cluster) and `cluster_size`; a dropped duplicate names its
cluster in the rejected detail and payload. Semantic dedup is incremental: a batch is
compared with every record the family's LanceDB table already holds (other than itself)
and its kept records are then added to that table.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import polars as pl
from pydantic import BaseModel, ConfigDict

from quality.decontam import EvalItem, find_contamination
from quality.dedup import (
    EXACT_BELOW,
    Pairs,
    clustered_pairs,
    cross_pairs,
    exact_clusters,
    unique_pairs,
)
from quality.diversity import Diversity, diversity
from quality.embeddings import embed
from quality.store import EmbeddingStore
from synth.progress import Progress
from synth.records import Rejected, rejected_frame

# Above this many query x stored comparisons, cluster-then-compare replaces the exact join.
EXACT_JOIN_BUDGET = 2_000_000_000


class CurationSettings(BaseModel):
    """Knobs of the curation step; a pydantic model so a Dagster Config can extend it."""

    model_config = ConfigDict(frozen=True)

    near_duplicate_threshold: float = 0.95  # cosine of MiniLM embeddings
    decontam_cosine: float = 0.9
    decontam_ngram: int = 8  # words
    benchmark_files: list[str] = []  # user-registered eval files, besides every family's own


@dataclass(frozen=True, slots=True)
class CurationSpec:
    family: str  # the LanceDB table
    dedup_fields: tuple[str, ...]  # joined into the text that is deduplicated
    decontam_fields: tuple[str, ...]  # joined into the text compared with eval items


@dataclass(slots=True)
class CurationResult:
    kept: pl.DataFrame
    rejected: pl.DataFrame
    n_in: int
    stored_before: int
    diversity: Diversity
    cluster_sizes: list[int] = field(default_factory=list)  # of clusters with a dropped member

    def metadata(self) -> dict:
        counts = Counter(self.rejected["reason"].to_list()) if self.rejected.height else Counter()
        return {
            "stored_before": self.stored_before,
            "duplicate_clusters": len(self.cluster_sizes),
            **{f"dropped_{k}": v for k, v in sorted(counts.items())},
            **self.diversity.metadata(),
        }


def _text(df: pl.DataFrame, fields: tuple[str, ...]) -> list[str]:
    return (
        df.select(pl.concat_str([pl.col(f).fill_null("") for f in fields], separator="\n"))
        .to_series()
        .to_list()
    )


def near_duplicates(new: np.ndarray, stored: np.ndarray, threshold: float) -> Pairs:
    """Pairs over [stored..., new...] (indices into that order) that involve a new vector."""
    everything = np.concatenate([stored, new]) if len(stored) else new
    n_old = len(stored)
    if len(new) * len(everything) <= EXACT_JOIN_BUDGET or len(everything) < EXACT_BELOW:
        ids = np.arange(len(everything))
        lo, hi, s = cross_pairs(new, ids[n_old:], everything, ids, threshold)
        return unique_pairs(lo, hi, s, len(everything))
    pairs = clustered_pairs(everything, threshold)
    keep = pairs.right >= n_old  # right > left, so a pair touching a new vector has right new
    return Pairs(pairs.left[keep], pairs.right[keep], pairs.similarity[keep])


def curate(
    df: pl.DataFrame,
    spec: CurationSpec,
    settings: CurationSettings,
    store: EmbeddingStore,
    eval_items: list[EvalItem],
    asset: str,
    run_id: str,
    log: Callable[[str], None] | None = None,
) -> CurationResult:
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    rows = df.to_dicts()
    rejected: list[Rejected] = []

    def drop(i: int, stage: str, reason: str, detail: str, cluster_id: str = "") -> Rejected:
        r = rows[i]
        rejected.append(
            Rejected(
                r["record_id"],
                stage,
                reason,
                detail,
                list(r.get("parent_ids") or []),
                payload={**r, "cluster_id": cluster_id},
            )
        )
        return rejected[-1]

    fields_s = "+".join(spec.dedup_fields)
    dedup_text = _text(df, spec.dedup_fields)
    alive = []
    for i, t in enumerate(dedup_text):
        if t.strip():
            alive.append(i)
        else:
            drop(
                i,
                "curate",
                "empty_field",
                f"record {rows[i]['record_id']}: fields {fields_s} are empty",
            )

    # 1. exact duplicates on normalised text
    clusters = exact_clusters(
        pl.DataFrame(
            {
                "record_id": [rows[i]["record_id"] for i in alive],
                "t": [dedup_text[i] for i in alive],
            },
            schema={"record_id": pl.Utf8, "t": pl.Utf8},  # typed even when nothing is alive
        ),
        "t",
    )
    rep_of = dict(zip(clusters["record_id"], clusters["cluster_id"], strict=True))
    exact_dupes: dict[str, list[Rejected]] = {}  # representative -> its dropped copies
    survivors = []
    for i in alive:
        rid = rows[i]["record_id"]
        if rep_of[rid] != rid:
            exact_dupes.setdefault(rep_of[rid], []).append(
                drop(
                    i,
                    "exact_dedup",
                    "exact_duplicate",
                    f"record {rid}: fields {fields_s} have the same normalised text as record {rep_of[rid]}",
                    rep_of[rid],
                )
            )
        else:
            survivors.append(i)

    # 2. embeddings (one pass per distinct text field set)
    progress = Progress(len(survivors), f"{asset}: embedding", log=log)
    vectors = embed([dedup_text[i] for i in survivors], on_batch=progress.update)
    progress.close()
    if spec.decontam_fields == spec.dedup_fields:
        contam_text, contam_vectors = [dedup_text[i] for i in survivors], vectors
    else:
        all_contam = _text(df, spec.decontam_fields)
        contam_text = [all_contam[i] for i in survivors]
        contam_vectors = embed(contam_text)

    # 3. decontamination against every family's eval set and registered benchmarks
    item_vectors = embed([it.text for it in eval_items])
    hits = find_contamination(
        contam_text,
        contam_vectors,
        eval_items,
        item_vectors,
        ngram=settings.decontam_ngram,
        cosine=settings.decontam_cosine,
    )
    clean = []
    for k, i in enumerate(survivors):
        if k in hits:
            h = hits[k]
            drop(
                i,
                "decontaminate",
                "contaminated",
                f"record {rows[i]['record_id']}: fields {'+'.join(spec.decontam_fields)} match eval item {h.eval_id} ({h.method}, score {h.score:.3f})",
            )
        else:
            clean.append(k)

    # 4. semantic near-duplicates, within the batch and against the family's store
    batch_ids = {rows[i]["record_id"] for i in alive}
    stored_ids, stored_vecs = store.vectors(spec.family)
    keep_old = [j for j, rid in enumerate(stored_ids) if rid not in batch_ids]
    stored_ids = [stored_ids[j] for j in keep_old]
    stored_vecs = stored_vecs[keep_old]
    new_vecs = vectors[clean]
    n_old = len(stored_ids)
    pairs = near_duplicates(new_vecs, stored_vecs, settings.near_duplicate_threshold)
    n_all = n_old + len(clean)
    graph = coo_matrix((np.ones(len(pairs)), (pairs.left, pairs.right)), shape=(n_all, n_all))
    _, component = connected_components(graph, directed=False)
    best_sim: dict[int, tuple[float, int]] = {}
    for a, b, s in zip(
        pairs.left.tolist(), pairs.right.tolist(), pairs.similarity.tolist(), strict=True
    ):
        for x, y in ((a, b), (b, a)):
            if x not in best_sim or s > best_sim[x][0]:
                best_sim[x] = (s, y)

    def node_id(x: int) -> str:
        return stored_ids[x] if x < n_old else rows[survivors[clean[x - n_old]]]["record_id"]

    first_of: dict[int, int] = {}
    for x in range(n_all):  # stored first, then the batch in order: the first node represents
        first_of.setdefault(int(component[x]), x)
    kept_idx, cluster_size = [], Counter()
    for pos, k in enumerate(clean):
        x = n_old + pos
        rep = first_of[int(component[x])]
        i = survivors[k]
        if rep == x:
            kept_idx.append(i)
            continue
        root = node_id(rep)
        cluster_size[root] += 1
        # Exact copies of this record join the cluster that absorbed it.
        for copy in exact_dupes.pop(rows[i]["record_id"], []):
            copy.payload["cluster_id"] = root
            cluster_size[root] += 1
        s, y = best_sim[x]
        where = "stored from an earlier batch" if rep < n_old else "in this batch"
        drop(
            i,
            "semantic_dedup",
            "near_duplicate",
            f"record {rows[i]['record_id']}: fields {fields_s} are a near-duplicate (cosine {s:.3f}) of record {node_id(y)}; cluster {root}, {where}",
            root,
        )
    for rep, copies in exact_dupes.items():
        cluster_size[rep] += len(copies)
    sizes = {k: v + 1 for k, v in cluster_size.items()}
    kept = df[kept_idx].with_columns(
        pl.col("record_id").alias("cluster_id"),
        pl.col("record_id")
        .replace_strict(sizes, default=1, return_dtype=pl.Int64)
        .alias("cluster_size"),
    )
    position = {i: k for k, i in enumerate(survivors)}
    kept_vecs = vectors[[position[i] for i in kept_idx]] if kept_idx else vectors[:0]
    kept_text = [dedup_text[i] for i in kept_idx]
    store.upsert(spec.family, asset, kept, kept_text, kept_vecs, run_id)
    if log:
        log(
            f"{asset}: {len(rows)} in, {kept.height} kept, {len(rejected)} rejected "
            f"({n_old} stored records compared)"
        )
    return CurationResult(
        kept=kept,
        rejected=rejected_frame(rejected),
        n_in=len(rows),
        stored_before=n_old,
        diversity=diversity(kept_text, kept_vecs),
        cluster_sizes=sorted(sizes.values(), reverse=True),
    )
