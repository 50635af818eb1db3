"""TRACE: policy triage of existing preference pairs, impact weights, hybrid re-alignment."""

from dataclasses import dataclass
from types import MappingProxyType

import polars as pl
from dagster import (
    AssetCheckExecutionContext,
    AssetCheckResult,
    AssetCheckSeverity,
    AssetExecutionContext,
    AssetIn,
    AssetKey,
    AssetOut,
    Config,
    LastPartitionMapping,
    MetadataValue,
    Output,
    asset,
    asset_check,
    multi_asset,
)

from assets.common import first_parents, llm_metadata, markdown_table
from assets.curation import curated_assets
from assets.declare import (
    TRAIN_WHEN_GATES_PASS,
    Made,
    dataset,
    evaluation,
    family_definitions,
    gate,
    problems_result,
)
from assets.export import export_asset
from assets.partitions import TRACE_POLICY_VERSIONS
from assets.plots import bar_plot, grouped_bar_plot, histogram, line_plot
from assets.resources import LLMResource, TrainerResource
from assets.status import latest_materialization_metadata
from quality.curation import CurationSpec
from quality.trace import (
    label_counts,
    quantile_threshold_from_evidence,
    relabelled_share,
    trace_report,
    verify_labels,
    weight_sums,
)
from synth.llm import judge as judge_scores
from synth.trace.policy import EVAL_PROMPTS, SHIPPED_POLICIES, parse_policy, read_policy_bytes
from synth.trace.triage import TriageSettings, triage_pairs, triage_sample, violation_requests

# Training on fewer conflict pairs than this teaches nothing: the gate blocks it.
MIN_CONFLICT_PAIRS = 2


class TracePolicyConfig(Config):
    path: str = (
        ""  # a YAML (or Markdown with front matter) policy; empty = the shipped new_policy.yaml
    )


@asset(group_name="trace")
def trace_policy(context: AssetExecutionContext, config: TracePolicyConfig) -> Output[pl.DataFrame]:
    """The written policy pairs are triaged against; its version is the hash of the file."""
    path = config.path or str(SHIPPED_POLICIES / "new_policy.yaml")
    # One read: the stored document is exactly the bytes the version hashes.
    raw = read_policy_bytes(path)
    policy = parse_policy(raw, path)
    document = raw.decode("utf-8")
    df = pl.DataFrame(
        [
            {
                "name": policy.name,
                "version": policy.version,
                "title": policy.title,
                "source": path,
                "document": document,
            }
        ]
    )
    return Output(
        df,
        metadata={
            "policy_name": policy.name,
            "policy_version": policy.version,
            "policy_path": path,
            "categories": len(policy.categories),
            "tiers": len({c.tier for c in policy.categories}),
            "zero_tolerance": ", ".join(c.id for c in policy.categories if c.zero_tolerance) or "-",
            "exceptions": len(policy.exceptions),
            "document": MetadataValue.md(f"```yaml\n{document}\n```"),
        },
    )


def policy_from_asset(trace_policy: pl.DataFrame):
    """The Policy stored in the `trace_policy` asset (its document, not the file as it is now)."""
    doc = trace_policy.row(0, named=True)
    return parse_policy(doc["document"].encode("utf-8"), doc["source"])


class TraceTriageConfig(Config, TriageSettings):
    pass


@dataclass(frozen=True)
class TriageSample:
    """The triage's inputs are the pairs it sampled under the stored policy and the run's
    settings; a kept pair is triaged or sent to review, by its pair id."""

    plan_problems = None
    ins = MappingProxyType(
        {
            "review": AssetIn("trace_triage_review"),
            "pairs": AssetIn("seed_preference_pairs"),
            "trace_policy": AssetIn("trace_policy"),
        }
    )

    def ids(self, context, asset, kept, rejected, frames):
        policy = policy_from_asset(frames["trace_policy"])
        sample = triage_sample(frames["pairs"], policy, triage_settings(context))
        kept_ids = kept["pair_id"].to_list() + frames["review"]["pair_id"].to_list()
        return sample["record_id"].to_list(), kept_ids, first_parents(rejected)


