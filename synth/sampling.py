"""Seeded, stratified sampling: a sample that keeps every stratum's share, not the first N."""

from __future__ import annotations

import random
from collections.abc import Sequence

import polars as pl


def allocate(sizes: dict[str, int], n: int) -> dict[str, int]:
    """How many of `n` to take from each stratum: proportional to its size (largest
    remainder), at least one from every non-empty stratum while n allows, never more than
    it holds."""
    total = sum(sizes.values())
    if n >= total:
        return dict(sizes)
    keys = sorted(k for k, v in sizes.items() if v > 0)
    take = dict.fromkeys(sizes, 0)
    if n >= len(keys):  # one each first, so a small stratum is never sampled away
        for k in keys:
            take[k] = 1
    left = n - sum(take.values())
    exact = {k: left * (sizes[k] - take[k]) / max(total - sum(take.values()), 1) for k in keys}
    for k in keys:
        take[k] += int(exact[k])
    order = sorted(keys, key=lambda k: (-(exact[k] - int(exact[k])), k))
    i = 0
    while sum(take.values()) < n:
        k = order[i % len(order)]
        if take[k] < sizes[k]:
            take[k] += 1
        i += 1
    return take


def stratified_sample(
    df: pl.DataFrame, by: str | Sequence[str], n: int | None, seed: int = 0
) -> pl.DataFrame:
    """`n` rows of `df` drawn per stratum of the `by` column(s) in proportion to its size,
    seeded; the rows keep their original order. `n` None or >= height: all rows."""
    if n is None or n >= df.height:
        return df
    cols = [by] if isinstance(by, str) else list(by)
    indexed = df.with_row_index("__row")
    keys = ["\x1f".join(str(v) for v in vals) for vals in indexed.select(cols).iter_rows()]
    strata: dict[str, list[int]] = {}
    for i, k in enumerate(keys):
        strata.setdefault(k, []).append(i)
    take = allocate({k: len(v) for k, v in strata.items()}, n)
    rng = random.Random(seed)
    chosen = sorted(i for k in sorted(strata) for i in rng.sample(strata[k], take[k]))
    return indexed[chosen].drop("__row")
