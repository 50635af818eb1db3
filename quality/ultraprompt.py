"""Verifier of UltraPrompt search trees: the budget, the principle rules and the backup,
recomputed from the stored node table alone (it trusts nothing the search reported)."""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import polars as pl

from synth.ultraprompt.principles import allowed_principles

TOL = 1e-9


def verify_tree(nodes: list[dict[str, Any]], category: str, iterations: int) -> list[str]:
    """Every rule the tree breaks, as one line each (empty = the tree is sound)."""
    problems: list[str] = []
    by_id = {n["node_id"]: n for n in nodes}
    roots = [n for n in nodes if n["parent_node_id"] is None]
    if len(roots) != 1 or roots[0]["action"] != "root" or roots[0]["depth"] != 0:
        return [f"needs exactly one root node at depth 0, found {len(roots)}"]
    expansions = len(nodes) - 1
    if expansions > iterations:
        problems.append(f"{expansions} expansions exceed the budget of {iterations}")
    allowed = set(allowed_principles(category))
    children: dict[int, list[dict[str, Any]]] = defaultdict(list)
    for n in nodes:
        if n["parent_node_id"] is not None:
            children[n["parent_node_id"]].append(n)
    for n in nodes:
        nid = n["node_id"]
        if n["parent_node_id"] is not None:
            parent = by_id.get(n["parent_node_id"])
            if parent is None:
                problems.append(f"node {nid}: parent {n['parent_node_id']} is missing")
                continue
            if n["action"] not in allowed:
                problems.append(
                    f"node {nid}: principle {n['action']!r} is not allowed for {category}"
                )
            path, cur = [], parent
            while cur is not None and cur["parent_node_id"] is not None:
                path.append(cur["action"])
                cur = by_id.get(cur["parent_node_id"])
            if n["action"] in path:
                problems.append(f"node {nid}: principle {n['action']!r} reused on its path")
            if n["depth"] != parent["depth"] + 1:
                problems.append(
                    f"node {nid}: depth {n['depth']} under a parent at {parent['depth']}"
                )
            if list(n["path"]) != [*path[::-1], n["action"]]:
                problems.append(
                    f"node {nid}: stored path {list(n['path'])} disagrees with the edges"
                )
        actions = [c["action"] for c in children[nid]]
        if len(actions) != len(set(actions)):
            problems.append(f"node {nid}: a principle was expanded twice from it")
        if n["status"] == "pruned":
            if not n["prune_reason"] or n["reward"] is not None or n["visits"]:
                problems.append(f"node {nid}: pruned without a reason, or scored anyway")
            continue
        live = [c for c in children[nid] if c["status"] == "simulated"]
        want_value = max([n["reward"], *(c["value"] for c in live)])
        if n["value"] is None or abs(n["value"] - want_value) > TOL:
            problems.append(f"node {nid}: value {n['value']} is not the max backup {want_value}")
        want_visits = 1 + sum(c["visits"] for c in live)
        if n["visits"] != want_visits:
            problems.append(f"node {nid}: visits {n['visits']} != 1 + children's {want_visits - 1}")
    return problems


def verify_trees(
    trees: pl.DataFrame, records: pl.DataFrame, categories: dict[str, str], iterations: int
) -> pl.DataFrame:
    """One row per broken rule: seed_id, problem. Also checks each record's chosen and
    rejected nodes are the tree's best and worst, and chosen >= root."""
    out = []
    by_seed = trees.partition_by("seed_id", as_dict=True) if trees.height else {}
    for (seed_id,), nodes in by_seed.items():
        for p in verify_tree(nodes.to_dicts(), categories[seed_id], iterations):
            out.append({"seed_id": seed_id, "problem": p})
    for r in records.iter_rows(named=True):
        seed_id = r["parent_ids"][0]
        nodes = by_seed.get((seed_id,))
        if nodes is None:
            out.append({"seed_id": seed_id, "problem": "record without a tree"})
            continue
        scored = nodes.filter(pl.col("status") == "simulated")
        best, worst = scored["reward"].max(), scored["reward"].min()
        if abs(r["chosen_reward"] - best) > TOL or abs(r["rejected_reward"] - worst) > TOL:
            out.append(
                {"seed_id": seed_id, "problem": "chosen/rejected are not the tree's best/worst"}
            )
        if r["chosen_reward"] < r["root_reward"] - TOL:
            out.append({"seed_id": seed_id, "problem": "chosen reward below the root's"})
    return pl.DataFrame(out, schema={"seed_id": pl.Utf8, "problem": pl.Utf8})
