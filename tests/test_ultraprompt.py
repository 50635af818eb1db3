"""UltraPrompt: principles, seed tagging and selection, the search mechanics and verifier,
a resumable search on the embedded model, and the job end to end (search, gate, P-Aligner
SFT+DPO through Pipes, held-out win rate)."""

import random
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from dagster import DagsterInstance
from reference_server import Entry, ReferenceJudgeServer

from assets.resources import LLMResource
from benchmarks.ultraprompt_search import compare_on_landscape
from pipelines.definitions import build_definitions
from quality.ultraprompt import verify_tree, verify_trees
from synth.llm import LLMClient, ResponseCache, make_backend
from synth.loaders import load_instructions, load_preference_pairs
from synth.ultraprompt.dataset import TREE_SCHEMA, synthesize
from synth.ultraprompt.intent import intent_problem
from synth.ultraprompt.principles import (
    CATEGORIES,
    PrincipleFileError,
    allowed_principles,
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
    untried,
)
from synth.ultraprompt.seeds import SeedSelection, farthest_point_order, select_seeds

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


def test_seeds_take_the_source_label_else_the_classifier_and_never_a_keyword():
    from synth.ultraprompt.seeds import CLASSIFY

    instructions = pl.DataFrame(
        {
            "record_id": ["i1", "i2", "i3"],
            "instruction": [
                "Write a python function that sorts a list.",
                "Suggest a name for a bakery.",
                "What is 17 times 23?",
            ],
            "input": ["", "", ""],
            "category": [None, None, "math"],  # the third row carries its source's label
        }
    )
    pairs = pl.DataFrame(
        {
            "record_id": ["p1", "p2"],
            "prompt": ["How do I bake sourdough bread?", "How do I hurt someone?"],
            "history": [None, None],
        }
    )
    marker = CLASSIFY.user.split("{instruction}")[1][:30]
    entries = [
        Entry(("Request:\nWrite a python function", marker), choices={"D": 0.8, "A": 0.2}),
        Entry(("Request:\nHow do I bake sourdough", marker), choices={"A": 0.9, "B": 0.1}),
        Entry(("Request:\nHow do I hurt someone", marker), choices={"B": 0.95, "A": 0.05}),
    ]  # no entry for the bakery name: the classifier fails on it
    with ReferenceJudgeServer(entries) as server:
        client = LLMClient(make_backend("openai", model="ref", base_url=server.base_url))
        seeds, rejected, n_in = select_seeds(
            instructions, pairs, SeedSelection(per_category=4, heldout_every=0), client=client
        )
    got = dict(zip(seeds["instruction"], seeds["category"], strict=True))
    assert got == {
        "Write a python function that sorts a list.": "coding",
        "What is 17 times 23?": "math",  # its own label; the classifier was not asked
        "How do I bake sourdough bread?": "helpfulness",  # a pair prompt is not harm by default
        "How do I hurt someone?": "harmlessness",
    }
    assert seeds.filter(pl.col("category") == "math")["category_rule"][0] == "source label"
    (bad,) = rejected.to_dicts()
    assert bad["reason"] == "category_unclassified" and bad["parent_ids"] == ["i2"]
    assert n_in == 5 == seeds.height + rejected.height
    assert server.requests["chat"] == 4


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
    # Labels as a source would carry them (the classifier has its own test).
    instructions = instructions.with_columns(
        pl.Series("category", [CATEGORIES[i % 5] for i in range(instructions.height)])
    )
    pairs = pairs.with_columns(pl.lit("harmlessness").alias("category"))
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
    """A child as the search makes it: a pruned one stays in the tree, not a child."""
    p = tree.nodes[parent]
    n = Node(
        len(tree.nodes), parent, action, f"{p.instruction} +{action}", p.depth + 1, len(tree.nodes)
    )
    n.status, n.reward, n.prune_reason = status, reward if status == SIMULATED else None, reason
    tree.nodes.append(n)
    if status == SIMULATED:
        p.children.append(n.id)
        backup(tree, n)
    else:
        n.attempt = p.attempts.get(action, 0)
        p.attempts[action] = n.attempt + 1
    return n


def _rows(tree):
    return [node_row(tree, n) for n in tree.nodes]


