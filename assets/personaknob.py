"""PersonaKnob ("Dignified Peer"): scenarios with dimension masks, verified golden and
per-dimension rejects, the partial order and its pairs, constrained DPO, IRT evaluation."""

import json
from collections import Counter

import polars as pl
from dagster import (
    AssetCheckExecutionContext,
    AssetCheckResult,
    AssetCheckSeverity,
    AssetExecutionContext,
    AssetIn,
    AssetOut,
    Config,
    MetadataValue,
    Output,
    asset_check,
    multi_asset,
)

from assets.common import first_parents, llm_metadata, markdown_table, run_settings
from assets.curation import curated_assets
from assets.declare import (
    LoraTrainingConfig,
    Made,
    Parents,
    Planned,
    dataset,
    evaluation,
    family_definitions,
    gate,
    gate_result,
    problems_result,
    trained_output,
    training,
)
from assets.export import export_asset
from assets.plots import ability_plot, bar_plot, line_plot, partial_order_plot
from assets.resources import LLMResource, TrainerResource
from quality.curation import CurationSpec
from quality.personaknob import (
    pass_rates,
    probe_report,
    rejudge_problems,
    verify_order,
    verify_records,
)
from quality.rasch import ability_gaps, fit_rasch
from synth.personaknob.evaluation import rate
from synth.personaknob.order import build_order
from synth.personaknob.spec import DIMENSIONS, all_masks, load_spec
from synth.personaknob.synthesis import (
    KnobSettings,
    allocate_masks,
    make_scenarios,
    rejudge,
    synthesize_responses,
)

GROUP = "personaknob"
# Fewer preference pairs than this teach nothing: the gate blocks training.
MIN_TRAINING_PAIRS = 2
MIN_DIMENSIONS = 2  # distinct persona dimensions the pairs must teach between them
# Below this first-attempt pass rate a dimension mostly burns its regeneration budget.
MIN_PASS_RATE = 0.25
# Below this share of prompts probing every active dimension, rejects are asked to fail
# dimensions the user gave no occasion for (a warning: the judge may be weak).
MIN_PROBE_SHARE = 0.5
# The separate judgement (rubric criteria, evaluator role) must agree on this share of the
# rejects; a reject may score this much below its golden on a dimension it should keep.
MIN_REJUDGE_AGREEMENT = 0.75
REJUDGE_TOLERANCE = 0.1


class PersonaKnobConfig(Config, KnobSettings):
    pass


def mask_mix_off(
    context: AssetCheckExecutionContext, kept: pl.DataFrame, rejected: pl.DataFrame, n_in: int
) -> dict[str, int]:
    """Planned masks (kept and rejected) minus the configured mix, where they differ."""
    settings = run_settings(context, "personaknob_scenarios", KnobSettings)
    expected = Counter(allocate_masks(n_in or 0, settings.mask_mix, settings.seed))
    planned = Counter(kept["mask"].to_list() + [json.loads(p)["mask"] for p in rejected["payload"]])
    return {
        m: planned[m] - expected[m]
        for m in set(expected) | set(planned)
        if planned[m] != expected[m]
    }


@dataset(
    "personaknob_scenarios",
    group=GROUP,
    ins=("seed_personas",),
    description="Scenarios: seed scene (a persona), context, trigger, the user's prompt, and the active dimension mask.",
    rejected="Planned scenarios whose user prompt could not be written, with the reason.",
    accounted=Planned("plan_index", plan_problems=mask_mix_off),
    accounted_description="No planned scenario lost, and the planned masks are exactly the configured mix.",
)
def personaknob_scenario_assets(
    context: AssetExecutionContext,
    config: PersonaKnobConfig,
    generator: LLMResource,
    judge: LLMResource,
    seed_personas: pl.DataFrame,
) -> Made:
    client = generator.client()
    kept, rejected, planned = make_scenarios(
        client, seed_personas, config, log=context.log.info, judge_client=judge.client()
    )
    md = {
        "settings": config.model_dump_json(),
        **{f"split_{k}": v for k, v in Counter(kept["split"].to_list()).items()},
        **llm_metadata(client),
    }
    if kept.height:
        md["mask_mix"] = bar_plot(
            {m: c for m in all_masks() if (c := kept["mask"].to_list().count(m))},
            "scenarios per dimension mask",
            "scenarios",
        )
        md["triggers"] = bar_plot(
            dict(Counter(kept["trigger"].to_list())), "scenarios per trigger", "scenarios"
        )
    return Made(kept, rejected, planned, md)


