"""Exact and semantic near-duplicate detection.

Exact: texts normalised (case, whitespace, punctuation) and grouped with polars; the first
row of each group is kept and the others point at it through a shared cluster id.

Semantic: cosine similarity of unit-normalised embeddings above a threshold. Two search
strategies return the same kind of answer (pairs i < j with their similarity):
- `exact_pairs`: a blocked matrix-product self-join, O(n^2); the reference for recall.
- `clustered_pairs`: cluster-then-compare in the style of SemDeDup (Abbas et al. 2023):
  spherical k-means, every vector is stored in its nearest cluster and probes its
  `probes` nearest clusters, so only vectors in neighbouring clusters are compared.
  A near-duplicate pair is missed only when neither vector's nearest centroid is among
  the other's `probes` nearest, which is rare above a cosine of ~0.9.
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass

import numpy as np
import polars as pl

# Below this many vectors the exact self-join is as fast as clustering and has no misses.
EXACT_BELOW = 20_000
BLOCK_BYTES = 256 * 2**20  # memory for one block of the similarity matrix


def normalise_text(expr: pl.Expr) -> pl.Expr:
    """Lower case, punctuation dropped, whitespace collapsed (polars, vectorised)."""
    return (
        expr.str.to_lowercase()
        .str.replace_all(r"[^\p{L}\p{N}\s]", "")
        .str.replace_all(r"\s+", " ")
        .str.strip_chars()
    )


def normalise(text: str) -> str:
    """The same normalisation for one string (eval sets, tests)."""
    text = unicodedata.normalize("NFKC", text).lower()
    text = re.sub(r"[^\w\s]|_", "", text)
    return re.sub(r"\s+", " ", text).strip()


def exact_clusters(df: pl.DataFrame, text_col: str) -> pl.DataFrame:
    """record_id, cluster_id (record_id of the kept representative), is_representative.

    The representative of a group of equal normalised texts is its first row.
    """
    return (
        df.select("record_id", normalise_text(pl.col(text_col)).alias("_norm"))
        .with_row_index("_row")
        .with_columns(pl.col("record_id").first().over("_norm").alias("cluster_id"))
        .with_columns((pl.col("record_id") == pl.col("cluster_id")).alias("is_representative"))
        .sort("_row")
        .select("record_id", "cluster_id", "is_representative")
    )


@dataclass(slots=True)
class Pairs:
    """Near-duplicate pairs: left[k] < right[k] (row indices), similarity[k] >= threshold."""

    left: np.ndarray
    right: np.ndarray
    similarity: np.ndarray

    def __len__(self) -> int:
        return len(self.left)

    def as_set(self) -> set[tuple[int, int]]:
        return set(zip(self.left.tolist(), self.right.tolist(), strict=True))


def unit(vectors: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length; already-unit float32 rows are returned as they are (no copy)."""
    v = np.asarray(vectors, dtype=np.float32)
    norms = np.linalg.norm(v, axis=1, keepdims=True)
    if np.allclose(norms, 1.0, atol=1e-4):
        return v
    return v / np.maximum(norms, 1e-12)


