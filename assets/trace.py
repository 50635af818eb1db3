"""TRACE: policy triage of existing preference pairs, impact weights, hybrid re-alignment."""

from typing import Optional

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

from assets.common import (
    accounting_result,
    dataset_metadata,
    first_parents,
    rejected_metadata,
    rows_in,
)
from assets.curation import curated_assets
from assets.export import export_asset
from assets.plots import bar_plot, histogram, line_plot
from assets.quality import suite_checks
from pipelines.automation import TRAIN_WHEN_GATES_PASS
from pipelines.partitions import TRACE_POLICY_VERSIONS
from pipelines.resources import LLMResource, TrainerResource
from quality.accounting import account
from quality.curation import CurationSpec
from quality.trace import label_counts, label_mismatches, weight_sums
from synth.llm import judge
from synth.trace.policy import EVAL_PROMPTS, SHIPPED_POLICIES, parse_policy, read_policy_bytes
from synth.trace.triage import TriageSettings, triage_pairs, violation_requests

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
            "exceptions": len(policy.exceptions),
            "document": MetadataValue.md(f"```yaml\n{document}\n```"),
        },
    )


def policy_from_asset(trace_policy: pl.DataFrame):
    """The Policy stored in the `trace_policy` asset (its document, not the file as it is now)."""
    doc = trace_policy.row(0, named=True)
    return parse_policy(doc["document"].encode("utf-8"), doc["source"])


class TraceTriageConfig(Config, TriageSettings):
    limit: Optional[int] = None  # only the first N preference pairs


@multi_asset(
    outs={
        "trace_triage": AssetOut(
            description="Pairs labelled RETAIN/INVERT/PUNISH from per-response policy verdicts."
        ),
        "trace_triage_review": AssetOut(
            description="Pairs whose deciding verdicts were too close to call."
        ),
        "trace_triage_rejected": AssetOut(
            description="Pairs the judge gave no usable verdict for."
        ),
    },
    ins={"seed_preference_pairs": AssetIn(), "trace_policy": AssetIn()},
    partitions_def=TRACE_POLICY_VERSIONS,
    group_name="trace",
)
def trace_triage_assets(
    context: AssetExecutionContext,
    config: TraceTriageConfig,
    llm: LLMResource,
    seed_preference_pairs: pl.DataFrame,
    trace_policy: pl.DataFrame,
):
    policy = policy_from_asset(trace_policy)
    if policy.version != context.partition_key:
        raise ValueError(
            f"trace_policy is version {policy.version} ({trace_policy['source'][0]}), but this run "
            f"triages partition {context.partition_key}: add the partition {policy.version} "
            "(the trace_policy_sensor does so for a watched file) and run that one"
        )
    pairs = (
        seed_preference_pairs if config.limit is None else seed_preference_pairs.head(config.limit)
    )
    client = llm.client()
    result = triage_pairs(client, pairs, policy, config, log=context.log.info)
    counts = label_counts(result.triaged)
    probs = (
        result.triaged["p_chosen_violates"].to_list()
        + result.triaged["p_rejected_violates"].to_list()
    )
    md = dataset_metadata(
        result.triaged,
        result.rejected,
        result.n_in,
        review=result.review.height,
        policy_version=policy.version,
        **{f"label_{k}": v for k, v in counts.items()},
        **client.stats.as_metadata(),
    )
    md["label_distribution"] = bar_plot(counts, f"labels under {policy.name}", "pairs")
    if probs:
        md["verdict_histogram"] = histogram(
            probs, "p(response violates)", "probability", "responses"
        )
    yield Output(result.triaged, output_name="trace_triage", metadata=md)
    yield Output(
        result.review, output_name="trace_triage_review", metadata={"rows": result.review.height}
    )
    yield Output(
        result.rejected,
        output_name="trace_triage_rejected",
        metadata=rejected_metadata(result.rejected),
    )