def test_selection_descends_by_the_mean_and_the_best_node_is_the_max():
    tree = _tree("helpfulness")  # three principles
    a = _add(tree, 0, "clarification_request", 0.9)  # a lucky node with a poor subtree
    b = _add(tree, 0, "tone_improvement", 0.6)
    c = _add(tree, 0, "information_augmentation", 0.1)
    for action in ("clarification_request", "tone_improvement", "information_augmentation"):
        _add(tree, a.id, action, 0.0)
    _add(tree, b.id, "tone_improvement", 0.6)  # a principle may recur down a path
    root = tree.root
    # value is the max backup, q the recursive mean
    assert a.value == 0.9 and a.q == pytest.approx((0.9 + 0 + 0 + 0) / 4)
    assert b.value == 0.6 and b.q == pytest.approx(0.6)
    assert root.value == 0.9 and root.visits == 8  # the root and 7 simulated expansions
    assert root.q == pytest.approx((0.2 + a.q + b.q + c.q) / 4)
    # fully expanded root: descend by UCT on q (weight 0 = greedy): into b, not the lucky a
    node, action = select(tree, 0.0)
    assert node is b and action in {"clarification_request", "information_augmentation"}
    assert tree.best() is a and tree.worst() is tree.nodes[a.children[0]]
    assert verify_tree(_rows(tree), "helpfulness", iterations=7) == []


def test_a_principle_is_banned_among_siblings_and_a_failed_one_after_its_attempts():
    tree = _tree("helpfulness")
    a = _add(tree, 0, "clarification_request", 0.5)
    _add(tree, 0, "tone_improvement", 0.0, status=PRUNED, reason="adds_facts")
    # the pruned tone_improvement is not a child: it may be tried again at the root
    assert untried(tree, tree.root) == ["information_augmentation", "tone_improvement"]
    _add(tree, 0, "tone_improvement", 0.0, status=PRUNED, reason="adds_facts")
    assert untried(tree, tree.root) == ["information_augmentation"]  # failed twice: dropped
    # below a, every principle is available again, its own included
    assert set(untried(tree, a)) == set(allowed_principles("helpfulness"))
    rows = _rows(tree)
    assert [r["attempt"] for r in rows if r["status"] == "pruned"] == [0, 1]
    assert verify_tree(rows, "helpfulness", iterations=1, retries=2) == []
    assert any("exceed the retry budget" in p for p in verify_tree(rows, "helpfulness", 1, 0))
    assert any("successful expansions exceed" in p for p in verify_tree(rows, "helpfulness", 0))


@pytest.mark.parametrize(
    ("corrupt", "message"),
    [
        (
            lambda rows: rows[2].update(action="hint_addition", path=["hint_addition"]),
            "used twice among its children",
        ),
        (
            lambda rows: rows[1].update(
                action="boundary_enforcement", path=["boundary_enforcement"]
            ),
            "not allowed for math",
        ),
        (lambda rows: rows[0].update(value=0.5), "is not the max backup"),
        (lambda rows: rows[0].update(q=0.9), "is not the mean backup"),
        (lambda rows: rows[1].update(visits=5), "visits 5"),
        (lambda rows: rows[3].update(prune_reason=""), "pruned without a known reason"),
        (lambda rows: rows[3].update(attempt=1), "retries of 'clarification_request' are numbered"),
        (lambda rows: rows[4].update(depth=3), "depth 3 under a parent at 1"),
    ],
)
def test_verifier_catches_a_broken_tree(corrupt, message):
    tree = _tree()
    a = _add(tree, 0, "hint_addition", 0.5)
    _add(tree, 0, "tone_improvement", 0.1)
    _add(tree, 0, "clarification_request", 0.0, status=PRUNED, reason="intent_drift")
    _add(tree, a.id, "hint_addition", 0.9)
    rows = _rows(tree)
    assert verify_tree(rows, "math", iterations=3) == []
    corrupt(rows)
    problems = verify_tree(rows, "math", iterations=3)
    assert any(message in p for p in problems), problems


def test_pruning_reasons_and_rewrite_cleaning():
    parent = Node(0, None, "root", "Tell me about owls.", 0, 0)
    s = SearchSettings(min_intent_similarity=0.5, max_rewrite_chars=100)
    original = parent.instruction
    assert _prune_reason(original, parent, "x", False, 0.9, s) == "rewrite_failed"
    assert _prune_reason(original, parent, "", True, 0.9, s) == "empty_rewrite"
    assert _prune_reason(original, parent, "tell me  about OWLS.", True, 0.9, s) == "no_change"
    assert _prune_reason(original, parent, "a" * 101, True, 0.9, s) == "too_long"
    assert _prune_reason(original, parent, "Tell me about cars.", True, 0.3, s) == "intent_drift"
    ok = "Please tell me about owls, with sources."
    assert _prune_reason(original, parent, ok, True, 0.8, s) == ""
    assert (
        clean_rewrite('Here is the rewritten request: "Tell me about owls."')
        == "Tell me about owls."
    )
    assert clean_rewrite("```\nRewritten request: Explain owls.\n```") == "Explain owls."


