"""UltraPrompt: principles, seed tagging and selection, the search mechanics and verifier,
a resumable search on the embedded model, and the job end to end (search, gate, P-Aligner
SFT+DPO through Pipes, held-out win rate)."""

import random
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from dagster import DagsterInstance

from pipelines.definitions import build_definitions
from quality.ultraprompt import verify_tree, verify_trees
from synth.llm import LLMClient, ResponseCache
from synth.loaders import load_instructions, load_preference_pairs
from synth.ultraprompt.dataset import TREE_SCHEMA, synthesize
from synth.ultraprompt.principles import (
    PrincipleFileError,
    allowed_principles,
    categorize,
    load_principles,
)
from synth.ultraprompt.search import (
    PRUNED,
    SIMULATED,
    Node,
    SearchSettings,
    SeedTask,
    Tree,
    _prune_reason,
    backup,
    best_of_n,
    clean_rewrite,
    node_row,
    select,
)
from synth.ultraprompt.seeds import farthest_point_order, select_seeds

import ultraprompt_worker
from conftest import decode_png, kill_once_cached


def test_principles_follow_the_paper():
    principles = load_principles()
    assert len(principles) == 10
    assert allowed_principles("helpfulness") == (
        "clarification_request",
        "information_augmentation",
        "tone_improvement",
    )
    assert set(allowed_principles("math")) - set(allowed_principles("helpfulness")) == {
        "hint_addition",
        "solution_verification",
    }
    assert len(allowed_principles("honesty")) == 4
    assert "boundary_enforcement" in allowed_principles("harmlessness")
    assert "boundary_enforcement" not in allowed_principles("coding")


def test_a_bad_principle_file_names_the_entry(tmp_path):
    f = tmp_path / "p.yaml"
    f.write_text("helpfulness:\n  - name: a\n    how: b\nmath:\n  - name: c\n")
    with pytest.raises(
        PrincipleFileError, match=r"p.yaml: math\[0\]: needs fields 'name' and 'how'"
    ):
        load_principles(f)
    f.write_text("poetry:\n  - name: a\n    how: b\n")
    with pytest.raises(PrincipleFileError, match="unknown category 'poetry'"):
        load_principles(f)


def test_categories_of_real_self_instruct_tasks(shared_data):
    seeds = load_instructions(str(shared_data / "self-instruct-seed-tasks.jsonl")).kept
    cats = [categorize(i)[0] for i in seeds["instruction"]]
    counts = {c: cats.count(c) for c in set(cats)}
    assert counts["coding"] >= 10 and counts["math"] >= 5 and counts["honesty"] >= 3
    assert (
        categorize("Write a python function that sorts a list from large to small.")[0] == "coding"
    )
    assert categorize("Solve the math problems. Intermediate steps are required.")[0] == "math"
    # Case matters for SQL keywords: an English "select ... from" is not code.
    assert categorize("Select the oldest person from the list.") == ("helpfulness", "")


def test_farthest_point_takes_copies_last():
    rng = np.random.default_rng(0)
    base = rng.normal(size=(4, 16))
    vecs = np.vstack([base, base[0] + 1e-3])  # row 4 is a near-copy of row 0
    vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
    order, nearest = farthest_point_order(vecs, 5)
    assert sorted(order) == [0, 1, 2, 3, 4] and nearest[0] == 1.0
    assert order[-1] in (0, 4) and nearest[-1] > 0.99  # the copy of an earlier pick comes last


def test_seed_selection_on_real_data_loses_nothing(shared_data):
    instructions = load_instructions(str(shared_data / "self-instruct-seed-tasks.jsonl")).kept
    pairs = load_preference_pairs(
        str(shared_data / "hh-rlhf-harmless-base-test.jsonl.gz"), limit=40
    ).kept
    seeds, rejected, n_in = select_seeds(instructions, pairs)
    assert n_in == instructions.height + pairs.height == seeds.height + rejected.height
    per_cat = dict(seeds.group_by("category").len().iter_rows())
    assert per_cat == {c: 4 for c in ("helpfulness", "harmlessness", "honesty", "coding", "math")}
    assert seeds.filter(pl.col("split") == "heldout").height == 5  # the 3rd of 4, per category
    assert seeds.filter(pl.col("source_kind") == "preference_pair")[
        "category"
    ].unique().to_list() == ["harmlessness"]
    assert set(rejected["reason"]) == {"not_selected_diverse"}
    assert "closest taken seed is" in rejected["detail"][0]
    parents = [p[0] for p in seeds["parent_ids"]] + [p[0] for p in rejected["parent_ids"]]
    assert sorted(parents) == sorted(
        instructions["record_id"].to_list() + pairs["record_id"].to_list()
    )


