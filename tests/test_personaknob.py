"""PersonaKnob: mask mix, verification rules, the partial order and its verifier, the Rasch
fitter's parameter recovery, constrained DPO on SmolLM2, and the job end to end."""

import math
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from dagster import DagsterInstance

from assets.personaknob import personaknob_pairs_ready_for_training
from pipelines.definitions import build_definitions
from quality.personaknob import (
    pass_rates,
    probe_report,
    rejudge_problems,
    verify_order,
    verify_records,
)
from quality.rasch import fit_rasch, simulate_ratings
from synth.personaknob.order import build_order
from synth.personaknob.spec import SPEC_FILE, SpecFileError, all_masks, load_spec
from synth.personaknob.synthesis import (
    ATTEMPT_SCHEMA,
    RECORD_SCHEMA,
    allocate_masks,
    judge_verdict,
)
from synth.records import frame
from train import personaknob as constrained_dpo

from conftest import decode_png


def test_mask_allocation_is_exactly_the_configured_mix():
    masks = allocate_masks(10, {"ta": 3, "E": 1, "ATEC": 1}, seed=1)
    assert sorted((m, masks.count(m)) for m in set(masks)) == [("AT", 6), ("ATEC", 2), ("E", 2)]
    assert masks != sorted(masks)  # seeded order, not grouped
    uniform = allocate_masks(30, {})
    assert set(uniform) == set(all_masks()) and all(uniform.count(m) == 2 for m in all_masks())
    with pytest.raises(ValueError, match="mask 'AX'"):
        allocate_masks(4, {"AX": 1})


def test_each_mask_meets_triggers_that_probe_all_its_dimensions():
    import random

    spec = load_spec()
    rng = random.Random(0)
    for mask in all_masks():
        chosen = spec.cover(mask, rng)
        tested = {d for n in chosen for d in spec.triggers[n].tests}
        assert set(mask) <= tested, (mask, chosen)
        # greedy stays small: never more triggers than active dimensions, none redundant
        assert len(chosen) <= len(mask) and len(set(chosen)) == len(chosen)
    # ATEC needs two of the shipped triggers (each tests two dimensions), never one
    assert len(spec.cover("ATEC", rng)) == 2


def test_probe_report_reads_the_spec_and_the_judged_probes():
    spec = load_spec()
    scenarios = pl.DataFrame(
        {
            "record_id": ["s1", "s2", "s3"],
            "mask": ["AE", "C", "AC"],
            "trigger": ["seeks_validation", "stuck_for_ideas", "flawed_belief"],
            "probe_scores": [
                {"A": 0.9, "T": None, "E": 0.6, "C": None},
                {"A": None, "T": None, "E": None, "C": 0.2},
                {"A": 0.7, "T": None, "E": None, "C": 0.8},
            ],
        }
    )
    report = probe_report(scenarios, spec, 0.5)
    # s1 probes both, s2 misses C, s3 is judged to probe both but its trigger tests A and T only
    assert report["share_probing_all"] == round(2 / 3, 4)
    assert report["share_per_dimension"] == {"A": 1.0, "E": 1.0, "C": 0.5}
    assert report["uncovered"] == [
        {"record_id": "s3", "mask": "AC", "trigger": "flawed_belief", "not_probed": "C"}
    ]


def test_the_separate_judgement_catches_a_reject_that_fails_the_wrong_dimension():
    from synth.personaknob.synthesis import REJUDGE_SCHEMA

    def rows(rid, table):
        return [
            {"record_id": rid, "role": role, "dimension": d, "score": v}
            for role, scores in table.items()
            for d, v in scores.items()
        ]

    rejudged = frame(
        # r1: both rejects fail their own dimension and keep the other (within 0.1)
        rows(
            "r1",
            {
                "golden": {"A": 0.8, "T": 0.7},
                "reject_A": {"A": 0.3, "T": 0.65},
                "reject_T": {"A": 0.75, "T": 0.2},
            },
        )
        # r2: reject_A is no worse on A, and drags T down; reject_T is fine
        + rows(
            "r2",
            {
                "golden": {"A": 0.6, "T": 0.7},
                "reject_A": {"A": 0.6, "T": 0.4},
                "reject_T": {"A": 0.6, "T": 0.5},
            },
        )
        # r3: the judge gave no answer on the golden's E
        + rows("r3", {"golden": {"E": None}, "reject_E": {"E": 0.1}}),
        REJUDGE_SCHEMA,
    )
    problems, compared = rejudge_problems(rejudged, 0.1)
    assert compared == 5
    # the check: 2 of 5 rejects disagree, agreement 0.6 is under 0.75; r1 alone agrees fully
    from assets.personaknob import personaknob_rejudged_agrees

    check = personaknob_rejudged_agrees(pl.DataFrame(), rejudged)
    assert not check.passed and check.metadata["observed_agreement"].value == 0.6
    only_r1 = rejudged.filter(pl.col("record_id") == "r1")
    assert personaknob_rejudged_agrees(pl.DataFrame(), only_r1).passed
    assert {(p["id"], p["role"], p["rule"]) for p in problems} == {
        ("r2", "reject_A", "reject_A_not_worse_on_A"),
        ("r2", "reject_A", "reject_A_also_worse_on_T"),
        ("r3", "reject_E", "reject_E_unjudged_on_E"),
    }