@asset_check(
    asset="trace_triage",
    blocking=True,
    additional_ins={
        "review": AssetIn("trace_triage_review"),
        "rejected": AssetIn("trace_triage_rejected"),
        "pairs": AssetIn("seed_preference_pairs"),
    },
    description="No pair lost: in == triaged + review + rejected.",
)
def trace_triage_accounted(
    context: AssetCheckExecutionContext,
    triaged: pl.DataFrame,
    review: pl.DataFrame,
    rejected: pl.DataFrame,
    pairs: pl.DataFrame,
) -> AssetCheckResult:
    n_in = rows_in(context, "trace_triage")
    inputs = pairs["record_id"].to_list()[: n_in if n_in is not None else None]
    kept = triaged["pair_id"].to_list() + review["pair_id"].to_list()
    acc = account(inputs, kept, first_parents(rejected))
    return accounting_result(acc, n_in)


@asset_check(
    asset="trace_triage", blocking=True, description="Every label recomputes from its verdicts."
)
def trace_triage_labels_follow_verdicts(triaged: pl.DataFrame) -> AssetCheckResult:
    bad = label_mismatches(triaged)
    return AssetCheckResult(
        passed=bad.height == 0,
        severity=AssetCheckSeverity.ERROR,
        metadata={
            "observed_mismatches": bad.height,
            "threshold": 0,
            "examples": bad.head(10).to_dicts(),
        },
    )


trace_curated_assets, trace_curated_checks = curated_assets(
    "trace_curated",
    "trace_triage",
    CurationSpec(
        family="trace", dedup_fields=("prompt", "chosen", "rejected"), decontam_fields=("prompt",)
    ),
    group="trace",
    doc="The newest policy version's triaged pairs after exact dedup, decontamination against every eval set, and near-dedup: what TRACE trains on.",
    source_partition=LastPartitionMapping(),
)


@asset_check(
    asset="trace_curated",
    blocking=True,
    description=f"Gate before training: at least {MIN_CONFLICT_PAIRS} INVERT+PUNISH pairs to re-align on.",
)
def trace_curated_enough_conflicts(triaged: pl.DataFrame) -> AssetCheckResult:
    counts = label_counts(triaged)
    conflicts = counts["INVERT"] + counts["PUNISH"]
    return AssetCheckResult(
        passed=conflicts >= MIN_CONFLICT_PAIRS,
        severity=AssetCheckSeverity.ERROR,
        metadata={"observed": conflicts, "threshold": MIN_CONFLICT_PAIRS, **counts},
    )


class TraceModelConfig(Config):
    max_steps: int = 4
    batch_size: int = 4
    learning_rate: float = 1e-4
    beta: float = 0.3
    alpha_kl: float = 0.1
    gold_batch_size: int = 12
    max_length: int = 256
    seed: int = 0


