"""PersonaAtlas (PersonaGym / PPOpt): personas over many preference dimensions, multi-turn
trajectories with a hidden-persona user simulator and a noise-injecting distractor, the
PPOpt data view, SFT + GRPO training, and the rewritten-vs-original win-rate evaluation."""

import os
from collections import Counter

import polars as pl
from dagster import (
    AssetCheckExecutionContext,
    AssetCheckResult,
    AssetCheckSeverity,
    AssetExecutionContext,
    AssetIn,
    Config,
    MetadataValue,
    Output,
    StaticPartitionsDefinition,
    asset_check,
)

from assets.common import llm_metadata, markdown_table, run_settings, shard_settings
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
from assets.plots import bar_plot, barh_plot, line_plot, sft_grpo_curves
from assets.resources import LLMResource, TrainerResource
from quality.curation import CurationSpec
from quality.personaatlas import (
    coverage,
    noise_effects,
    noise_report,
    persona_problems,
    ppopt_history_problems,
    turn_problems,
    win_rates,
)
from synth.personaatlas.noise import layer_shares
from synth.personaatlas.personas import build_personas
from synth.personaatlas.ppopt import (
    build_ppopt,
    no_history_prompt,
    parse_output,
    score_rewrites,
)
from synth.personaatlas.trajectories import (
    AtlasSettings,
    plan_conversations,
    pool_clients,
    synthesize_trajectories,
)

GROUP = "personaatlas"
# Fewer PPOpt rows than this teach nothing: the gate blocks training.
MIN_TRAINING_ROWS = 2


class PersonaAtlasConfig(Config, AtlasSettings):
    pass


@dataset(
    "personaatlas_personas",
    group=GROUP,
    ins=("seed_personas",),
    description="Personas: a value for every schema dimension (hidden) and the observed part, from Persona Hub text mapped by the LLM and from seeded sampling.",
    rejected="Persona Hub texts whose mapping onto the schema did not parse, was too sparse or not distinct, with the reason.",
    accounted=Planned("persona_index"),
    accounted_description="No persona lost: Persona Hub texts mapped + sampled personas = kept + rejected.",
)
def personaatlas_persona_assets(
    context: AssetExecutionContext,
    config: PersonaAtlasConfig,
    generator: LLMResource,
    seed_personas: pl.DataFrame,
) -> Made:
    client = generator.client()
    schema = config.schema()
    kept, rejected, n_in = build_personas(
        client, seed_personas, schema, config, log=context.log.info
    )
    md = {
        "settings": config.model_dump_json(),
        "dimensions": len(schema.dimensions),
        **{f"source_{k}": v for k, v in Counter(kept["source"].to_list()).items()},
        **{f"split_{k}": v for k, v in Counter(kept["split"].to_list()).items()},
        **llm_metadata(client),
    }
    if kept.height:
        md["mean_observed_dims"] = round(float(kept["observed_dims"].mean()), 2)
        md["coverage_per_dimension"] = barh_plot(
            coverage(kept, schema), "share of personas exposing each dimension", "share of personas"
        )
    return Made(kept, rejected, n_in, md)


@asset_check(
    asset="personaatlas_personas",
    blocking=True,
    description="Recomputed from the stored personas: any two differ on at least min_distance dimensions, each exposes at least min_constraints hard constraints, and no dimension is outside the schema.",
)
def personaatlas_personas_distinct(
    context: AssetCheckExecutionContext, personas: pl.DataFrame
) -> AssetCheckResult:
    s = run_settings(context, "personaatlas_personas", AtlasSettings)
    problems = persona_problems(personas, s.schema(), s.min_distance, s.min_constraints)
    return problems_result(
        problems,
        personas=personas.height,
        min_distance=s.min_distance,
        min_constraints=s.min_constraints,
    )


# Personas are sharded for trajectory synthesis: shard k holds the personas whose
# persona_index % N == k (N = ALIGNFOUNDRY_PERSONA_SHARDS, default 2).
PERSONA_SHARDS = StaticPartitionsDefinition(
    [f"shard_{k}" for k in range(int(os.environ.get("ALIGNFOUNDRY_PERSONA_SHARDS", "2")))]
)


