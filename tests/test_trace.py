"""TRACE: policies, labels, verifiers, the gate, and the job end to end (triage, impact
weights, hybrid-loss training through Dagster Pipes)."""

import json
import math

import numpy as np
import polars as pl
import pytest
import torch
from dagster import DagsterInstance
from reference_server import ReferenceJudgeServer

from assets.partitions import TRACE_POLICY_VERSIONS
from assets.resources import LLMResource
from assets.trace import (
    trace_curated_ready_for_training,
    trace_triage_label_shift,
    trace_weighted_is_a_distribution,
)
from pipelines.definitions import build_definitions
from quality.trace import quantile_threshold_from_evidence, verify_labels
from synth.llm.judge import JudgeScore
from synth.trace.policy import SHIPPED_POLICIES, PolicyError, load_policy
from synth.trace.triage import (
    TriageSettings,
    triage_label,
    triage_sample,
    verdict_threshold,
    violation_requests,
)
from train.trace import (
    dpo_loss,
    gold_batch,
    loss_terms,
    normalise_impact,
    npo_loss,
    split_heldout,
    token_kl,
    training_pair,
)

from conftest import trace_partition, trace_reference_fixture


@pytest.mark.parametrize(
    ("chosen_violates", "rejected_violates", "label"),
    [
        (False, False, "RETAIN"),
        (False, True, "RETAIN"),
        (True, False, "INVERT"),
        (True, True, "PUNISH"),
    ],
)
def test_labels_follow_the_paper(chosen_violates, rejected_violates, label):
    assert triage_label(chosen_violates, rejected_violates) == label


def test_shipped_policies_differ_and_are_versioned_by_content(tmp_path):
    strict = load_policy(SHIPPED_POLICIES / "strict.yaml")
    new = load_policy(SHIPPED_POLICIES / "new_policy.yaml")
    tiered = load_policy(SHIPPED_POLICIES / "tiered_2026.yaml")
    assert len({strict.version, new.version, tiered.version}) == 3 and len(new.version) == 12
    assert not strict.exceptions and new.exceptions[0].id == "educational_context"
    assert (
        new.match_category("What household chemicals should never be mixed?") == "dangerous_advice"
    )
    assert new.match_category("Write a joke about cats") == "general"
    # the tiered policy: 19 categories in 4 named tiers, zero tolerance on S1-S3
    assert [c.id for c in tiered.categories] == [f"S{i}" for i in range(1, 20)]
    assert [t.name for t in tiered.tiers] == ["CRITICAL", "HIGH", "STANDARD", "REDUCED"]
    assert [c.id for c in tiered.categories if c.zero_tolerance] == ["S1", "S2", "S3"]
    assert {e.id for e in tiered.exceptions} == {
        "educational_safety",
        "historical_academic",
        "therapeutic_support",
        "legal_journalistic",
    }
    edited = tmp_path / "p.yaml"
    edited.write_bytes((SHIPPED_POLICIES / "new_policy.yaml").read_bytes() + b"\n# a comment\n")
    assert load_policy(edited).version != new.version


def test_the_judge_reads_the_whole_policy_first_and_the_category_only_as_a_hint():
    tiered = load_policy(SHIPPED_POLICIES / "tiered_2026.yaml")
    items = [
        ("How does carbon monoxide poisoning happen at home?", "It comes from faulty boilers."),
        ("How do I pick a lock?", "I can't help with that."),
    ]
    a, b = violation_requests(tiered, items)
    # one system prompt for every item (a server's prefix cache reuses it), holding it all
    assert a.messages[0] == b.messages[0] and a.messages[0].role == "system"
    system = a.messages[0].content
    for c in tiered.categories:
        assert f"[{c.id}] {c.name}" in system
    for ex in tiered.exceptions:
        assert f"[{ex.id}]" in system
    for rid, _ in tiered.requirements:
        assert f"[{rid}]" in system
    assert "Tier 1 (CRITICAL)" in system and "Zero tolerance" in system
    assert system.index("=== POLICY ===") < system.index("[S19]")
    # "poisoning" routes to S5 violent crime by keyword; it is only a hint to the judge
    assert "Keyword hint (may be wrong; the whole policy decides)" in a.messages[1].content
    assert "User: How do I pick a lock?" in b.messages[1].content
    assert "[S8] Fraud, theft and scams (tier 2)" in b.messages[1].content


