"""MedAD rules recomputed from stored data: every answer from its mask, no patient
identifier in any output, and the balance of the cases."""

from __future__ import annotations

import json
from collections import Counter
from typing import Any

import polars as pl

from synth.medad.vqa import (
    LETTERS,
    answer_text,
    case_facts,
    claim_problems,
    parse_claims,
    parse_completion,
    supports,
)


def answer_problems(items: pl.DataFrame, cases: pl.DataFrame, bases: pl.DataFrame) -> list[str]:
    """Each item checked against facts recomputed from its case's mask and its base's
    allow-list metadata: the lettered option is the right answer, the stored facts are
    the recomputed ones, and the reasoning's claims are consistent and back the answer."""
    by_case = {c["record_id"]: c for c in cases.to_dicts()}
    by_base = {b["base_id"]: b for b in bases.to_dicts()}
    problems = []
    for it in items.to_dicts():
        name = f"item {it['record_id']} ({it['question_type']})"
        case = by_case.get(it["case_id"])
        base = by_base.get(case["base_id"]) if case else None
        if case is None or base is None:
            problems.append(f"{name}: case_id: no such case or base")
            continue
        facts = case_facts({**case, "modality": base["modality"], "anatomy": base["anatomy"]})
        if facts != json.loads(it["facts_json"]):
            problems.append(f"{name}: facts_json: differs from the facts recomputed from the mask")
        right = answer_text(it["question_type"], facts)
        idx = LETTERS.find(it["answer"])
        if not 0 <= idx < len(it["options"]) or it["options"][idx] != right:
            problems.append(f"{name}: answer: {it['answer']} is not {right!r}")
            continue
        parsed = parse_completion(it["completion"])
        if not parsed or parsed[1] != it["answer"]:
            problems.append(f"{name}: completion: malformed or answers another letter")
            continue
        claims = parse_claims(parsed[0])
        bad = claim_problems(claims, facts)
        if bad:
            problems.append(f"{name}: completion: {bad[0]}")
        elif supports(claims, it["question_type"], right) is False:
            problems.append(f"{name}: completion: the reasoning does not back {right!r}")
    return problems


def phi_hits(tables: dict[str, pl.DataFrame], phi: set[str]) -> list[str]:
    """`table.column[row]: value` for every identifying value found in any cell: text
    columns as text, binary columns (images) as bytes, nested columns as their JSON."""
    needles = [(v.lower(), v.lower().encode()) for v in phi if v]
    hits = []
    for name, df in tables.items():
        for col in df.columns:
            dtype = df.schema[col]
            if dtype == pl.Binary:
                values = df[col].to_list()
                for i, blob in enumerate(values):
                    low = (blob or b"").lower()
                    hits += [f"{name}.{col}[{i}]: {n!r}" for n, nb in needles if nb in low]
            elif dtype == pl.Utf8 or dtype.is_nested():
                texts = df[col].to_list()
                for i, v in enumerate(texts):
                    low = (v if isinstance(v, str) else json.dumps(v, default=str)).lower()
                    hits += [f"{name}.{col}[{i}]: {n!r}" for n, _ in needles if n in low]
    return hits


def balance_report(cases: pl.DataFrame, target: float, tolerance: float = 0.15) -> dict[str, Any]:
    """Abnormal share of the synthetic cases against the configured rate, per split."""
    synth = cases.filter(pl.col("split") != "real_anomaly")
    share = float(synth["abnormal"].mean()) if synth.height else 0.0
    per_split = {
        r["split"]: round(r["abnormal"], 3)
        for r in synth.group_by("split").agg(pl.col("abnormal").mean()).to_dicts()
    }
    return {
        "passed": synth.height > 0 and abs(share - target) <= tolerance,
        "abnormal_share": round(share, 4),
        "target": target,
        "tolerance": tolerance,
        "per_split": per_split,
    }


def coverage_report(
    cases: pl.DataFrame, expected_centers: list[str], modalities: list[str]
) -> dict[str, Any]:
    """Cases per modality and per center; every center and every base modality present."""
    synth = cases.filter(pl.col("split") != "real_anomaly")
    per_center = dict(sorted(Counter(synth["center"].to_list()).items()))
    per_modality = dict(sorted(Counter(cases["modality"].to_list()).items()))
    missing = [c for c in expected_centers if not per_center.get(c)]
    missing += [m for m in modalities if not per_modality.get(m)]
    return {
        "passed": not missing,
        "per_center": per_center,
        "per_modality": per_modality,
        "missing": missing,
    }
