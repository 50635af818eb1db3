"""The partial order over one scenario's responses, and the preference pairs it yields.

Every judged response of a kept scenario (the record's golden and rejects, and the attempts
that did not verify) gets a binary vector over the active dimensions: 1 where the judge's
p(Yes) reaches the threshold. Responses with the same vector are one node of the order
(represented by the record's response when there is one, else the earliest attempt);
u dominates v when u is at least as good on every active dimension and better on one.
The exported pairs are the covering relation (u over v with nothing in between), each
labelled with the dimensions it teaches: those where u has 1 and v has 0.
"""

from __future__ import annotations

from typing import Any

import polars as pl

from synth.records import PROVENANCE_DTYPE, content_id, frame

NODE_SCHEMA: dict[str, pl.DataType] = {
    "scenario_id": pl.Utf8(),
    "node": pl.Utf8(),  # the vector as a string over the mask, e.g. "10" for mask "AT"
    "mask": pl.Utf8(),
    "vector": pl.List(pl.Int64),
    "role": pl.Utf8(),  # of the representative response
    "attempt": pl.Int64(),
    "in_record": pl.Boolean(),
    "members": pl.Int64(),  # responses with this vector
    "text": pl.Utf8(),
}

PAIR_SCHEMA: dict[str, pl.DataType] = {
    "record_id": pl.Utf8(),
    "parent_ids": pl.List(pl.Utf8),
    "provenance": PROVENANCE_DTYPE,
    "scenario_id": pl.Utf8(),
    "mask": pl.Utf8(),
    "prompt": pl.Utf8(),
    "chosen": pl.Utf8(),
    "rejected": pl.Utf8(),
    "chosen_node": pl.Utf8(),
    "rejected_node": pl.Utf8(),
    "dims": pl.List(pl.Utf8),  # what the pair teaches
}


def dominates(u: list[int], v: list[int]) -> bool:
    return all(a >= b for a, b in zip(u, v, strict=True)) and u != v


def covering(vectors: dict[str, list[int]]) -> list[tuple[str, str]]:
    """(upper, lower) pairs of the covering relation of dominance over the given nodes."""
    out = []
    for u, vu in vectors.items():
        for v, vv in vectors.items():
            if dominates(vu, vv) and not any(
                dominates(vu, vw) and dominates(vw, vv) for vw in vectors.values()
            ):
                out.append((u, v))
    return sorted(out)


def vector(scores: dict[str, float | None], mask: str, threshold: float) -> list[int] | None:
    if any(scores.get(d) is None for d in mask):
        return None
    return [int(scores[d] >= threshold) for d in mask]


def build_order(
    records: pl.DataFrame, attempts: pl.DataFrame, threshold: float
) -> tuple[pl.DataFrame, pl.DataFrame]:
    """(nodes, pairs) for every record; pairs carry the record as their parent."""
    by_scenario: dict[str, list[dict[str, Any]]] = {}
    for a in attempts.to_dicts():
        by_scenario.setdefault(a["scenario_id"], []).append(a)
    nodes, pairs = [], []
    for r in records.to_dicts():
        sid, mask = r["parent_ids"][0], r["mask"]
        in_record = {r["golden"]} | {r[f"reject_{d}"] for d in mask if r[f"reject_{d}"]}
        classes: dict[str, list[dict[str, Any]]] = {}
        for a in by_scenario.get(sid, []):
            vec = vector(a["scores"], mask, threshold)
            if vec is not None:
                classes.setdefault("".join(map(str, vec)), []).append(a)
        vectors: dict[str, list[int]] = {}
        reps: dict[str, dict[str, Any]] = {}
        for key, members in classes.items():
            rep = min(members, key=lambda a: (a["text"] not in in_record, a["attempt"], a["role"]))
            vectors[key], reps[key] = [int(c) for c in key], rep
            nodes.append(
                {
                    "scenario_id": sid,
                    "node": key,
                    "mask": mask,
                    "vector": vectors[key],
                    "role": rep["role"],
                    "attempt": rep["attempt"],
                    "in_record": rep["text"] in in_record,
                    "members": len(members),
                    "text": rep["text"],
                }
            )
        for up, low in covering(vectors):
            dims = [d for d, a, b in zip(mask, vectors[up], vectors[low], strict=True) if a > b]
            chosen, rejected = reps[up]["text"], reps[low]["text"]
            pairs.append(
                {
                    "record_id": content_id("personaknob_pair", sid, chosen, rejected),
                    "parent_ids": [r["record_id"]],
                    "provenance": r["provenance"],
                    "scenario_id": sid,
                    "mask": mask,
                    "prompt": r["prompt"],
                    "chosen": chosen,
                    "rejected": rejected,
                    "chosen_node": up,
                    "rejected_node": low,
                    "dims": dims,
                }
            )
    return frame(nodes, NODE_SCHEMA), frame(pairs, PAIR_SCHEMA)