@dataset(
    "personaatlas_trajectory_shards",
    group=GROUP,
    ins=("personaatlas_personas", "seed_instructions"),
    description="One persona shard's conversations (a partition per shard): persona, initial query, every turn with clean and sent user text, noise, assistant reply and the simulator's verdict.",
    rejected="That shard's planned conversations that could not be completed, with the turn and the reason.",
    partitions_def=PERSONA_SHARDS,
    accounted=None,  # the merge accounts for every shard's conversations
)
def personaatlas_trajectory_shard_assets(
    context: AssetExecutionContext,
    config: PersonaAtlasConfig,
    generator: LLMResource,
    simulator: LLMResource,
    personaatlas_personas: pl.DataFrame,
    seed_instructions: pl.DataFrame,
) -> Made:
    client, sim_client = generator.client(), simulator.client()
    pool = pool_clients(generator.cache_file, generator.max_concurrency, config.assistants_file)
    shards = PERSONA_SHARDS.get_partition_keys()
    shard = (shards.index(context.partition_key), len(shards))
    kept, rejected, n_in = synthesize_trajectories(
        client,
        personaatlas_personas,
        seed_instructions,
        config,
        pool,
        log=context.log.info,
        shard=shard,
        simulator=sim_client,
    )
    md = {
        "settings": config.model_dump_json(),
        "shard": context.partition_key,
        **llm_metadata(client, sim_client),
    }
    return Made(kept, rejected, n_in, md)


@dataset(
    "personaatlas_trajectories",
    group=GROUP,
    ins={
        # Missing partitions load as absent, so the body can name them.
        "personaatlas_trajectory_shards": AssetIn(metadata={"allow_missing_partitions": True}),
        "personaatlas_trajectory_shards_rejected": AssetIn(
            metadata={"allow_missing_partitions": True}
        ),
        "personaatlas_personas": AssetIn(),
        "seed_instructions": AssetIn(),
    },
    description="Every persona shard's conversations merged: persona (full and observed), original and initial query, every turn with clean and sent user text, noise, assistant reply and model, and the user simulator's verdict.",
    rejected="Planned conversations that could not be completed (failed call, empty assistant turn, unparseable verdict), with the turn and the reason.",
    accounted=Planned("plan_index"),
    accounted_description="No planned conversation lost: planned = kept + rejected, each exactly once.",
)
def personaatlas_trajectory_assets(
    context: AssetExecutionContext,
    personaatlas_trajectory_shards: dict[str, pl.DataFrame],
    personaatlas_trajectory_shards_rejected: dict[str, pl.DataFrame],
    personaatlas_personas: pl.DataFrame,
    seed_instructions: pl.DataFrame,
) -> Made:
    order = PERSONA_SHARDS.get_partition_keys()
    s = shard_settings(
        context,
        "personaatlas_trajectory_shards",
        order,
        personaatlas_trajectory_shards,
        AtlasSettings,
        "run the persona-shard backfill first (the UI's Materialize all, or the "
        "`personaatlas_shards` job for each shard)",
    )
    kept = pl.concat([personaatlas_trajectory_shards[k] for k in order]).sort("plan_index")
    rejected = pl.concat([personaatlas_trajectory_shards_rejected[k] for k in order])
    n_in = len(plan_conversations(personaatlas_personas, seed_instructions, s))
    md: dict = {"settings": s.model_dump_json(), "shards": len(order)}
    if kept.height:
        turns = [t for ts in kept["turns"].to_list() for t in ts]
        mix = Counter(t["noise_layer"] or "clean" for t in turns)
        md["noise_mix"] = bar_plot(dict(mix), "user messages per noise layer", "messages")
        md["assistant_mix"] = MetadataValue.json(dict(Counter(t["assistant_model"] for t in turns)))
        md["mean_turns"] = round(float(kept["num_turns"].mean()), 3)
        md["satisfied_share"] = round(sum(t["satisfied"] for t in turns) / len(turns), 4)
        by_turn = [
            [t["satisfied"] for t in turns if t["turn"] == k]
            for k in range(kept["num_turns"].max())
        ]
        md["satisfaction_by_turn"] = line_plot(
            list(range(1, len(by_turn) + 1)),
            {"satisfied": [sum(v) / len(v) for v in by_turn]},
            "share of satisfied verdicts per turn",
            "turn",
        )
    return Made(kept, rejected, n_in, md)


