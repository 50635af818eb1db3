"""MedAD rules recomputed from stored data: every answer re-derived from its mask, no
patient identifier in any output, the balance of the cases, and splits by subject."""

from __future__ import annotations

import json
import math
from collections import Counter
from typing import Any

import numpy as np
import polars as pl

from synth.medad.bases import decode_png
from synth.medad.vqa import (
    COUNT_WORDS,
    LETTERS,
    claim_problems,
    parse_claims,
    parse_completion,
    supports,
)

# The rules as the questions state them to a reader, restated here rather than taken from
# the generator, so a generator mistake shows as a disagreement: size classes by the
# lesion's equivalent diameter over the image width (the size question's note), and the
# 3x3 grid the location question names.
SIZE_BY_WIDTH = ((0.07, "small"), (0.12, "medium"), (math.inf, "large"))
GRID_ROWS, GRID_COLS = ("upper", "middle", "lower"), ("left", "centre", "right")


def _cell(row: int, col: int) -> str:
    return "centre" if (row, col) == (1, 1) else f"{GRID_ROWS[row]} {GRID_COLS[col]}"


def read_facts(case: dict[str, Any], base: dict[str, Any]) -> dict[str, Any]:
    """What a reader of the saved mask PNG and the base's allow-list metadata finds: the
    lesions are the mask's connected components (whatever their label values), the
    largest is the one of most pixels (all of them on a tie)."""
    from scipy import ndimage as ndi

    mask = decode_png(case["mask_png"])
    side = mask.shape[1]
    parts, n = ndi.label(mask > 0)
    lesions = []
    for k in range(1, n + 1):
        ys, xs = np.nonzero(parts == k)
        width = 2 * math.sqrt(len(ys) / math.pi) / side
        size = next(name for edge, name in SIZE_BY_WIDTH if width < edge)
        row, col = (min(int(3 * v.mean() / side), 2) for v in (ys, xs))
        lesions.append({"area": len(ys), "cell": _cell(row, col), "size": size})
    top = max((f["area"] for f in lesions), default=0)
    largest = [f for f in lesions if f["area"] == top]
    real = case["split"] == "real_anomaly"  # as acquired: presence is what the source states
    return {
        "modality": base["modality"],
        "anatomy": base["anatomy"],
        "abnormal": bool(base["finding"]) if real else bool(lesions),
        "count": None if real else len(lesions),
        "finding": case["finding"] if lesions else None,
        "location": largest[0]["cell"] if len(largest) == 1 else None,
        "largest_cells": sorted({f["cell"] for f in largest}),
        "size": largest[0]["size"] if largest else None,
        "cells": sorted({f["cell"] for f in lesions}),
        "sizes": sorted({f["size"] for f in lesions}),
    }


def right_answers(qtype: str, facts: dict[str, Any]) -> set[str]:
    """The option texts a reader accepts for a question (two on a tie for the largest)."""
    if qtype == "presence":
        return {"yes" if facts["abnormal"] else "no"}
    if qtype == "count":
        return {COUNT_WORDS[facts["count"]]}
    if qtype == "characterisation":
        return {facts["finding"]}
    if qtype == "location":
        return set(facts["largest_cells"])
    return {facts[qtype]}


STORED_FACTS = ("modality", "anatomy", "abnormal", "count", "finding", "size", "cells", "sizes")


def answer_problems(items: pl.DataFrame, cases: pl.DataFrame, bases: pl.DataFrame) -> list[str]:
    """Each item checked against `read_facts` of its case and base: the lettered option is
    the right answer, the stored facts are what the reader finds, and the reasoning's
    claims are consistent with them and back the answer."""
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
        facts = read_facts(case, base)
        stored = json.loads(it["facts_json"])
        differ = [k for k in STORED_FACTS if stored.get(k) != facts[k]]
        if facts["location"] is not None and stored.get("location") != facts["location"]:
            differ.append("location")
        if differ:
            k = differ[0]
            problems.append(
                f"{name}: facts_json: {k} is {stored.get(k)!r}, the mask and base read {facts[k]!r}"
            )
        right = right_answers(it["question_type"], facts)
        idx = LETTERS.find(it["answer"])
        if not 0 <= idx < len(it["options"]) or it["options"][idx] not in right:
            problems.append(f"{name}: answer: {it['answer']} is not {sorted(right)}")
            continue
        chosen = it["options"][idx]
        others = [o for o in it["options"] if o != chosen and o in right]
        if others:
            problems.append(f"{name}: options: {others[0]!r} is right as well")
        parsed = parse_completion(it["completion"])
        if not parsed or parsed[1] != it["answer"]:
            problems.append(f"{name}: completion: malformed or answers another letter")
            continue
        claims = parse_claims(parsed[0])
        bad = claim_problems(claims, facts)
        if bad:
            problems.append(f"{name}: completion: {bad[0]}")
        elif supports(claims, it["question_type"], chosen) is False:
            problems.append(f"{name}: completion: the reasoning does not back {chosen!r}")
    return problems


def subject_leaks(items: pl.DataFrame, bases: pl.DataFrame) -> dict[str, list[str]]:
    """Subjects (a volume's slices are one) whose images are in the training items and in
    an evaluation split, each with the evaluation splits it is in. The subject comes from
    the base table, not from the cases, so a case filed under the wrong split shows."""
    subject_of = dict(zip(bases["base_id"].to_list(), bases["subject_id"].to_list(), strict=True))
    splits: dict[str, set[str]] = {}
    for base_id, split in zip(items["base_id"].to_list(), items["split"].to_list(), strict=True):
        splits.setdefault(subject_of.get(base_id, base_id), set()).add(split)
    return {
        s: sorted(v - {"train"}) for s, v in sorted(splits.items()) if "train" in v and len(v) > 1
    }


def phi_hits(tables: dict[str, pl.DataFrame], phi: set[str]) -> list[str]:
    """`table.column[row]: value` for every identifying value found in any cell: text
    columns as text, binary columns (images) as bytes, nested columns as their JSON.
    Values under 8 characters ("1CT1") are looked for in text only: in compressed image
    bytes a 4-byte run turns up by chance once in a few hundred megabytes."""
    needles = [(v.lower(), v.lower().encode() if len(v) >= 8 else None) for v in phi if v]
    hits = []
    for name, df in tables.items():
        for col in df.columns:
            dtype = df.schema[col]
            if dtype == pl.Binary:
                values = df[col].to_list()
                for i, blob in enumerate(values):
                    low = (blob or b"").lower()
                    hits += [f"{name}.{col}[{i}]: {n!r}" for n, nb in needles if nb and nb in low]
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