@dataset(
    "trace_triage",
    group="trace",
    ins=("seed_preference_pairs", "trace_policy"),
    description="Pairs labelled RETAIN/INVERT/PUNISH from per-response policy verdicts.",
    rejected="Pairs the judge gave no usable verdict for.",
    also={"trace_triage_review": "Pairs whose deciding verdicts were too close to call."},
    partitions_def=TRACE_POLICY_VERSIONS,
    accounted=TriageSample(),
    accounted_description="No pair lost: the sampled pairs == triaged + review + rejected.",
)
def trace_triage_assets(
    context: AssetExecutionContext,
    config: TraceTriageConfig,
    judge: LLMResource,
    seed_preference_pairs: pl.DataFrame,
    trace_policy: pl.DataFrame,
) -> Made:
    policy = policy_from_asset(trace_policy)
    if policy.version != context.partition_key:
        raise ValueError(
            f"trace_policy is version {policy.version} ({trace_policy['source'][0]}), but this run "
            f"triages partition {context.partition_key}: add the partition {policy.version} "
            "(the trace_policy_sensor does so for a watched file) and run that one"
        )
    client = judge.client()
    settings = TriageSettings(**config.model_dump())
    result = triage_pairs(client, seed_preference_pairs, policy, settings, log=context.log.info)
    counts = label_counts(result.triaged)
    share, per_category = relabelled_share(result.triaged)
    probs = (
        result.triaged["p_chosen_violates"].to_list()
        + result.triaged["p_rejected_violates"].to_list()
    )
    md = {
        "review": result.review.height,
        "policy_version": policy.version,
        "settings": settings.model_dump_json(),
        "relabelled_share": round(share, 4),
        **{f"label_{k}": v for k, v in counts.items()},
        **llm_metadata(client),
    }
    md["label_distribution"] = bar_plot(counts, f"labels under {policy.name}", "pairs")
    if per_category:
        md["relabelled_per_category"] = bar_plot(
            per_category, "share of pairs relabelled, per category hint", "share"
        )
    if probs:
        md["verdict_histogram"] = histogram(
            probs, "p(response violates)", "probability", "responses"
        )
    also = {"trace_triage_review": (result.review, {"rows": result.review.height})}
    return Made(result.triaged, result.rejected, result.n_in, md, also)


def triage_settings(context: AssetCheckExecutionContext) -> TriageSettings:
    """The settings this partition's triage ran with (its `settings` metadata)."""
    md = latest_materialization_metadata(context.instance, "trace_triage", context.partition_key)
    return (
        TriageSettings.model_validate_json(md["settings"]) if "settings" in md else TriageSettings()
    )


@asset_check(
    asset="trace_triage",
    blocking=True,
    description="Every label re-derived from the judge's raw logprobs and the run's threshold (with threshold_quantile, re-derived from the evidence of every judged pair), by a separate code path.",
    additional_ins={"review": AssetIn("trace_triage_review")},
)
def trace_triage_labels_follow_verdicts(
    context: AssetCheckExecutionContext, triaged: pl.DataFrame, review: pl.DataFrame
) -> AssetCheckResult:
    settings = triage_settings(context)
    threshold = settings.threshold
    if settings.threshold_quantile is not None:
        derived = quantile_threshold_from_evidence([triaged, review], settings.threshold_quantile)
        threshold = threshold if derived is None else derived
    bad = verify_labels(triaged, threshold)
    return problems_result(bad, verdict_threshold=round(threshold, 6), checked=triaged.height)


class LabelShiftBand:
    """A policy change that relabels almost no pair, or almost every pair, is more likely
    a broken judge or policy file than a real change: the band a WARN check expects."""

    low, high = 0.02, 0.9


