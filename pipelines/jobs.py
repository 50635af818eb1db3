"""Jobs: one per group, and the demo (everything the embedded defaults can run)."""

from dagster import AssetSelection, Definitions, define_asset_job

seeds_job = define_asset_job(
    "seeds",
    selection=AssetSelection.groups("seeds"),
    description="Load and validate every seed source.",
)
responses_job = define_asset_job(
    "responses",
    selection=AssetSelection.groups("responses").upstream().required_multi_asset_neighbors(),
    description="Judged responses to the seed instructions.",
)
trace_job = define_asset_job(
    "trace",
    selection=AssetSelection.groups("trace").upstream().required_multi_asset_neighbors(),
    description="TRACE: triage the preference pairs under a policy, weigh them, re-align.",
)
ultraprompt_job = define_asset_job(
    "ultraprompt",
    selection=AssetSelection.groups("ultraprompt").upstream().required_multi_asset_neighbors(),
    description="UltraPrompt: MCTS over principle rewrites of diverse seeds, then the P-Aligner rewriter.",
)
personaknob_job = define_asset_job(
    "personaknob",
    selection=AssetSelection.groups("personaknob").upstream().required_multi_asset_neighbors(),
    description="PersonaKnob: scenarios, verified golden and per-dimension rejects, partial-order pairs, constrained DPO, IRT evaluation.",
)
# PersonaAtlas trajectories are partitioned by persona shard; `personaatlas_shards` makes
# the seeds, the personas and one shard's conversations per run (a backfill over every
# shard makes them all); `personaatlas` merges the shards and goes on from there.
PERSONA_SHARDS = AssetSelection.assets(
    "personaatlas_trajectory_shards", "personaatlas_trajectory_shards_rejected"
)
PERSONA_SHARDS_JOB = PERSONA_SHARDS.upstream().required_multi_asset_neighbors()
personaatlas_shards_job = define_asset_job(
    "personaatlas_shards",
    selection=PERSONA_SHARDS_JOB,
    description="PersonaAtlas, per persona-shard partition: seeds, personas and that shard's simulated conversations. Backfill it over every shard before running `personaatlas`.",
)
personaatlas_job = define_asset_job(
    "personaatlas",
    selection=AssetSelection.groups("personaatlas").upstream().required_multi_asset_neighbors()
    - PERSONA_SHARDS_JOB,
    description="PersonaAtlas, after the shard backfill: merged trajectories, curation, PPOpt data, SFT + GRPO, win-rate evaluation.",
)
# MedAD's center shards are partitioned (one per acquisition center); everything after
# them is not. `medad_centers` makes the bases and one center's cases per run (a backfill
# over every center makes them all); `medad` merges the centers and goes on from there.
MEDAD_SHARDS = AssetSelection.assets(
    "medad_bases", "medad_bases_rejected", "medad_center_cases", "medad_center_cases_rejected"
)
medad_centers_job = define_asset_job(
    "medad_centers",
    selection=MEDAD_SHARDS,
    description="MedAD, per center partition: the allow-listed base images and that center's cases. Backfill it over every center before running `medad`.",
)
medad_job = define_asset_job(
    "medad",
    selection=AssetSelection.groups("medad") - MEDAD_SHARDS,
    description="MedAD, after the center backfill: merged cases and the real-anomaly slice, mask-verified VQA with reasoning, SFT + GRPO of a small VLM, per-type and per-center evaluation.",
)
demo_job = define_asset_job(
    "demo",
    selection=AssetSelection.groups("seeds", "responses"),
    description="The README demo: seeds and the judged-response slice on the embedded model.",
)

judges_job = define_asset_job(
    "judges",
    selection=AssetSelection.assets("judge_calibration").upstream(),
    description="Calibrate every LLM judge against its labelled reference items.",
)

everything_job = define_asset_job(
    "everything",
    selection=AssetSelection.all() - MEDAD_SHARDS - PERSONA_SHARDS,
    description="End to end: every family, curation, export, training, evaluation and judge calibration (the partitioned shards come from the `medad_centers` and `personaatlas_shards` backfills).",
)

jobs = [
    seeds_job,
    responses_job,
    trace_job,
    ultraprompt_job,
    personaknob_job,
    personaatlas_shards_job,
    personaatlas_job,
    medad_centers_job,
    medad_job,
    demo_job,
    judges_job,
    everything_job,
]


def jobs_with_settings(op_config: dict[str, dict], defs: Definitions) -> list:
    """The jobs, each with the per-family settings of alignfoundry.yaml (op name -> config)
    for the ops it runs as its default run config; `defs` is the code location with the
    plain jobs, to resolve which ops each job runs."""
    if not op_config:
        return jobs
    names = {node for job in jobs for node in defs.resolve_job_def(job.name).graph.node_dict}
    unknown = sorted(set(op_config) - names)
    if unknown:
        raise ValueError(
            f"alignfoundry.yaml families: {unknown[0]!r} is not an op of any job "
            "(the op names are the asset functions, e.g. trace_triage_assets)"
        )
    out = []
    for job in jobs:
        nodes = set(defs.resolve_job_def(job.name).graph.node_dict)
        ops = {op: {"config": cfg} for op, cfg in op_config.items() if op in nodes}
        out.append(
            define_asset_job(
                job.name,
                selection=job.selection,
                description=job.description,
                config={"ops": ops},
                partitions_def=job.partitions_def,
                tags=job.tags,
            )
            if ops
            else job
        )
    return out
