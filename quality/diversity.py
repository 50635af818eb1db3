"""Diversity of a dataset: distinct-n, embedding dispersion and topic cluster sizes."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


def distinct_n(texts: list[str], n: int) -> float:
    """Unique word n-grams over all word n-grams (Li et al. 2016); 0 for no n-grams."""
    grams: list[tuple[str, ...]] = []
    for t in texts:
        words = t.lower().split()
        grams += [tuple(words[i : i + n]) for i in range(len(words) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 0.0


@dataclass(slots=True)
class Diversity:
    rows: int
    distinct_1: float
    distinct_2: float
    dispersion: float  # mean cosine distance to the centroid: 0 = all alike
    cluster_sizes: list[int] = field(default_factory=list)  # k-means topic clusters, largest first

    def metadata(self) -> dict:
        return {
            "distinct_1": round(self.distinct_1, 4),
            "distinct_2": round(self.distinct_2, 4),
            "embedding_dispersion": round(self.dispersion, 4),
            "topic_clusters": len(self.cluster_sizes),
            "largest_topic_share": round(self.cluster_sizes[0] / self.rows, 4)
            if self.cluster_sizes
            else 0.0,
        }


def diversity(
    texts: list[str], vectors: np.ndarray, max_clusters: int = 8, seed: int = 0
) -> Diversity:
    if not texts:
        return Diversity(0, 0.0, 0.0, 0.0, [])
    centroid = vectors.mean(axis=0)
    centroid /= max(float(np.linalg.norm(centroid)), 1e-12)
    dispersion = float(np.mean(1.0 - vectors @ centroid))
    k = min(max_clusters, len(texts) // 4)
    sizes: list[int] = [len(texts)]
    if k >= 2:
        from sklearn.cluster import KMeans

        labels = KMeans(n_clusters=k, n_init=3, random_state=seed).fit_predict(vectors)
        sizes = sorted(np.bincount(labels, minlength=k).tolist(), reverse=True)
    return Diversity(len(texts), distinct_n(texts, 1), distinct_n(texts, 2), dispersion, sizes)