@asset_check(
    asset="personaatlas_trajectories",
    blocking=True,
    description="Recomputed from the stored turns: no empty assistant turn, every target within [min_turns, max_turns], and every dialogue stopped where the protocol says: at the first satisfied verdict, else at its target.",
)
def personaatlas_turns_valid(
    context: AssetCheckExecutionContext, trajectories: pl.DataFrame
) -> AssetCheckResult:
    s = run_settings(context, "personaatlas_trajectories", AtlasSettings)
    problems = turn_problems(trajectories, s.min_turns, s.max_turns)
    bounds = [s.min_turns, s.max_turns]
    return problems_result(problems, conversations=trajectories.height, bounds=bounds)


@asset_check(
    asset="personaatlas_trajectories",
    description="The realised noise rate over user messages and the layer mix over noised ones are within three binomial standard errors (at least 0.05) of the configuration.",
)
def personaatlas_noise_mix(
    context: AssetCheckExecutionContext, trajectories: pl.DataFrame
) -> AssetCheckResult:
    s = run_settings(context, "personaatlas_trajectories", AtlasSettings)
    report = noise_report(trajectories, s.noise_rate, layer_shares(s.noise()))
    return AssetCheckResult(
        passed=report["passed"],
        severity=AssetCheckSeverity.ERROR,
        metadata={
            k: MetadataValue.json(v) if isinstance(v, dict) else v for k, v in report.items()
        },
    )


@asset_check(
    asset="personaatlas_trajectories",
    description="Read back from the text by rules of our own: noised user messages differ from their clean version, and where a drawn strategy has a visible effect it shows (missing_slots: a slot the intent step found lost a word; vague_values: a number is gone; punctuation: no final stop). WARN: a weak distractor model is reported, not blocked.",
)
def personaatlas_noise_took_effect(trajectories: pl.DataFrame) -> AssetCheckResult:
    report = noise_effects(trajectories)
    return AssetCheckResult(
        passed=report["passed"],
        severity=AssetCheckSeverity.WARN,
        metadata={
            k: MetadataValue.json(v) if isinstance(v, dict) else v
            for k, v in report.items()
            if v is not None
        },
    )


personaatlas_curated = curated_assets(
    "personaatlas_curated",
    "personaatlas_trajectories",
    CurationSpec(
        family="personaatlas", dedup_fields=("initial_query",), decontam_fields=("initial_query",)
    ),
    group=GROUP,
    doc="PersonaAtlas conversations after exact dedup, decontamination against every eval set, and near-dedup of the initial queries.",
)


@dataset(
    "personaatlas_ppopt",
    group=GROUP,
    ins=("personaatlas_curated",),
    description="PPOpt rows, one per persona: history (user turns, replies masked; noised and clean) + target query -> the teacher's <REASONING>profile</REASONING><PROMPT>rewrite</PROMPT>.",
    rejected="Personas without a PPOpt row (one curated session only, or a teacher output that did not parse), with the reason.",
    accounted=Parents("personaatlas_curated", kept_key="persona_id", source_key="persona_id"),
    accounted_description="No persona lost: personas in the curated conversations = PPOpt rows + rejected.",
)
def personaatlas_ppopt_assets(
    context: AssetExecutionContext, generator: LLMResource, personaatlas_curated: pl.DataFrame
) -> Made:
    client = generator.client()
    s = run_settings(context, "personaatlas_trajectories", AtlasSettings)
    kept, rejected, n_in = build_ppopt(
        client, personaatlas_curated, s.schema(), s.seed, log=context.log.info
    )
    md = {
        **llm_metadata(client),
        **{f"split_{k}": v for k, v in Counter(kept["split"].to_list()).items()},
    }
    if kept.height:
        md["mean_history_sessions"] = round(float(kept["history_ids"].list.len().mean()), 3)
        md["noised_history_turns"] = int(kept["noised_history_turns"].sum())
    return Made(kept, rejected, n_in, md)