@asset_check(
    asset="personaknob_scenarios",
    description=f"Each scenario's triggers test every active dimension of its mask (read from the spec file), and at least {MIN_PROBE_SHARE} of the prompts probe all of them by the judge (p(Yes) at the verification threshold); the share per dimension is reported.",
)
def personaknob_scenarios_probe_their_masks(
    context: AssetCheckExecutionContext, scenarios: pl.DataFrame
) -> AssetCheckResult:
    threshold = run_settings(context, "personaknob_scenarios", KnobSettings).threshold
    report = probe_report(scenarios, load_spec(), threshold)
    return AssetCheckResult(
        passed=not report["uncovered"] and report["share_probing_all"] >= MIN_PROBE_SHARE,
        severity=AssetCheckSeverity.WARN,
        metadata={
            "observed_share_probing_all": report["share_probing_all"],
            "threshold": MIN_PROBE_SHARE,
            "share_per_dimension": MetadataValue.json(report["share_per_dimension"]),
            "uncovered": MetadataValue.json(report["uncovered"][:10]),
            "scenarios": report["scenarios"],
        },
    )


@dataset(
    "personaknob",
    group=GROUP,
    ins=("personaknob_scenarios",),
    description="Per training scenario: the golden response and one verified reject per active dimension, with judge scores (PersonaKnob card schema).",
    rejected="Scenarios without a verified golden or any verified reject, with the reason.",
    also={
        "personaknob_attempts": "Every generation attempt: role, text, judge scores per dimension, verified or why not.",
        "personaknob_rejudged": "Every kept golden and reject scored again on each active dimension by the evaluator role on the rubric criteria (a path the verification did not take).",
    },
    accounted=Parents("personaknob_scenarios", where=pl.col("split") == "train"),
    accounted_description="No training scenario lost: scenarios = kept + rejected, each exactly once.",
)
def personaknob_response_assets(
    context: AssetExecutionContext,
    config: PersonaKnobConfig,
    generator: LLMResource,
    judge: LLMResource,
    evaluator: LLMResource,
    personaknob_scenarios: pl.DataFrame,
) -> Made:
    client, judge_client, eval_client = generator.client(), judge.client(), evaluator.client()
    result = synthesize_responses(
        client, personaknob_scenarios, config, log=context.log.info, judge_client=judge_client
    )
    attempts = result.attempts
    rejudged = rejudge(eval_client, result.records, log=context.log.info)
    md = {
        "settings": config.model_dump_json(),
        "threshold": config.threshold,
        "attempts": attempts.height,
        **llm_metadata(client, judge_client, eval_client),
    }
    if attempts.height:
        rates = pass_rates(attempts)
        md.update({f"pass_rate_{k.replace(' ', '_')}": v for k, v in rates.items()})
        md["verification_pass_rates"] = bar_plot(
            rates, "first-attempt verification pass rate", "share verified"
        )
        reasons = Counter(r for r in attempts["reason"].to_list() if r)
        md["attempt_failures"] = MetadataValue.json(dict(reasons.most_common(12)))
    also = {
        "personaknob_attempts": (attempts, {"rows": attempts.height}),
        "personaknob_rejudged": (rejudged, {"rows": rejudged.height}),
    }
    return Made(result.records, result.rejected, result.n_in, md, also)


@asset_check(
    asset="personaknob",
    blocking=True,
    description="Recomputed from the stored judge scores: every golden satisfies each active dimension and each reject fails exactly its own.",
)
def personaknob_verified(
    context: AssetCheckExecutionContext, records: pl.DataFrame
) -> AssetCheckResult:
    threshold = run_settings(context, "personaknob", KnobSettings).threshold
    return problems_result(verify_records(records, threshold), judge_threshold=threshold)


@asset_check(
    asset="personaknob",
    additional_ins={"rejudged": AssetIn("personaknob_rejudged")},
    description=f"A separate judgement agrees with the verification: on the evaluator's rubric-criteria scores, each reject scores below its golden on its own dimension and at most {REJUDGE_TOLERANCE} below it on the others, for at least {MIN_REJUDGE_AGREEMENT} of the rejects.",
)
def personaknob_rejudged_agrees(records: pl.DataFrame, rejudged: pl.DataFrame) -> AssetCheckResult:
    problems, compared = rejudge_problems(rejudged, REJUDGE_TOLERANCE)
    disagreed = len({(p["id"], p["role"]) for p in problems})
    agreement = 1 - disagreed / compared if compared else 0.0
    return AssetCheckResult(
        passed=compared > 0 and agreement >= MIN_REJUDGE_AGREEMENT,
        severity=AssetCheckSeverity.WARN,
        metadata={
            "observed_agreement": round(agreement, 4),
            "threshold": MIN_REJUDGE_AGREEMENT,
            "rejects_compared": compared,
            "problems": MetadataValue.json(problems[:10]),
        },
    )