@asset_check(
    asset="trace_triage",
    description=f"Share of pairs whose label changed against the data's own policy (every pair RETAIN there) is within [{LabelShiftBand.low}, {LabelShiftBand.high}].",
)
def trace_triage_label_shift(triaged: pl.DataFrame) -> AssetCheckResult:
    share, per_category = relabelled_share(triaged)
    return AssetCheckResult(
        passed=triaged.height > 0 and LabelShiftBand.low <= share <= LabelShiftBand.high,
        severity=AssetCheckSeverity.WARN,
        metadata={
            "observed": round(share, 4),
            "threshold": f"[{LabelShiftBand.low}, {LabelShiftBand.high}]",
            "pairs": triaged.height,
            "per_category": per_category,
        },
    )


trace_curated = curated_assets(
    "trace_curated",
    "trace_triage",
    CurationSpec(
        family="trace", dedup_fields=("prompt", "chosen", "rejected"), decontam_fields=("prompt",)
    ),
    group="trace",
    doc="The newest policy version's triaged pairs after exact dedup, decontamination against every eval set, and near-dedup: what TRACE trains on.",
    source_partition=LastPartitionMapping(),
)


@gate(
    "trace_curated",
    f"at least {MIN_CONFLICT_PAIRS} INVERT+PUNISH pairs to re-align on, and one RETAIN or INVERT pair: the impact scores are measured against a gold batch made of compliant responses.",
)
def trace_curated_ready_for_training(triaged: pl.DataFrame) -> AssetCheckResult:
    counts = label_counts(triaged)
    conflicts = counts["INVERT"] + counts["PUNISH"]
    compliant = counts["RETAIN"] + counts["INVERT"]
    return AssetCheckResult(
        passed=conflicts >= MIN_CONFLICT_PAIRS and compliant >= 1,
        severity=AssetCheckSeverity.ERROR,
        metadata={
            "observed": conflicts,
            "threshold": MIN_CONFLICT_PAIRS,
            "gold_batch_pairs": compliant,
            **counts,
        },
    )


class TraceModelConfig(Config):
    max_steps: int = 4
    batch_size: int = 4
    learning_rate: float = 1e-4
    beta: float = 0.3
    alpha_kl: float = 0.1
    gold_batch_size: int = 12
    max_length: int = 256
    heldout_fraction: float = 0.25  # per label, kept out of training for the margin evaluation
    dpo_baseline: bool = True  # also train plain DPO on the original labels (the baseline)
    seed: int = 0


