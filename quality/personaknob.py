"""Verifiers for PersonaKnob: records against their judge scores, and the partial order.

Both recompute from the stored tables alone and return one problem row per violation
(scenario or record, rule, detail), so a check can show exactly what is wrong.
"""

from __future__ import annotations

from collections import defaultdict

import polars as pl

from synth.personaknob.order import dominates
from synth.personaknob.spec import DIMENSIONS, KnobSpec

PROBLEM_SCHEMA = {"id": pl.Utf8, "rule": pl.Utf8, "detail": pl.Utf8}


def verify_records(records: pl.DataFrame, threshold: float) -> pl.DataFrame:
    """Golden satisfies every active dimension; reject_d fails d and only d; inactive
    dimensions have no reject."""
    problems = []
    for r in records.to_dicts():
        rid, mask = r["record_id"], r["mask"]
        gs = r["golden_scores"] or {}
        for d in mask:
            if gs.get(d) is None or gs[d] < threshold:
                problems.append((rid, "golden_fails", f"golden scores {gs.get(d)} on {d}"))
        for d in DIMENSIONS:
            text, scores = r[f"reject_{d}"], r[f"reject_{d}_scores"]
            if d not in mask:
                if text is not None:
                    problems.append(
                        (rid, "inactive_reject", f"reject_{d} set but {d} not in {mask}")
                    )
                continue
            if text is None:
                if d not in (r["unverified_rejects"] or ""):
                    problems.append(
                        (rid, "missing_reject", f"reject_{d} empty, not listed unverified")
                    )
                continue
            for e in mask:
                s = (scores or {}).get(e)
                bad = s is None or (s >= threshold if e == d else s < threshold)
                if bad:
                    problems.append(
                        (rid, f"reject_{d}_wrong_on_{e}", f"reject_{d} scores {s} on {e}")
                    )
    return pl.DataFrame(problems, schema=PROBLEM_SCHEMA, orient="row")


def pass_rates(attempts: pl.DataFrame) -> dict[str, float]:
    """First-attempt verification pass rate per role kind and dimension: 'golden A' is the
    share of goldens of scenarios with A active that verified, 'reject A' the share of
    A-rejects that did."""
    first = attempts.filter(pl.col("attempt") == 0)
    rates = {}
    for d in DIMENSIONS:
        for kind, rows in (
            ("golden", first.filter((pl.col("role") == "golden") & pl.col("mask").str.contains(d))),
            ("reject", first.filter(pl.col("role") == f"reject_{d}")),
        ):
            if rows.height:
                rates[f"{kind} {d}"] = round(
                    rows.filter(pl.col("verified")).height / rows.height, 3
                )
    return rates


def _closure(edges: set[tuple[str, str]]) -> set[tuple[str, str]]:
    closure = set(edges)
    while True:
        more = {(a, d) for a, b in closure for c, d in closure if b == c} - closure
        if not more:
            return closure
        closure |= more


def verify_order(nodes: pl.DataFrame, pairs: pl.DataFrame) -> pl.DataFrame:
    """Per scenario: every pair is a real dominance between its nodes' vectors and labelled
    with exactly the dimensions it improves; no pair skips a node in between (covering);
    the pairs have no cycle; and their transitive closure is exactly the dominance relation
    (so the order is transitive and nothing is left out)."""
    vectors: dict[str, dict[str, list[int]]] = defaultdict(dict)
    masks: dict[str, str] = {}
    for n in nodes.to_dicts():
        vectors[n["scenario_id"]][n["node"]] = n["vector"]
        masks[n["scenario_id"]] = n["mask"]
    edges: dict[str, set[tuple[str, str]]] = defaultdict(set)
    problems = []
    for p in pairs.to_dicts():
        sid, up, low = p["scenario_id"], p["chosen_node"], p["rejected_node"]
        vec = vectors.get(sid, {})
        if up not in vec or low not in vec:
            problems.append((sid, "unknown_node", f"pair {p['record_id']}: {up} > {low}"))
            continue
        edges[sid].add((up, low))
        if not dominates(vec[up], vec[low]):
            problems.append(
                (sid, "not_dominance", f"pair {p['record_id']}: {up} does not dominate {low}")
            )
            continue
        taught = [d for d, a, b in zip(masks[sid], vec[up], vec[low], strict=True) if a > b]
        if list(p["dims"]) != taught:
            problems.append(
                (
                    sid,
                    "wrong_dims",
                    f"pair {p['record_id']}: labelled {list(p['dims'])}, improves {taught}",
                )
            )
        if any(dominates(vec[up], w) and dominates(w, vec[low]) for w in vec.values()):
            problems.append(
                (sid, "not_covering", f"pair {p['record_id']}: a node lies between {up} and {low}")
            )
    for sid, vec in vectors.items():
        closure = _closure(edges[sid])
        if any(a == b for a, b in closure):
            problems.append((sid, "cycle", "the pairs contain a cycle"))
        dominance = {(u, v) for u in vec for v in vec if dominates(vec[u], vec[v])}
        if missing := dominance - closure:
            problems.append(
                (sid, "incomplete", f"dominances not implied by the pairs: {sorted(missing)[:5]}")
            )
        if extra := closure - dominance:
            problems.append(
                (
                    sid,
                    "not_transitive",
                    f"implied by the pairs but not dominance: {sorted(extra)[:5]}",
                )
            )
    return pl.DataFrame(problems, schema=PROBLEM_SCHEMA, orient="row")


