"""Expectation-suite validation rate on 1M rows, against the same checks written in polars.

    python -m benchmarks.expectations_rate [--rows 1000000]

The frame has the trace_triage schema; the suite is trace_triage's integrity suite (the
ERROR suite that gates training). The baseline computes the same verdicts with polars
expressions in this process, so the ratio shows what Great Expectations costs on top.
"""

import argparse
import sys
import time

import numpy as np
import polars as pl

from quality.expectations import to_pandas, validate
from quality.suites import MAX_TEXT_CHARS, SUITES
from synth.trace.triage import LABELS


def frame(n: int) -> pl.DataFrame:
    rng = np.random.default_rng(0)
    words = np.array(["how", "do", "I", "keep", "safe", "a", "lock", "bleach", "scam", "help"])
    prompt = [" ".join(rng.choice(words, 8)) for _ in range(1000)]
    p1, p2 = rng.random(n), rng.random(n)
    return pl.DataFrame(
        {
            "record_id": [f"{i:020x}" for i in range(n)],
            "parent_ids": [[f"p{i}"] for i in range(n)],
            "provenance": [{"backend": "embedded", "model": "m"}] * n,
            "pair_id": [f"p{i}" for i in range(n)],
            "policy_name": "new_policy",
            "policy_version": "abc123",
            "category": "general",
            "prompt": [prompt[i % 1000] for i in range(n)],
            "chosen": [prompt[(i + 1) % 1000] for i in range(n)],
            "rejected": [prompt[(i + 2) % 1000] for i in range(n)],
            "p_chosen_violates": p1,
            "p_rejected_violates": p2,
            "chosen_violates": p1 >= 0.5,
            "rejected_violates": p2 >= 0.5,
            "judge_method": "logprobs",
            "label": np.array(LABELS)[rng.integers(0, 3, n)],
            "verdict_threshold": 0.5,
        }
    )


def polars_verdicts(df: pl.DataFrame) -> list[bool]:
    """The integrity suite's expectations, as polars expressions."""
    texts = ["prompt", "chosen", "rejected"]
    out = df.select(
        pl.col("record_id").null_count().eq(0).alias("id_not_null"),
        pl.col("record_id").is_unique().all().alias("id_unique"),
        pl.col("provenance").null_count().eq(0).alias("prov"),
        pl.col("parent_ids").list.len().is_between(1, 1).all().alias("parents"),
        *[pl.col(t).null_count().eq(0).alias(f"{t}_nn") for t in texts],
        *[
            pl.col(t).str.len_chars().is_between(1, MAX_TEXT_CHARS).all().alias(f"{t}_len")
            for t in texts
        ],
        pl.col("p_chosen_violates").is_between(0, 1).all().alias("p1"),
        pl.col("p_rejected_violates").is_between(0, 1).all().alias("p2"),
        pl.col("label").is_in(list(LABELS)).all().alias("labels"),
        pl.col("policy_version").n_unique().eq(1).alias("one_version"),
    )
    return list(out.row(0))


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=1_000_000)
    a = ap.parse_args(argv)
    df = frame(a.rows)
    suite = next(s for s in SUITES["trace_triage"] if s.severity == "error")
    validate(df.head(100), suite)  # import GX and warm up outside the timing
    t = time.perf_counter()
    ok_polars = all(polars_verdicts(df))
    t_polars = time.perf_counter() - t
    t = time.perf_counter()
    to_pandas(df)
    t_convert = time.perf_counter() - t
    t = time.perf_counter()
    result = validate(df, suite)
    t_gx = time.perf_counter() - t
    print(
        "$ python -m benchmarks.expectations_rate "
        + " ".join(sys.argv[1:] if argv is None else argv)
    )
    print(f"suite {suite.name}: {len(suite.expectations)} expectations, {a.rows:,} rows, 2 cores\n")
    print("| step | time | rows/s | ratio to polars |")
    print("|---|---|---|---|")
    print(
        f"| polars expressions (baseline), all pass={ok_polars} | {t_polars:.2f} s | {a.rows / t_polars:,.0f} | 1.0 |"
    )
    print(
        f"| polars -> pandas at the boundary | {t_convert:.2f} s | {a.rows / t_convert:,.0f} | {t_convert / t_polars:.1f} |"
    )
    print(
        f"| GX suite incl. conversion, success={result.success} | {t_gx:.2f} s | {a.rows / t_gx:,.0f} | {t_gx / t_polars:.1f} |"
    )


if __name__ == "__main__":
    main()
