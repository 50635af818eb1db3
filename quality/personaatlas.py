"""PersonaAtlas rules, recomputed from the stored tables: persona distinctness and
constraints, turn bounds and empty assistant turns, and the realised noise rate and layer
mix against the configuration (a binomial tolerance: sampling noise is not a failure)."""

from __future__ import annotations

import json
import math
from itertools import combinations
from typing import Any

import polars as pl

from synth.personaatlas.personas import PersonaSchema, hamming


def persona_problems(
    personas: pl.DataFrame, schema: PersonaSchema, min_distance: int, min_constraints: int
) -> list[dict[str, Any]]:
    """Pairs closer than `min_distance`, and personas exposing too few constraints."""
    rows = personas.select("record_id", "features", "observed").to_dicts()
    full = [(r["record_id"], json.loads(r["features"])) for r in rows]
    out: list[dict[str, Any]] = []
    for (a, fa), (b, fb) in combinations(full, 2):
        if (d := hamming(fa, fb)) < min_distance:
            out.append({"record_id": a, "problem": f"differs from {b} on {d} dimensions"})
    for r in rows:
        n = sum(d in json.loads(r["observed"]) for d in schema.constraints)
        if n < min_constraints:
            out.append({"record_id": r["record_id"], "problem": f"exposes {n} hard constraints"})
        unknown = set(json.loads(r["features"])) - set(schema.dimensions)
        if unknown:
            out.append(
                {"record_id": r["record_id"], "problem": f"unknown dimensions {sorted(unknown)}"}
            )
    return out


def turn_problems(
    trajectories: pl.DataFrame, min_turns: int, max_turns: int
) -> list[dict[str, Any]]:
    """Empty assistant turns, turn counts off their target or outside the bounds."""
    out = []
    for r in trajectories.select("record_id", "target_turns", "num_turns", "turns").to_dicts():
        rid = r["record_id"]
        for t in r["turns"]:
            if not (t["assistant"] or "").strip():
                out.append({"record_id": rid, "problem": f"turn {t['turn']}: empty assistant turn"})
        if not min_turns <= r["num_turns"] <= max_turns:
            out.append(
                {
                    "record_id": rid,
                    "problem": f"{r['num_turns']} turns, outside [{min_turns}, {max_turns}]",
                }
            )
        if r["num_turns"] != r["target_turns"] or len(r["turns"]) != r["num_turns"]:
            out.append(
                {
                    "record_id": rid,
                    "problem": f"{len(r['turns'])} turns stored, target {r['target_turns']}",
                }
            )
    return out


def _tolerance(p: float, n: int, floor: float) -> float:
    """Three binomial standard errors, and never below `floor`."""
    return max(floor, 3 * math.sqrt(p * (1 - p) / n)) if n else math.inf


def noise_report(
    trajectories: pl.DataFrame, rate: float, layer_shares: dict[str, float], floor: float = 0.05
) -> dict[str, Any]:
    """Realised noise rate over user messages and layer mix over noised ones, each with
    the configured value and its tolerance; `passed` when all are within tolerance."""
    turns = [t for ts in trajectories["turns"].to_list() for t in ts]
    n = len(turns)
    noised = [t for t in turns if t["noise_layer"]]
    # A distractor that failed still drew the message for noise: count it in the rate.
    drawn = len(noised) + sum(bool(t["noise_error"]) for t in turns)
    observed = drawn / n if n else 0.0
    report: dict[str, Any] = {
        "user_messages": n,
        "noised": len(noised),
        "distractor_failed": drawn - len(noised),
        "rate": {
            "observed": round(observed, 4),
            "expected": rate,
            "tolerance": round(_tolerance(rate, n, floor), 4),
        },
        "layers": {},
    }
    ok = abs(observed - rate) <= _tolerance(rate, n, floor)
    for layer, share in layer_shares.items():
        got = sum(t["noise_layer"] == layer for t in noised) / len(noised) if noised else 0.0
        tol = _tolerance(share, len(noised), floor)
        report["layers"][layer] = {
            "observed": round(got, 4),
            "expected": round(share, 4),
            "tolerance": round(tol, 4),
        }
        ok = ok and abs(got - share) <= tol
    report["passed"] = ok
    return report


def coverage(personas: pl.DataFrame, schema: PersonaSchema) -> dict[str, float]:
    """Per dimension, the share of personas that expose it (partial observability)."""
    observed = [json.loads(o) for o in personas["observed"].to_list()]
    n = len(observed) or 1
    return {d: round(sum(d in o for o in observed) / n, 4) for d in schema.dimensions}