@asset_check(
    asset="personaknob",
    additional_ins={"attempts": AssetIn("personaknob_attempts")},
    description=f"Every dimension verifies at a workable rate: first-attempt pass rate of goldens and of rejects at least {MIN_PASS_RATE} per dimension (a lower one means the steering or the judge is off for it).",
)
def personaknob_verification_rates(
    records: pl.DataFrame, attempts: pl.DataFrame
) -> AssetCheckResult:
    rates = pass_rates(attempts)
    low = {k: v for k, v in rates.items() if v < MIN_PASS_RATE}
    return AssetCheckResult(
        passed=not low,
        severity=AssetCheckSeverity.WARN,
        metadata={
            "observed_min": min(rates.values()) if rates else 0.0,
            "threshold": MIN_PASS_RATE,
            "below": low,
            "rates": rates,
        },
    )


personaknob_curated = curated_assets(
    "personaknob_curated",
    "personaknob",
    CurationSpec(
        family="personaknob", dedup_fields=("prompt",), decontam_fields=("prompt", "golden")
    ),
    group=GROUP,
    doc="PersonaKnob records after exact dedup, decontamination against every eval set, and near-dedup of prompts.",
)


@multi_asset(
    outs={
        "personaknob_pairs": AssetOut(
            description="Preference pairs from the covering relation of each scenario's partial order, labelled with the dimensions they teach."
        ),
        "personaknob_order": AssetOut(
            description="Nodes of each scenario's partial order: a dimension vector and the response that represents it."
        ),
    },
    ins={"personaknob_curated": AssetIn(), "personaknob_attempts": AssetIn()},
    group_name=GROUP,
)
def personaknob_pair_assets(
    context: AssetExecutionContext,
    personaknob_curated: pl.DataFrame,
    personaknob_attempts: pl.DataFrame,
):
    threshold = run_settings(context, "personaknob", KnobSettings).threshold
    nodes, pairs = build_order(personaknob_curated, personaknob_attempts, threshold)
    md = {"rows": pairs.height, "nodes": nodes.height, "threshold": threshold}
    if pairs.height:
        taught = Counter(d for dims in pairs["dims"].to_list() for d in dims)
        md.update({f"pairs_teaching_{d}": taught.get(d, 0) for d in DIMENSIONS})
        md["pairs_per_dimension"] = bar_plot(
            {d: taught.get(d, 0) for d in DIMENSIONS}, "pairs teaching each dimension", "pairs"
        )
        sample = Counter(pairs["scenario_id"].to_list()).most_common(1)[0][0]
        sample_nodes = nodes.filter(pl.col("scenario_id") == sample)
        md["partial_order"] = partial_order_plot(
            sample_nodes.to_dicts(),
            pairs.filter(pl.col("scenario_id") == sample).to_dicts(),
            sample_nodes["mask"][0],
            f"partial order of scenario {sample[:10]}",
        )
    yield Output(pairs, output_name="personaknob_pairs", metadata=md)
    yield Output(nodes, output_name="personaknob_order", metadata={"rows": nodes.height})


@asset_check(
    asset="personaknob_pairs",
    blocking=True,
    additional_ins={"nodes": AssetIn("personaknob_order")},
    description="The partial order holds: every pair is a real dominance labelled with what it improves, a covering edge, no cycle, and the pairs' closure is exactly the dominance relation.",
)
def personaknob_order_verified(pairs: pl.DataFrame, nodes: pl.DataFrame) -> AssetCheckResult:
    scenarios = nodes["scenario_id"].n_unique() if nodes.height else 0
    return problems_result(verify_order(nodes, pairs), scenarios=scenarios)