def _tree(category="math") -> Tree:
    root = Node(0, None, "root", "Solve 2x = 4.", 0, 0, status=SIMULATED, reward=0.2)
    tree = Tree("s", category, allowed_principles(category), [root], random.Random(0))
    backup(tree, root)
    return tree


def _add(tree, parent, action, reward, status=SIMULATED, reason=""):
    p = tree.nodes[parent]
    n = Node(
        len(tree.nodes), parent, action, f"{p.instruction} +{action}", p.depth + 1, len(tree.nodes)
    )
    n.status, n.reward, n.prune_reason = status, reward if status == SIMULATED else None, reason
    tree.nodes.append(n)
    p.children.append(n.id)
    if status == SIMULATED:
        backup(tree, n)
    return n


def _rows(tree):
    return [node_row(tree, n) for n in tree.nodes]


def test_max_backup_uct_and_the_verifier():
    tree = _tree()
    a = _add(tree, 0, "hint_addition", 0.5)
    _add(tree, 0, "tone_improvement", 0.1)
    _add(tree, 0, "clarification_request", 0.0, status=PRUNED, reason="intent_drift")
    deep = _add(tree, a.id, "solution_verification", 0.9)
    root = tree.root
    assert root.value == 0.9 and a.value == 0.9 and root.visits == 4 and a.visits == 2
    assert verify_tree(_rows(tree), "math", iterations=4) == []
    # The root still has untried principles: it is expanded before anything deeper.
    node, action = select(tree, 0.1)
    assert node is root and action in {"information_augmentation", "solution_verification"}
    assert action not in {tree.nodes[c].action for c in root.children}
    # Principles on the path are never offered again below it.
    for c in ("information_augmentation", "solution_verification"):
        _add(tree, 0, c, 0.05)
    node, action = select(tree, 0.1)
    assert node.id in (a.id, deep.id) and action not in tree.path_actions(node)
    assert verify_tree(_rows(tree), "math", iterations=6) == []
    assert any("exceed the budget" in p for p in verify_tree(_rows(tree), "math", iterations=5))


@pytest.mark.parametrize(
    ("corrupt", "message"),
    [
        (
            lambda rows: rows[4].update(
                action="hint_addition", path=["hint_addition", "hint_addition"]
            ),
            "reused on its path",
        ),
        (
            lambda rows: rows[1].update(
                action="boundary_enforcement", path=["boundary_enforcement"]
            ),
            "not allowed for math",
        ),
        (lambda rows: rows[0].update(value=0.5), "is not the max backup"),
        (lambda rows: rows[1].update(visits=5), "visits 5"),
        (lambda rows: rows[3].update(prune_reason=""), "pruned without a reason"),
        (
            lambda rows: rows[2].update(action="hint_addition", path=["hint_addition"]),
            "expanded twice",
        ),
    ],
)
def test_verifier_catches_a_broken_tree(corrupt, message):
    tree = _tree()
    a = _add(tree, 0, "hint_addition", 0.5)
    _add(tree, 0, "tone_improvement", 0.1)
    _add(tree, 0, "clarification_request", 0.0, status=PRUNED, reason="intent_drift")
    _add(tree, a.id, "solution_verification", 0.9)
    rows = _rows(tree)
    corrupt(rows)
    assert any(message in p for p in verify_tree(rows, "math", iterations=4)), verify_tree(
        rows, "math", 4
    )