@gate(
    "personaatlas_ppopt",
    f"at least {MIN_TRAINING_ROWS} training rows, each with a well-formed teacher output; history only from the persona's own curated sessions, never the target, each played from exactly the observed features the judges grade against; held-out personas carry no teacher output.",
    ins={"curated": "personaatlas_curated"},
)
def personaatlas_ppopt_ready_for_training(
    rows: pl.DataFrame, curated: pl.DataFrame
) -> AssetCheckResult:
    train = rows.filter(pl.col("split") == "train")
    malformed = sum(parse_output(c) is None for c in train["completion"].to_list())
    leaked = rows.filter((pl.col("split") == "heldout") & (pl.col("completion") != "")).height
    problems = ppopt_history_problems(rows, curated)
    return gate_result(
        train.height,
        MIN_TRAINING_ROWS,
        "train_rows",
        {"history_problems": MetadataValue.json(problems[:10])},
        malformed_completions=malformed,
        heldout_with_teacher_output=leaked,
        rows_with_bad_history=len({p["record_id"] for p in problems}),
    )


class PPOptConfig(LoraTrainingConfig):
    sft_steps: int = 4
    grpo_steps: int = 2
    num_generations: int = 2  # paper 8: 2 keeps the CPU default in minutes (docs: the GPU run)
    max_completion_length: int = 96
    w_profile: float = 0.3  # paper 0.3
    w_task: float = 0.7  # paper 0.7
    kl_beta: float = 0.1  # paper 0.1
    temperature: float = 0.7  # paper 0.7
    rl_share: float = 0.5  # inputs kept for GRPO, disjoint from SFT's (the paper splits them)
    max_length: int = 1024


@training("personaatlas_model", group=GROUP, ins=("personaatlas_ppopt",))
def personaatlas_model(
    context: AssetExecutionContext,
    config: PPOptConfig,
    judge: LLMResource,
    trainer: TrainerResource,
    personaatlas_ppopt: pl.DataFrame,
) -> Output[pl.DataFrame]:
    """The PPOpt prompt optimizer (LoRA adapters): SFT on teacher outputs, then GRPO with
    profile and task rewards scored by the judge role, trained out of process through Pipes."""
    run_dir = trainer.run_dir(f"personaatlas-{context.run_id}")
    data = run_dir / "ppopt.parquet"
    personaatlas_ppopt.write_parquet(data)
    spec, env = judge.subprocess_spec()
    args = ["--data", str(data), "--output-dir", str(run_dir), "--judge", spec]
    reported = trainer.launch_reported(
        context, "train.ppopt", [*args, *trainer.flags(config)], env=env
    )
    reported["role_judge"] = judge.label
    history = reported["history"]
    row = {
        "final_sft_loss": float(reported["final_sft_loss"]),
        "final_reward": float(reported["final_reward"]),
        "train_rows": int(reported["train_rows"]),
    }
    md = {
        **row,
        **{
            k: reported[k]
            for k in (
                "sft_rows",
                "rl_rows",
                "sft_tokens_per_s",
                "grpo_completions_per_s",
                "role_judge",
            )
        },
        "history": MetadataValue.json(history),
        **sft_grpo_curves(history, "PPOpt", ("profile_score", "task_score", "format_ok")),
    }
    return trained_output(reported, row, md)


class PPOptEvalConfig(Config):
    max_new_tokens: int = 96
    answer_max_tokens: int = 96