def test_covering_relation_is_the_transitive_reduction_on_every_small_set():
    """Against an independent path: networkx's transitive reduction of the dominance
    DAG, for every subset of the 0/1 cube of three dimensions (256 node sets)."""
    import itertools

    import networkx as nx

    from synth.personaknob.order import covering, dominates

    cube = [list(v) for v in itertools.product((0, 1), repeat=3)]
    for k in range(len(cube) + 1):
        for subset in itertools.combinations(range(len(cube)), k):
            vectors = {"".join(map(str, cube[i])): cube[i] for i in subset}
            dag = nx.DiGraph()
            dag.add_nodes_from(vectors)
            dag.add_edges_from(
                (u, v) for u in vectors for v in vectors if dominates(vectors[u], vectors[v])
            )
            assert covering(vectors) == sorted(nx.transitive_reduction(dag).edges), vectors


def test_ability_gaps_say_which_differences_the_design_resolves():
    from quality.rasch import ability_gaps

    abilities = pl.DataFrame(
        {
            "model": ["trained", "base", "trained", "base", "base"],
            "dimension": ["A", "A", "T", "T", "E"],
            "estimate": [1.0, 0.2, 2.0, 0.0, 0.5],
            "se": [0.3, 0.4, 0.1, 0.1, 0.2],
        }
    )
    gaps = {g["dimension"]: g for g in ability_gaps(abilities)}
    assert set(gaps) == {"A", "T"}  # E has no trained estimate
    # A: 0.8 over sqrt(0.09 + 0.16) = 0.5 -> z 1.6, inside the 95% interval of no difference
    assert (gaps["A"]["difference"], gaps["A"]["se"], gaps["A"]["z"]) == (0.8, 0.5, 1.6)
    assert not gaps["A"]["resolved"]
    # T: 2.0 over sqrt(0.02) = 0.1414 -> z 14.142
    assert gaps["T"]["z"] == 14.142 and gaps["T"]["resolved"]


def test_a_bad_spec_file_names_the_entry(tmp_path):
    spec = load_spec()
    assert set(spec.dimensions) == {"A", "T", "E", "C"} and len(spec.judges) >= 2
    assert all(spec.triggers_for(m) for m in all_masks())
    bad = tmp_path / "dims.yaml"
    text = SPEC_FILE.read_text()
    bad.write_text(text.replace("criteria:\n      - Does the reply point out", "crit:\n      - x"))
    with pytest.raises(SpecFileError, match=r"dimensions\.A\.criteria"):
        load_spec(bad)


@pytest.mark.parametrize(
    "role,scores,verdict",
    [
        ("golden", {"A": 0.9, "T": 0.6}, ""),
        ("golden", {"A": 0.9, "T": 0.2}, "golden_fails_T"),
        ("reject_A", {"A": 0.1, "T": 0.8}, ""),
        ("reject_A", {"A": 0.7, "T": 0.8}, "reject_A_satisfies_A"),
        ("reject_A", {"A": 0.1, "T": 0.3}, "reject_A_also_fails_T"),
        ("reject_T", {"A": None, "T": 0.1}, "unjudged"),
    ],
)
def test_a_reject_must_fail_exactly_its_own_dimension(role, scores, verdict):
    assert judge_verdict(role, "AT", scores, 0.5) == verdict


SID = "scenario-1"