def test_pruning_reasons_and_rewrite_cleaning():
    parent = Node(0, None, "root", "Tell me about owls.", 0, 0)
    s = SearchSettings(min_intent_similarity=0.5, max_rewrite_chars=100)
    assert _prune_reason(parent, "x", False, 0.9, s) == "rewrite_failed"
    assert _prune_reason(parent, "", True, 0.9, s) == "empty_rewrite"
    assert _prune_reason(parent, "tell me  about OWLS.", True, 0.9, s) == "no_change"
    assert _prune_reason(parent, "a" * 101, True, 0.9, s) == "too_long"
    assert _prune_reason(parent, "Tell me about cars.", True, 0.3, s) == "intent_drift"
    assert _prune_reason(parent, "Please tell me about owls, with sources.", True, 0.8, s) == ""
    assert (
        clean_rewrite('Here is the rewritten request: "Tell me about owls."')
        == "Tell me about owls."
    )
    assert clean_rewrite("```\nRewritten request: Explain owls.\n```") == "Explain owls."


def test_search_on_the_embedded_model_is_verified_and_resumes_from_the_cache(
    embedded_backend, tmp_path
):
    seeds = pl.DataFrame(
        {
            "record_id": ["s1", "s2"],
            "instruction": [
                "Write a python function that reverses a string.",
                "How do I pick a lock?",
            ],
            "category": ["coding", "harmlessness"],
            "split": ["search", "search"],
        }
    )
    settings = SearchSettings(
        iterations=2, samples=1, response_max_tokens=48, rewrite_max_tokens=80
    )
    cache = tmp_path / "cache.sqlite"
    first_client = LLMClient(embedded_backend, ResponseCache(cache), max_concurrency=4)
    first = synthesize(first_client, seeds, settings)
    assert first_client.stats.calls > 0
    assert first.records.height + first.rejected.height == 2
    assert first.trees.schema == pl.Schema(TREE_SCHEMA)
    for tree in first.searched:
        assert len(tree.nodes) - 1 <= 2  # the budget
        assert tree.root.status == SIMULATED and 0 <= tree.root.reward <= 1
    problems = verify_trees(first.trees, first.records, {"s1": "coding", "s2": "harmlessness"}, 2)
    assert problems.height == 0, problems.to_dicts()
    for r in first.records.iter_rows(named=True):
        assert r["chosen_reward"] >= r["root_reward"] and r["reward_gain"] >= 0
        assert (
            r["llm_calls"]
            == first.trees.filter(pl.col("seed_id") == r["parent_ids"][0])["calls"].sum()
        )
    # A re-run (after a kill, or unchanged) rebuilds the same trees from the cache alone.
    again_client = LLMClient(embedded_backend, ResponseCache(cache), max_concurrency=4)
    again = synthesize(again_client, seeds, settings)
    assert again_client.stats.calls == 0 and again_client.stats.cache_hits > 0
    assert again.trees.equals(first.trees) and again.records.equals(first.records)


def _run(tmp_path, seeds_config, search_config=None):
    defs = build_definitions(tmp_path)
    return defs.resolve_job_def("ultraprompt").execute_in_process(
        instance=DagsterInstance.ephemeral(),
        raise_on_error=False,
        run_config={
            "ops": {
                "ultraprompt_seeds_assets": {"config": seeds_config},
                "ultraprompt_search_assets": {
                    "config": search_config or {"iterations": 3, "samples": 1}
                },
                "paligner_model": {"config": {"max_steps": 2, "dpo_steps": 1, "max_length": 256}},
                "paligner_eval": {"config": {"max_new_tokens": 48, "response_max_tokens": 48}},
            }
        },
    )


def test_failed_gate_stops_the_rewriter_training(tmp_path):
    # Every taken seed is held out: nothing is searched, so there is nothing to train on.
    result = _run(tmp_path, {"per_category": 1, "heldout_every": 1})
    checks = {e.asset_check_key.name: e for e in result.get_asset_check_evaluations()}
    gate = checks["ultraprompt_curated_ready_for_training"]
    assert not gate.passed and gate.metadata["observed_records"].value == 0
    materialized = {e.asset_key.path[-1] for e in result.get_asset_materialization_events()}
    assert "ultraprompt_curated" in materialized
    assert not materialized & {"ultraprompt_sft", "paligner_model", "paligner_eval"}