@evaluation("personaatlas_eval", group=GROUP, ins=("personaatlas_model", "personaatlas_ppopt"))
def personaatlas_eval(
    context: AssetExecutionContext,
    config: PPOptEvalConfig,
    generator: LLMResource,
    evaluator: LLMResource,
    trainer: TrainerResource,
    personaatlas_model: pl.DataFrame,
    personaatlas_ppopt: pl.DataFrame,
) -> Output[pl.DataFrame]:
    """Win rate of rewritten over original prompts for held-out personas, for the base and
    the trained optimizer, from noised and clean histories (robustness = the gap) and from
    no history (the generic-rewrite baseline), each with its 95% interval."""
    heldout = personaatlas_ppopt.filter(pl.col("split") == "heldout")
    if not heldout.height:
        raise ValueError(
            "personaatlas_ppopt has no held-out personas: set heldout_every > 0 and enough personas"
        )
    run_dir = trainer.run_dir(f"personaatlas-eval-{context.run_id}")
    prompts, out = run_dir / "heldout.parquet", run_dir / "responses.parquet"
    items = [
        {"prompt_id": f"{r['record_id']}|{h}", "prompt": prompt}
        for r in heldout.to_dicts()
        for h, prompt in (
            ("noised", r["prompt"]),
            ("clean", r["prompt_clean"]),
            ("none", no_history_prompt(r["query"])),
        )
    ]
    pl.DataFrame(items).write_parquet(prompts)
    args = [
        "--adapter",
        personaatlas_model["adapter_dir"][0],
        "--prompts",
        str(prompts),
        "--out",
        str(out),
    ]
    trainer.launch(
        context, "train.adapter_responses", [*args, "--max-new-tokens", str(config.max_new_tokens)]
    )
    client, answer_client = evaluator.client(), generator.client()
    table = score_rewrites(
        client,
        heldout,
        pl.read_parquet(out).to_dicts(),
        config.answer_max_tokens,
        answer_client=answer_client,
    )
    summary = win_rates(table)
    rates = {f"{r['model']}/{r['history']}": r["win_rate"] or 0.0 for r in summary.to_dicts()}
    md: dict = {f"win_rate_{k.replace('/', '_')}": v for k, v in rates.items()}
    md["win_rate_intervals"] = MetadataValue.json(
        {f"{r['model']}/{r['history']}": [r["ci_low"], r["ci_high"]] for r in summary.to_dicts()}
    )
    md["judge_failures"] = int(table["judge_failed"].sum())
    for m in sorted(set(table["model"].to_list())):
        md[f"robustness_gap_{m}"] = round(
            rates.get(f"{m}/clean", 0.0) - rates.get(f"{m}/noised", 0.0), 4
        )
        # what the history adds over a generic rewrite of the bare query
        md[f"history_gain_{m}"] = round(
            rates.get(f"{m}/clean", 0.0) - rates.get(f"{m}/none", 0.0), 4
        )
    md.update(
        {
            "heldout_personas": heldout.height,
            "win_rates": bar_plot(rates, "rewritten beats original (win rate)", "win rate"),
            "summary": MetadataValue.md(markdown_table(summary)),
            "per_persona": MetadataValue.md(
                markdown_table(
                    table.group_by("persona_id", "model")
                    .agg(pl.col("win").mean().alias("win_rate"))
                    .sort("persona_id", "model")
                )
            ),
            **llm_metadata(client, answer_client),
        }
    )
    return Output(table, metadata=md)


personaatlas_curated_export = export_asset(
    "personaatlas", group=GROUP, checks=[personaatlas_curated]
)

defs = family_definitions(
    personaatlas_persona_assets,
    personaatlas_personas_distinct,
    personaatlas_trajectory_shard_assets,
    personaatlas_trajectory_assets,
    personaatlas_turns_valid,
    personaatlas_noise_mix,
    personaatlas_noise_took_effect,
    personaatlas_curated,
    personaatlas_ppopt_assets,
    personaatlas_ppopt_ready_for_training,
    personaatlas_model,
    personaatlas_eval,
    personaatlas_curated_export,
)