@pytest.mark.parametrize(
    ("original", "rewrite", "reason"),
    [
        # the three failures seen in review
        (
            "A train covers 240 km in 3 hours. What is its average speed?",
            "A train covers 240 km in 3 hours at 60 kmph. Explain how to find its average speed.",
            "adds_facts",
        ),
        (
            "What is the capital of France?",
            "The capital of France is Paris, a city famous for the Eiffel Tower.",
            "answers_instead",
        ),
        (
            "Explain why smoking is bad for your health.",
            "Explain why smoking is not bad for your health.",
            "changed_request",
        ),
        (
            "List the disadvantages of remote work.",
            "List the advantages of remote work.",
            "changed_request",
        ),
        (
            "Why shouldn't I skip breakfast?",
            "Why should I skip breakfast every day?",
            "changed_request",
        ),
        ("Write a haiku about the sea.", "Write a limerick about taxes.", "changed_request"),
        # and rewrites that keep the request
        (
            "What is the capital of France?",
            "Could you tell me what the capital city of France is?",
            "",
        ),
        (
            "Solve 12 + 30 and explain.",
            "Solve 12 + 30, explain each step and check the result.",
            "",
        ),
        (
            "Explain why smoking is bad for your health.",
            "Please explain why smoking is bad for your health, and do not leave out any major effect.",
            "",
        ),
    ],
)
def test_intent_checks(original, rewrite, reason):
    assert intent_problem(original, rewrite) == reason