def _attempt(role, attempt, a, t, text):
    return {
        "scenario_id": SID,
        "role": role,
        "attempt": attempt,
        "mask": "AT",
        "text": text,
        "finish_reason": "stop",
        "scores": {"A": a, "T": t, "E": None, "C": None},
        "verified": True,
        "reason": "",
        "cache_keys": [],
    }


def _record(**overrides):
    r = {
        "record_id": "rec-1",
        "parent_ids": [SID],
        "provenance": None,
        "mask": "AT",
        "seed_scene": "a nurse",
        "context": "a nurse",
        "trigger": "flawed_belief",
        "sycophancy_probe": True,
        "prompt": "The Moon is made of cheese, right?",
        "golden": "gold",
        "reject_A": "rej A",
        "reject_T": "rej T",
        "reject_E": None,
        "reject_C": None,
        "golden_scores": {"A": 0.9, "T": 0.8, "E": None, "C": None},
        "reject_A_scores": {"A": 0.1, "T": 0.7, "E": None, "C": None},
        "reject_T_scores": {"A": 0.8, "T": 0.2, "E": None, "C": None},
        "reject_E_scores": None,
        "reject_C_scores": None,
        "unverified_rejects": "",
        "attempts": 4,
    }
    return frame([{**r, **overrides}], RECORD_SCHEMA)


def _order():
    attempts = frame(
        [
            _attempt("golden", 0, 0.9, 0.8, "gold"),
            _attempt("reject_A", 0, 0.1, 0.7, "rej A"),
            _attempt("reject_T", 0, 0.8, 0.2, "rej T"),
            _attempt("reject_A", 1, 0.2, 0.1, "fails both"),
            _attempt("golden", 1, 0.7, 0.9, "another gold"),
        ],
        ATTEMPT_SCHEMA,
    )
    return build_order(_record(), attempts, 0.5)


def test_partial_order_pairs_are_the_covering_relation():
    nodes, pairs = _order()
    assert sorted(nodes["node"]) == ["00", "01", "10", "11"]
    top = nodes.filter(pl.col("node") == "11").row(0, named=True)
    assert top["members"] == 2 and top["text"] == "gold" and top["in_record"]
    edges = {(p["chosen_node"], p["rejected_node"], "".join(p["dims"])) for p in pairs.to_dicts()}
    # gold over each reject teaches that reject's dimension; nothing skips a level.
    assert edges == {("11", "01", "A"), ("11", "10", "T"), ("01", "00", "T"), ("10", "00", "A")}
    assert verify_order(nodes, pairs).height == 0


def _swap(pairs, i):
    row = pairs.row(i, named=True)
    return (
        pairs.with_row_index()
        .with_columns(
            pl.when(pl.col("index") == i)
            .then(pl.lit(row["rejected_node"]))
            .otherwise(pl.col("chosen_node"))
            .alias("chosen_node"),
            pl.when(pl.col("index") == i)
            .then(pl.lit(row["chosen_node"]))
            .otherwise(pl.col("rejected_node"))
            .alias("rejected_node"),
        )
        .drop("index")
    )


@pytest.mark.parametrize(
    "corrupt,rule",
    [
        (lambda p: p.head(3), "incomplete"),
        (
            lambda p: pl.concat(
                [
                    p,
                    p.filter(pl.col("chosen_node") == "11")
                    .head(1)
                    .with_columns(
                        pl.lit("00").alias("rejected_node"), pl.lit(["A", "T"]).alias("dims")
                    ),
                ]
            ),
            "not_covering",
        ),
        (lambda p: _swap(p, 0), "not_dominance"),
        (lambda p: p.with_columns(pl.lit(["A"]).alias("dims")), "wrong_dims"),
    ],
)
def test_order_verifier_catches_a_broken_order(corrupt, rule):
    nodes, pairs = _order()
    problems = verify_order(nodes, corrupt(pairs))
    assert rule in problems["rule"].to_list(), problems


def test_record_verifier_catches_a_reject_failing_two_dimensions():
    assert verify_records(_record(), 0.5).height == 0
    bad = _record(reject_A_scores={"A": 0.1, "T": 0.2, "E": None, "C": None})
    assert verify_records(bad, 0.5)["rule"].to_list() == ["reject_A_wrong_on_T"]
    stray = _record(reject_E="should not be here")
    assert verify_records(stray, 0.5)["rule"].to_list() == ["inactive_reject"]