def test_bad_policy_names_file_and_field(tmp_path):
    f = tmp_path / "bad.yaml"
    f.write_text(
        "name: x\ntitle: t\ndescription: d\ncategories:\n  - id: a\n    name: A\n    tier: one\n    description: d\nrequirements: []\n"
    )
    with pytest.raises(
        PolicyError, match=r"bad.yaml categories\[0\]: field 'tier' should be int, got str"
    ):
        load_policy(f)
    cat = "categories:\n  - {id: a, name: A, tier: 1, description: d}\n"
    g = tmp_path / "bad2.yaml"
    g.write_text(
        f"name: x\ntitle: t\ndescription: d\n{cat}exceptions:\n  - id: e\n    text: t\n    applies_to: [nope]\nrequirements: []\n"
    )
    with pytest.raises(
        PolicyError,
        match=r"exceptions\[0\]: field 'applies_to' names unknown categories \['nope'\]",
    ):
        load_policy(g)
    h = tmp_path / "strings.yaml"
    h.write_text(
        f"name: x\ntitle: t\ndescription: d\n{cat}exceptions: [be nice]\nrequirements: []\n"
    )
    with pytest.raises(PolicyError, match=r"exceptions\[0\]: should be a mapping with id and text"):
        load_policy(h)
    empty = tmp_path / "empty.yaml"
    empty.write_text("name: x\ntitle: t\ndescription: d\ncategories: []\nrequirements: []\n")
    with pytest.raises(PolicyError, match="field 'categories' is empty"):
        load_policy(empty)
    broken = tmp_path / "broken.yaml"
    broken.write_text("name: [x\n")
    with pytest.raises(PolicyError, match="invalid YAML") as e:
        load_policy(broken)
    assert "\n" not in str(e.value)
    with pytest.raises(PolicyError, match="cannot read policy file"):
        load_policy(tmp_path / "missing.yaml")


def test_a_limit_samples_pairs_stratified_by_category_not_the_first_n():
    tiered = load_policy(SHIPPED_POLICIES / "tiered_2026.yaml")
    prompts = ["How do I hack a server?"] * 6 + ["Write a story with a villain."] * 3
    prompts += ["How much ibuprofen is a safe dose?"] * 3
    pairs = pl.DataFrame(
        {
            "record_id": [f"p{i}" for i in range(12)],
            "prompt": prompts,
            "chosen": ["c"] * 12,
            "rejected": ["r"] * 12,
        }
    )
    sample = triage_sample(pairs, tiered, TriageSettings(limit=4, seed=3))
    hints = [tiered.match_category(p) for p in sample["prompt"]]
    assert sample.height == 4 and sorted(set(hints)) == ["S12", "S17", "S7"]
    assert hints.count("S7") == 2  # half the pairs are S7: half the sample
    assert sample["record_id"].to_list() != ["p0", "p1", "p2", "p3"]
    again = triage_sample(pairs, tiered, TriageSettings(limit=4, seed=3))
    assert again["record_id"].to_list() == sample["record_id"].to_list()
    other = triage_sample(pairs, tiered, TriageSettings(limit=4, seed=4))
    assert other["record_id"].to_list() != sample["record_id"].to_list()
    assert triage_sample(pairs, tiered, TriageSettings()).height == 12


def _evidence(p_yes: float) -> str:
    return json.dumps([["Yes", math.log(p_yes)], ["No", math.log(1 - p_yes)], [" the", -9.0]])


def _row(label, pc, pr, threshold=0.5):
    return {
        "record_id": f"r{label}{pc}",
        "label": label,
        "p_chosen_violates": pc,
        "p_rejected_violates": pr,
        "chosen_violates": pc >= threshold,
        "rejected_violates": pr >= threshold,
        "chosen_judge_evidence": _evidence(pc),
        "rejected_judge_evidence": _evidence(pr),
        "verdict_threshold": threshold,
    }


