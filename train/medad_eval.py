"""MedAD evaluation: the trained vision-language model answers the evaluation items
(in-distribution test cases, the held-out center, the real-anomaly slice) greedily, and
every answer is scored with the same verifiable rewards used in training."""

from __future__ import annotations

import argparse
import time
from typing import Any

import polars as pl

from synth.medad.vqa import parse_completion
from train.medad import load_items, load_trained
from train.medad_rewards import rewards
from train.reporting import reporter

EVAL_SPLITS = ("test", "heldout_center", "real_anomaly")


def evaluate(a: argparse.Namespace, log) -> dict[str, Any]:
    rows = load_items(a.items, a.cases, EVAL_SPLITS)
    if a.limit_per_split:
        per: dict[str, int] = {}
        kept = []
        for r in rows:
            if per.get(r["split"], 0) < a.limit_per_split:
                per[r["split"]] = per.get(r["split"], 0) + 1
                kept.append(r)
        rows = kept
    if not rows:
        raise ValueError(f"{a.items}: no items in the evaluation splits {EVAL_SPLITS}")
    vlm = load_trained(a.model_dir)
    vlm.lm.eval()
    out, t0 = [], time.perf_counter()
    for i in range(0, len(rows), a.batch_size):
        batch = rows[i : i + a.batch_size]
        gen = vlm.generate(
            [r["image_png"] for r in batch],
            [r["prompt"] for r in batch],
            a.max_new_tokens,
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
    ap.add_argument("--max-new-tokens", type=int, default=96)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--limit-per-split", type=int, default=0, help="0 = every item")
    return ap


def main(argv: list[str] | None = None) -> dict[str, Any]:
    a = parser().parse_args(argv)
    with reporter() as report:
        result = evaluate(a, report.log)
        report.result({"items": result["items"], "seconds": result["seconds"]})
    return result


if __name__ == "__main__":
    main()
