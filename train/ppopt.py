"""PPOpt: a personalized prompt optimizer trained on PersonaAtlas (arXiv 2602.12394).

    python -m train.ppopt --data ppopt.parquet --output-dir runs/ppopt
        [--model PATH] [--sft-steps 4] [--grpo-steps 2] [--num-generations 2]
        [--w-profile 0.3] [--w-task 0.7] [--judge '{"backend": "openai", "base_url": ...}']

SFT (TRL SFTTrainer, LoRA) on history + query -> the teacher's
`<REASONING>profile</REASONING><PROMPT>rewrite</PROMPT>`, then GRPO (TRL GRPOTrainer) on
other rows (disjoint on the input, `--rl-share`) with reward = w_profile x profile score (the inferred profile against
the true persona, judged) + w_task x task score (the judged probability that the answer
to the rewritten prompt serves the user better than the answer to the original). An
output not in the format earns 0. The CPU default is a few steps of the embedded
SmolLM2-135M with the embedded judge; on a GPU the same entry point runs in bf16.
"""

from __future__ import annotations

import argparse
import math
import random
import time
from pathlib import Path
from typing import Any

from train.paligner import (
    add_lora_preference_args,
    chat_example,
    fit,
    tensors_changed,
    trainer_args,
)
from train.reporting import run_training


def combined_reward(profile: float, task: float, w_profile: float, w_task: float) -> float | None:
    """The paper's R = w_profile x r_prof + w_task x r_task, both in [0, 1]; None when a
    judge gave no score (the sample is dropped, not scored 0)."""
    if math.isnan(profile) or math.isnan(task):
        return None
    return w_profile * profile + w_task * task


def split_sft_rl(rows: list[dict[str, Any]], rl_share: float, seed: int) -> tuple[list, list]:
    """(sft, rl): disjoint on the policy input, as the paper selects them. Distinct prompts
    are shuffled with the seed and the first `rl_share` of them (at least one, and never
    all) go to GRPO; rows repeating a prompt follow it. Fewer than two distinct prompts
    cannot be split: both stages then use all rows."""
    prompts = sorted({r["prompt"] for r in rows})
    if len(prompts) < 2 or rl_share <= 0:
        return rows, rows
    random.Random(seed).shuffle(prompts)
    k = min(max(round(len(prompts) * rl_share), 1), len(prompts) - 1)
    rl = set(prompts[:k])
    return [r for r in rows if r["prompt"] not in rl], [r for r in rows if r["prompt"] in rl]


def ppopt_reward(client: Any, w_profile: float, w_task: float) -> Any:
    """The GRPO reward function (TRL calls it with the dataset's persona and query columns)."""
    from synth.personaatlas.ppopt import parse_output, profile_scores, rewrite_scores

    def reward(
        completions: list, persona: list[str], query: list[str], log_metric=None, **_
    ) -> list[float]:
        texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
        parsed = [parse_output(t) for t in texts]
        ok = [i for i, p in enumerate(parsed) if p is not None]
        # Out of format scores 0; a failed judge call scores None, which TRL leaves out of
        # the group's baseline and gives no advantage (a 0 would read as a bad rewrite).
        rewards: list[float | None] = [0.0] * len(texts)
        prof: list[float] = []
        task: list[float] = []
        if ok:
            prof = profile_scores(client, [persona[i] for i in ok], [parsed[i][0] for i in ok])
            task = rewrite_scores(
                client,
                [persona[i] for i in ok],
                [query[i] for i in ok],
                [parsed[i][1] for i in ok],
                both_orders=False,
            )
            for i, p, t in zip(ok, prof, task, strict=True):
                rewards[i] = combined_reward(p, t, w_profile, w_task)
        if log_metric is not None:
            log_metric("format_ok", len(ok) / max(len(texts), 1))
            log_metric("judge_failed", sum(r is None for r in rewards) / max(len(texts), 1))
            log_metric("profile_score", _mean(prof))
            log_metric("task_score", _mean(task))
        return rewards

    return reward


def _mean(xs: list[float]) -> float:
    xs = [x for x in xs if not math.isnan(x)]
    return sum(xs) / len(xs) if xs else 0.0


