"""Rewrites of held-out seeds by the P-Aligner rewriter, before and after training.

    python -m train.paligner_eval --adapter runs/paligner/adapter --seeds heldout.parquet --out rewrites.parquet

Writes one row per (rewriter, instruction): `base` is the network with its LoRA adapters
off, `paligner` with them on. Answering and judging the rewrites is the asset's job.
"""

from __future__ import annotations

import argparse
from typing import Any

from train.reporting import reporter
from train.trace_eval import generate_off_and_on

REWRITERS = ("base", "paligner")


def rewrite(
    adapter: str, instructions: list[str], base_model: str = "", max_new_tokens: int = 128
) -> list[dict[str, Any]]:
    from synth.ultraprompt.dataset import rewriter_prompt

    prompts = [rewriter_prompt(i) for i in instructions]
    outs = generate_off_and_on(adapter, prompts, REWRITERS, base_model, max_new_tokens)
    return [
        {"rewriter": name, "instruction": i, "rewrite": o}
        for name in REWRITERS
        for i, o in zip(instructions, outs[name], strict=True)
    ]


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    import polars as pl

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--adapter", required=True)
    ap.add_argument("--seeds", required=True, help="Parquet with an instruction column")
    ap.add_argument("--out", required=True, help="Parquet of rewrites")
    ap.add_argument("--model", default="")
    ap.add_argument("--max-new-tokens", type=int, default=128)
    a = ap.parse_args(argv)
    instructions = pl.read_parquet(a.seeds)["instruction"].to_list()
    with reporter() as report:
        rows = rewrite(a.adapter, instructions, a.model, a.max_new_tokens)
        pl.DataFrame(
            rows, schema={"rewriter": pl.Utf8, "instruction": pl.Utf8, "rewrite": pl.Utf8}
        ).write_parquet(a.out)
        empty = sum(not r["rewrite"] for r in rows)
        report.result({"rewrites": len(rows), "empty_rewrites": empty})
    return rows


if __name__ == "__main__":
    main()
