"""Tolerant constrained multi-objective DPO for PersonaKnob ("Dual Optimal", arXiv 2604.00979).

    python -m train.personaknob --pairs pairs.parquet --output-dir runs/personaknob
        [--model PATH] [--max-steps 4] [--epsilon 0.5] [--tolerances A=0.3,C=0.5] [--dual-lr 1.0]
        [--plain-dpo-steps 4]

Each pair carries the dimensions it teaches (A/T/E/C). The paper's text is not available;
what is known is a Lagrangian multi-objective DPO that balances the four dimensions with
one tolerance (0.5) for all. Our reading:

    minimise    L(theta)                                   DPO loss over every pair
    subject to  L_d(theta) - min_d' L_d'(theta) <= eps_d   for each dimension d

where L_d is the DPO loss on the pairs that teach d. No dimension may fall behind the best
learnt one by more than its tolerance, which plain DPO breaks whenever the dimensions pull
apart (a minority dimension whose pairs disagree with the rest is traded away). A gradient
step is taken on L + sum_d lambda_d L_d (the min is the constraint's level, held fixed in
the step), then projected dual ascent on the multipliers,
lambda_d <- max(0, lambda_d + dual_lr * (L_d - min L - eps_d)): a violated constraint raises
its multiplier, a satisfied one lowers it to 0. A dimension not in a batch keeps its
multiplier. `--dual-lr 0` is plain DPO on the same pairs; `--plain-dpo-steps N` trains that
baseline too, beside the constrained policy, for the evaluation to compare. Every step
logs each dimension's loss, reward margin, violation and multiplier.

Built on TRL's DPOTrainer: its loss on a subset of the batch is the per-dimension loss,
so a step costs one forward over the batch plus one over each distinct set of rows that
teaches a dimension (dimensions taught by the same rows, or by every row, share one).
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path
from typing import Any

import torch

from synth.personaknob.spec import DIMENSIONS
from train.paligner import add_lora_preference_args, tensors_changed, trainer_args
from train.reporting import run_training


def violations(losses: dict[str, float], tolerances: dict[str, float]) -> dict[str, float]:
    """g_d = L_d - min over the batch's dimensions of L - eps_d; > 0 is a violation."""
    if not losses:
        return {}
    best = min(losses.values())
    return {d: ld - best - tolerances[d] for d, ld in losses.items()}


def dual_ascent(
    multipliers: dict[str, float], violation: dict[str, float], lr: float
) -> dict[str, float]:
    """Projected dual ascent: lambda_d <- max(0, lambda_d + lr * g_d) for the dimensions
    measured this step; the others keep theirs."""
    return {
        d: max(0.0, lam + lr * violation[d]) if d in violation else lam
        for d, lam in multipliers.items()
    }


def parse_tolerances(text: str, epsilon: float) -> dict[str, float]:
    """'A=0.3,C=0.8' over the default epsilon for every dimension."""
    out = dict.fromkeys(DIMENSIONS, epsilon)
    for part in filter(None, (p.strip() for p in text.split(","))):
        d, sep, value = part.partition("=")
        if not sep or d.strip() not in DIMENSIONS:
            raise ValueError(f"--tolerances: {part!r} is not DIM=VALUE with DIM in {DIMENSIONS}")
        out[d.strip()] = float(value)
    return out