def train(a: argparse.Namespace, log: Any = print) -> dict[str, Any]:
    import polars as pl
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer, SFTConfig, SFTTrainer

    from train.models import freeze_as_reference, load_lora_policy, save_stages

    rows = pl.read_parquet(a.data).filter(pl.col("split") == "train").to_dicts()
    if not rows:
        raise ValueError(f"{a.data}: no rows with split == 'train' to train on")
    for i, r in enumerate(rows):
        if not r["completion"]:
            raise ValueError(
                f"{a.data}: row {i} (record {r['record_id']}): field completion is empty"
            )
    sft_rows, rl_rows = split_sft_rl(rows, a.rl_share, a.seed)
    model, tok, cuda = load_lora_policy(a.model, a.lora_r, a.lora_alpha, 0.05, a.seed)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    sft = Dataset.from_list([chat_example(r["prompt"], r["completion"]) for r in sft_rows])
    log(f"PPOpt SFT on {len(sft)} teacher outputs for {a.sft_steps} steps")
    sft_history, sft_s, sft_tokens = fit(
        SFTTrainer,
        SFTConfig(**trainer_args(a, cuda, "sft", a.sft_steps), completion_only_loss=True),
        model,
        tok,
        sft,
    )
    grpo_history: list[dict[str, float]] = []
    grpo_s, completions = 0.0, 0
    out = Path(a.output_dir) / "adapter"
    changed = tensors_changed(before, model)
    stages: list[tuple[str, Any]] = [("sft", model)]
    if a.grpo_steps > 0:
        from synth.llm import client_from_spec

        # GRPO's reference (what its KL term is to) is the SFT policy, not the base model.
        model.save_pretrained(out / "sft")  # before its adapters are merged away
        model = freeze_as_reference(model, model.peft_config["default"])
        stages = [("sft", None), ("grpo", model)]

        client = client_from_spec(a.judge)
        prompts = Dataset.from_list(
            [
                {
                    "prompt": [{"role": "user", "content": r["prompt"]}],
                    "persona": r["persona"],
                    "query": r["query"],
                }
                for r in rl_rows
            ]
        )
        args = trainer_args(a, cuda, "grpo", a.grpo_steps)
        args.pop("max_length")  # GRPO bounds the completion instead
        args["per_device_train_batch_size"] = a.num_generations  # one prompt's group per step
        config = GRPOConfig(
            **args,
            num_generations=a.num_generations,
            max_completion_length=a.max_completion_length,
            beta=a.kl_beta,
            temperature=a.temperature,
        )
        log(f"PPOpt GRPO for {a.grpo_steps} steps, {a.num_generations} completions per prompt")
        t0 = time.perf_counter()
        trainer = GRPOTrainer(
            model=model,
            reward_funcs=[ppopt_reward(client, a.w_profile, a.w_task)],
            args=config,
            train_dataset=prompts,
            processing_class=tok,
        )
        trainer.train()
        grpo_s = time.perf_counter() - t0
        completions = a.grpo_steps * a.num_generations
        keep = ("loss", "reward", "reward_std", "format_ok", "profile_score", "task_score")
        grpo_history = [
            {"step": int(h["step"]), **{k: float(h[k]) for k in keep if k in h}}
            for h in trainer.state.log_history
            if "reward" in h
        ]
    if len(stages) == 1:
        model.save_pretrained(out)
        tok.save_pretrained(out)
    else:
        save_stages(stages, out, tok)
    return {
        "history": {"sft": sft_history, "grpo": grpo_history},
        "final_sft_loss": sft_history[-1]["loss"] if sft_history else math.nan,
        "final_reward": grpo_history[-1]["reward"] if grpo_history else math.nan,
        "train_rows": len(rows),
        "sft_rows": len(sft_rows),
        "rl_rows": len(rl_rows),
        "sft_seconds": round(sft_s, 3),
        "grpo_seconds": round(grpo_s, 3),
        "sft_tokens_per_s": round(sft_tokens / sft_s, 1) if sft_s else 0.0,
        "grpo_completions_per_s": round(completions / grpo_s, 3) if grpo_s else 0.0,
        "trainable_tensors_changed": changed,
        "output_dir": str(out),
        "device": "cuda" if cuda else "cpu",
    }


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description="PPOpt: SFT on teacher outputs, then GRPO.")
    ap.add_argument("--data", required=True, help="Parquet of the personaatlas_ppopt asset")
    ap.add_argument("--output-dir", required=True)
    ap.add_argument("--model", default="", help="local path or hub id; empty = embedded SmolLM2")
    ap.add_argument("--sft-steps", type=int, default=4)
    ap.add_argument("--grpo-steps", type=int, default=2)
    ap.add_argument("--num-generations", type=int, default=2)
    ap.add_argument("--max-completion-length", type=int, default=96)
    ap.add_argument("--temperature", type=float, default=0.7, help="sampling (paper 0.7)")
    ap.add_argument("--kl-beta", type=float, default=0.1, help="GRPO's KL coefficient (paper 0.1)")
    ap.add_argument(
        "--rl-share",
        type=float,
        default=0.5,
        help="share of distinct inputs kept for GRPO, disjoint from SFT's (0 = both use all)",
    )
    ap.add_argument("--w-profile", type=float, default=0.3)
    ap.add_argument("--w-task", type=float, default=0.7)
    ap.add_argument(
        "--judge",
        default='{"role": "judge", "backend": "embedded"}',
        help="the judge role as JSON (LLMResource.subprocess_spec): backend, model, base_url, cache_path, ...",
    )
    add_lora_preference_args(ap)
    ap.set_defaults(max_length=1024)
    return ap


def main(argv: list[str] | None = None) -> dict[str, Any]:
    return run_training(
        argv,
        parser,
        train,
        (
            "final_sft_loss",
            "final_reward",
            "train_rows",
            "sft_rows",
            "rl_rows",
            "sft_tokens_per_s",
            "grpo_completions_per_s",
            "trainable_tensors_changed",
            "device",
        ),
    )


if __name__ == "__main__":
    main()