def test_the_verifier_rederives_labels_from_the_raw_judge_output():
    good = pl.DataFrame(
        [_row("RETAIN", 0.1, 0.9), _row("INVERT", 0.8, 0.2), _row("PUNISH", 0.7, 0.6)]
    )
    assert verify_labels(good, 0.5).height == 0
    # a label that does not follow from the verdicts
    tampered = good.with_columns(
        pl.when(pl.col("label") == "INVERT")
        .then(pl.lit("RETAIN"))
        .otherwise(pl.col("label"))
        .alias("label")
    )
    (bad,) = verify_labels(tampered, 0.5).to_dicts()
    assert "label RETAIN should be INVERT" in bad["problem"]
    # a triage that read the wrong choice's probability: stored p no longer matches the judge
    swapped = good.with_columns((1 - pl.col("p_chosen_violates")).alias("p_chosen_violates"))
    assert verify_labels(swapped, 0.5).height == 3
    # the run's threshold decides, not the one a row claims: at 0.65 PUNISH becomes INVERT,
    # and every row claiming 0.5 is flagged for it
    moved = {r["label"]: r["problem"] for r in verify_labels(good, 0.65).to_dicts()}
    assert all("verdict_threshold 0.5 != 0.65" in p for p in moved.values())
    assert "should be INVERT" in moved["PUNISH"] and "should be" not in moved["RETAIN"]
    # a reply without logprobs: the first yes/no word of the text
    parsed = good.with_columns(
        pl.lit(json.dumps({"text": "No, it complies."})).alias("chosen_judge_evidence"),
        pl.lit(0.0).alias("p_chosen_violates"),
    )
    assert verify_labels(parsed.head(1), 0.5).height == 0


def test_a_quantile_threshold_is_read_off_the_batch_and_rederived_from_the_evidence():
    probs = [(0.1, 0.9), (0.8, 0.2), (0.7, 0.6)]  # pooled and sorted: .1 .2 .6 .7 .8 .9
    scores = [
        JudgeScore(("Yes", "No"), {"Yes": p, "No": 1 - p}, "logprobs", 1.0)
        for pair in probs
        for p in pair
    ]
    # linear quantile: the median sits halfway between 0.6 and 0.7, q=0.25 at 0.2 + 0.25 x 0.4
    assert verdict_threshold(scores, TriageSettings(threshold_quantile=0.5)) == pytest.approx(0.65)
    assert verdict_threshold(scores, TriageSettings(threshold_quantile=0.25)) == pytest.approx(0.3)
    assert verdict_threshold(scores, TriageSettings(threshold=0.4)) == 0.4
    # a pair with one failed verdict is rejected, so neither of its p's counts
    failed = JudgeScore(("Yes", "No"), {}, "failed", 0.0, error="http_500")
    assert verdict_threshold(
        [*scores, failed, scores[0]], TriageSettings(threshold_quantile=0.5)
    ) == pytest.approx(0.65)
    kept = pl.DataFrame([_row("RETAIN", 0.1, 0.9, 0.65), _row("INVERT", 0.8, 0.2, 0.65)])
    review = pl.DataFrame([_row("PUNISH", 0.7, 0.6, 0.65)])
    assert quantile_threshold_from_evidence([kept, review], 0.5) == pytest.approx(0.65)
    # without the review rows the median moves to (0.2 + 0.8) / 2: the check must read both
    assert quantile_threshold_from_evidence([kept], 0.5) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="threshold_quantile"):
        TriageSettings(threshold_quantile=1.0)


def test_gold_batch_follows_algorithm_2():
    rows = [
        {"prompt": f"p{i}", "chosen": f"c{i}", "rejected": f"r{i}", "label": lab}
        for i, lab in enumerate(["RETAIN"] * 5 + ["INVERT"] * 5 + ["PUNISH"] * 5)
    ]
    gold = gold_batch(rows, 9, seed=1)
    assert len(gold) == 9
    by_prompt = {r["prompt"]: r for r in rows}
    kinds = [by_prompt[p]["label"] for p, _, _ in gold]
    assert kinds.count("RETAIN") == 3 and kinds.count("INVERT") == 3 and kinds.count("PUNISH") == 3
    for p, good, bad in gold:
        r = by_prompt[p]
        if r["label"] == "INVERT":  # swapped: the compliant rejected response is preferred
            assert (good, bad) == (r["rejected"], r["chosen"]) == training_pair(r)[1:]
        if r["label"] == "PUNISH":  # a compliant response from elsewhere over the violating chosen
            assert bad == r["chosen"] and good.startswith(("c", "r")) and good != r["rejected"]


# ---------------------------------------------------------------- the loss, on hand-computed values


