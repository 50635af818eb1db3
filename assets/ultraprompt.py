"""UltraPrompt (P-Aligner): seeds, MCTS over principle rewrites, training views, the rewriter."""

from collections import Counter
from typing import Optional

import polars as pl
from dagster import (
    AssetCheckExecutionContext,
    AssetCheckResult,
    AssetExecutionContext,
    AssetIn,
    Config,
    Output,
    asset,
    asset_check,
)

from assets.common import first_parents, llm_metadata, rate_result, run_settings
from assets.curation import curated_assets
from assets.declare import (
    LoraTrainingConfig,
    Made,
    Parents,
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
from assets.plots import bar_plot, histogram, line_plot, search_tree_plot
from assets.resources import LLMResource, TrainerResource
from quality.curation import CurationSpec
from quality.stats import wilson_interval
from quality.ultraprompt import search_report, verify_trees
from synth.ultraprompt.dataset import dpo_view, sft_view, synthesize
from synth.ultraprompt.evaluation import win_rates
from synth.ultraprompt.search import SearchSettings
from synth.ultraprompt.seeds import SeedSelection, select_seeds

GROUP = "ultraprompt"
# Training a rewriter on fewer searched seeds than this teaches nothing: the gate blocks it.
MIN_TRAINING_RECORDS = 2


class UltraPromptSeedConfig(Config, SeedSelection):
    pass


@dataset(
    "ultraprompt_seeds",
    group=GROUP,
    ins=("seed_instructions", "seed_preference_pairs"),
    description="Seed instructions tagged with a category, chosen for diversity, split into search and held-out.",
    rejected="Candidate seeds not taken, with the closest seed that was.",
    accounted=Parents(("seed_instructions", "seed_preference_pairs")),
    accounted_description="No candidate lost: every instruction and pair prompt is taken or rejected exactly once.",
)
def ultraprompt_seeds_assets(
    context: AssetExecutionContext,
    config: UltraPromptSeedConfig,
    judge: LLMResource,
    seed_instructions: pl.DataFrame,
    seed_preference_pairs: pl.DataFrame,
) -> Made:
    client = judge.client()
    kept, rejected, n_in = select_seeds(
        seed_instructions, seed_preference_pairs, config, client=client
    )
    splits = dict(Counter(kept["split"].to_list()))
    md = {**{f"split_{k}": v for k, v in splits.items()}, **llm_metadata(client)}
    if kept.height:
        md["categories"] = bar_plot(
            dict(Counter(kept["category"].to_list())), "seeds per category", "seeds"
        )
    context.log.info(f"ultraprompt seeds: {n_in} candidates, {kept.height} taken {splits}")
    return Made(kept, rejected, n_in, md)


class UltraPromptSearchConfig(Config, SearchSettings):
    # Demo-sized: the paper runs 20 iterations; raise this with a real model server.
    iterations: int = 4
    retries: int = 4
    limit: Optional[int] = None  # only the first N search seeds
    # Also ask the judge role whether each rewrite keeps the intent. Off by default: a judge
    # at chance (the embedded 135M model) prunes good rewrites at random; turn it on with a
    # capable judge.
    intent_judge: bool = False


@dataset(
    "ultraprompt",
    group=GROUP,
    ins=("ultraprompt_seeds",),
    description="Per seed: the original, the best (chosen) and worst (rejected) instruction of its tree, with paths and rewards.",
    rejected="Search seeds that gave no usable tree, with the reason.",
    also={
        "ultraprompt_trees": "Every node of every search tree: instruction, principle path, reward, visits, value, prune reason."
    },
    accounted=Parents("ultraprompt_seeds", where=pl.col("split") == "search", first_rows_in=True),
    accounted_description="No search seed lost: searched = kept + rejected, each exactly once.",
)
def ultraprompt_search_assets(
    context: AssetExecutionContext,
    config: UltraPromptSearchConfig,
    generator: LLMResource,
    reward: LLMResource,
    judge: LLMResource,
    ultraprompt_seeds: pl.DataFrame,
) -> Made:
    settings = SearchSettings(
        **{k: v for k, v in config.model_dump().items() if k in SearchSettings.model_fields}
    )
    seeds = ultraprompt_seeds.filter(pl.col("split") == "search")
    if config.limit is not None:
        seeds = seeds.head(config.limit)
    client, reward_client = generator.client(), reward.client()
    intent_client = judge.client() if config.intent_judge else None
    result = synthesize(
        client,
        seeds,
        settings,
        log=context.log.info,
        reward_client=reward_client,
        intent_client=intent_client,
    )
    trees, records = result.trees, result.records
    md = {
        "iterations": settings.iterations,
        "retries": settings.retries,
        "attempts_per_action": settings.attempts_per_action,
        "settings": settings.model_dump_json(),
        "exploration_weight": settings.exploration_weight,
        "samples_per_node": settings.samples,
        "tree_nodes": trees.height,
        "pruned_nodes": trees.filter(pl.col("status") == "pruned").height,
        **llm_metadata(client, reward_client, intent_client),
    }
    expanded = trees.filter(pl.col("action") != "root")
    if expanded.height:
        md["principles_expanded"] = bar_plot(
            dict(Counter(expanded["action"].to_list())), "principles applied (all nodes)", "nodes"
        )
    if records.height:
        md["mean_reward_gain"] = round(float(records["reward_gain"].mean()), 4)
        chosen = Counter(a for path in records["chosen_actions"].to_list() for a in path)
        if chosen:
            md["principles_in_chosen"] = bar_plot(
                dict(chosen), "principles on the chosen paths", "records"
            )
        md["reward_gain"] = histogram(
            records["reward_gain"].to_list(), "reward gain of chosen over original", "gain"
        )
        biggest = records.sort("tree_nodes", descending=True)["parent_ids"][0][0]
        md["search_tree"] = search_tree_plot(
            trees.filter(pl.col("seed_id") == biggest).to_dicts(), f"search tree of seed {biggest}"
        )
    pruned = Counter(trees.filter(pl.col("status") == "pruned")["prune_reason"].to_list())
    md.update({f"pruned_{k}": v for k, v in sorted(pruned.items())})
    also = {"ultraprompt_trees": (trees, {"rows": trees.height})}
    return Made(records, result.rejected, result.n_in, md, also)


def _search_settings(context: AssetCheckExecutionContext) -> SearchSettings:
    return run_settings(context, "ultraprompt", SearchSettings)


@asset_check(
    asset="ultraprompt",
    blocking=True,
    additional_ins={"trees": AssetIn("ultraprompt_trees"), "seeds": AssetIn("ultraprompt_seeds")},
    description="Every tree follows the paper's search: the budget counts successful expansions, a principle is used once among siblings, pruned expansions are kept with a reason and retried within limits, value is the max backup and Q the mean, and each record's chosen/rejected are its highest/lowest-reward nodes.",
)
def ultraprompt_trees_verified(
    context: AssetCheckExecutionContext,
    records: pl.DataFrame,
    trees: pl.DataFrame,
    seeds: pl.DataFrame,
) -> AssetCheckResult:
    categories = dict(zip(seeds["record_id"], seeds["category"], strict=True))
    s = _search_settings(context)
    problems = verify_trees(
        trees, records, categories, s.iterations, s.retries, s.attempts_per_action
    )
    trees_seen = trees["seed_id"].n_unique() if trees.height else 0
    return problems_result(problems, trees=trees_seen, budget=s.iterations)


class SearchTargets:
    """What a search that searches should reach (WARN checks; raise them on a real model)."""

    gain_margin = 0.02  # a best rewrite must beat the original by more than this ...
    min_gain_share = 0.3  # ... for at least this share of seeds
    min_deep_share = 0.5  # share of trees whose simulated nodes reach depth >= 2
    max_pruned_share = 0.5  # share of expansions pruned for any one reason


@asset_check(
    asset="ultraprompt",
    additional_ins={"trees": AssetIn("ultraprompt_trees")},
    description=f"At least {SearchTargets.min_gain_share:.0%} of seeds have a best rewrite that beats the original by more than {SearchTargets.gain_margin}.",
)
def ultraprompt_search_gains(records: pl.DataFrame, trees: pl.DataFrame) -> AssetCheckResult:
    report = search_report(records, trees, SearchTargets.gain_margin)
    return rate_result(report["gain_share"], SearchTargets.min_gain_share, at_least=True)


@asset_check(
    asset="ultraprompt",
    additional_ins={"trees": AssetIn("ultraprompt_trees")},
    description=f"At least {SearchTargets.min_deep_share:.0%} of trees grew past depth 1 (a search, not a best-of-N).",
)
def ultraprompt_trees_deep(records: pl.DataFrame, trees: pl.DataFrame) -> AssetCheckResult:
    report = search_report(records, trees, SearchTargets.gain_margin)
    return rate_result(report["deep_share"], SearchTargets.min_deep_share, at_least=True)


@asset_check(
    asset="ultraprompt",
    additional_ins={"trees": AssetIn("ultraprompt_trees")},
    description=f"No single prune reason takes more than {SearchTargets.max_pruned_share:.0%} of the expansions.",
)
def ultraprompt_pruned_share(records: pl.DataFrame, trees: pl.DataFrame) -> AssetCheckResult:
    per_reason = search_report(records, trees, SearchTargets.gain_margin)["pruned_share_per_reason"]
    worst = max(per_reason.values(), default=0.0)
    result = rate_result(worst, SearchTargets.max_pruned_share, at_least=False)
    return AssetCheckResult(
        passed=result.passed,
        severity=result.severity,
        metadata={**result.metadata, "per_reason": per_reason},
    )


ultraprompt_curated = curated_assets(
    "ultraprompt_curated",
    "ultraprompt",
    CurationSpec(
        family="ultraprompt",
        dedup_fields=("src_instruction",),
        decontam_fields=("src_instruction", "chosen_instruction"),
    ),
    group=GROUP,
    doc="UltraPrompt records after exact dedup, decontamination against every eval set, and near-dedup: what P-Aligner trains on.",
)


@gate(
    "ultraprompt_curated",
    f"at least {MIN_TRAINING_RECORDS} records, at least one whose chosen instruction is a rewrite, and none from a held-out seed.",
    ins={"seeds": "ultraprompt_seeds"},
)
def ultraprompt_curated_ready_for_training(
    records: pl.DataFrame, seeds: pl.DataFrame
) -> AssetCheckResult:
    heldout = set(seeds.filter(pl.col("split") == "heldout")["record_id"].to_list())
    leaked = [p for p in first_parents(records) if p in heldout]
    rewrites = records.filter(pl.col("chosen_node_id") != 0).height
    return gate_result(
        records.height,
        MIN_TRAINING_RECORDS,
        "records",
        details={"chosen_is_rewrite": rewrites},
        holds=rewrites >= 1,
        heldout_leaked=len(leaked),
    )


@asset(group_name=GROUP, ins={"ultraprompt_curated": AssetIn()})
def ultraprompt_sft(ultraprompt_curated: pl.DataFrame) -> Output[pl.DataFrame]:
    """Rewriter SFT view: the rewriting prompt around the original -> the best rewrite."""
    view = sft_view(ultraprompt_curated)
    return Output(
        view,
        metadata={"rows": view.height, "keeps_original": int(view["keeps_original"].sum())},
    )


@asset(group_name=GROUP, ins={"ultraprompt_curated": AssetIn()})
def ultraprompt_dpo(ultraprompt_curated: pl.DataFrame) -> Output[pl.DataFrame]:
    """Rewriter DPO view: best over worst rewrite of the same tree (ties left out)."""
    view = dpo_view(ultraprompt_curated)
    md = {"rows": view.height}
    if view.height:
        md["mean_reward_margin"] = round(float(view["reward_margin"].mean()), 4)
    return Output(view, metadata=md)


class PAlignerConfig(LoraTrainingConfig):
    max_steps: int = 4
    dpo_steps: int = 2  # 0 = SFT only
    beta: float = 0.1
    max_length: int = 384


# The views carry no checks of their own: depend on the gated table they are cut from.
@training(
    "paligner_model",
    group=GROUP,
    ins=(
        "ultraprompt_sft",
        "ultraprompt_dpo",
    ),
    deps=("ultraprompt_curated",),
)
def paligner_model(
    context: AssetExecutionContext,
    config: PAlignerConfig,
    trainer: TrainerResource,
    ultraprompt_sft: pl.DataFrame,
    ultraprompt_dpo: pl.DataFrame,
) -> Output[pl.DataFrame]:
    """The P-Aligner rewriter (LoRA adapters), trained out of process through Dagster Pipes."""
    run_dir = trainer.run_dir(f"paligner-{context.run_id}")
    sft, dpo = run_dir / "sft.parquet", run_dir / "dpo.parquet"
    ultraprompt_sft.write_parquet(sft)
    ultraprompt_dpo.write_parquet(dpo)
    args = ["--sft", str(sft), "--dpo", str(dpo), "--output-dir", str(run_dir)]
    reported = trainer.launch_reported(context, "train.paligner", [*args, *trainer.flags(config)])
    history = reported["history"]
    curves = {"sft": [h["loss"] for h in history["sft"]]}
    if history["dpo"]:
        curves["dpo"] = [h["loss"] for h in history["dpo"]]
    steps = list(range(1, max(len(c) for c in curves.values()) + 1))
    final_loss = float(reported["final_loss"])
    row = {
        "final_loss": final_loss,
        "sft_steps": len(history["sft"]),
        "dpo_steps": len(history["dpo"]),
    }
    md = {
        "final_loss": final_loss,
        "sft_tokens_per_s": float(reported["sft_tokens_per_s"]),
        "loss_curve": line_plot(steps, curves, "P-Aligner training loss", "step"),
    }
    return trained_output(reported, row, md)


class PAlignerEvalConfig(Config):
    max_new_tokens: int = 128  # of a rewrite
    response_max_tokens: int = 96


@evaluation("paligner_eval", group=GROUP, ins=("paligner_model", "ultraprompt_seeds"))
def paligner_eval(
    context: AssetExecutionContext,
    config: PAlignerEvalConfig,
    generator: LLMResource,
    evaluator: LLMResource,
    trainer: TrainerResource,
    paligner_model: pl.DataFrame,
    ultraprompt_seeds: pl.DataFrame,
) -> Output[pl.DataFrame]:
    """Win rate of responses to rewritten over original held-out instructions, for the
    untrained base rewriter and the trained P-Aligner, judged in both orders."""
    heldout = ultraprompt_seeds.filter(pl.col("split") == "heldout")
    if not heldout.height:
        raise ValueError(
            "ultraprompt_seeds has no held-out seeds: set heldout_every > 0 in its config"
        )
    run_dir = trainer.run_dir(f"paligner-eval-{context.run_id}")
    seeds_file, out = run_dir / "heldout.parquet", run_dir / "rewrites.parquet"
    heldout.select("instruction").write_parquet(seeds_file)
    args = ["--adapter", paligner_model["adapter_dir"][0], "--seeds", str(seeds_file)]
    args += ["--out", str(out), "--max-new-tokens", str(config.max_new_tokens)]
    trainer.launch(context, "train.paligner_eval", args)
    client, answer_client = evaluator.client(), generator.client()
    judged = win_rates(
        client,
        pl.read_parquet(out),
        config.response_max_tokens,
        log=context.log.info,
        answer_client=answer_client,
    )
    rates, intervals = {}, {}
    for name in ("base", "paligner"):
        mine = judged.filter((pl.col("rewriter") == name) & ~pl.col("judge_failed"))
        wins = int(mine["win"].sum())
        rates[name] = wins / mine.height if mine.height else float("nan")
        intervals[name] = [round(x, 4) for x in wilson_interval(wins, mine.height)]
    return Output(
        judged,
        metadata={
            **{f"win_rate_{k}": round(v, 4) for k, v in rates.items()},
            **{f"win_rate_{k}_ci95": v for k, v in intervals.items()},
            "heldout_instructions": heldout.height,
            "judge_failures": int(judged["judge_failed"].sum()),
            "judge_failures_excluded": "yes: failures are neither wins nor losses",
            "win_rates": bar_plot(rates, "rewritten beats original (held-out)", "win rate"),
            **llm_metadata(client, answer_client),
        },
    )


ultraprompt_curated_export = export_asset(
    "ultraprompt", group=GROUP, checks=[ultraprompt_curated, ultraprompt_curated_ready_for_training]
)

defs = family_definitions(
    ultraprompt_seeds_assets,
    ultraprompt_search_assets,
    ultraprompt_trees_verified,
    ultraprompt_search_gains,
    ultraprompt_trees_deep,
    ultraprompt_pruned_share,
    ultraprompt_curated,
    ultraprompt_curated_ready_for_training,
    ultraprompt_sft,
    ultraprompt_dpo,
    paligner_model,
    paligner_eval,
    ultraprompt_curated_export,
)
