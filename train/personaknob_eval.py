"""Responses of the base and the PersonaKnob-trained model to held-out scenario prompts.

    python -m train.personaknob_eval --adapter runs/personaknob/adapter --prompts heldout.parquet --out responses.parquet

Writes one row per (model, scenario): `base` is the network with its LoRA adapters off,
`trained` with them on. Rating the responses and fitting the Rasch model is the asset's job.
"""

from __future__ import annotations

import argparse
from typing import Any

from train.reporting import reporter
from train.trace_eval import generate_off_and_on

MODELS = ("base", "trained")


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    import polars as pl

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--adapter", required=True)
    ap.add_argument("--prompts", required=True, help="Parquet with record_id and prompt")
    ap.add_argument("--out", required=True, help="Parquet of responses")
    ap.add_argument("--model", default="")
    ap.add_argument("--max-new-tokens", type=int, default=128)
    a = ap.parse_args(argv)
    scenarios = pl.read_parquet(a.prompts).select("record_id", "prompt").to_dicts()
    with reporter() as report:
        outs = generate_off_and_on(
            a.adapter, [s["prompt"] for s in scenarios], MODELS, a.model, a.max_new_tokens
        )
        rows = [
            {"model": m, "scenario_id": s["record_id"], "response": o}
            for m in MODELS
            for s, o in zip(scenarios, outs[m], strict=True)
        ]
        pl.DataFrame(
            rows, schema={"model": pl.Utf8, "scenario_id": pl.Utf8, "response": pl.Utf8}
        ).write_parquet(a.out)
        report.result({"responses": len(rows), "empty": sum(not r["response"] for r in rows)})
    return rows


if __name__ == "__main__":
    main()