def test_dpo_npo_and_kl_terms_on_hand_computed_values():
    t = torch.tensor
    # beta ((pc - rc) - (pr - rr)) = 0.3 ((-1 + 1.5) - (-2 + 1.5)) = 0.3; -log sigmoid(0.3)
    assert float(dpo_loss(t(-1.0), t(-2.0), t(-1.5), t(-1.5), 0.3)) == pytest.approx(
        0.554355, abs=1e-6
    )
    # -log sigmoid(-0.3 (-1 - -2)) = log(1 + e^0.3)
    assert float(npo_loss(t(-1.0), t(-2.0), 0.3)) == pytest.approx(0.854355, abs=1e-6)
    # ref (0.5, 0.5) vs theta (0.75, 0.25): 0.5 ln(0.5/0.75) + 0.5 ln(0.5/0.25) = 0.143841;
    # the second token is outside the response mask and does not count
    ref = t([[[0.0, 0.0], [5.0, 0.0]]])
    pol = t([[[math.log(3.0), 0.0], [0.0, 5.0]]])
    mask = t([[True, False]])
    assert float(token_kl(ref, pol, mask)) == pytest.approx(0.143841, abs=1e-6)
    assert float(token_kl(ref, ref, mask)) == pytest.approx(0.0, abs=1e-7)


def test_impact_weights_clamp_normalise_and_never_fall_back_to_uniform():
    labels = ["RETAIN", "INVERT", "PUNISH", "PUNISH"]
    assert normalise_impact([5.0, 2.0, -1.0, 1.0], labels) == pytest.approx([0, 2 / 3, 0, 1 / 3])
    assert normalise_impact([0.0, -2.0, -1.0, 0.0], labels) == [0.0, 0.0, 0.0, 0.0]


def test_heldout_split_is_stratified_by_label_and_seeded():
    rows = [{"label": lab} for lab in ["INVERT"] * 8 + ["PUNISH"] * 4 + ["RETAIN"] * 4 + ["RETAIN"]]
    train, held = split_heldout(rows, 0.25, seed=0)
    assert sorted(train + held) == list(range(len(rows))) and not set(train) & set(held)
    by = {lab: sum(rows[i]["label"] == lab for i in held) for lab in ("INVERT", "PUNISH", "RETAIN")}
    assert by == {"INVERT": 2, "PUNISH": 1, "RETAIN": 1}
    assert split_heldout(rows, 0.25, seed=0) == (train, held)
    assert split_heldout(rows, 0.25, seed=1) != (train, held)
    assert split_heldout(rows, 0.0, seed=0) == (list(range(len(rows))), [])


@pytest.fixture(scope="module")
def lora_model():
    from train.models import load_causal_lm
    from train.trace import TraceConfig, add_lora

    cfg = TraceConfig(output_dir="unused", report_to=[], use_cpu=True, max_length=64)
    torch.manual_seed(0)
    base, tok = load_causal_lm("")
    model = add_lora(base, cfg)
    # Away from the reference: at theta = ref the KL term and its gradient are exactly 0.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.02)
    return model, tok, cfg


def test_every_branch_of_the_hybrid_loss_gives_gradient(lora_model):
    model, tok, cfg = lora_model
    rows = [
        {
            "prompt": "Mixing bleach and ammonia?",
            "chosen": "I can't help.",
            "rejected": "Never: toxic gas.",
            "label": "INVERT",
            "impact_weight": 0.5,
        },
        {
            "prompt": "Break into a car?",
            "chosen": "Use a slim jim.",
            "rejected": "Smash the window.",
            "label": "PUNISH",
            "impact_weight": 0.5,
        },
        {
            "prompt": "Name a fruit.",
            "chosen": "An apple.",
            "rejected": "No.",
            "label": "RETAIN",
            "impact_weight": 0.0,
        },
    ]
    params = [p for p in model.parameters() if p.requires_grad]
    terms = loss_terms(model, tok, rows, cfg)
    assert set(terms) == {"loss_invert", "loss_punish", "loss_kl"}
    for name, term in terms.items():
        assert float(term.detach()) > 0, name
        grads = torch.autograd.grad(term, params, retain_graph=True, allow_unused=True)
        norm = sum(float(g.norm()) for g in grads if g is not None)
        assert norm > 0, f"{name} gives no gradient"
    # weight 0 switches a branch off; the baseline objective is one DPO term on chosen > rejected
    off = loss_terms(model, tok, [dict(rows[0], impact_weight=0.0)], cfg)
    assert float(off["loss_invert"]) == 0.0
    baseline = loss_terms(model, tok, rows, cfg, objective="dpo")
    assert set(baseline) == {"loss_dpo"} and float(baseline["loss_dpo"]) > 0


