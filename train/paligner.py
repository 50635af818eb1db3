"""P-Aligner: train an instruction rewriter on UltraPrompt (arXiv 2508.04626).

    python -m train.paligner --sft sft.parquet --output-dir runs/paligner [--dpo dpo.parquet]
        [--model PATH] [--max-steps 4] [--dpo-steps 2]

SFT (TRL SFTTrainer, LoRA) on prompt -> completion, where the prompt asks to rewrite the
original request and the completion is the best rewrite of its search tree; then, when a
DPO table is given and --dpo-steps > 0, DPO (TRL DPOTrainer) on best over worst rewrite.
DPO starts from the SFT model and uses it as its reference: the SFT adapters are merged
into the weights and DPO trains fresh adapters on top (saved as two stages). The CPU
default is a few steps of the embedded SmolLM2-135M; on a GPU the same entry point runs
in bf16 with whatever --model and step counts you give it.
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path
from typing import Any

import torch

from train.reporting import run_training


def trainer_args(a: argparse.Namespace, cuda: bool, stage: str, max_steps: int) -> dict[str, Any]:
    return {
        "output_dir": str(Path(a.output_dir) / stage),
        "max_steps": max_steps,
        "per_device_train_batch_size": a.batch_size,
        "learning_rate": a.learning_rate,
        "logging_steps": 1,
        "save_strategy": "no",
        "report_to": [],
        "use_cpu": not cuda,
        "bf16": cuda,
        "gradient_checkpointing": False,
        "disable_tqdm": True,
        "seed": a.seed,
        "max_length": a.max_length,
    }


def chat_example(prompt: str, completion: str) -> dict[str, list[dict[str, str]]]:
    return {
        "prompt": [{"role": "user", "content": prompt}],
        "completion": [{"role": "assistant", "content": completion}],
    }


def fit(trainer_cls: Any, args: Any, model: Any, tok: Any, ds: Any) -> tuple[list, float, int]:
    """Train with one TRL trainer; (loss per logged step, seconds, tokens TRL counted)."""
    t0 = time.perf_counter()
    trainer = trainer_cls(model=model, args=args, train_dataset=ds, processing_class=tok)
    trainer.train()
    losses = [
        {"step": int(h["step"]), "loss": float(h["loss"])}
        for h in trainer.state.log_history
        if "loss" in h
    ]
    tokens = max(
        (int(float(h["num_tokens"])) for h in trainer.state.log_history if "num_tokens" in h),
        default=0,
    )
    return losses, time.perf_counter() - t0, tokens


def tensors_changed(before: dict[str, Any], model: Any) -> int:
    """How many of the trainable tensors recorded in `before` differ now."""
    return sum(
        not torch.equal(before[n], p.detach()) for n, p in model.named_parameters() if n in before
    )


def train(a: argparse.Namespace, log: Any = print) -> dict[str, Any]:
    import polars as pl
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer, SFTConfig, SFTTrainer

    from train.models import freeze_as_reference, load_lora_policy, save_stages

    model, tok, cuda = load_lora_policy(a.model, a.lora_r, a.lora_alpha, 0.05, a.seed)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    sft_rows = pl.read_parquet(a.sft).select("prompt", "completion").to_dicts()
    sft = Dataset.from_list([chat_example(r["prompt"], r["completion"]) for r in sft_rows])
    log(f"P-Aligner SFT on {len(sft)} rewrites for {a.max_steps} steps")
    sft_losses, sft_s, sft_tokens = fit(
        SFTTrainer,
        SFTConfig(**trainer_args(a, cuda, "sft", a.max_steps), completion_only_loss=True),
        model,
        tok,
        sft,
    )
    history = {"sft": sft_losses, "dpo": []}
    dpo_pairs, dpo_s = 0, 0.0
    stages: list[tuple[str, Any]] = [("sft", model)]
    out = Path(a.output_dir) / "adapter"
    if a.dpo and a.dpo_steps > 0:
        rows = pl.read_parquet(a.dpo).select("prompt", "chosen", "rejected").to_dicts()
        dpo_pairs = len(rows)
        if rows:
            model.save_pretrained(out / "sft")  # before its adapters are merged away
            changed = tensors_changed(before, model)
            model = freeze_as_reference(model, model.peft_config["default"])
            stages = [("sft", None), ("dpo", model)]
            ds = Dataset.from_list(
                [
                    {
                        "prompt": [{"role": "user", "content": r["prompt"]}],
                        "chosen": [{"role": "assistant", "content": r["chosen"]}],
                        "rejected": [{"role": "assistant", "content": r["rejected"]}],
                    }
                    for r in rows
                ]
            )
            log(f"P-Aligner DPO on {len(ds)} pairs for {a.dpo_steps} steps")
            history["dpo"], dpo_s, _ = fit(
                DPOTrainer,
                DPOConfig(**trainer_args(a, cuda, "dpo", a.dpo_steps), beta=a.beta),
                model,
                tok,
                ds,
            )
    if len(stages) == 1:
        changed = tensors_changed(before, model)
        model.save_pretrained(out)
        tok.save_pretrained(out)
    else:
        save_stages(stages, out, tok)
    last = (history["dpo"] or history["sft"] or [{"loss": math.nan}])[-1]["loss"]
    return {
        "history": history,
        "final_loss": last,
        "sft_rows": len(sft),
        "dpo_pairs": dpo_pairs,
        "sft_seconds": round(sft_s, 3),
        "dpo_seconds": round(dpo_s, 3),
        "sft_tokens_per_s": round(sft_tokens / sft_s, 1) if sft_s else 0.0,
        "trainable_tensors_changed": changed,
        "trainable_tensors": len(before),
        "output_dir": str(out),
        "device": "cuda" if cuda else "cpu",
    }


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description="P-Aligner rewriter: SFT, then optional DPO.")
    ap.add_argument("--sft", required=True, help="Parquet with prompt, completion")
    ap.add_argument("--dpo", default="", help="Parquet with prompt, chosen, rejected")
    ap.add_argument("--output-dir", required=True)
    ap.add_argument("--model", default="", help="local path or hub id; empty = embedded SmolLM2")
    ap.add_argument("--max-steps", type=int, default=4)
    ap.add_argument("--dpo-steps", type=int, default=2)
    add_lora_preference_args(ap)
    return ap


def add_lora_preference_args(ap: argparse.ArgumentParser) -> None:
    """Flags every LoRA preference-training entry point shares."""
    ap.add_argument("--batch-size", type=int, default=2)
    ap.add_argument("--learning-rate", type=float, default=2e-4)
    ap.add_argument("--beta", type=float, default=0.1)
    ap.add_argument("--lora-r", type=int, default=16)
    ap.add_argument("--lora-alpha", type=int, default=32)
    ap.add_argument("--max-length", type=int, default=384)
    ap.add_argument("--seed", type=int, default=0)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    return run_training(
        argv,
        parser,
        train,
        (
            "final_loss",
            "trainable_tensors_changed",
            "sft_rows",
            "dpo_pairs",
            "sft_tokens_per_s",
            "device",
        ),
    )


if __name__ == "__main__":
    main()
