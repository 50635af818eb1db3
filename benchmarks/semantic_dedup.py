"""Semantic near-duplicate search at 100k and 1M records: embedding rate, index build,
search time, recall against an exact search in the same run, and memory peaks.

    python -m benchmarks.semantic_dedup [--sizes 100000 1000000] [--threshold 0.9]

Embedding rate is measured on real Persona Hub text with all-MiniLM-L6-v2. Embedding a
million texts at that rate would take most of an hour, so the search corpora are built
from real embeddings: 2,000 embedded personas are topic anchors, every record is an anchor
plus Gaussian noise (typical cosine to its anchor about 0.6, as in a real topical corpus),
and 1% of the records are planted near-duplicates of others (cosine 0.93-0.99).

Baseline: the exact blocked matrix-product self-join (quality.dedup.exact_pairs). At 1M it
would take hours, so recall there is measured on 2,000 sampled records, each searched
exactly against all 1M.
"""

import argparse
import json
import sys
import time
import tracemalloc
from pathlib import Path

import numpy as np

from quality.dedup import clustered_pairs as clustered
from quality.dedup import (
    cross_pairs,
    default_clusters,
    exact_pairs,
    spherical_kmeans,
    unit,
)
from quality.embeddings import embed

PERSONAS = (
    Path(__file__).resolve().parent.parent.parent / "shared" / "data" / "persona-hub-personas.jsonl"
)


def timed(fn, *args, **kwargs):
    tracemalloc.start()
    t = time.perf_counter()
    out = fn(*args, **kwargs)
    dt = time.perf_counter() - t
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return out, dt, peak / 2**20


def corpus(anchors: np.ndarray, n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    d = anchors.shape[1]
    v = anchors[rng.integers(0, len(anchors), n)] + rng.normal(size=(n, d)).astype(np.float32) * (
        1.3 / np.sqrt(d)
    )
    n_dupes = n // 100
    src, dst = rng.choice(n, (2, n_dupes), replace=False)
    v[dst] = v[src] + rng.normal(size=(n_dupes, d)).astype(np.float32) * rng.uniform(
        0.1, 0.35, (n_dupes, 1)
    ).astype(np.float32) / np.sqrt(d)
    return unit(v)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000])
    ap.add_argument("--threshold", type=float, default=0.9)
    ap.add_argument("--embed", type=int, default=2000, help="real texts embedded for the rate")
    ap.add_argument("--recall-sample", type=int, default=2000)
    a = ap.parse_args(argv)
    texts = [json.loads(line)["persona"] for line in PERSONAS.read_text().splitlines()][: a.embed]
    embed(texts[:64])  # load the model outside the timing
    t = time.perf_counter()  # not under tracemalloc, which slows torch's allocations
    anchors = embed(texts)
    t_embed = time.perf_counter() - t
    rate = len(texts) / t_embed
    rows = [
        (
            "embedding (MiniLM, real text)",
            f"{len(texts)} texts",
            f"{t_embed:.1f} s",
            f"{rate:.0f} texts/s",
            "",
        )
    ]
    for n in a.sizes:
        v = corpus(anchors, n, seed=n)
        k = default_clusters(n)
        centroids, t_build, m_build = timed(spherical_kmeans, v, k)
        found, t_search, m_search = timed(clustered, v, a.threshold, centroids=centroids)
        t_total = t_build + t_search
        rows.append(
            (
                f"index build (k-means, k={k})",
                f"{n:,}",
                f"{t_build:.1f} s",
                "",
                f"{m_build:.0f} MiB",
            )
        )
        rows.append(
            (
                "cluster-then-compare search",
                f"{n:,}",
                f"{t_search:.1f} s",
                f"{len(found):,} pairs",
                f"{m_search:.0f} MiB",
            )
        )
        if n <= 200_000:
            exact, t_exact, m_exact = timed(exact_pairs, v, a.threshold)
            recall = len(exact.as_set() & found.as_set()) / max(len(exact), 1)
            rows.append(
                (
                    "exact blocked self-join (baseline)",
                    f"{n:,}",
                    f"{t_exact:.1f} s",
                    f"{len(exact):,} pairs",
                    f"{m_exact:.0f} MiB",
                )
            )
            rows.append(
                (
                    "  recall vs exact / search speed-up",
                    "",
                    "",
                    f"recall {recall:.4f}",
                    f"{t_exact / t_search:.1f}x search, {t_exact / t_total:.1f}x incl. build",
                )
            )
        else:
            rng = np.random.default_rng(0)
            sample = rng.choice(n, a.recall_sample, replace=False)
            (lo, hi, _), t_exact, _ = timed(
                cross_pairs, v[sample], sample, v, np.arange(n), a.threshold
            )
            truth = set(zip(lo.tolist(), hi.tolist(), strict=True))
            got = found.as_set()
            recall = len(truth & got) / max(len(truth), 1)
            est = t_exact * n / a.recall_sample / 2
            rows.append(
                (
                    f"exact search of {a.recall_sample} sampled records",
                    f"{n:,}",
                    f"{t_exact:.1f} s",
                    f"{len(truth):,} true pairs",
                    f"full join est. {est / 60:.0f} min",
                )
            )
            rows.append(
                (
                    "  recall on the sample / search speed-up",
                    "",
                    "",
                    f"recall {recall:.4f}",
                    f"{est / t_search:.0f}x vs est. exact",
                )
            )
        del v
    print(
        "$ python -m benchmarks.semantic_dedup " + " ".join(sys.argv[1:] if argv is None else argv)
    )
    print(
        f"threshold cosine >= {a.threshold}; 2 cores; times are wall clock, memory is the tracemalloc peak of the phase\n"
    )
    print("| phase | records | time | result | memory / ratio |")
    print("|---|---|---|---|---|")
    for r in rows:
        print("| " + " | ".join(r) + " |")


if __name__ == "__main__":
    main()