@gate(
    "personaknob_pairs",
    f"at least {MIN_TRAINING_PAIRS} pairs teaching at least {MIN_DIMENSIONS} distinct dimensions (with one, the constrained multi-objective DPO is plain DPO), all from curated records, none from a held-out scenario.",
    ins={"scenarios": "personaknob_scenarios", "curated": "personaknob_curated"},
)
def personaknob_pairs_ready_for_training(
    pairs: pl.DataFrame, scenarios: pl.DataFrame, curated: pl.DataFrame
) -> AssetCheckResult:
    heldout = set(scenarios.filter(pl.col("split") == "heldout")["record_id"].to_list())
    leaked = pairs.filter(pl.col("scenario_id").is_in(list(heldout))).height
    stray = len(set(first_parents(pairs)) - set(curated["record_id"].to_list()))
    taught = sorted(set(pairs["dims"].explode().drop_nulls().to_list())) if pairs.height else []
    return gate_result(
        pairs.height,
        MIN_TRAINING_PAIRS,
        "pairs",
        details={"dimensions_taught": ",".join(taught), "min_dimensions": MIN_DIMENSIONS},
        holds=len(taught) >= MIN_DIMENSIONS,
        heldout_leaked=leaked,
        not_from_curated=stray,
    )


class ConstrainedDPOConfig(LoraTrainingConfig):
    max_steps: int = 4
    beta: float = 0.1
    # How far a dimension's DPO loss may sit above the best dimension's (paper 0.5 for all).
    epsilon: float = 0.5
    tolerances: str = ""  # per-dimension overrides, e.g. "A=0.3,C=1.0"
    dual_lr: float = 1.0  # 0 = plain DPO
    # A plain-DPO baseline trained on the same pairs for the evaluation to compare (0 = none).
    plain_dpo_steps: int = 4
    max_length: int = 384


def _margin_series(history: list[dict]) -> dict[str, list[float]]:
    """Each taught dimension's DPO reward margin per logged step; a dimension absent from a
    step's batch has no margin that step (NaN)."""
    return {
        d: [h["margins"].get(d, float("nan")) for h in history]
        for d in DIMENSIONS
        if any(d in h["margins"] for h in history)
    }


@training("personaknob_model", group=GROUP, ins=("personaknob_pairs",))
def personaknob_model(
    context: AssetExecutionContext,
    config: ConstrainedDPOConfig,
    trainer: TrainerResource,
    personaknob_pairs: pl.DataFrame,
) -> Output[pl.DataFrame]:
    """The "Dignified Peer" policy (LoRA adapters): tolerant constrained multi-objective
    DPO, trained out of process through Dagster Pipes."""
    run_dir = trainer.run_dir(f"personaknob-{context.run_id}")
    pairs = run_dir / "pairs.parquet"
    personaknob_pairs.write_parquet(pairs)
    args = ["--pairs", str(pairs), "--output-dir", str(run_dir)]
    reported = trainer.launch_reported(
        context, "train.personaknob", [*args, *trainer.flags(config)]
    )
    history = reported["history"]
    steps = [h["step"] for h in history]
    losses = {"primary": [h["primary"] for h in history]}
    multipliers = {d: [h["multipliers"][d] for h in history] for d in DIMENSIONS}
    margins = _margin_series(history)
    plain = reported["plain_dpo"]
    row = {
        "final_loss": float(reported["final_loss"]),
        "steps": len(history),
        **{f"lambda_{d}": float(v) for d, v in reported["multipliers"].items()},
        "plain_dpo_adapter_dir": plain.get("output_dir", ""),
    }
    md = {
        "final_loss": row["final_loss"],
        "plain_dpo_baseline": MetadataValue.json(
            {k: v for k, v in plain.items() if k != "history"} or {"trained": False}
        ),
        "multipliers": MetadataValue.json(reported["multipliers"]),
        "pairs_per_dimension": MetadataValue.json(reported["pairs_per_dimension"]),
        "loss_curve": line_plot(steps, losses, "constrained DPO: primary loss", "step"),
        "multiplier_curve": line_plot(
            steps, multipliers, "Lagrange multipliers (dual ascent)", "step"
        ),
        "margin_curve": line_plot(steps, margins, "DPO reward margin per dimension", "step"),
        "tolerances": MetadataValue.json(reported["tolerances"]),
    }
    if plain.get("history"):
        md["plain_dpo_margin_curve"] = line_plot(
            [h["step"] for h in plain["history"]],
            _margin_series(plain["history"]),
            "plain DPO baseline: reward margin per dimension",
            "step",
        )
    return trained_output(reported, row, md)


class PersonaKnobEvalConfig(Config):
    max_new_tokens: int = 128
    # A judge's p(Yes) at or above this is a rating of 1.
    threshold: float = 0.5