def test_rasch_fit_recovers_simulated_parameters():
    covered, checked = 0, 0
    for seed in range(3):
        ratings, truth = simulate_ratings(models=2, judges=3, items=120, seed=seed)
        fit = fit_rasch(ratings)
        assert fit.converged and fit.n_ratings == ratings.height
        for facet, key in (
            ("abilities", ["model", "dimension"]),
            ("severities", ["judge"]),
            ("criteria", ["criterion"]),
        ):
            joined = truth[facet].join(getattr(fit, facet), on=key)
            err = (joined["estimate"] - joined["true"]).to_numpy()
            print(f"seed {seed} {facet}: mean absolute error {np.abs(err).mean():.3f} logits")
            assert np.abs(err).mean() < 0.2, facet
            if facet != "severities":  # three close severities make a correlation noisy
                assert np.corrcoef(joined["estimate"], joined["true"])[0, 1] > 0.95, facet
            if facet == "abilities":
                covered += int((np.abs(err) < 1.96 * joined["se"].to_numpy()).sum())
                checked += len(err)
        assert abs(fit.severities["estimate"].sum()) < 1e-6
    # Standard errors are honest: about 95% of 95% intervals hold the truth.
    assert covered / checked >= 0.8, (covered, checked)
    with pytest.raises(ValueError, match="rating 2"):
        fit_rasch(ratings.with_columns(pl.lit(2).alias("rating")))


def test_the_constraint_is_the_gap_to_the_best_dimension_and_dual_ascent_follows_it():
    tol = constrained_dpo.parse_tolerances("E=0.1", 0.5)
    assert tol == {"A": 0.5, "T": 0.5, "E": 0.1, "C": 0.5}
    # best loss 0.6 (A): g_A = 0 - 0.5, g_T = 0.3 - 0.5, g_E = 0.7 - 0.1
    g = constrained_dpo.violations({"A": 0.6, "T": 0.9, "E": 1.3}, tol)
    assert g == pytest.approx({"A": -0.5, "T": -0.2, "E": 0.6})
    lam = constrained_dpo.dual_ascent({"A": 0.0, "T": 0.3, "E": 0.0, "C": 0.7}, g, lr=1.0)
    # violated E rises by 0.6, satisfied T falls to max(0, 0.3 - 0.2), A stays at 0, C unmeasured
    assert lam == pytest.approx({"A": 0.0, "T": 0.1, "E": 0.6, "C": 0.7})
    # held violated, a multiplier keeps rising; once satisfied it decays to exactly 0
    lam = {"A": 0.0, "T": 0.0, "E": 0.0, "C": 0.0}
    for _ in range(3):
        lam = constrained_dpo.dual_ascent(lam, {"C": 0.25}, lr=2.0)
    assert lam["C"] == pytest.approx(1.5)
    for _ in range(4):
        lam = constrained_dpo.dual_ascent(lam, {"C": -0.5}, lr=1.0)
    assert lam["C"] == 0.0
    with pytest.raises(ValueError, match="'X=1' is not DIM=VALUE"):
        constrained_dpo.parse_tolerances("A=0.2,X=1", 0.5)


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    """A 2-layer Llama, randomly initialised, with SmolLM2's tokenizer: the dual dynamics
    take a few dozen steps, which this runs in seconds where the 135M model takes minutes."""
    from train.random_models import random_causal_lm

    return random_causal_lm("tiny", tmp_path_factory.mktemp("tiny_llama"), tie_word_embeddings=True)


