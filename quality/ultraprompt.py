"""Verifier of UltraPrompt search trees: the budget, the principle rules and the backup,
recomputed from the stored node table alone (it trusts nothing the search reported)."""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import polars as pl

from synth.ultraprompt.principles import allowed_principles
from synth.ultraprompt.search import PRUNE_REASONS

TOL = 1e-9


def verify_tree(
    nodes: list[dict[str, Any]],
    category: str,
    iterations: int,
    retries: int = 20,
    attempts_per_action: int = 2,
) -> list[str]:
    """Every rule of the paper's search the tree breaks, one line each (empty = sound):
    the budget counts successful expansions; a principle is used at most once among a
    node's (simulated) children and may recur down a path; a pruned expansion is kept
    with its reason, is nobody's child, and is retried at most `attempts_per_action` times
    per principle and node; value is the max backup, q the mean, visits the subtree's
    simulated nodes."""
    problems: list[str] = []
    by_id = {n["node_id"]: n for n in nodes}
    roots = [n for n in nodes if n["parent_node_id"] is None]
    if len(roots) != 1 or roots[0]["action"] != "root" or roots[0]["depth"] != 0:
        return [f"needs exactly one root node at depth 0, found {len(roots)}"]
    simulated = [n for n in nodes if n["status"] == "simulated" and n["parent_node_id"] is not None]
    pruned = [n for n in nodes if n["status"] == "pruned"]
    if len(simulated) > iterations:
        problems.append(f"{len(simulated)} successful expansions exceed the budget of {iterations}")
    if len(pruned) > retries + 1:
        problems.append(f"{len(pruned)} pruned expansions exceed the retry budget of {retries}")
    allowed = set(allowed_principles(category))
    children: dict[int, list[dict[str, Any]]] = defaultdict(list)
    failures: dict[tuple[int, str], list[int]] = defaultdict(list)
    for n in nodes:
        if n["parent_node_id"] is None:
            continue
        if n["status"] == "simulated":
            children[n["parent_node_id"]].append(n)
        elif n["status"] == "pruned":
            failures[(n["parent_node_id"], n["action"])].append(n["attempt"])
    for (parent, action), tries in failures.items():
        if sorted(tries) != list(range(len(tries))):
            problems.append(f"node {parent}: retries of {action!r} are numbered {sorted(tries)}")
        if len(tries) > attempts_per_action:
            problems.append(
                f"node {parent}: {action!r} failed {len(tries)} times, more than {attempts_per_action}"
            )
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
            if n["depth"] != parent["depth"] + 1:
                problems.append(
                    f"node {nid}: depth {n['depth']} under a parent at {parent['depth']}"
                )
            if list(n["path"]) != [*path[::-1], n["action"]]:
                problems.append(
                    f"node {nid}: stored path {list(n['path'])} disagrees with the edges"
                )
        if n["status"] == "pruned":
            if n["prune_reason"] not in PRUNE_REASONS or n["reward"] is not None or n["visits"]:
                problems.append(f"node {nid}: pruned without a known reason, or scored anyway")
            continue
        live = children[nid]
        actions = [c["action"] for c in live]
        if len(actions) != len(set(actions)):
            problems.append(f"node {nid}: a principle was used twice among its children")
        want_value = max([n["reward"], *(c["value"] for c in live)])
        if n["value"] is None or abs(n["value"] - want_value) > TOL:
            problems.append(f"node {nid}: value {n['value']} is not the max backup {want_value}")
        want_q = sum([n["reward"], *(c["q"] for c in live)]) / (1 + len(live))
        if n["q"] is None or abs(n["q"] - want_q) > TOL:
            problems.append(f"node {nid}: q {n['q']} is not the mean backup {want_q}")
        want_visits = 1 + sum(c["visits"] for c in live)
        if n["visits"] != want_visits:
            problems.append(f"node {nid}: visits {n['visits']} != 1 + children's {want_visits - 1}")
    return problems


def verify_trees(
    trees: pl.DataFrame,
    records: pl.DataFrame,
    categories: dict[str, str],
    iterations: int,
    retries: int = 20,
    attempts_per_action: int = 2,
) -> pl.DataFrame:
    """One row per broken rule: seed_id, problem. Also checks that each record's chosen and
    rejected nodes are the tree's highest- and lowest-reward nodes."""
    out = []
    by_seed = trees.partition_by("seed_id", as_dict=True) if trees.height else {}
    for (seed_id,), nodes in by_seed.items():
        rules = verify_tree(
            nodes.to_dicts(), categories[seed_id], iterations, retries, attempts_per_action
        )
        out += [{"seed_id": seed_id, "problem": p} for p in rules]
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
    return pl.DataFrame(out, schema={"seed_id": pl.Utf8, "problem": pl.Utf8})


def search_report(records: pl.DataFrame, trees: pl.DataFrame, margin: float) -> dict[str, Any]:
    """What the search achieved: the share of seeds whose best rewrite beats the original
    by more than `margin`, the share of trees that reached depth >= 2, and the share of
    expansions pruned for each reason."""
    n = records.height
    expansions = trees.filter(pl.col("parent_node_id").is_not_null())
    pruned = expansions.filter(pl.col("status") == "pruned")
    per_reason = (
        {r: c / expansions.height for r, c in pruned["prune_reason"].value_counts().iter_rows()}
        if expansions.height
        else {}
    )
    return {
        "gain_share": float((records["reward_gain"] > margin).mean()) if n else 0.0,
        "deep_share": float((records["max_depth"] >= 2).mean()) if n else 0.0,
        "pruned_share": pruned.height / expansions.height if expansions.height else 0.0,
        "pruned_share_per_reason": {k: round(v, 4) for k, v in sorted(per_reason.items())},
    }