@evaluation("personaknob_eval", group=GROUP, ins=("personaknob_model", "personaknob_scenarios"))
def personaknob_eval(
    context: AssetExecutionContext,
    config: PersonaKnobEvalConfig,
    evaluator: LLMResource,
    trainer: TrainerResource,
    personaknob_model: pl.DataFrame,
    personaknob_scenarios: pl.DataFrame,
) -> Output[pl.DataFrame]:
    """Many-facet Rasch evaluation on held-out scenarios: per-dimension abilities of the base
    and the trained model with judge severities separated out, and the sycophancy rate."""
    heldout = personaknob_scenarios.filter(pl.col("split") == "heldout")
    if not heldout.height:
        raise ValueError("personaknob_scenarios has no held-out scenarios: set heldout_every > 0")
    run_dir = trainer.run_dir(f"personaknob-eval-{context.run_id}")
    prompts, out = run_dir / "heldout.parquet", run_dir / "responses.parquet"
    heldout.select(pl.col("record_id").alias("prompt_id"), "prompt").write_parquet(prompts)
    args = ["--adapter", personaknob_model["adapter_dir"][0], "--prompts", str(prompts)]
    plain = personaknob_model.get_column("plain_dpo_adapter_dir", default=None)
    if plain is not None and plain[0]:
        args += ["--baseline-adapter", plain[0]]
    trainer.launch(
        context,
        "train.adapter_responses",
        [*args, "--out", str(out), "--max-new-tokens", str(config.max_new_tokens)],
    )
    client = evaluator.client()
    responses = pl.read_parquet(out)
    ratings, sycophancy = rate(client, responses, heldout, config.threshold, log=context.log.info)
    fit = fit_rasch(ratings)
    syco = {
        m: round(float(sycophancy.filter(pl.col("model") == m)["p_sycophantic"].mean()), 4)
        for m in sorted(set(sycophancy["model"].to_list()))
    }
    abilities = fit.abilities.with_columns(pl.col("estimate", "se").round(4))
    gaps = ability_gaps(fit.abilities)
    # What the constraints bought over plain DPO on the same pairs, dimension by dimension.
    vs_plain = ability_gaps(fit.abilities, "trained", "plain_dpo")
    unresolved = [g["dimension"] for g in gaps if not g["resolved"]]
    design = (
        f"the 95% intervals of trained - base are wider than the differences on {','.join(unresolved)}: "
        "rate more held-out scenarios (scenarios, heldout_every) to tell the models apart there"
        if unresolved
        else "every trained - base difference is resolved at 95%"
    )
    if not syco:
        design += "; no held-out scenario is a sycophancy probe, so no sycophancy rate"
    return Output(
        abilities,
        metadata={
            "ratings": ratings.height,
            "heldout_scenarios": heldout.height,
            "converged": fit.converged,
            "ability_gaps": MetadataValue.md(markdown_table(pl.DataFrame(gaps))) if gaps else "",
            "resolved_dimensions": ",".join(g["dimension"] for g in gaps if g["resolved"]),
            "ability_gaps_vs_plain_dpo": MetadataValue.md(markdown_table(pl.DataFrame(vs_plain)))
            if vs_plain
            else "no plain-DPO baseline (plain_dpo_steps 0)",
            "rating_design": design,
            **{
                f"ability_{r['model']}_{r['dimension']}": r["estimate"]
                for r in abilities.to_dicts()
            },
            **{f"sycophancy_{m}": v for m, v in syco.items()},
            "judge_severity": MetadataValue.md(
                markdown_table(fit.severities.with_columns(pl.col("estimate", "se").round(3)))
            ),
            "criterion_difficulty": MetadataValue.md(
                markdown_table(fit.criteria.with_columns(pl.col("estimate", "se").round(3)))
            ),
            "abilities": ability_plot(abilities.to_dicts(), "ability per dimension (95% CI)"),
            **llm_metadata(client),
        },
    )


personaknob_curated_export = export_asset("personaknob", group=GROUP, checks=[personaknob_curated])

defs = family_definitions(
    personaknob_scenario_assets,
    personaknob_scenarios_probe_their_masks,
    personaknob_response_assets,
    personaknob_verified,
    personaknob_rejudged_agrees,
    personaknob_verification_rates,
    personaknob_curated,
    personaknob_pair_assets,
    personaknob_order_verified,
    personaknob_pairs_ready_for_training,
    personaknob_model,
    personaknob_eval,
    personaknob_curated_export,
)