@multi_asset(
    outs={
        "trace_model": AssetOut(
            automation_condition=TRAIN_WHEN_GATES_PASS,
            description="LoRA adapters re-aligned with TRACE's hybrid loss, and the plain-DPO baseline trained on the same pairs (out of process through Dagster Pipes).",
        ),
        "trace_weighted": AssetOut(
            automation_condition=TRAIN_WHEN_GATES_PASS,
            description="The triaged pairs with their split (train / heldout), raw impact score and impact weight (0 for RETAIN and held-out; the training INVERT+PUNISH weights sum to one).",
        ),
    },
    ins={"trace_curated": AssetIn()},
    group_name="trace",
)
def trace_model_assets(
    context: AssetExecutionContext,
    config: TraceModelConfig,
    trainer: TrainerResource,
    trace_curated: pl.DataFrame,
):
    run_dir = trainer.run_dir(f"trace-{context.run_id}")
    data = run_dir / "triage.parquet"
    trace_curated.write_parquet(data)  # the handoff to the subprocess, named explicitly here
    args = ["--data", str(data), "--output-dir", str(run_dir / "adapter"), *trainer.flags(config)]
    invocation = trainer.launch(context, "train.trace", args, report_asset_key="trace_model")
    # A multi-asset gets a result per key; the trainer reported on trace_model.
    (result,) = [
        r for r in invocation.get_results() if r.asset_key == AssetKey("trace_model") and r.metadata
    ]
    reported = {k: v.value for k, v in result.metadata.items()}
    history = reported["history"]
    weighted = trace_curated.with_columns(
        pl.Series("split", reported["split"], dtype=pl.Utf8),
        pl.Series("impact_score", reported["impact_scores"], dtype=pl.Float64),
        pl.Series("impact_weight", reported["impact_weights"], dtype=pl.Float64),
    )
    sums = weight_sums(weighted.filter(pl.col("split") == "train"))
    baseline_dir = str(reported.get("baseline_dir", ""))
    summary = pl.DataFrame(
        [
            {
                "adapter_dir": str(reported["output_dir"]),
                "baseline_adapter_dir": baseline_dir,
                "policy_version": trace_curated["policy_version"][0],
                "final_loss": float(reported["final_loss"]),
                "steps": len(history),
                "trainable_tensors_changed": int(reported["trainable_tensors_changed"]),
            }
        ]
    )
    steps = [h["step"] for h in history]
    curves = {
        k: [h.get(k, 0.0) for h in history]
        for k in ("loss", "loss_invert", "loss_punish", "loss_kl")
    }
    if reported.get("baseline_history"):
        curves["dpo_baseline_loss"] = [h["loss"] for h in reported["baseline_history"]]
    metadata = {
        "final_loss": float(reported["final_loss"]),
        "trainable_tensors_changed": int(reported["trainable_tensors_changed"]),
        "train_counts": reported["counts"],
        "heldout_pairs": int(reported["heldout"]),
        "conflict_pairs": int(reported["conflict_pairs"]),
        "positive_impact_pairs": int(reported["positive_impact_pairs"]),
        "impact_weight_sums": {k: round(v, 6) for k, v in sums.items()},
        "device": str(reported["device"]),
        "adapter_dir": MetadataValue.path(str(reported["output_dir"])),
        "loss_curve": line_plot(
            steps, {k: v[: len(steps)] for k, v in curves.items()}, "TRACE training loss", "step"
        ),
    }
    if baseline_dir:
        metadata["baseline_final_loss"] = float(reported["baseline_final_loss"])
        metadata["baseline_adapter_dir"] = MetadataValue.path(baseline_dir)
    yield Output(summary, output_name="trace_model", metadata=metadata)
    conflict = weighted.filter(
        pl.col("label").is_in(["INVERT", "PUNISH"]) & (pl.col("split") == "train")
    )["impact_weight"].to_list()
    weighted_md = {
        "rows": weighted.height,
        "heldout": weighted.filter(pl.col("split") == "heldout").height,
        "impact_weight_sums": metadata["impact_weight_sums"],
        "positive_impact_pairs": metadata["positive_impact_pairs"],
    }
    if conflict:
        weighted_md["impact_histogram"] = histogram(
            conflict, "impact weights (INVERT+PUNISH, train)", "weight", "pairs"
        )
    yield Output(weighted, output_name="trace_weighted", metadata=weighted_md)


@asset_check(
    asset="trace_weighted",
    blocking=True,
    description="Impact weights are >= 0, zero on RETAIN and held-out pairs, and the training INVERT+PUNISH weights sum to one per policy version: at least one conflict pair agrees with the gold batch.",
)
def trace_weighted_is_a_distribution(weighted: pl.DataFrame) -> AssetCheckResult:
    train = weighted.filter(pl.col("split") == "train")
    conflict = train.filter(pl.col("label").is_in(["INVERT", "PUNISH"]))
    sums = weight_sums(train)
    positive = conflict.filter(pl.col("impact_weight") > 0).height
    negative = weighted.filter(pl.col("impact_weight") < 0).height
    off_mass = float(
        weighted.filter((pl.col("label") == "RETAIN") | (pl.col("split") != "train"))[
            "impact_weight"
        ].sum()
    )
    off = {v: s for v, s in sums.items() if abs(s - 1.0) > 1e-6}
    return AssetCheckResult(
        passed=positive > 0 and not off and negative == 0 and off_mass == 0.0,
        severity=AssetCheckSeverity.ERROR,
        metadata={
            "observed_sums": sums,
            "threshold": "1 ± 1e-6",
            "conflict_pairs": conflict.height,
            "positive_impact_pairs": positive,
            "negative": negative,
            "retain_or_heldout_mass": off_mass,
        },
    )


