"""MedAD evaluation: the trained vision-language model answers the evaluation items
(in-distribution test cases, the held-out center, the real-anomaly slice) greedily, and
every answer is scored with the same verifiable rewards used in training.

Items are sampled per (split, question type), seeded, so every type is asked in every
split. Each prediction row carries what three baselines would have scored on that item:
chance (1 / options), majority (the option most often right among the training items of
that type) and always-yes (presence items only), so a trained model is read against them.
"""

from __future__ import annotations

import argparse
import time
from collections import Counter
from typing import Any

import numpy as np
import polars as pl

from synth.medad.vqa import parse_completion
from train.medad import completion_budget, load_items, load_trained
from train.medad_rewards import rewards
from train.reporting import reporter

EVAL_SPLITS = ("test", "heldout_center", "real_anomaly")


def sample_per_type(rows: list[dict], limit: int, seed: int) -> list[dict]:
    """Up to `limit` items of each (split, question type), seeded; 0 = every item."""
    if not limit:
        return rows
    cells: dict[tuple[str, str], list[dict]] = {}
    for r in rows:
        cells.setdefault((r["split"], r["question_type"]), []).append(r)
    rng = np.random.default_rng([seed, 4099])
    out = []
    for key in sorted(cells):
        cell = cells[key]
        out += [cell[i] for i in sorted(rng.permutation(len(cell))[:limit])]
    return out


def majority_answers(train: pl.DataFrame) -> dict[str, Counter]:
    """How often each answer text is right among the training items, per question type."""
    out: dict[str, Counter] = {}
    for q, text in zip(
        train["question_type"].to_list(), train["answer_text"].to_list(), strict=True
    ):
        out.setdefault(q, Counter())[text] += 1
    return out


def baseline_scores(item: dict[str, Any], majority: dict[str, Counter]) -> dict[str, Any]:
    """What each baseline scores on one item: chance, majority (among the item's options,
    the one most often right in training, ties to the first listed), always-yes (None
    unless a presence item)."""
    seen = majority.get(item["question_type"], Counter())
    pick = max(item["options"], key=lambda o: (seen[o], -item["options"].index(o)))
    return {
        "chance": 1.0 / len(item["options"]),
        "majority_correct": pick == item["answer_text"],
        "always_yes_correct": (item["answer_text"] == "yes")
        if item["question_type"] == "presence"
        else None,
    }


def evaluate(a: argparse.Namespace, log) -> dict[str, Any]:
    rows = sample_per_type(load_items(a.items, a.cases, EVAL_SPLITS), a.limit_per_type, a.seed)
    if not rows:
        raise ValueError(f"{a.items}: no items in the evaluation splits {EVAL_SPLITS}")
    train_items = pl.read_parquet(a.items).filter(pl.col("split") == "train")
    majority = majority_answers(train_items)
    vlm = load_trained(a.model_dir)
    vlm.lm.eval()
    max_new = a.max_new_tokens or completion_budget(
        vlm.tok, [r["completion"] for r in rows] + train_items["completion"].to_list()
    )
    out, t0 = [], time.perf_counter()
    for i in range(0, len(rows), a.batch_size):
        batch = rows[i : i + a.batch_size]
        gen = vlm.generate(
            [r["image_png"] for r in batch],
            [r["prompt"] for r in batch],
            max_new,
            1.0,
            sample=False,
        )
        for r, g in zip(batch, gen, strict=True):
            text = vlm.tok.decode(g, skip_special_tokens=True)
            parsed = parse_completion(text)
            parts = rewards(text, r)
            out.append(
                {
                    "item_id": r["record_id"],
                    "case_id": r["case_id"],
                    "split": r["split"],
                    "center": r["center"],
                    "modality": r["modality"],
                    "question_type": r["question_type"],
                    "options": len(r["options"]),
                    "answer": r["answer"],
                    "predicted": parsed[1] if parsed else "",
                    "format_ok": parts["format"] == 1.0,
                    "correct": parts["accuracy"] == 1.0,
                    "consistency": parts["consistency"],
                    **baseline_scores(r, majority),
                    "generation": text,
                }
            )
        log(f"medad eval: {min(i + a.batch_size, len(rows))}/{len(rows)} items")
    seconds = time.perf_counter() - t0
    table = pl.DataFrame(out)
    table.write_parquet(a.out)
    return {"items": table.height, "seconds": round(seconds, 2), "out": a.out}


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description="Answer MedAD evaluation items with a trained model.")
    ap.add_argument("--model-dir", required=True, help="the output dir of train.medad")
    ap.add_argument("--items", required=True)
    ap.add_argument("--cases", required=True)
    ap.add_argument("--out", required=True, help="Parquet of per-item predictions")
    ap.add_argument(
        "--max-new-tokens", type=int, default=0, help="0 = the longest target plus 8 tokens"
    )
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument(
        "--limit-per-type",
        type=int,
        default=0,
        help="items per (split, question type), seeded; 0 = every item",
    )
    ap.add_argument("--seed", type=int, default=0)
    return ap


def main(argv: list[str] | None = None) -> dict[str, Any]:
    a = parser().parse_args(argv)
    with reporter() as report:
        result = evaluate(a, report.log)
        report.result({"items": result["items"], "seconds": result["seconds"]})
    return result


if __name__ == "__main__":
    main()