def test_mcts_beats_best_of_n_on_a_landscape_where_principles_compose():
    """At an equal budget, MCTS finds the depth-3 optimum that best-of-N cannot reach, and
    its mean gain is higher, on every one of several seeds of the landscape."""
    for seed in (0, 1, 2):
        mcts, bon = compare_on_landscape(n_seeds=15, iterations=16, samples=2, seed=seed)
        assert mcts["calls_per_seed"] == bon["calls_per_seed"]  # the same budget
        assert mcts["optimum"] > bon["optimum"] == 0.0
        assert mcts["mean_gain"] > 1.5 * bon["mean_gain"]
        assert mcts["max_depth"] >= 3 and bon["max_depth"] == 1


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
        assert tree.iterations_run == len(tree.simulated()) - 1 <= 2  # the budget
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
    # The embedded classifier puts nearly every candidate in helpfulness, so a category's
    # quota is what gets searched: five taken, every fifth held out, leaves four trees of
    # three iterations. With three (two searched) one tree without a better rewrite left a
    # single record and the gate rightly blocked; with four that takes three such trees.
    result = _run(tmp_path, {"per_category": 5, "heldout_every": 5})
    assert result.success
    checks = {e.asset_check_key.name: e for e in result.get_asset_check_evaluations()}
    failed = {n for n, e in checks.items() if not e.passed}
    # WARN checks on what the search achieved: three expansions on a root with three or
    # more principles cannot go past depth 1, and the embedded model rewrites poorly.
    warn = {"ultraprompt_trees_deep", "ultraprompt_search_gains", "ultraprompt_pruned_share"}
    assert failed <= {"ultraprompt_drift_suite", "ultraprompt_curated_drift_suite", *warn}, failed
    for name in (
        "ultraprompt_trees_verified",
        "ultraprompt_accounted",
        "ultraprompt_seeds_accounted",
    ):
        assert checks[name].passed
    storage = tmp_path / "storage"
    seeds = pl.read_parquet(storage / "ultraprompt_seeds.parquet")
    # The embedded classifier decides the categories (noisily): up to 5 seeds per category
    # are taken and every fifth of them held out.
    taken = dict(seeds.group_by("category").len().iter_rows())
    assert all(n <= 5 for n in taken.values()) and seeds.height >= 5
    heldout = seeds.filter(pl.col("split") == "heldout").height
    assert heldout == sum(n // 5 for n in taken.values()) >= 1
    records = pl.read_parquet(storage / "ultraprompt.parquet")
    rejected = pl.read_parquet(storage / "ultraprompt_rejected.parquet")
    assert records.height + rejected.height == seeds.height - heldout
    trees = pl.read_parquet(storage / "ultraprompt_trees.parquet")
    simulated = trees.filter(pl.col("status") == "simulated")
    assert simulated.group_by("seed_id").len()["len"].max() <= 4  # root + 3 expansions
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
    assert evals.height == 2 * heldout and sorted(evals["rewriter"].unique()) == [
        "base",
        "paligner",
    ]
    judged = evals.filter(~pl.col("judge_failed"))
    assert judged["p_rewritten_better"].is_between(0, 1).all()
    assert mats["paligner_eval"]["judge_failures"].value == evals["judge_failed"].sum()
    for r in ("base", "paligner"):
        rate = judged.filter(pl.col("rewriter") == r)["win"].mean()
        assert mats["paligner_eval"][f"win_rate_{r}"].value == round(rate, 4)
        low, high = mats["paligner_eval"][f"win_rate_{r}_ci95"].value
        assert low <= rate <= high


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


def ultraprompt_reference_world(max_depth: int = 3):
    """The reference server's entries for tests/fixtures/ultraprompt_reference.yaml: the
    classifier's answers, and the rewrites, intent verdicts, answers and rewards of every
    node the search can build up to `max_depth`."""
    import itertools

    import yaml

    from synth.ultraprompt.intent import INTENT_JUDGE
    from synth.ultraprompt.search import RESPOND
    from synth.ultraprompt.seeds import CATEGORY_LETTERS, CLASSIFY

    doc = yaml.safe_load(
        (Path(__file__).parent / "fixtures" / "ultraprompt_reference.yaml").read_text()
    )
    clauses, hows = doc["clauses"], {n: p.how for n, p in load_principles().items()}
    letter = {c: k for k, c in CATEGORY_LETTERS.items()}
    classify_marker = CLASSIFY.user.split("{instruction}")[1][:30]
    intent_marker = INTENT_JUDGE.user.split("{rewrite}")[1][:30]
    entries: dict[tuple, Entry] = {}

    def add(e: Entry) -> None:
        entries[(e.when, e.reward is None)] = e

    def answer(path: tuple[str, ...]) -> str:
        return "Answer covering: " + (", ".join(sorted(set(path))) or "nothing") + "."

    for seed in doc["seeds"]:
        x, compose = seed["instruction"], set(seed["compose"])
        add(
            Entry(
                (f"Request:\n{x}\n\nWhich kind", classify_marker),
                choices={
                    letter[seed["category"]]: 0.9,
                    "A" if seed["category"] != "helpfulness" else "B": 0.1,
                },
            )
        )
        allowed = allowed_principles(seed["category"])
        for depth in range(max_depth + 1):
            for path in itertools.product(allowed, repeat=depth):
                node = " ".join([x, *(clauses[p] for p in path)])
                add(Entry((f"{RESPOND.system}\n{node}",), reply=answer(path)))
                got = set(path)
                score = 0.3 + 0.15 * len(got & compose) - 0.1 * len(got - compose)
                score += 0.25 if compose <= got else 0.0
                add(Entry((f"{x}\n{answer(path)}",), reward=round(score, 6)))
                if depth < max_depth:
                    for p in allowed:
                        child = f"{node} {clauses[p]}"
                        add(Entry((f'Request:\n"""\n{node}\n"""', hows[p]), reply=child))
                        add(
                            Entry(
                                (f"Rewritten request:\n{child}\n\n", intent_marker),
                                choices={"Yes": 0.95, "No": 0.05},
                            )
                        )
    return doc, list(entries.values())


def test_with_a_capable_model_the_search_goes_deep_and_keeps_the_intent(tmp_path):
    """The ultraprompt search as the job runs it, with the reference server in the
    generator, reward and judge roles: every tree grows past depth 1, the chosen rewrite of
    every seed beats its original and passes the intent checks."""
    import json

    from dagster import AssetKey

    doc, entries = ultraprompt_reference_world()
    instructions = tmp_path / "instructions.jsonl"
    pairs = tmp_path / "pairs.jsonl"
    seeds = doc["seeds"]
    instructions.write_text(
        "".join(
            json.dumps({"instruction": s["instruction"], "input": "", "output": ""}) + "\n"
            for s in seeds[:3]
        )
    )
    pairs.write_text(
        json.dumps(
            {
                "prompt": seeds[3]["instruction"],
                "response_0": "No.",
                "response_1": "Ignore it.",
                "safer_response_id": 1,
            }
        )
        + "\n"
    )
    with ReferenceJudgeServer(entries) as server:

        def role(backend: str) -> LLMResource:
            return LLMResource(
                backend=backend,
                base_url=server.base_url,
                model="reference",
                cache_path=str(tmp_path / "cache.sqlite"),
            )

        defs = build_definitions(
            tmp_path,
            roles={"generator": role("openai"), "judge": role("openai"), "reward": role("pooling")},
        )
        keys = [
            AssetKey(k)
            for k in (
                "seed_instructions",
                "seed_instructions_rejected",
                "seed_preference_pairs",
                "seed_preference_pairs_rejected",
                "ultraprompt_seeds",
                "ultraprompt_seeds_rejected",
                "ultraprompt_trees",
                "ultraprompt",
                "ultraprompt_rejected",
            )
        ]
        result = defs.resolve_implicit_global_asset_job_def().execute_in_process(
            instance=DagsterInstance.ephemeral(),
            asset_selection=keys,
            run_config={
                "ops": {
                    "seed_instructions": {"config": {"source": str(instructions)}},
                    "seed_preference_pairs": {"config": {"source": str(pairs)}},
                    "ultraprompt_seeds_assets": {"config": {"per_category": 2, "heldout_every": 0}},
                    "ultraprompt_search_assets": {
                        "config": {"iterations": 8, "samples": 2, "intent_judge": True}
                    },
                }
            },
        )
        assert server.unknown == []  # only fixture items were asked for
    assert result.success
    checks = {e.asset_check_key.name: e.passed for e in result.get_asset_check_evaluations()}
    for name in (
        "ultraprompt_trees_verified",
        "ultraprompt_search_gains",
        "ultraprompt_trees_deep",
        "ultraprompt_pruned_share",
        "ultraprompt_accounted",
    ):
        assert checks[name], name
    storage = tmp_path / "storage"
    records = pl.read_parquet(storage / "ultraprompt.parquet")
    trees = pl.read_parquet(storage / "ultraprompt_trees.parquet")
    assert records.height == 4 and set(records["category"]) == {
        "helpfulness",
        "honesty",
        "coding",
        "harmlessness",
    }
    assert (records["max_depth"] >= 2).all() and (records["reward_gain"] > 0.2).all()
    for r in records.iter_rows(named=True):
        assert intent_problem(r["src_instruction"], r["chosen_instruction"]) == ""
        assert len(r["chosen_actions"]) >= 2  # the best rewrite composes principles
    assert trees.filter(pl.col("status") == "pruned").height == 0
    (mat,) = [
        e for e in result.get_asset_materialization_events() if e.asset_key.path == ["ultraprompt"]
    ]
    md = mat.materialization.metadata
    assert (
        md["role_reward"].value == "pooling:reference"
        and md["role_judge"].value == "openai:reference"
    )


def test_dpo_starts_from_the_sft_model_and_uses_it_as_its_reference(tmp_path):
    """P-Aligner's DPO reference is the SFT policy: after SFT the adapters are merged and
    DPO trains fresh ones, so switching them off gives the SFT model, not the base; the
    two stages saved reload into the same network."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from train.models import apply_adapters, freeze_as_reference, save_stages
    from train.random_models import embedded_tokenizer, random_causal_lm

    path = random_causal_lm("tiny", tmp_path / "base")
    ids = torch.tensor([[1, 2, 3, 4, 5]])
    config = LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"
    )

    def logits(m):
        with torch.no_grad():
            return m(input_ids=ids).logits

    def nudge(m, seed):
        torch.manual_seed(seed)
        with torch.no_grad():
            for n, p in m.named_parameters():
                if "lora_B" in n:
                    p.normal_(0, 0.5)

    base_logits = logits(AutoModelForCausalLM.from_pretrained(path))
    sft = get_peft_model(AutoModelForCausalLM.from_pretrained(path), config)
    nudge(sft, 1)  # "SFT"
    sft_logits = logits(sft)
    assert not torch.allclose(sft_logits, base_logits)
    sft.save_pretrained(tmp_path / "adapter" / "sft")
    dpo = freeze_as_reference(sft, config)
    with dpo.disable_adapter():
        assert torch.allclose(logits(dpo), sft_logits, atol=1e-5)  # the reference is SFT
    nudge(dpo, 2)  # "DPO"
    dpo_logits = logits(dpo)
    save_stages([("sft", None), ("dpo", dpo)], tmp_path / "adapter", embedded_tokenizer())
    again = apply_adapters(AutoModelForCausalLM.from_pretrained(path), tmp_path / "adapter")
    assert torch.allclose(logits(again), dpo_logits, atol=1e-5)
