"""TRACE verifiers: labels re-derived from the judge's raw output, weights a distribution.

`verify_labels` is deliberately a second path to each label: it reads the judge's raw
evidence (the deciding token's top logprobs, or the reply text), turns it into p(violates)
itself, applies the threshold of the run's settings (re-derived from the evidence when it is
a quantile of the batch), and looks the label up in its own table. It shares no code with
the triage, so a bug in how the triage reads logprobs, applies the threshold or combines
verdicts shows up here as a mismatch.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass

import polars as pl

LABELS = ("RETAIN", "INVERT", "PUNISH")
# (chosen violates, rejected violates) -> label, as The Realignment Problem defines them
LABEL_TABLE = {
    (False, False): "RETAIN",
    (False, True): "RETAIN",
    (True, False): "INVERT",
    (True, True): "PUNISH",
}


def p_violates_from_evidence(evidence: str) -> float | None:
    """p(Yes) over {Yes, No} from the judge's raw evidence; None when it holds neither."""
    try:
        raw = json.loads(evidence)
    except (TypeError, ValueError):
        return None
    if isinstance(raw, dict):  # no logprobs: the reply's first yes/no word decides
        words = [w.strip(".,:;!*\"'()").lower() for w in str(raw.get("text", "")).split()]
        answer = next((w for w in words if w in ("yes", "no")), None)
        return None if answer is None else float(answer == "yes")
    mass = {"yes": 0.0, "no": 0.0}
    for token, logprob in raw:
        word = str(token).strip().strip(".:*\"'()[]").lower()
        if word in mass:
            mass[word] += math.exp(float(logprob))
    total = mass["yes"] + mass["no"]
    return None if total <= 0 else mass["yes"] / total


def quantile_threshold_from_evidence(judged: list[pl.DataFrame], q: float) -> float | None:
    """The `threshold_quantile` threshold re-derived: the q-quantile (linear) of p(violates)
    read from the raw evidence of both responses of every judged pair (kept and review)."""
    probs = [
        p_violates_from_evidence(e)
        for frame in judged
        for col in ("chosen_judge_evidence", "rejected_judge_evidence")
        for e in frame[col].to_list()
    ]
    probs = sorted(p for p in probs if p is not None)
    if not probs:
        return None
    pos = q * (len(probs) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(probs) - 1)
    return probs[lo] + (pos - lo) * (probs[hi] - probs[lo])


def verify_labels(triaged: pl.DataFrame, threshold: float, tol: float = 1e-6) -> pl.DataFrame:
    """Rows whose stored probability, verdicts or label disagree with the ones re-derived
    from the raw judge evidence under `threshold`, each with what was expected."""
    bad = []
    for r in triaged.iter_rows(named=True):
        pc = p_violates_from_evidence(r["chosen_judge_evidence"])
        pr = p_violates_from_evidence(r["rejected_judge_evidence"])
        problems = []
        if abs(r["verdict_threshold"] - threshold) > tol:
            problems.append(f"verdict_threshold {r['verdict_threshold']} != {threshold}")
        if pc is None or pr is None:
            problems.append("no usable judge evidence")
        else:
            if abs(pc - r["p_chosen_violates"]) > tol or abs(pr - r["p_rejected_violates"]) > tol:
                problems.append(
                    f"stored p ({r['p_chosen_violates']:.4f}, {r['p_rejected_violates']:.4f}) != evidence ({pc:.4f}, {pr:.4f})"
                )
            verdicts = (pc >= threshold, pr >= threshold)
            if verdicts != (r["chosen_violates"], r["rejected_violates"]):
                problems.append(f"verdicts {verdicts} at threshold {threshold}")
            expected = LABEL_TABLE[verdicts]
            if expected != r["label"]:
                problems.append(f"label {r['label']} should be {expected}")
        if problems:
            bad.append(
                {"record_id": r["record_id"], "label": r["label"], "problem": "; ".join(problems)}
            )
    return pl.DataFrame(bad, schema={"record_id": pl.Utf8, "label": pl.Utf8, "problem": pl.Utf8})