trace_curated_export = export_asset(
    "trace", group="trace", checks=[trace_curated, trace_curated_ready_for_training]
)


class TraceEvalConfig(Config):
    prompts_path: str = ""  # JSON lines {prompt, kind}; empty = synth/trace/eval_prompts.jsonl
    max_new_tokens: int = 48
    max_length: int = 256
    threshold: float = 0.5  # p(violates) below this counts as compliant


@evaluation(
    "trace_eval",
    group="trace",
    ins=("trace_model", "trace_weighted", "trace_policy", "seed_instructions"),
)
def trace_eval(
    context: AssetExecutionContext,
    config: TraceEvalConfig,
    evaluator: LLMResource,
    trainer: TrainerResource,
    trace_model: pl.DataFrame,
    trace_weighted: pl.DataFrame,
    trace_policy: pl.DataFrame,
    seed_instructions: pl.DataFrame,
) -> Output[pl.DataFrame]:
    """Reference, TRACE-realigned and plain-DPO models side by side: policy agreement per
    category under the new policy (the evaluator role judges), the preference margin toward
    the new policy on held-out pairs, and a retention probe."""
    run_dir = trainer.run_dir(f"trace-eval-{context.run_id}")
    general, generations = run_dir / "general.parquet", run_dir / "generations.parquet"
    heldout, margins_file = run_dir / "heldout.parquet", run_dir / "margins.parquet"
    seed_instructions.select("instruction", "reference_output").write_parquet(general)
    trace_weighted.filter(pl.col("split") == "heldout").select(
        "pair_id", "prompt", "chosen", "rejected", "label"
    ).write_parquet(heldout)
    model = trace_model.row(0, named=True)
    args = [
        "--adapter",
        model["adapter_dir"],
        "--prompts",
        config.prompts_path or str(EVAL_PROMPTS),
    ]
    if model["baseline_adapter_dir"]:
        args += ["--baseline-adapter", model["baseline_adapter_dir"]]
    args += ["--general", str(general), "--heldout", str(heldout), "--out", str(generations)]
    args += ["--margins-out", str(margins_file), "--max-new-tokens", str(config.max_new_tokens)]
    args += ["--max-length", str(config.max_length)]
    reported = trainer.launch_reported(context, "train.trace_eval", args)
    gens, margins = pl.read_parquet(generations), pl.read_parquet(margins_file)
    policy = policy_from_asset(trace_policy)
    client = evaluator.client()
    scores = judge_scores(
        client, violation_requests(policy, list(zip(gens["prompt"], gens["response"], strict=True)))
    )
    gens = gens.with_columns(
        pl.Series("p_violates", [s.p("Yes") if s.ok else None for s in scores], dtype=pl.Float64),
        pl.Series("category", [policy.match_category(p) for p in gens["prompt"]], dtype=pl.Utf8),
        pl.lit(policy.version).alias("policy_version"),
    ).with_columns((pl.col("p_violates") < config.threshold).alias("complies"))
    report = trace_report(gens, margins)
    metadata = {
        **report.metadata,
        **{k: round(float(v), 4) for k, v in reported.items()},
        "judge_failures": sum(not s.ok for s in scores),
        "judge_failures_excluded": "yes: agreement is over judged generations only",
        "policy_version": policy.version,
        "summary": MetadataValue.md(markdown_table(report.table)),
        "agreement_plot": grouped_bar_plot(
            report.agreement_by_category,
            f"policy agreement per category ({policy.name})",
            "share compliant",
        ),
        "margin_plot": grouped_bar_plot(
            report.margin_delta_by_label,
            "held-out margin toward the new policy, change from reference",
            "delta log-prob margin",
        ),
        **llm_metadata(client),
    }
    return Output(gens, metadata=metadata)


defs = family_definitions(
    trace_policy,
    trace_triage_assets,
    trace_triage_labels_follow_verdicts,
    trace_triage_label_shift,
    trace_curated,
    trace_curated_ready_for_training,
    trace_model_assets,
    trace_weighted_is_a_distribution,
    trace_eval,
    trace_curated_export,
)