# ---------------------------------------------------------------- the gates, each failing once


def test_the_weights_check_fails_when_no_conflict_pair_agrees_with_the_gold_batch():
    weighted = pl.DataFrame(
        {
            "label": ["RETAIN", "INVERT", "PUNISH", "INVERT"],
            "split": ["train", "train", "train", "heldout"],
            "impact_weight": [0.0, 0.0, 0.0, 0.0],
            "policy_version": ["v1"] * 4,
        }
    )
    result = trace_weighted_is_a_distribution(weighted)
    assert not result.passed and result.metadata["positive_impact_pairs"].value == 0
    assert result.metadata["conflict_pairs"].value == 2
    fine = weighted.with_columns(pl.Series("impact_weight", [0.0, 0.75, 0.25, 0.0]))
    assert trace_weighted_is_a_distribution(fine).passed
    leak = weighted.with_columns(pl.Series("impact_weight", [0.0, 0.75, 0.25, 0.5]))
    assert not trace_weighted_is_a_distribution(leak).passed  # weight on a held-out pair


def test_the_label_shift_check_fails_when_a_policy_relabels_nothing():
    nothing = pl.DataFrame({"label": ["RETAIN"] * 5, "category": ["S8"] * 5})
    result = trace_triage_label_shift(nothing)
    assert not result.passed and result.metadata["observed"].value == 0.0
    some = nothing.with_columns(
        pl.Series("label", ["INVERT", "RETAIN", "PUNISH", "RETAIN", "RETAIN"])
    )
    assert trace_triage_label_shift(some).passed


def test_the_gate_needs_conflicts_and_a_compliant_response_for_the_gold_batch():
    def labelled(*labels):
        return pl.DataFrame({"label": list(labels)})

    assert trace_curated_ready_for_training(labelled("RETAIN", "INVERT", "PUNISH")).passed
    assert trace_curated_ready_for_training(labelled("INVERT", "INVERT")).passed
    # every pair PUNISH: conflicts enough, but no compliant response to measure against
    punished = trace_curated_ready_for_training(labelled("PUNISH", "PUNISH", "PUNISH"))
    assert not punished.passed and punished.metadata["gold_batch_pairs"].value == 0
    assert not trace_curated_ready_for_training(labelled("RETAIN", "RETAIN", "PUNISH")).passed


def _run_trace(tmp_path, triage):
    defs, instance = build_definitions(tmp_path), DagsterInstance.ephemeral()
    return defs.resolve_job_def("trace").execute_in_process(
        instance=instance,
        partition_key=trace_partition(instance),
        raise_on_error=False,
        run_config={
            "ops": {
                "trace_triage_assets": {"config": {**triage, "review_margin": 0.01}},
                "trace_model_assets": {
                    "config": {"max_steps": 2, "max_length": 128, "gold_batch_size": 6}
                },
                "trace_eval": {"config": {"max_new_tokens": 16, "max_length": 128}},
            }
        },
    )


def test_failed_gate_stops_training(tmp_path):
    # Nothing reaches p >= 0.99 with this judge: every pair is RETAIN, nothing to re-align on.
    result = _run_trace(tmp_path, {"threshold": 0.99})
    checks = {e.asset_check_key.name: e for e in result.get_asset_check_evaluations()}
    assert not checks["trace_curated_ready_for_training"].passed
    assert checks["trace_curated_ready_for_training"].metadata["observed"].value == 0
    assert not checks["trace_triage_label_shift"].passed  # nothing relabelled: a WARN
    materialized = {e.asset_key.path[-1] for e in result.get_asset_materialization_events()}
    assert (
        "trace_curated" in materialized
        and "trace_model" not in materialized
        and "trace_weighted" not in materialized
    )
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())


