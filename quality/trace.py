"""TRACE verifiers: labels follow from verdicts, weights are a distribution per policy version."""

from __future__ import annotations

import polars as pl

from synth.trace.triage import LABELS, triage_label


def label_mismatches(triaged: pl.DataFrame) -> pl.DataFrame:
    """Rows whose stored verdicts or label disagree with a recomputation from the probabilities."""
    rows = []
    for r in triaged.iter_rows(named=True):
        threshold = r["verdict_threshold"]
        cv, rv = r["p_chosen_violates"] >= threshold, r["p_rejected_violates"] >= threshold
        expected = triage_label(cv, rv)
        if (cv, rv) != (r["chosen_violates"], r["rejected_violates"]) or expected != r["label"]:
            rows.append({"record_id": r["record_id"], "label": r["label"], "expected": expected})
    return pl.DataFrame(rows, schema={"record_id": pl.Utf8, "label": pl.Utf8, "expected": pl.Utf8})


def label_counts(df: pl.DataFrame) -> dict[str, int]:
    counts = dict(df["label"].value_counts().iter_rows()) if df.height else {}
    return {label: int(counts.get(label, 0)) for label in LABELS}


def weight_sums(weighted: pl.DataFrame) -> dict[str, float]:
    """Sum of impact weights over INVERT+PUNISH rows, per policy version."""
    conflict = weighted.filter(pl.col("label").is_in(["INVERT", "PUNISH"]))
    if conflict.height == 0:
        return {}
    sums = conflict.group_by("policy_version").agg(pl.col("impact_weight").sum())
    return {v: float(s) for v, s in sums.iter_rows()}
