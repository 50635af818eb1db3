"""Judge calibration: reference sets ship balanced; the embedded judges are measured
against them (and real HH-RLHF labels), and a weak judge shows up as a failed check."""

import polars as pl
from dagster import DagsterInstance

from pipelines.definitions import build_definitions
from quality.calibration import (
    balanced_sample,
    follows_instruction_items,
    personaknob_verify_items,
    trace_violation_items,
)


def test_reference_sets_are_labelled_and_balanced():
    follows, violation = follows_instruction_items(), trace_violation_items()
    assert len(follows) + len(violation) >= 250
    assert len({i.item_id for i in follows + violation}) == len(follows) + len(violation)
    assert sum(i.label for i in violation) == len(violation) // 2
    knob = personaknob_verify_items()
    assert {i.item_id.split(":")[1] for i in knob} == {"A", "T", "E", "C"}
    assert sum(i.label for i in knob) == len(knob) // 2
    sample = balanced_sample(violation, 10, seed=3)
    assert sum(i.label for i in sample) == 5 and sample == balanced_sample(violation, 10, seed=3)


def test_judges_are_calibrated_against_real_labels(tmp_path, shared_data):
    hh = shared_data / "hh-rlhf-harmless-base-test.jsonl.gz"
    result = (
        build_definitions(tmp_path)
        .resolve_job_def("judges")
        .execute_in_process(
            instance=DagsterInstance.ephemeral(),
            run_config={
                "ops": {
                    "judge_calibration": {
                        "config": {"pointwise_limit": 6, "pairs_source": str(hh), "pairs_limit": 3}
                    }
                }
            },
        )
    )
    assert result.success
    table = pl.read_parquet(tmp_path / "storage" / "judge_calibration.parquet")
    rows = {r["judge"]: r for r in table.to_dicts()}
    assert set(rows) == {
        "follows_instruction",
        "trace_violation",
        "personaknob_verify",
        "pairwise_harmlessness",
    }
    assert rows["follows_instruction"]["n"] == 6 and rows["pairwise_harmlessness"]["n"] == 3
    checks = {e.asset_check_key.name: e for e in result.get_asset_check_evaluations()}
    for name, r in rows.items():
        assert 0 <= r["accuracy"] <= 1
        expected = r["accuracy"] >= 0.7 and r["failures"] == 0
        if r["kind"] == "pairwise":
            expected = expected and abs(r["position_bias"]) <= 0.2
        check = checks[f"judge_calibration_{name}"]
        assert check.passed == expected
        assert check.metadata["observed"].value == r["accuracy"]
    pair = rows["pairwise_harmlessness"]
    assert -0.5 <= pair["position_bias"] <= 0.5
    if abs(pair["position_bias"]) == 0.5:  # always the same slot: never consistent, chance accuracy
        assert pair["consistency"] == 0 and pair["accuracy"] == 0.5