def constrained_dpo_trainer(base: type) -> type:
    """A DPOTrainer subclass with per-dimension constraints (TRL imported lazily)."""

    class ConstrainedDPOTrainer(base):
        def __init__(
            self, *a: Any, tolerances: dict[str, float], dual_lr: float, **kw: Any
        ) -> None:
            super().__init__(*a, **kw)
            self.tolerances, self.dual_lr = tolerances, dual_lr
            self.multipliers = dict.fromkeys(DIMENSIONS, 0.0)
            self.dual_history: list[dict[str, Any]] = []
            collate = self.data_collator

            def with_dims(examples: list[dict[str, Any]]) -> dict[str, Any]:
                batch = collate(examples)
                batch["dim_mask"] = torch.tensor([e["dim_mask"] for e in examples])
                return batch

            self.data_collator = with_dims

        def _set_signature_columns_if_needed(self) -> None:
            super()._set_signature_columns_if_needed()
            if "dim_mask" not in self._signature_columns:
                self._signature_columns.append("dim_mask")

        @staticmethod
        def _rows(inputs: dict[str, Any], rows: torch.Tensor, n: int) -> dict[str, Any]:
            # The batch holds chosen rows then rejected rows (2n); reference log-probs hold n.
            both = torch.cat([rows, rows + n])
            out = {}
            for k, v in inputs.items():
                if torch.is_tensor(v) and v.dim() and v.shape[0] == 2 * n:
                    out[k] = v[both.to(v.device)]
                elif torch.is_tensor(v) and v.dim() and v.shape[0] == n:
                    out[k] = v[rows.to(v.device)]
                else:
                    out[k] = v
            return out

        def _loss_and_margin(self, model, inputs) -> tuple[torch.Tensor, float]:
            loss = super().compute_loss(model, inputs, return_outputs=False)
            mode = "train" if model.training else "eval"
            return loss, self._metrics[mode]["rewards/margins"][-1]

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            dim_mask = inputs.pop("dim_mask")
            n = dim_mask.shape[0]
            primary, primary_margin = self._loss_and_margin(model, inputs)
            counted = self._total_train_tokens
            loss, losses, margins = primary, {}, {}
            # Dimensions taught by the same rows share one forward pass (all rows: the primary's).
            by_rows = {tuple(range(n)): (primary, primary_margin)}
            for k, d in enumerate(DIMENSIONS):
                rows = torch.nonzero(dim_mask[:, k] > 0).flatten()
                if not len(rows):
                    continue
                key = tuple(rows.tolist())
                if key not in by_rows:
                    by_rows[key] = self._loss_and_margin(model, self._rows(inputs, rows, n))
                losses[d], margins[d] = by_rows[key]
                loss = loss + self.multipliers[d] * losses[d]
            # TRL counts tokens on every forward: count the batch once.
            self._total_train_tokens = counted
            if model.training:
                measured = {d: float(v.detach()) for d, v in losses.items()}
                violation = violations(measured, self.tolerances)
                self.multipliers = dual_ascent(self.multipliers, violation, self.dual_lr)
                metrics = self._metrics["train"]
                metrics["primary_loss"].append(float(primary.detach()))
                for d in DIMENSIONS:
                    metrics[f"lambda_{d}"].append(self.multipliers[d])
                    if d in losses:
                        metrics[f"loss_{d}"].append(measured[d])
                        metrics[f"margin_{d}"].append(margins[d])
                self.dual_history.append(
                    {
                        "step": len(self.dual_history) + 1,
                        "primary": float(primary.detach()),
                        "losses": measured,
                        "margins": margins,
                        "violations": violation,
                        "multipliers": dict(self.multipliers),
                    }
                )
            return loss

    return ConstrainedDPOTrainer


def _pairs_dataset(path: str) -> Any:
    import polars as pl
    from datasets import Dataset

    rows = pl.read_parquet(path).select("prompt", "chosen", "rejected", "dims").to_dicts()
    if not rows:
        raise ValueError(f"{path}: no preference pairs to train on")
    for i, r in enumerate(rows):
        if bad := [d for d in r["dims"] if d not in DIMENSIONS]:
            raise ValueError(f"{path}: row {i} field dims has unknown dimension(s) {bad}")
    return Dataset.from_list(
        [
            {
                "prompt": [{"role": "user", "content": r["prompt"]}],
                "chosen": [{"role": "assistant", "content": r["chosen"]}],
                "rejected": [{"role": "assistant", "content": r["rejected"]}],
                "dim_mask": [float(d in r["dims"]) for d in DIMENSIONS],
            }
            for r in rows
        ]
    )


def _fit(
    a: argparse.Namespace, ds: Any, tolerances: dict[str, float], dual_lr: float, steps: int
) -> tuple[Any, Any, Any, int, int, float]:
    """(trainer, model, tokenizer, tensors changed, trainable tensors, seconds) of one
    run from the base model: dual ascent at `dual_lr` (0 = plain DPO)."""
    import time

    from trl import DPOConfig, DPOTrainer

    from train.models import load_lora_policy

    model, tok, cuda = load_lora_policy(a.model, a.lora_r, a.lora_alpha, 0.0, a.seed)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    args = DPOConfig(**trainer_args(a, cuda, "dpo", steps), beta=a.beta)
    trainer = constrained_dpo_trainer(DPOTrainer)(
        model=model,
        args=args,
        train_dataset=ds,
        processing_class=tok,
        tolerances=tolerances,
        dual_lr=dual_lr,
    )
    t0 = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - t0
    return trainer, model, tok, tensors_changed(before, model), len(before), seconds