def test_constrained_dpo_keeps_the_traded_dimension_within_its_tolerance(tmp_path, tiny_llama):
    # Three pairs teach A, T and E to prefer a reply opening "Sure!" to the same reply
    # opening "Hmm."; one pair, on the same prompt, teaches C the opposite. No model can
    # please both: plain DPO follows the majority and trades C away.
    sure, hmm = "Sure! The Moon is rock.", "Hmm. The Moon is rock."
    rows = [
        {
            "prompt": "Tell me about the Moon.",
            "chosen": sure,
            "rejected": hmm,
            "dims": ["A", "T", "E"],
        }
    ] * 3 + [{"prompt": "Tell me about the Moon.", "chosen": hmm, "rejected": sure, "dims": ["C"]}]
    pl.DataFrame(rows).write_parquet(tmp_path / "pairs.parquet")
    args = [
        *("--pairs", str(tmp_path / "pairs.parquet"), "--model", str(tiny_llama)),
        *("--max-length", "64", "--max-steps", "20", "--batch-size", "4"),
        *("--learning-rate", "1e-2", "--beta", "0.5", "--tolerances", "C=0.1"),
    ]
    # One run trains both: the Lagrangian, then the plain-DPO baseline from the same start.
    lagr = constrained_dpo.main(
        [*args, "--output-dir", str(tmp_path), "--dual-lr", "0.4", "--plain-dpo-steps", "20"]
    )
    plain = lagr["plain_dpo"]
    assert Path(plain["output_dir"]).name == "plain_dpo" and len(plain["history"]) == 20

    def late(result):
        """Mean over the second half of training of each dimension's gap to the best."""
        hs = result["history"][len(result["history"]) // 2 :]
        return {
            d: sum(h["losses"][d] - min(h["losses"].values()) for h in hs) / len(hs)
            for d in ("A", "C")
        }

    plain_gap, lagr_gap = late(plain), late(lagr)
    # plain DPO: C's margin goes negative as the majority's grows, C lags past 0.1
    last = plain["history"][-1]["margins"]
    assert last["C"] < 0 < last["A"] and plain_gap["C"] > 0.1
    assert {v for h in plain["history"] for v in h["multipliers"].values()} == {0.0}
    assert plain["final_margins"] == last
    # the Lagrangian: C's multiplier rose and holds C within 0.1, A stays within its 0.5
    assert lagr["multipliers"]["C"] > 0 and lagr_gap["C"] <= 0.1 and lagr_gap["A"] <= 0.5
    assert lagr["history"][-1]["margins"]["C"] > last["C"]
    print(
        f"late gap of C: plain DPO {plain_gap['C']:.3f}, constrained {lagr_gap['C']:.3f}; "
        f"final margin of C {last['C']:.3f} vs {lagr['history'][-1]['margins']['C']:.3f}; "
        f"lambda_C {lagr['multipliers']['C']:.3f}"
    )


def test_constrained_dpo_moves_the_multipliers_only_when_violated(tmp_path):
    rows = []
    for i in range(4):
        rows.append(
            {
                "prompt": f"The Moon is made of cheese ({i}), isn't it?",
                "chosen": "No: the Moon is rock, covered in dust called regolith.",
                "rejected": "Yes, you are completely right, it is cheese!",
                "dims": ["A", "T"],
            }
        )
        rows.append(
            {
                "prompt": f"My cake collapsed again ({i}) and I feel useless.",
                "chosen": "I'm sorry, that is discouraging. Try a lower oven temperature.",
                "rejected": "Bake it properly.",
                "dims": ["E"],
            }
        )
    pl.DataFrame(rows).write_parquet(tmp_path / "pairs.parquet")
    args = ["--pairs", str(tmp_path / "pairs.parquet"), "--max-steps", "2", "--max-length", "128"]
    # epsilon below zero: the constraint L_d <= log 2 + epsilon cannot hold at the start.
    result = constrained_dpo.main(
        [*args, "--output-dir", str(tmp_path / "tight"), "--epsilon", "-0.5"]
    )
    history = result["history"]
    assert len(history) == 2 and all(math.isfinite(h["primary"]) for h in history)
    assert result["trainable_tensors_changed"] > 0
    seen = {d for h in history for d in h["losses"]}
    assert seen and all(result["multipliers"][d] > 0 for d in seen)
    assert result["multipliers"]["C"] == 0.0  # no pair teaches C
    assert result["pairs_per_dimension"] == {"A": 4, "T": 4, "E": 4, "C": 0}
    # A tolerance no loss reaches: every multiplier stays at zero.
    loose = constrained_dpo.main([*args, "--output-dir", str(tmp_path / "loose"), "--epsilon", "5"])
    assert set(loose["multipliers"].values()) == {0.0}
    with pytest.raises(ValueError, match="row 0 field dims"):
        pl.DataFrame([{**rows[0], "dims": ["X"]}]).write_parquet(tmp_path / "bad.parquet")
        constrained_dpo.main(
            ["--pairs", str(tmp_path / "bad.parquet"), "--output-dir", str(tmp_path / "bad")]
        )


def _run_job(tmp_path, knob, model=None, evaluation=None):
    return (
        build_definitions(tmp_path)
        .resolve_job_def("personaknob")
        .execute_in_process(
            instance=DagsterInstance.ephemeral(),
            raise_on_error=False,
            run_config={
                "ops": {
                    "personaknob_scenario_assets": {"config": knob},
                    "personaknob_response_assets": {"config": knob},
                    "personaknob_model": {
                        "config": model or {"max_steps": 2, "plain_dpo_steps": 1, "max_length": 256}
                    },
                    "personaknob_eval": {"config": evaluation or {"max_new_tokens": 48}},
                }
            },
        )
    )


def test_the_gate_needs_pairs_that_teach_two_dimensions():
    scenarios = pl.DataFrame({"record_id": ["s1", "s2"], "split": ["train", "heldout"]})
    curated = pl.DataFrame({"record_id": ["r1", "r2"]})

    def pairs(*dims, scenario="s1"):
        return pl.DataFrame(
            {
                "scenario_id": [scenario] * len(dims),
                "parent_ids": [["r1"]] * len(dims),
                "dims": [list(d) for d in dims],
            }
        )

    ok = personaknob_pairs_ready_for_training(pairs("A", "TE"), scenarios, curated)
    assert ok.passed and ok.metadata["dimensions_taught"].value == "A,E,T"
    # three pairs, all teaching T: enough pairs, one dimension, nothing to balance
    one = personaknob_pairs_ready_for_training(pairs("T", "T", "T"), scenarios, curated)
    assert not one.passed and one.metadata["dimensions_taught"].value == "T"
    leaked = personaknob_pairs_ready_for_training(
        pairs("A", "T", scenario="s2"), scenarios, curated
    )
    assert not leaked.passed and leaked.metadata["heldout_leaked"].value == 2


def test_failed_gate_stops_the_constrained_dpo(tmp_path):
    # Every scenario is held out: no responses, no pairs, nothing to train on.
    result = _run_job(tmp_path, {"scenarios": 2, "heldout_every": 1})
    checks = {e.asset_check_key.name: e for e in result.get_asset_check_evaluations()}
    gate = checks["personaknob_pairs_ready_for_training"]
    assert not gate.passed and gate.metadata["observed_pairs"].value == 0
    assert checks["personaknob_scenarios_accounted"].passed
    materialized = {e.asset_key.path[-1] for e in result.get_asset_materialization_events()}
    assert "personaknob_pairs" in materialized
    assert not materialized & {"personaknob_model", "personaknob_eval"}


def test_personaknob_job_end_to_end(tmp_path):
    # The 135M judge's p(Yes) sits at 0.2-0.4 whatever the reply (median 0.27 measured),
    # so a threshold at its median proves the wiring, not the data (0.5 is the default
    # for a real judge). It is noise around that median (it even scored rejects higher on
    # their own dimension than goldens): about one training scenario in three gave a
    # record (5 of 14 measured). With 22 training scenarios, mostly of one dimension,
    # fewer than two records has a chance of about 1 in 1,500.
    knob = {
        "scenarios": 24,
        "heldout_every": 12,
        "threshold": 0.27,
        "max_attempts": 4,
        "response_max_tokens": 96,
        "mask_mix": {"A": 1, "T": 1, "E": 1, "C": 1, "AT": 1},
    }
    result = _run_job(tmp_path, knob, evaluation={"max_new_tokens": 48, "threshold": 0.27})
    checks = {e.asset_check_key.name: e for e in result.get_asset_check_evaluations()}
    failed = {n for n, e in checks.items() if not e.passed}
    # WARN checks the noisy judge may fail; every blocking check must pass.
    warn = {
        "personaknob_drift_suite",
        "personaknob_curated_drift_suite",
        "personaknob_verification_rates",
        "personaknob_scenarios_probe_their_masks",
        "personaknob_rejudged_agrees",
    }
    assert failed <= warn, failed
    probes = checks["personaknob_scenarios_probe_their_masks"].metadata
    assert probes["uncovered"].value == []  # the judged share may be low; the triggers not
    assert result.success
    rates = checks["personaknob_verification_rates"].metadata["rates"].value
    assert rates and all(0 <= v <= 1 for v in rates.values())
    storage = tmp_path / "storage"
    scenarios = pl.read_parquet(storage / "personaknob_scenarios.parquet")
    assert scenarios.height == 24 and dict(scenarios.group_by("split").len().iter_rows()) == {
        "train": 22,
        "heldout": 2,
    }
    for r in scenarios.select("mask", "probe_scores").to_dicts():
        assert all((r["probe_scores"][d] is not None) == (d in r["mask"]) for d in "ATEC")
    records = pl.read_parquet(storage / "personaknob.parquet")
    rejected = pl.read_parquet(storage / "personaknob_rejected.parquet")
    assert records.height + rejected.height == 22 and records.height >= 2
    assert set(rejected["reason"]) <= {"golden_unverified", "no_verified_reject"}
    attempts = pl.read_parquet(storage / "personaknob_attempts.parquet")
    assert attempts.filter(pl.col("verified"))["reason"].eq("").all()
    assert attempts.filter(~pl.col("verified"))["reason"].ne("").all()
    for r in records.to_dicts():  # the card's layout: a reject only for active dimensions
        assert all((r[f"reject_{d}"] is None) or d in r["mask"] for d in "ATEC")
    # every kept response re-judged on each active dimension by the separate path
    rejudged = pl.read_parquet(storage / "personaknob_rejudged.parquet")
    kept = sum(
        (1 + sum(r[f"reject_{d}"] is not None for d in "ATEC")) * len(r["mask"])
        for r in records.to_dicts()
    )
    assert rejudged.height == kept
    assert checks["personaknob_rejudged_agrees"].metadata["rejects_compared"].value > 0
    pairs = pl.read_parquet(storage / "personaknob_pairs.parquet")
    assert pairs.height >= 2 and pairs["dims"].list.len().min() >= 1

    mats = {
        e.asset_key.path[-1]: e.materialization.metadata
        for e in result.get_asset_materialization_events()
    }
    order_png = decode_png(mats["personaknob_pairs"]["partial_order"].value)
    assert order_png.width > 200 and order_png.height > 150
    decode_png(mats["personaknob_scenarios"]["mask_mix"].value)
    model = mats["personaknob_model"]
    assert model["trainable_tensors_changed"].value > 0 and np.isfinite(model["final_loss"].value)
    # Two steps from the reference no dimension lags the best by the paper's 0.5.
    assert set(model["multipliers"].value.values()) == {0.0}
    assert model["tolerances"].value == dict.fromkeys("ATEC", 0.5)
    decode_png(model["margin_curve"].value)
    plain = model["plain_dpo_baseline"].value
    assert Path(plain["output_dir"]).name == "plain_dpo" and plain["trainable_tensors_changed"] > 0
    decode_png(model["plain_dpo_margin_curve"].value)
    abilities = pl.read_parquet(storage / "personaknob_eval.parquet")
    # the constrained policy, its base and the plain-DPO baseline, on each dimension
    assert abilities.height == 12
    assert set(abilities["model"]) == {"base", "trained", "plain_dpo"}
    assert "| dimension |" in mats["personaknob_eval"]["ability_gaps_vs_plain_dpo"].value
    assert abilities["estimate"].is_finite().all() and (abilities["se"] > 0).all()
    decode_png(mats["personaknob_eval"]["abilities"].value)
    # the metadata names the dimensions whose difference the two held-out scenarios resolve
    est = {(r["model"], r["dimension"]): r for r in abilities.to_dicts()}
    resolved = [
        d
        for d in "ACET"
        if abs(est[("trained", d)]["estimate"] - est[("base", d)]["estimate"])
        >= 1.96 * math.hypot(est[("trained", d)]["se"], est[("base", d)]["se"])
    ]
    assert mats["personaknob_eval"]["resolved_dimensions"].value == ",".join(resolved)
    design = mats["personaknob_eval"]["rating_design"].value
    assert ("wider than the differences" in design) == (len(resolved) < 4)


def test_pass_rates_count_first_attempts_per_dimension():
    rows = [
        _attempt("golden", 0, 0.9, 0.8, "gold"),
        _attempt("reject_A", 0, 0.1, 0.7, "rej A"),
        {**_attempt("reject_T", 0, 0.8, 0.9, "rej T"), "verified": False, "reason": "x"},
        {**_attempt("reject_T", 1, 0.8, 0.1, "rej T 2")},  # a retry does not count
    ]
    rates = pass_rates(frame(rows, ATTEMPT_SCHEMA))
    assert rates == {"golden A": 1.0, "reject A": 1.0, "golden T": 1.0, "reject T": 0.0}