def test_trace_job_end_to_end(tmp_path):
    """Wiring on the embedded judge (its labels are noise): every asset and check runs."""
    result = _run_trace(tmp_path, {"threshold_quantile": 0.5})
    evals = result.get_asset_check_evaluations()
    # the embedded judge's labels are noise: only the ERROR checks must pass (WARN ones, the
    # drift suites and the label shift, report what noise looks like)
    failed = [e.asset_check_key.name for e in evals if not e.passed and e.severity.value == "ERROR"]
    assert result.success and not failed, failed
    # The triage is a partition per policy version: storage/<asset>/<version>.parquet.
    version = load_policy(SHIPPED_POLICIES / "new_policy.yaml").version
    triaged = pl.read_parquet(tmp_path / "storage" / "trace_triage" / f"{version}.parquet")
    review = pl.read_parquet(tmp_path / "storage" / "trace_triage_review" / f"{version}.parquet")
    rejected = pl.read_parquet(
        tmp_path / "storage" / "trace_triage_rejected" / f"{version}.parquet"
    )
    assert triaged.height + review.height + rejected.height == 11
    assert triaged["policy_version"].unique().to_list() == [version]
    assert set(triaged["label"]) <= {"RETAIN", "INVERT", "PUNISH"}
    # threshold_quantile 0.5: the median of both responses' p over the kept and review pairs
    judged = pl.concat([triaged, review])
    pooled = judged["p_chosen_violates"].to_list() + judged["p_rejected_violates"].to_list()
    assert triaged["verdict_threshold"].unique().to_list() == [pytest.approx(np.median(pooled))]
    (mat,) = [
        e for e in result.get_asset_materialization_events() if e.asset_key.path == ["trace_model"]
    ]
    md = {k: v.value for k, v in mat.materialization.metadata.items()}
    assert math.isfinite(md["final_loss"]) and math.isfinite(md["baseline_final_loss"])
    assert md["trainable_tensors_changed"] > 0  # LoRA weights moved
    (weights_sum,) = md["impact_weight_sums"].values()
    assert abs(weights_sum - 1.0) < 1e-6
    assert md["loss_curve"].startswith("![TRACE training loss](data:image/png;base64,")
    weighted = pl.read_parquet(tmp_path / "storage" / "trace_weighted.parquet")
    assert weighted.height == triaged.height
    assert weighted.filter(pl.col("label") == "RETAIN")["impact_weight"].sum() == 0
    train = weighted.filter((pl.col("label") != "RETAIN") & (pl.col("split") == "train"))
    assert (train["impact_weight"] >= 0).all() and abs(train["impact_weight"].sum() - 1) < 1e-6
    summary = pl.read_parquet(tmp_path / "storage" / "trace_model.parquet")
    assert summary["steps"][0] == 2 and summary["baseline_adapter_dir"][0]

    # evaluation: three models generated for every prompt, judged under the new policy
    evals = pl.read_parquet(tmp_path / "storage" / "trace_eval.parquet")
    assert sorted(evals["model"].unique().to_list()) == ["dpo_baseline", "realigned", "reference"]
    assert evals.height == 3 * 12 and evals["p_violates"].is_between(0, 1).all()
    (ev,) = [
        e for e in result.get_asset_materialization_events() if e.asset_key.path == ["trace_eval"]
    ]
    emd = {k: v.value for k, v in ev.materialization.metadata.items()}
    for m in ("reference", "realigned", "dpo_baseline"):
        share = evals.filter(pl.col("model") == m)["complies"].mean()
        assert emd[f"policy_agreement_{m}"] == round(share, 4)
        assert 0 < emd[f"retention_nll_{m}"] < 20
    assert emd["retention_nll_realigned"] != emd["retention_nll_reference"]
    assert emd["role_evaluator"].startswith("embedded:")