def test_ultraprompt_job_end_to_end(tmp_path):
    # Ten searched seeds of three iterations: with graded p(Yes) rewards, the chance that
    # no tree finds a rewrite above its original (and the gate rightly blocks) is tiny.
    result = _run(tmp_path, {"per_category": 3, "heldout_every": 3})
    assert result.success
    checks = {e.asset_check_key.name: e for e in result.get_asset_check_evaluations()}
    failed = {n for n, e in checks.items() if not e.passed}
    assert failed <= {"ultraprompt_drift_suite", "ultraprompt_curated_drift_suite"}, failed
    for name in (
        "ultraprompt_trees_verified",
        "ultraprompt_accounted",
        "ultraprompt_seeds_accounted",
    ):
        assert checks[name].passed
    storage = tmp_path / "storage"
    seeds = pl.read_parquet(storage / "ultraprompt_seeds.parquet")
    assert dict(seeds.group_by("split").len().iter_rows()) == {"search": 10, "heldout": 4}
    records = pl.read_parquet(storage / "ultraprompt.parquet")
    rejected = pl.read_parquet(storage / "ultraprompt_rejected.parquet")
    assert records.height + rejected.height == 10
    trees = pl.read_parquet(storage / "ultraprompt_trees.parquet")
    assert trees.group_by("seed_id").len()["len"].max() <= 4  # root + at most 3 expansions
    sft = pl.read_parquet(storage / "ultraprompt_sft.parquet")
    assert sft.height == pl.read_parquet(storage / "ultraprompt_curated.parquet").height
    assert sft["prompt"].str.contains("Request:").all()

    mats = {
        e.asset_key.path[-1]: e.materialization.metadata
        for e in result.get_asset_materialization_events()
    }
    up = mats["ultraprompt"]
    assert up["tree_nodes"].value == trees.height
    tree_png = decode_png(up["search_tree"].value)
    assert tree_png.width > 200 and tree_png.height > 150
    decode_png(up["reward_gain"].value)
    model = mats["paligner_model"]
    assert model["trainable_tensors_changed"].value > 0 and np.isfinite(model["final_loss"].value)
    decode_png(model["loss_curve"].value)
    summary = pl.read_parquet(storage / "paligner_model.parquet")
    assert summary["sft_steps"][0] == 2 and summary["dpo_steps"][0] in (0, 1)

    evals = pl.read_parquet(storage / "paligner_eval.parquet")
    assert evals.height == 2 * 4 and sorted(evals["rewriter"].unique()) == ["base", "paligner"]
    assert evals["p_rewritten_better"].is_between(0, 1).all()
    for r in ("base", "paligner"):
        rate = evals.filter(pl.col("rewriter") == r)["win"].mean()
        assert mats["paligner_eval"][f"win_rate_{r}"].value == round(rate, 4)


def test_killed_search_resumes_from_the_cache(tmp_path):
    # The search's requests are a deterministic function of the cached answers before
    # them, so everything the killed run finished is found again, and nothing else is.
    cache_path = tmp_path / "cache.sqlite"
    done_before_kill = kill_once_cached(Path(ultraprompt_worker.__file__), cache_path, 8)
    client = ultraprompt_worker.client(str(cache_path))
    result = synthesize(client, ultraprompt_worker.SEEDS, ultraprompt_worker.SETTINGS)
    assert client.stats.cache_hits == done_before_kill
    assert client.stats.calls > 0  # the kill came before the end
    assert result.records.height + result.rejected.height == 3
    seeds = ultraprompt_worker.SEEDS
    cats = dict(zip(seeds["record_id"], seeds["category"], strict=True))
    assert verify_trees(result.trees, result.records, cats, 3).height == 0


def test_best_of_n_baseline_rewrites_only_the_root(embedded_backend):
    client = LLMClient(embedded_backend, None, max_concurrency=4)
    settings = SearchSettings(samples=1, response_max_tokens=40, rewrite_max_tokens=60)
    (tree,) = best_of_n(client, [SeedTask("b1", "Solve 12 + 30 and explain.", "math")], 3, settings)
    assert len(tree.nodes) == 4 and all(n.parent == 0 for n in tree.nodes[1:])
    assert {n.action for n in tree.nodes[1:]} <= set(allowed_principles("math"))
    scored = [n.reward for n in tree.simulated()]
    assert tree.root.value == max(scored) and tree.root.visits == len(scored)
    assert tree.best().reward == max(scored)