@multi_asset(
    outs={
        "trace_model": AssetOut(
            automation_condition=TRAIN_WHEN_GATES_PASS,
            description="LoRA adapters re-aligned with TRACE's hybrid loss (trained out of process through Dagster Pipes).",
        ),
        "trace_weighted": AssetOut(
            automation_condition=TRAIN_WHEN_GATES_PASS,
            description="The triaged pairs with their impact weights (0 for RETAIN; INVERT+PUNISH sum to one).",
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
    weights = reported["impact_weights"]
    weighted = trace_curated.with_columns(pl.Series("impact_weight", weights, dtype=pl.Float64))
    sums = weight_sums(weighted)
    summary = pl.DataFrame(
        [
            {
                "adapter_dir": str(reported["output_dir"]),
                "policy_version": trace_curated["policy_version"][0],
                "final_loss": float(reported["final_loss"]),
                "steps": len(history),
                "trainable_tensors_changed": int(reported["trainable_tensors_changed"]),
            }
        ]
    )
    steps = [h["step"] for h in history]
    metadata = {
        "final_loss": float(reported["final_loss"]),
        "trainable_tensors_changed": int(reported["trainable_tensors_changed"]),
        "impact_weight_sums": {k: round(v, 6) for k, v in sums.items()},
        "adapter_dir": MetadataValue.path(str(reported["output_dir"])),
        "loss_curve": line_plot(
            steps,
            {
                k: [h.get(k, 0.0) for h in history]
                for k in ("loss", "loss_invert", "loss_punish", "loss_kl")
            },
            "TRACE training loss",
            "step",
        ),
    }
    yield Output(summary, output_name="trace_model", metadata=metadata)
    conflict = weighted.filter(pl.col("label").is_in(["INVERT", "PUNISH"]))[
        "impact_weight"
    ].to_list()
    weighted_md = {"rows": weighted.height, "impact_weight_sums": metadata["impact_weight_sums"]}
    if conflict:
        weighted_md["impact_histogram"] = histogram(
            conflict, "impact weights (INVERT+PUNISH)", "weight", "pairs"
        )
    yield Output(weighted, output_name="trace_weighted", metadata=weighted_md)


@asset_check(
    asset="trace_weighted",
    blocking=True,
    description="Impact weights are >= 0, zero on RETAIN, and sum to one per policy version.",
)
def trace_weighted_is_a_distribution(weighted: pl.DataFrame) -> AssetCheckResult:
    sums = weight_sums(weighted)
    negative = weighted.filter(pl.col("impact_weight") < 0).height
    retain_mass = float(weighted.filter(pl.col("label") == "RETAIN")["impact_weight"].sum())
    off = {v: s for v, s in sums.items() if abs(s - 1.0) > 1e-6}
    return AssetCheckResult(
        passed=bool(sums) and not off and negative == 0 and retain_mass == 0.0,
        severity=AssetCheckSeverity.ERROR,
        metadata={
            "observed_sums": sums,
            "threshold": "1 ± 1e-6",
            "negative": negative,
            "retain_mass": retain_mass,
        },
    )


trace_curated_export = export_asset(
    "trace", group="trace", checks=[*trace_curated_checks, trace_curated_enough_conflicts]
)

assets = [
    trace_policy,
    trace_triage_assets,
    trace_curated_assets,
    trace_curated_export,
    trace_model_assets,
]
checks = [
    trace_triage_accounted,
    trace_triage_labels_follow_verdicts,
    *suite_checks("trace_triage"),
    *trace_curated_checks,
    trace_curated_enough_conflicts,
    trace_weighted_is_a_distribution,
]


class TraceEvalConfig(Config):
    prompts_path: str = ""  # JSON lines {prompt, kind}; empty = synth/trace/eval_prompts.jsonl
    max_new_tokens: int = 48
    threshold: float = 0.5  # p(violates) below this counts as compliant


@asset(
    group_name="trace",
    ins={"trace_model": AssetIn(), "trace_policy": AssetIn(), "seed_instructions": AssetIn()},
)
def trace_eval(
    context: AssetExecutionContext,
    config: TraceEvalConfig,
    llm: LLMResource,
    trainer: TrainerResource,
    trace_model: pl.DataFrame,
    trace_policy: pl.DataFrame,
    seed_instructions: pl.DataFrame,
) -> Output[pl.DataFrame]:
    """Policy agreement of the reference and the re-aligned model, and a retention probe."""
    run_dir = trainer.run_dir(f"trace-eval-{context.run_id}")
    general, generations = run_dir / "general.parquet", run_dir / "generations.parquet"
    seed_instructions.select("instruction", "reference_output").write_parquet(general)
    prompts = config.prompts_path or str(EVAL_PROMPTS)
    args = [
        "--adapter",
        trace_model["adapter_dir"][0],
        "--prompts",
        prompts,
        "--general",
        str(general),
        "--out",
        str(generations),
        "--max-new-tokens",
        str(config.max_new_tokens),
    ]
    reported = trainer.launch_reported(context, "train.trace_eval", args)
    gens = pl.read_parquet(generations)
    policy = policy_from_asset(trace_policy)
    client = llm.client()
    scores = judge(
        client, violation_requests(policy, list(zip(gens["prompt"], gens["response"], strict=True)))
    )
    failed = sum(not s.ok for s in scores)
    gens = gens.with_columns(
        pl.Series("p_violates", [s.p("Yes") if s.ok else None for s in scores], dtype=pl.Float64),
        pl.lit(policy.version).alias("policy_version"),
    ).with_columns((pl.col("p_violates") < config.threshold).alias("complies"))
    agreement = {
        m: float(gens.filter(pl.col("model") == m)["complies"].mean() or 0.0)
        for m in ("reference", "realigned")
    }
    metadata = {
        **{f"policy_agreement_{m}": round(v, 4) for m, v in agreement.items()},
        **{k: round(float(v), 4) for k, v in reported.items()},
        "judge_failures": failed,
        "policy_version": policy.version,
        "agreement_plot": bar_plot(
            agreement, f"policy agreement ({policy.name})", "share compliant"
        ),
        **client.stats.as_metadata(),
    }
    return Output(gens, metadata=metadata)


assets.append(trace_eval)