def test_trace_realigns_toward_the_new_policy_with_the_reference_judge(tmp_path):
    """The paper's effect in direction, with a capable judge: labels exactly as the policy
    decides, every branch trained, and the held-out margin toward the new policy rising,
    where plain DPO on the old labels moves it the other way."""
    seeds, entries, pairs = trace_reference_fixture(tmp_path)
    policy_file = SHIPPED_POLICIES / "tiered_2026.yaml"
    version = load_policy(policy_file).version
    with ReferenceJudgeServer(entries) as server:
        judge = LLMResource(
            backend="openai",
            base_url=server.base_url,
            model="reference-judge",
            cache_path=str(tmp_path / "cache.sqlite"),
        )
        defs = build_definitions(tmp_path, roles={"judge": judge})
        instance = DagsterInstance.ephemeral()
        instance.add_dynamic_partitions(TRACE_POLICY_VERSIONS.name, [version])
        result = defs.resolve_job_def("trace").execute_in_process(
            instance=instance,
            partition_key=version,
            raise_on_error=False,
            run_config={
                "ops": {
                    "seed_preference_pairs": {"config": {"source": str(seeds)}},
                    "trace_policy": {"config": {"path": str(policy_file)}},
                    "trace_model_assets": {"config": TRACE_EFFECT_TRAINING},
                    "trace_eval": {"config": {"max_new_tokens": 24, "max_length": 128}},
                }
            },
        )
        assert server.unknown == []  # the judge was asked about fixture items only
    checks = {e.asset_check_key.name: e.passed for e in result.get_asset_check_evaluations()}
    assert result.success and all(checks.values()), checks

    triaged = pl.read_parquet(tmp_path / "storage" / "trace_triage" / f"{version}.parquet")
    expected = {p["prompt"]: p["label"] for p in pairs}
    assert triaged.height == len(pairs)
    assert dict(zip(triaged["prompt"], triaged["label"], strict=True)) == expected

    (mat,) = [
        e for e in result.get_asset_materialization_events() if e.asset_key.path == ["trace_model"]
    ]
    md = {k: v.value for k, v in mat.materialization.metadata.items()}
    weighted = pl.read_parquet(tmp_path / "storage" / "trace_weighted.parquet")
    train = weighted.filter(pl.col("split") == "train")
    assert set(train["label"]) == {"RETAIN", "INVERT", "PUNISH"}
    assert md["positive_impact_pairs"] > 0
    history = mat.materialization.metadata["loss_curve"].value  # a plot; the numbers:
    assert history.startswith("![TRACE training loss]")
    margins = pl.read_parquet(next((tmp_path / "runs").glob("trace-eval-*/margins.parquet")))
    mean = {
        (m, lab): float(
            margins.filter((pl.col("model") == m) & (pl.col("label") == lab))["margin"].mean()
        )
        for m in ("reference", "realigned", "dpo_baseline")
        for lab in ("INVERT", "RETAIN")
    }
    print("\n" + margin_table(margins))  # `pytest -s` shows the numbers the docs quote
    trace_gain = mean[("realigned", "INVERT")] - mean[("reference", "INVERT")]
    dpo_gain = mean[("dpo_baseline", "INVERT")] - mean[("reference", "INVERT")]
    assert trace_gain > 0 and trace_gain > dpo_gain, mean
    (ev,) = [
        e for e in result.get_asset_materialization_events() if e.asset_key.path == ["trace_eval"]
    ]
    emd = {k: v.value for k, v in ev.materialization.metadata.items()}
    assert emd["margin_INVERT_delta_realigned"] == pytest.approx(trace_gain, abs=1e-3)
    assert emd["margin_preference_delta_realigned"] > emd["margin_preference_delta_dpo_baseline"]
    evals = pl.read_parquet(tmp_path / "storage" / "trace_eval.parquet")
    by_model = {
        m: evals.filter(pl.col("model") == m)["response"].to_list()
        for m in ("reference", "realigned")
    }
    assert by_model["reference"] != by_model["realigned"]  # re-alignment changed generations


def margin_table(margins: pl.DataFrame) -> str:
    """Held-out margins per model and label, and their change from the reference."""
    mean = margins.group_by("model", "label").agg(pl.col("margin").mean())
    get = {(m, lab): v for m, lab, v in mean.iter_rows()}
    lines = [
        "| model | INVERT | change | RETAIN | change | PUNISH | change |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for m in ("reference", "realigned", "dpo_baseline"):
        cells = []
        for lab in ("INVERT", "RETAIN", "PUNISH"):
            v, ref = get.get((m, lab)), get.get(("reference", lab))
            cells += [
                f"{v:.2f}" if v is not None else "-",
                "" if m == "reference" or v is None else f"{v - ref:+.2f}",
            ]
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


# A few dozen CPU steps on SmolLM2-135M + LoRA (about 3 minutes for both adapters).
TRACE_EFFECT_TRAINING = {
    "max_steps": 24,
    "max_length": 128,
    "learning_rate": 5e-4,
    "gold_batch_size": 12,
}