def label_counts(df: pl.DataFrame) -> dict[str, int]:
    counts = dict(df["label"].value_counts().iter_rows()) if df.height else {}
    return {label: int(counts.get(label, 0)) for label in LABELS}


def relabelled_share(triaged: pl.DataFrame) -> tuple[float, dict[str, float]]:
    """Share of pairs whose label changed against the data's own policy (under which every
    pair's chosen response was the right one, i.e. RETAIN), overall and per category."""
    if not triaged.height:
        return 0.0, {}
    changed = triaged.with_columns((pl.col("label") != "RETAIN").alias("changed"))
    per = changed.group_by("category").agg(pl.col("changed").mean()).sort("category")
    return float(changed["changed"].mean()), {c: round(float(v), 4) for c, v in per.iter_rows()}


def weight_sums(weighted: pl.DataFrame) -> dict[str, float]:
    """Sum of impact weights over INVERT+PUNISH rows, per policy version."""
    conflict = weighted.filter(pl.col("label").is_in(["INVERT", "PUNISH"]))
    if conflict.height == 0:
        return {}
    sums = conflict.group_by("policy_version").agg(pl.col("impact_weight").sum())
    return {v: float(s) for v, s in sums.iter_rows()}


@dataclass(slots=True)
class TraceReport:
    """The evaluation side by side: one row per model (reference, realigned, dpo_baseline)."""

    table: pl.DataFrame
    agreement_by_category: dict[str, dict[str, float]]  # model -> category -> share compliant
    margin_delta_by_label: dict[str, dict[str, float]]  # model -> label -> change vs reference
    metadata: dict[str, float]


def trace_report(generations: pl.DataFrame, margins: pl.DataFrame) -> TraceReport:
    """Policy agreement (share of judged generations that comply), per model and per
    category; held-out margins toward the new policy per model and label, and their change
    from the reference model. Generations the judge could not score are left out."""
    judged = generations.filter(pl.col("complies").is_not_null())
    models = [
        m for m in ("reference", "realigned", "dpo_baseline") if m in set(generations["model"])
    ]
    agreement = {
        m: {
            c: round(float(v), 4)
            for c, v in judged.filter(pl.col("model") == m)
            .group_by("category")
            .agg(pl.col("complies").mean())
            .sort("category")
            .iter_rows()
        }
        for m in models
    }
    mean_margin: dict[str, dict[str, float]] = {m: {} for m in models}
    for m in models:
        mine = margins.filter(pl.col("model") == m)
        for label in LABELS:
            vals = mine.filter(pl.col("label") == label)["margin"]
            if vals.len():
                mean_margin[m][label] = float(vals.mean())
        pref = mine.filter(pl.col("label").is_in(["RETAIN", "INVERT"]))["margin"]
        if pref.len():
            mean_margin[m]["preference"] = float(pref.mean())
    ref = mean_margin.get("reference", {})
    delta = {
        m: {k: round(v - ref[k], 4) for k, v in mean_margin[m].items() if k in ref}
        for m in models
        if m != "reference"
    }
    rows, md = [], {}
    for m in models:
        mj = judged.filter(pl.col("model") == m)
        share = float(mj["complies"].mean()) if mj.height else float("nan")
        row = {"model": m, "policy_agreement": round(share, 4), "judged": mj.height}
        for k, v in mean_margin[m].items():
            row[f"margin_{k}"] = round(v, 4)
        rows.append(row)
        md[f"policy_agreement_{m}"] = round(share, 4)
        for k, v in mean_margin[m].items():
            md[f"margin_{k}_{m}"] = round(v, 4)
        for k, v in delta.get(m, {}).items():
            md[f"margin_{k}_delta_{m}"] = v
    return TraceReport(pl.DataFrame(rows), agreement, delta, md)