def probe_report(scenarios: pl.DataFrame, spec: KnobSpec, threshold: float) -> dict:
    """How well the scenario prompts probe their masks: the triggers each scenario names
    must, by the spec file, test every active dimension (`uncovered` lists those that do
    not), and `share_probing_all` is the share whose judge p(Yes) on every active
    dimension reaches `threshold`, with the same share per dimension."""
    uncovered, per_dim, complete = [], {d: [] for d in DIMENSIONS}, []
    for r in scenarios.select("record_id", "mask", "trigger", "probe_scores").to_dicts():
        names = r["trigger"].split("+")
        tested = {d for n in names if n in spec.triggers for d in spec.triggers[n].tests}
        if missing := [d for d in r["mask"] if d not in tested] or [
            n for n in names if n not in spec.triggers
        ]:
            uncovered.append(
                {
                    "record_id": r["record_id"],
                    "mask": r["mask"],
                    "trigger": r["trigger"],
                    "not_probed": "".join(missing),
                }
            )
        scores = r["probe_scores"] or {}
        hits = [(scores.get(d) or 0.0) >= threshold for d in r["mask"]]
        for d, hit in zip(r["mask"], hits, strict=True):
            per_dim[d].append(hit)
        complete.append(all(hits))
    return {
        "scenarios": len(complete),
        "share_probing_all": round(sum(complete) / len(complete), 4) if complete else 0.0,
        "share_per_dimension": {d: round(sum(v) / len(v), 4) for d, v in per_dim.items() if v},
        "uncovered": uncovered,
    }


def rejudge_problems(rejudged: pl.DataFrame, tolerance: float) -> tuple[list[dict], int]:
    """(problems, rejects compared); a problem names the record (`id`), the reject
    (`role`) and the rule it breaks. By the separate judgement alone, reject_d must score
    below the golden on d (it fails its dimension) and no more than `tolerance` below it
    on any other active dimension (it fails only that one). An unjudged score is a
    problem too."""
    score, dims_of = {}, defaultdict(list)
    for r in rejudged.to_dicts():
        score[(r["record_id"], r["role"], r["dimension"])] = r["score"]
        dims_of[(r["record_id"], r["role"])].append(r["dimension"])
    rejects = sorted(k for k in dims_of if k[1] != "golden")
    problems = []
    for rid, role in rejects:
        own = role.removeprefix("reject_")
        for d in sorted(dims_of[(rid, role)]):
            s, g = score[(rid, role, d)], score.get((rid, "golden", d))
            if s is None or g is None:
                rule, detail = f"unjudged_on_{d}", f"{role} {s}, golden {g} on {d}"
            elif d == own and not s < g:
                rule, detail = f"not_worse_on_{d}", f"{role} {s:.3f} >= golden {g:.3f} on {d}"
            elif d != own and s < g - tolerance:
                rule = f"also_worse_on_{d}"
                detail = f"{role} {s:.3f} < golden {g:.3f} - {tolerance} on {d}"
            else:
                continue
            problems.append({"id": rid, "role": role, "rule": f"{role}_{rule}", "detail": detail})
    return problems, len(rejects)
