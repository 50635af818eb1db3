"""Responses of a base model and its LoRA-trained version to held-out prompts.

    python -m train.adapter_responses --adapter runs/x/adapter --prompts heldout.parquet --out responses.parquet

Writes one row per (model, prompt): `base` is the network with its LoRA adapters off,
`trained` with them on, and `plain_dpo` with `--baseline-adapter` on instead when one is
given. Judging the responses is the evaluating asset's job (PersonaKnob's Rasch ratings,
PersonaAtlas' win rates).
"""

from __future__ import annotations

import argparse
from typing import Any

from train.reporting import reporter
from train.trace_eval import generate_off_and_on

MODELS = ("base", "trained")
BASELINE = "plain_dpo"


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    import polars as pl

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--adapter", required=True)
    ap.add_argument("--prompts", required=True, help="Parquet with prompt_id and prompt")
    ap.add_argument("--out", required=True, help="Parquet of responses")
    ap.add_argument("--model", default="")
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--baseline-adapter", default="", help="a baseline's adapter (plain_dpo)")
    a = ap.parse_args(argv)
    items = pl.read_parquet(a.prompts).select("prompt_id", "prompt").to_dicts()
    prompts = [s["prompt"] for s in items]
    with reporter() as report:
        outs = generate_off_and_on(a.adapter, prompts, MODELS, a.model, a.max_new_tokens)
        if a.baseline_adapter:
            from train.models import apply_adapters, load_causal_lm
            from train.trace_eval import generate

            # A fresh base: PEFT injected the trained adapter's layers into the first one.
            base, tok = load_causal_lm(a.model)
            baseline = apply_adapters(base, a.baseline_adapter).eval()
            outs[BASELINE] = generate(baseline, tok, prompts, a.max_new_tokens)
        rows = [
            {"model": m, "prompt_id": s["prompt_id"], "response": o}
            for m in outs
            for s, o in zip(items, outs[m], strict=True)
        ]
        pl.DataFrame(
            rows, schema={"model": pl.Utf8, "prompt_id": pl.Utf8, "response": pl.Utf8}
        ).write_parquet(a.out)
        report.result({"responses": len(rows), "empty": sum(not r["response"] for r in rows)})
    return rows


if __name__ == "__main__":
    main()