def _block_rows(n_cols: int) -> int:
    return max(32, BLOCK_BYTES // (4 * max(n_cols, 1)))


def cross_pairs(
    queries: np.ndarray, q_ids: np.ndarray, base: np.ndarray, b_ids: np.ndarray, threshold: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Every (min id, max id, sim) of a query and a different base vector with sim >= threshold."""
    out_l, out_r, out_s = [], [], []
    step = _block_rows(len(base))
    for a in range(0, len(queries), step):
        sims = queries[a : a + step] @ base.T
        qi, bi = np.nonzero(sims >= threshold)
        left, right = q_ids[a + qi], b_ids[bi]
        keep = left != right
        out_l.append(np.minimum(left[keep], right[keep]))
        out_r.append(np.maximum(left[keep], right[keep]))
        out_s.append(sims[qi[keep], bi[keep]])
    return _concat(out_l, out_r, out_s)


def _concat(ls: list, rs: list, ss: list) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    if not ls:
        return np.empty(0, np.int64), np.empty(0, np.int64), np.empty(0, np.float32)
    return np.concatenate(ls), np.concatenate(rs), np.concatenate(ss)


def unique_pairs(left: np.ndarray, right: np.ndarray, sims: np.ndarray, n: int) -> Pairs:
    key = left.astype(np.int64) * n + right.astype(np.int64)
    _, first = np.unique(key, return_index=True)
    return Pairs(left[first], right[first], sims[first].astype(np.float32))


def exact_pairs(vectors: np.ndarray, threshold: float) -> Pairs:
    """Every pair i < j with cosine >= threshold: a blocked matrix product over the upper triangle."""
    v = unit(vectors)
    ls, rs, ss = [], [], []
    step = _block_rows(len(v))
    for a in range(0, len(v), step):
        sims = v[a : a + step] @ v[a:].T
        qi, bj = np.nonzero(sims >= threshold)
        keep = bj > qi  # j > i within the triangle (column offset a cancels)
        ls.append(a + qi[keep])
        rs.append(a + bj[keep])
        ss.append(sims[qi[keep], bj[keep]])
    left, right, sims = _concat(ls, rs, ss)  # the upper triangle holds each pair once
    return Pairs(left, right, sims.astype(np.float32))


def spherical_kmeans(vectors: np.ndarray, n_clusters: int, seed: int = 0) -> np.ndarray:
    """Unit-norm centroids from k-means (scikit-learn) on a sample of unit vectors.

    Centroids only route vectors to buckets, so a rough fit on ~16 points per cluster
    does: a poor centroid costs speed (uneven buckets), not recall (probes cover it).
    """
    from sklearn.cluster import KMeans

    rng = np.random.default_rng(seed)
    sample = min(len(vectors), max(10_000, 16 * n_clusters))
    idx = rng.choice(len(vectors), size=sample, replace=False)
    km = KMeans(n_clusters=n_clusters, n_init=1, max_iter=10, random_state=seed)
    km.fit(vectors[idx])
    return unit(km.cluster_centers_)


def _top_clusters(v: np.ndarray, centroids: np.ndarray, probes: int) -> np.ndarray:
    """(n, probes) indices of each vector's nearest centroids, nearest first."""
    out = np.empty((len(v), probes), dtype=np.int32)
    step = _block_rows(len(centroids))
    for a in range(0, len(v), step):
        sims = v[a : a + step] @ centroids.T
        top = np.argpartition(-sims, probes - 1, axis=1)[:, :probes]
        order = np.argsort(-np.take_along_axis(sims, top, axis=1), axis=1)
        out[a : a + step] = np.take_along_axis(top, order, axis=1)
    return out


def default_clusters(n: int) -> int:
    # ~sqrt(n) clusters keep both the assignment and the in-cluster joins small.
    return int(min(max(16, np.sqrt(n)), 4096))


def clustered_pairs(
    vectors: np.ndarray,
    threshold: float,
    n_clusters: int | None = None,
    probes: int = 3,
    seed: int = 0,
    centroids: np.ndarray | None = None,
) -> Pairs:
    """Near-duplicate pairs by cluster-then-compare (see the module docstring).

    `centroids` (from `spherical_kmeans`) skips the fit: the index can be built once.
    """
    v = unit(vectors)
    n = len(v)
    if centroids is None:
        centroids = spherical_kmeans(v, n_clusters or default_clusters(n), seed=seed)
    k = len(centroids)
    top = _top_clusters(v, centroids, min(probes, k))
    home = top[:, 0]
    by_home = np.argsort(home, kind="stable")
    starts = np.searchsorted(home[by_home], np.arange(k + 1))
    probe_of = top.ravel()
    probe_vec = np.repeat(np.arange(n), top.shape[1])
    by_probe = np.argsort(probe_of, kind="stable")
    pstarts = np.searchsorted(probe_of[by_probe], np.arange(k + 1))
    ls, rs, ss = [], [], []
    for c in range(k):
        base_ids = by_home[starts[c] : starts[c + 1]]
        query_ids = probe_vec[by_probe[pstarts[c] : pstarts[c + 1]]]
        if len(base_ids) and len(query_ids):
            lo, hi, s = cross_pairs(v[query_ids], query_ids, v[base_ids], base_ids, threshold)
            ls.append(lo)
            rs.append(hi)
            ss.append(s)
    return unique_pairs(*_concat(ls, rs, ss), n)
