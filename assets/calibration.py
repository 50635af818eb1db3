"""Judge calibration against labelled reference items, reported as checks (WARN)."""

from typing import Optional

import polars as pl
from dagster import (
    AssetCheckResult,
    AssetCheckSeverity,
    AssetExecutionContext,
    AssetIn,
    Config,
    MetadataValue,
    Output,
    asset,
    asset_check,
)

from assets.common import llm_metadata, markdown_table
from assets.declare import family_definitions
from assets.plots import bar_plot
from assets.resources import LLMResource
from assets.trace import policy_from_asset
from quality.calibration import (
    PreferencePair,
    balanced_sample,
    calibrate_pairwise,
    calibrate_pointwise,
    follows_instruction_items,
    follows_instruction_requests,
    personaknob_verify_items,
    personaknob_verify_requests,
    trace_violation_items,
    trace_violation_requests,
)
from synth.loaders import SHIPPED_SEEDS, load_preference_pairs

JUDGES = ("follows_instruction", "trace_violation", "personaknob_verify", "pairwise_harmlessness")


class JudgeCalibrationConfig(Config):
    pointwise_limit: Optional[int] = 12  # reference items per pointwise judge; None = all
    pairs_source: str = (
        ""  # preference pairs (e.g. the HH-RLHF test file); empty = the shipped seeds
    )
    pairs_limit: Optional[int] = 4
    min_accuracy: float = 0.7
    max_position_bias: float = 0.2
    seed: int = 0


@asset(group_name="quality", ins={"trace_policy": AssetIn()})
def judge_calibration(
    context: AssetExecutionContext,
    config: JudgeCalibrationConfig,
    judge: LLMResource,
    evaluator: LLMResource,
    trace_policy: pl.DataFrame,
) -> Output[pl.DataFrame]:
    """Agreement of each LLM judge with labelled reference items (the `judge` role), and
    the pairwise biases of the `evaluator` role that grades win rates."""
    client, pairwise_client = judge.client(), evaluator.client()
    policy = policy_from_asset(trace_policy)
    follows = balanced_sample(follows_instruction_items(), config.pointwise_limit, config.seed)
    violation = balanced_sample(trace_violation_items(), config.pointwise_limit, config.seed)
    knob = balanced_sample(personaknob_verify_items(), config.pointwise_limit, config.seed)
    source = config.pairs_source or str(SHIPPED_SEEDS / "preference_pairs.jsonl")
    pairs = load_preference_pairs(source, limit=config.pairs_limit).kept
    rows = [
        calibrate_pointwise(
            "follows_instruction", client, follows, follows_instruction_requests(follows)
        ).row(),
        calibrate_pointwise(
            "trace_violation", client, violation, trace_violation_requests(policy, violation)
        ).row(),
        calibrate_pointwise(
            "personaknob_verify", client, knob, personaknob_verify_requests(knob)
        ).row(),
        calibrate_pairwise(
            "pairwise_harmlessness",
            pairwise_client,
            [
                PreferencePair(r["record_id"], r["prompt"], r["chosen"], r["rejected"])
                for r in pairs.iter_rows(named=True)
            ],
        ).row(),
    ]
    for r in rows:
        r["min_accuracy"] = config.min_accuracy
        r["max_position_bias"] = config.max_position_bias
        context.log.info(f"judge {r['judge']}: accuracy {r['accuracy']} on {r['n']} items")
    df = pl.DataFrame(rows)
    return Output(
        df,
        metadata={
            "table": MetadataValue.md(markdown_table(df.drop("min_accuracy", "max_position_bias"))),
            "accuracy": bar_plot(
                {r["judge"]: r["accuracy"] for r in rows}, "judge accuracy on reference", "accuracy"
            ),
            "policy_version": policy.version,
            "pairs_source": source,
            **llm_metadata(client, pairwise_client),
        },
    )


def _judge_check(name: str):
    @asset_check(
        asset="judge_calibration",
        name=f"judge_calibration_{name}",
        description=f"The {name} judge agrees with its reference labels (and, pairwise, is not position-biased).",
    )
    def _check(calibration: pl.DataFrame) -> AssetCheckResult:
        (r,) = calibration.filter(pl.col("judge") == name).to_dicts()
        ok = r["accuracy"] >= r["min_accuracy"] and r["failures"] == 0
        if r["kind"] == "pairwise":
            ok = ok and abs(r["position_bias"]) <= r["max_position_bias"]
        return AssetCheckResult(
            passed=ok,
            severity=AssetCheckSeverity.WARN,
            metadata={
                "observed": r["accuracy"],
                "threshold": r["min_accuracy"],
                **{k: v for k, v in r.items() if v is not None and k not in ("judge", "kind")},
            },
        )

    return _check


defs = family_definitions(judge_calibration, [_judge_check(j) for j in JUDGES])
