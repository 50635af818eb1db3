"""Run a dataset family end to end, the way its jobs need to be run.

    alignfoundry run FAMILY [--scale demo|default] [--policy FILE]
    alignfoundry run all --scale demo          # what `make demo` runs

A family is one or two jobs: TRACE triages under a policy version, which must first be a
partition (it is registered here, as `alignfoundry policy` does); PersonaAtlas and MedAD
make their shards as partitions (one run per partition, a backfill by hand) before the
job that merges them. `--scale demo` gives every op small settings, so that all five
families with training and evaluation finish in minutes on a laptop's CPU; `default`
runs the ops' own defaults (and alignfoundry.yaml's family settings).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

FAMILIES = ("responses", "trace", "ultraprompt", "personaknob", "personaatlas", "medad")

# PersonaAtlas' two ops must share their settings (the shards check it).
ATLAS_DEMO = {
    "hub_personas": 1,
    "sampled_personas": 2,
    "max_turns": 2,
    "assistant_max_tokens": 64,
    "user_max_tokens": 48,
    "style_max_tokens": 96,  # the long length buckets are cut: speed over length here
}
# The embedded 135M judge's p(Yes) sits between 0.2 and 0.4 whatever it reads (median
# 0.27): at the demo scale PersonaKnob verifies at that median and takes 10 scenarios, so
# that a few pairs pass the gate and training runs. With a real judge keep 0.5. Against a
# judge that is close to a coin, a golden must pass all k of its dimensions (about 0.5^k
# per attempt): the demo takes one- and two-dimension masks only, which verify often
# enough for the gate and cost fewer generations and judge calls.
KNOB_DEMO = {
    "scenarios": 10,
    "mask_mix": {m: 1.0 for m in ("A", "T", "E", "C", "AT", "EC", "AE", "TC")},
    "max_attempts": 3,
    "heldout_every": 5,
    "threshold": 0.27,
    "prompt_max_tokens": 64,
    "response_max_tokens": 56,
}
# Small settings per op: every family through its checks, gate, a few training steps and
# an evaluation, on the embedded model. The ops' defaults are the `default` scale.
DEMO_SCALE: dict[str, dict[str, Any]] = {
    "judged_responses_assets": {"limit": 8},
    # The embedded judge's p(violates) sit in a narrow band: flag the upper half.
    "trace_triage_assets": {"threshold_quantile": 0.5, "review_margin": 0.005},
    "trace_model_assets": {"max_steps": 2, "max_length": 128, "gold_batch_size": 6},
    "trace_eval": {"max_new_tokens": 12, "max_length": 128},
    # The embedded classifier files most seeds under helpfulness: take enough of them.
    "ultraprompt_seeds_assets": {"per_category": 4, "heldout_every": 3},
    "ultraprompt_search_assets": {"iterations": 2, "samples": 1, "retries": 4},
    "paligner_model": {"max_steps": 2, "dpo_steps": 1, "max_length": 256},
    "paligner_eval": {"max_new_tokens": 24, "response_max_tokens": 24},
    "personaknob_scenario_assets": KNOB_DEMO,
    "personaknob_response_assets": KNOB_DEMO,
    "personaknob_model": {"max_steps": 2, "plain_dpo_steps": 2, "max_length": 256},
    # Rated at the same median as verification: at 0.5 the embedded judge rates every
    # reply 0, and the Rasch fit has nothing to tell the three models apart by.
    "personaknob_eval": {"max_new_tokens": 16, "threshold": 0.27},
    "personaatlas_persona_assets": ATLAS_DEMO,
    "personaatlas_trajectory_shard_assets": ATLAS_DEMO,
    "personaatlas_model": {
        "sft_steps": 2,
        "grpo_steps": 1,
        "max_completion_length": 48,
        "max_length": 512,
    },
    "personaatlas_eval": {"max_new_tokens": 24, "answer_max_tokens": 24},
    "medad_base_assets": {"image_size": 96, "cases_per_base": 1},
    "medad_center_case_assets": {"image_size": 96, "cases_per_base": 1},
    "medad_model": {"sft_steps": 4, "grpo_steps": 1, "num_generations": 2},
    "medad_eval": {"limit_per_type": 1},
}
SCALES = {"demo": DEMO_SCALE, "default": {}}

# What to look at in the UI for each family, and the metrics a summary prints.
UI_GROUPS = {
    "responses": "responses",
    "trace": "trace",
    "ultraprompt": "ultraprompt",
    "personaknob": "personaknob",
    "personaatlas": "personaatlas",
    "medad": "medad",
}
METRIC_PREFIXES = (
    "final_loss",
    "final_reward",
    "final_sft_loss",
    "policy_agreement_",
    "margin_preference_delta_",
    "win_rate_",
    "ability_",
    "sycophancy_",
    "accuracy_",
    "format_rate",
    "mean_reward_gain",
    "trainable_tensors_changed",
    "retention_nll_",
)


@dataclass
class Step:
    job: str
    partitions: list[str | None] = field(default_factory=lambda: [None])


@dataclass
class FamilyResult:
    family: str
    runs: list[Any] = field(default_factory=list)  # ExecuteInProcessResult
    seconds: float = 0.0

    @property
    def success(self) -> bool:
        return bool(self.runs) and all(r.success for r in self.runs)


def plan(defs: Any, family: str, instance: Any, policy_file: str = "") -> list[Step]:
    """The job runs of one family, in order (registering TRACE's policy partition)."""
    if family not in FAMILIES:
        raise ValueError(f"unknown family {family!r} (families: {', '.join(FAMILIES)}, all)")
    if family == "trace":
        return [Step("trace", [register_policy(instance, policy_file)])]
    shards = {"personaatlas": "personaatlas_shards", "medad": "medad_centers"}.get(family)
    if shards:
        keys = defs.resolve_job_def(shards).partitions_def.get_partition_keys()
        return [Step(shards, list(keys)), Step(family)]
    return [Step(family)]


def register_policy(instance: Any, policy_file: str = "") -> str:
    """The policy file's version, added as a triage partition when it is new."""
    from assets.partitions import TRACE_POLICY_VERSIONS
    from synth.trace.policy import SHIPPED_POLICIES, load_policy

    policy = load_policy(policy_file or SHIPPED_POLICIES / "new_policy.yaml")
    if policy.version not in instance.get_dynamic_partitions(TRACE_POLICY_VERSIONS.name):
        instance.add_dynamic_partitions(TRACE_POLICY_VERSIONS.name, [policy.version])
    return policy.version


def run_config(defs: Any, job: str, scale: str, policy_file: str = "") -> dict[str, Any]:
    """The scale's settings for the ops `job` runs (and the policy file for TRACE)."""
    ops = set(defs.resolve_job_def(job).graph.node_dict)
    settings = dict(SCALES[scale])
    if policy_file:
        settings["trace_policy"] = {"path": policy_file}
    config: dict[str, Any] = {
        "ops": {op: {"config": cfg} for op, cfg in settings.items() if op in ops},
        "loggers": {"console": {"config": {"log_level": "WARNING"}}},
    }
    return config


def check_family(
    defs: Any, instance: Any, family: str, scale: str = "demo", policy_file: str = ""
) -> list[str]:
    """What `run_family` would run, each job's run config validated against its schema
    (Dagster's own validation), without running anything: one line per run."""
    from dagster import validate_run_config

    lines = []
    for step in plan(defs, family, instance, policy_file):
        cfg = run_config(defs, step.job, scale, policy_file)
        validate_run_config(defs.resolve_job_def(step.job), cfg)
        for key in step.partitions:
            lines.append(f"{family}: job {step.job}" + (f" partition {key}" if key else ""))
    return lines


def run_family(
    defs: Any,
    instance: Any,
    family: str,
    scale: str = "demo",
    policy_file: str = "",
    log: Callable[[str], None] = print,
) -> FamilyResult:
    out = FamilyResult(family)
    start = time.perf_counter()
    for step in plan(defs, family, instance, policy_file):
        job = defs.resolve_job_def(step.job)
        cfg = run_config(defs, step.job, scale, policy_file)
        for key in step.partitions:
            where = f" [{key}]" if key else ""
            log(f"  {family}: job {step.job}{where} ...")
            t = time.perf_counter()
            result = job.execute_in_process(
                instance=instance, run_config=cfg, partition_key=key, raise_on_error=False
            )
            out.runs.append(result)
            log(
                f"  {family}: job {step.job}{where} {'succeeded' if result.success else 'FAILED'}"
                f" in {time.perf_counter() - t:.0f}s (run {result.run_id[:8]})"
            )
            if not result.success:
                out.seconds = time.perf_counter() - start
                return out
    out.seconds = time.perf_counter() - start
    return out


def _fan_out(md: dict[str, Any]) -> str:
    """A note for steps where one row in makes several out (a volume's slices, a case's
    questions), so that kept above rows in does not read as rows appearing from nowhere."""
    used = md["rows_in"] - md["rejected"] - (md.get("review") or 0)
    if used > 0 and md["kept"] > used:
        return f"  ({md['kept'] / used:.1f} rows out per row in)"
    return ""


def summary(result: FamilyResult) -> str:
    """Rows in / kept / rejected by reason, checks, and the training and evaluation numbers."""
    lines = [
        f"== {result.family}: {'succeeded' if result.success else 'FAILED'} in {result.seconds:.0f}s"
    ]
    datasets: dict[str, str] = {}  # one line per asset (and partition): its last materialization
    metrics, checks = {}, {}
    for run in result.runs:
        for ev in run.get_asset_materialization_events():
            md = {k: v.value for k, v in ev.materialization.metadata.items()}
            name = ev.asset_key.to_user_string()
            if "rows_in" in md:
                dropped = ", ".join(
                    f"{k[8:]} {v}" for k, v in md.items() if k.startswith("dropped_")
                )
                part = f" [{ev.partition}]" if ev.partition else ""
                datasets[name + part] = (
                    f"   {name + part:44} {md['rows_in']:>6} in {md['kept']:>6} kept {md['rejected']:>5} rejected"
                    + (f" {md['review']:>3} for review" if md.get("review") else "")
                    + (f"  ({dropped})" if dropped else "")
                    + _fan_out(md)
                )
            for k, v in md.items():
                if k.startswith(METRIC_PREFIXES) and isinstance(v, (int, float)):
                    metrics[f"{name}.{k}"] = v
        for ev in run.get_asset_check_evaluations():
            checks[ev.asset_check_key.name] = (ev.passed, ev.severity.value)
    lines += datasets.values()
    failed = sorted(n for n, (ok, _) in checks.items() if not ok)
    lines.append(
        f"   checks: {sum(ok for ok, _ in checks.values())} passed, {len(failed)} failed"
        + (f": {', '.join(f'{n} ({checks[n][1]})' for n in failed)}" if failed else "")
    )
    for k in sorted(metrics):
        v = metrics[k]
        lines.append(f"   {k} = {round(v, 4) if isinstance(v, float) else v}")
    lines.append(
        f"   in the UI: Lineage > group '{UI_GROUPS[result.family]}' (each asset's metadata, checks and plots)"
    )
    return "\n".join(lines)
