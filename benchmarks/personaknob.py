"""PersonaKnob: the cost of the per-dimension constraints in DPO, and the Rasch fit.

    python -m benchmarks.personaknob [--steps 3] [--pairs 12] [--items 100 200 400]

1. Constrained DPO against TRL's plain DPOTrainer, same pairs, same LoRA set-up, same
   steps, in the same process: seconds per step and the ratio. The constrained trainer
   adds one forward pass per dimension present in a batch (here every pair teaches one
   or two of A, T, E), so the ratio says what the constraints cost.
2. The many-facet Rasch fit on simulated ratings (2 models x 4 dimensions x 2 criteria x
   3 judges x N items), against a plain logistic regression (torch LBFGS, no facets, no
   Hessian) on the same ratings: seconds and the ratio.
"""

import argparse
import math
import tempfile
import time
from pathlib import Path

import polars as pl
import torch

from quality.rasch import fit_rasch, simulate_ratings
from synth.personaknob.spec import DIMENSIONS
from train.paligner import add_lora_preference_args, trainer_args
from train.personaknob import _pairs_dataset, constrained_dpo_trainer

PAIRS = [
    (
        "The Moon is made of cheese, isn't it?",
        "No: it is rock and dust.",
        "Yes, cheese!",
        ["A", "T"],
    ),
    (
        "My cake collapsed and I feel useless.",
        "That is discouraging; try a cooler oven.",
        "Bake better.",
        ["E"],
    ),
    (
        "Vaccines contain microchips, right?",
        "No, they do not; here is what they contain.",
        "Right, they do.",
        ["A", "T"],
    ),
]


def _dpo_seconds(trainer_cls, a, path: str, out: str, **extra) -> float:
    from trl import DPOConfig

    from train.models import load_lora_policy

    model, tok, _ = load_lora_policy("", 16, 32, 0.0, 0)
    ds = _pairs_dataset(path)
    if not extra:
        ds = ds.remove_columns("dim_mask")
    a.output_dir = out
    trainer = trainer_cls(
        model=model,
        args=DPOConfig(**trainer_args(a, False, "dpo", a.steps), beta=0.1),
        train_dataset=ds,
        processing_class=tok,
        **extra,
    )
    trainer.train()  # the first step pays for warm-up in both runs alike
    t0 = time.perf_counter()
    trainer.train()
    return (time.perf_counter() - t0) / a.steps


def _logistic_seconds(ratings: pl.DataFrame) -> float:
    x = torch.tensor(
        ratings.to_dummies(["model", "dimension", "judge"])
        .drop("criterion", "item", "rating")
        .to_numpy(),
        dtype=torch.float64,
    )
    y = torch.tensor(ratings["rating"].to_numpy(), dtype=torch.float64)
    w = torch.zeros(x.shape[1], dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w], max_iter=200, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(x @ w, y, reduction="sum")
        loss.backward()
        return loss

    t0 = time.perf_counter()
    opt.step(closure)
    return time.perf_counter() - t0


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--pairs", type=int, default=12)
    ap.add_argument("--items", type=int, nargs="+", default=[100, 200, 400])
    add_lora_preference_args(ap)
    a = ap.parse_args(argv)
    a.max_length = min(a.max_length, 128)
    from trl import DPOTrainer

    with tempfile.TemporaryDirectory() as tmp:
        path = str(Path(tmp) / "pairs.parquet")
        rows = [PAIRS[i % len(PAIRS)] for i in range(a.pairs)]
        pl.DataFrame(
            rows, schema=["prompt", "chosen", "rejected", "dims"], orient="row"
        ).write_parquet(path)
        plain = _dpo_seconds(DPOTrainer, a, path, str(Path(tmp) / "plain"))
        constrained = _dpo_seconds(
            constrained_dpo_trainer(DPOTrainer),
            a,
            path,
            str(Path(tmp) / "constrained"),
            tolerances=dict.fromkeys(DIMENSIONS, 0.5),
            dual_lr=1.0,
        )
    print(
        f"\n`python -m benchmarks.personaknob --steps {a.steps} --pairs {a.pairs}` "
        f"(SmolLM2-135M + LoRA, batch {a.batch_size}, CPU, {torch.get_num_threads()} threads)\n"
    )
    print("| trainer | s/step | relative to plain DPO |")
    print("|---|---|---|")
    print(f"| TRL DPOTrainer (baseline) | {plain:.2f} | 1.00x |")
    print(
        f"| constrained DPO (A/T/E constraints) | {constrained:.2f} | {constrained / plain:.2f}x |"
    )
    print("\n| ratings | Rasch fit + Hessian s | logistic baseline s | relative | converged |")
    print("|---|---|---|---|---|")
    for items in a.items:
        ratings, _ = simulate_ratings(models=2, judges=3, items=items, seed=0)
        base = _logistic_seconds(ratings)
        t0 = time.perf_counter()
        fit = fit_rasch(ratings)
        rasch = time.perf_counter() - t0
        ratio = rasch / base if base > 0 else math.inf
        print(f"| {ratings.height:,} | {rasch:.2f} | {base:.2f} | {ratio:.1f}x | {fit.converged} |")


if __name__ == "__main__":
    main()