def train(a: argparse.Namespace, log: Any = print) -> dict[str, Any]:
    """The constrained policy into OUTPUT_DIR/adapter and, when `plain_dpo_steps` > 0, the
    plain-DPO baseline on the same pairs into OUTPUT_DIR/plain_dpo (the paper's
    comparison: what the constraints keep that plain DPO trades away)."""
    from train.models import training_device

    ds = _pairs_dataset(a.pairs)
    tolerances = parse_tolerances(a.tolerances, a.epsilon)
    log(
        f"constrained DPO on {len(ds)} pairs for {a.max_steps} steps "
        f"(tolerances {tolerances}, dual lr {a.dual_lr})"
    )
    trainer, model, tok, changed, trainable, seconds = _fit(
        a, ds, tolerances, a.dual_lr, a.max_steps
    )
    history, multipliers = trainer.dual_history, dict(trainer.multipliers)
    out = Path(a.output_dir) / "adapter"
    model.save_pretrained(out)
    tok.save_pretrained(out)
    baseline: dict[str, Any] = {}
    if a.plain_dpo_steps > 0:
        log(f"plain DPO baseline on the same pairs for {a.plain_dpo_steps} steps")
        del trainer, model
        plain, plain_model, plain_tok, plain_changed, _, plain_s = _fit(
            a, ds, tolerances, 0.0, a.plain_dpo_steps
        )
        plain_out = Path(a.output_dir) / "plain_dpo"
        plain_model.save_pretrained(plain_out)
        plain_tok.save_pretrained(plain_out)
        plain_history = plain.dual_history
        baseline = {
            "history": plain_history,
            "output_dir": str(plain_out),
            "final_loss": plain_history[-1]["primary"] if plain_history else math.nan,
            # Its margins per dimension at the last step, beside the constrained ones'.
            "final_margins": plain_history[-1]["margins"] if plain_history else {},
            "trainable_tensors_changed": plain_changed,
            "seconds": round(plain_s, 3),
        }
    return {
        "history": history,
        "final_loss": history[-1]["primary"] if history else math.nan,
        "multipliers": multipliers,
        "tolerances": tolerances,
        "pairs": len(ds),
        "pairs_per_dimension": {
            d: int(sum(r[k] for r in ds["dim_mask"])) for k, d in enumerate(DIMENSIONS)
        },
        "seconds": round(seconds, 3),
        "trainable_tensors_changed": changed,
        "trainable_tensors": trainable,
        "output_dir": str(out),
        "plain_dpo": baseline,
        "device": training_device(),
    }


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        description="PersonaKnob tolerant constrained multi-objective DPO."
    )
    ap.add_argument("--pairs", required=True, help="Parquet with prompt, chosen, rejected, dims")
    ap.add_argument("--output-dir", required=True)
    ap.add_argument("--model", default="", help="local path or hub id; empty = embedded SmolLM2")
    ap.add_argument("--max-steps", type=int, default=4)
    ap.add_argument("--epsilon", type=float, default=0.5, help="tolerance (paper 0.5)")
    ap.add_argument(
        "--tolerances", default="", help="per-dimension tolerances over --epsilon, e.g. A=0.3,C=1"
    )
    ap.add_argument(
        "--dual-lr", type=float, default=1.0, help="step of the dual ascent; 0 = plain DPO"
    )
    ap.add_argument(
        "--plain-dpo-steps",
        type=int,
        default=0,
        help="also train a plain-DPO baseline on the same pairs for this many steps (0 = none)",
    )
    add_lora_preference_args(ap)
    return ap


def main(argv: list[str] | None = None) -> dict[str, Any]:
    return run_training(
        argv,
        parser,
        train,
        ("final_loss", "trainable_tensors_changed", "pairs", "device"),
        ("multipliers", "tolerances", "pairs_per_dimension", "plain_dpo"),
    )


if __name__ == "__main__":
    main()
