"""TRACE: policies, labels, verifiers, the gate, and the job end to end (triage, impact
weights, hybrid-loss training through Dagster Pipes)."""

import math

import polars as pl
import pytest
from dagster import DagsterInstance

from pipelines.definitions import build_definitions
from quality.trace import label_mismatches
from synth.trace.policy import SHIPPED_POLICIES, PolicyError, load_policy
from synth.trace.triage import triage_label
from train.trace import gold_batch, training_pair

from conftest import trace_partition


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
    assert strict.version != new.version and len(new.version) == 12
    assert not strict.exceptions and new.exceptions[0].id == "educational_context"
    assert (
        new.match_category("What household chemicals should never be mixed?") == "dangerous_advice"
    )
    assert new.match_category("Write a joke about cats") == "general"
    assert "Exception (educational_context)" in new.render("dangerous_advice")
    assert "Exception" not in strict.render("dangerous_advice")
    edited = tmp_path / "p.yaml"
    edited.write_bytes((SHIPPED_POLICIES / "new_policy.yaml").read_bytes() + b"\n# a comment\n")
    assert load_policy(edited).version != new.version


def test_bad_policy_names_file_and_field(tmp_path):
    f = tmp_path / "bad.yaml"
    f.write_text(
        "name: x\ntitle: t\ndescription: d\ncategories:\n  - id: a\n    name: A\n    tier: one\n    description: d\nrequirements: []\n"
    )
    with pytest.raises(
        PolicyError, match=r"bad.yaml categories\[0\]: field 'tier' should be int, got str"
    ):
        load_policy(f)
    g = tmp_path / "bad2.yaml"
    g.write_text(
        "name: x\ntitle: t\ndescription: d\ncategories: []\nexceptions:\n  - id: e\n    text: t\n    applies_to: [nope]\nrequirements: []\n"
    )
    with pytest.raises(
        PolicyError,
        match=r"exceptions\[0\]: field 'applies_to' names unknown categories \['nope'\]",
    ):
        load_policy(g)
    with pytest.raises(PolicyError, match="cannot read policy file"):
        load_policy(tmp_path / "missing.yaml")


def _row(label, pc, pr, threshold=0.5):
    return {
        "record_id": f"r{label}{pc}",
        "label": label,
        "p_chosen_violates": pc,
        "p_rejected_violates": pr,
        "chosen_violates": pc >= threshold,
        "rejected_violates": pr >= threshold,
        "verdict_threshold": threshold,
    }


def test_verifier_catches_a_label_that_does_not_follow():
    good = pl.DataFrame(
        [_row("RETAIN", 0.1, 0.9), _row("INVERT", 0.8, 0.2), _row("PUNISH", 0.7, 0.6)]
    )
    assert label_mismatches(good).height == 0
    tampered = good.with_columns(
        pl.when(pl.col("label") == "INVERT")
        .then(pl.lit("RETAIN"))
        .otherwise(pl.col("label"))
        .alias("label")
    )
    bad = label_mismatches(tampered)
    assert bad.height == 1 and bad["expected"][0] == "INVERT"


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


def _run_trace(tmp_path, threshold):
    defs, instance = build_definitions(tmp_path), DagsterInstance.ephemeral()
    return defs.resolve_job_def("trace").execute_in_process(
        instance=instance,
        partition_key=trace_partition(instance),
        raise_on_error=False,
        run_config={
            "ops": {
                "trace_triage_assets": {"config": {"threshold": threshold, "review_margin": 0.01}},
                "trace_model_assets": {
                    "config": {"max_steps": 2, "max_length": 128, "gold_batch_size": 6}
                },
            }
        },
    )


def test_failed_gate_stops_training(tmp_path):
    # Nothing reaches p >= 0.99 with this judge: every pair is RETAIN, nothing to re-align on.
    result = _run_trace(tmp_path, threshold=0.99)
    checks = {e.asset_check_key.name: e for e in result.get_asset_check_evaluations()}
    assert not checks["trace_curated_enough_conflicts"].passed
    assert checks["trace_curated_enough_conflicts"].metadata["observed"].value == 0
    materialized = {e.asset_key.path[-1] for e in result.get_asset_materialization_events()}
    assert (
        "trace_curated" in materialized
        and "trace_model" not in materialized
        and "trace_weighted" not in materialized
    )
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())


def test_trace_job_end_to_end(tmp_path):
    result = _run_trace(tmp_path, threshold=0.3)
    assert result.success
    checks = {e.asset_check_key.name: e.passed for e in result.get_asset_check_evaluations()}
    assert all(checks.values()), checks
    # The triage is a partition per policy version: storage/<asset>/<version>.parquet.
    version = load_policy(SHIPPED_POLICIES / "new_policy.yaml").version
    triaged = pl.read_parquet(tmp_path / "storage" / "trace_triage" / f"{version}.parquet")
    review = pl.read_parquet(tmp_path / "storage" / "trace_triage_review" / f"{version}.parquet")
    rejected = pl.read_parquet(
        tmp_path / "storage" / "trace_triage_rejected" / f"{version}.parquet"
    )
    assert triaged.height + review.height + rejected.height == 11
    assert triaged["policy_version"].unique().to_list() == [
        load_policy(SHIPPED_POLICIES / "new_policy.yaml").version
    ]
    assert set(triaged["label"]) <= {"RETAIN", "INVERT", "PUNISH"}
    (mat,) = [
        e for e in result.get_asset_materialization_events() if e.asset_key.path == ["trace_model"]
    ]
    md = {k: v.value for k, v in mat.materialization.metadata.items()}
    assert math.isfinite(md["final_loss"])
    assert md["trainable_tensors_changed"] > 0  # LoRA weights moved
    (weights_sum,) = md["impact_weight_sums"].values()
    assert abs(weights_sum - 1.0) < 1e-6
    assert md["loss_curve"].startswith("![TRACE training loss](data:image/png;base64,")
    weighted = pl.read_parquet(tmp_path / "storage" / "trace_weighted.parquet")
    assert weighted.height == triaged.height
    assert weighted.filter(pl.col("label") == "RETAIN")["impact_weight"].sum() == 0
    conflict = weighted.filter(pl.col("label") != "RETAIN")["impact_weight"]
    assert (conflict >= 0).all() and abs(conflict.sum() - 1.0) < 1e-6
    summary = pl.read_parquet(tmp_path / "storage" / "trace_model.parquet")
    assert (tmp_path / "runs").exists() and summary["steps"][0] == 2

    # evaluation: both models generated for every held-out prompt and were judged under the new policy
    evals = pl.read_parquet(tmp_path / "storage" / "trace_eval.parquet")
    assert sorted(evals["model"].unique().to_list()) == ["realigned", "reference"]
    assert evals.height == 2 * 12 and evals["p_violates"].is_between(0, 1).all()
    (ev,) = [
        e for e in result.get_asset_materialization_events() if e.asset_key.path == ["trace_eval"]
    ]
    emd = {k: v.value for k, v in ev.materialization.metadata.items()}
    for m in ("reference", "realigned"):
        share = evals.filter(pl.col("model") == m)["complies"].mean()
        assert emd[f"policy_agreement_{m}"] == round(share, 4)
        assert 0 < emd[f"retention_nll_{m}"] < 20
    assert (
        emd["retention_nll_realigned"] != emd["retention_nll_reference"]
    )  # the adapters changed the model
