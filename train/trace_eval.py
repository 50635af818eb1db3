"""Generations and a retention probe for TRACE evaluation, for the reference model and the
re-aligned one (same network, LoRA adapters off and on).

    python -m train.trace_eval --adapter runs/x/adapter --prompts p.jsonl --general g.parquet --out eval.parquet

Writes one row per (model, prompt) with the generated response, and the mean per-token
negative log-likelihood of reference answers on a held-out general set (retention: a
capability drop shows as a higher NLL). Judging the generations is the asset's job.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

import torch

from train.reporting import reporter
from train.trace import collate, encode, token_logps

MODELS = ("reference", "realigned")


def generate(
    model: Any, tok: Any, prompts: list[str], max_new_tokens: int, batch_size: int = 8
) -> list[str]:
    tok.padding_side = "left"
    out: list[str] = []
    for i in range(0, len(prompts), batch_size):
        texts = [
            tok.apply_chat_template(
                [{"role": "user", "content": p}], add_generation_prompt=True, tokenize=False
            )
            for p in prompts[i : i + batch_size]
        ]
        enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)
        with torch.no_grad():
            ids = model.generate(
                **enc,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                repetition_penalty=1.1,
                pad_token_id=tok.pad_token_id,
            )
        out += tok.batch_decode(ids[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)
    return [o.strip() for o in out]


def generate_off_and_on(
    adapter: str,
    prompts: list[str],
    names: tuple[str, str],
    base_model: str = "",
    max_new_tokens: int = 128,
) -> dict[str, list[str]]:
    """Greedy generations for every prompt from the base (adapters off) and the trained
    network (adapters on), keyed by the two names given."""
    import contextlib

    from peft import PeftModel

    from train.models import load_causal_lm

    base, tok = load_causal_lm(base_model)
    model = PeftModel.from_pretrained(base, adapter)
    model.eval()
    out = {}
    for name, off in zip(names, (True, False), strict=True):
        with model.disable_adapter() if off else contextlib.nullcontext():
            out[name] = generate(model, tok, prompts, max_new_tokens)
    return out


def mean_nll(model: Any, tok: Any, pairs: list[tuple[str, str]], max_length: int = 256) -> float:
    total, count = 0.0, 0
    for i in range(0, len(pairs), 8):
        batch = collate(
            [encode(tok, p, a, max_length) for p, a in pairs[i : i + 8]], tok.pad_token_id
        )
        with torch.no_grad():
            logits = model(
                input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
            ).logits
        lp, mask = token_logps(logits, batch["labels"])
        total += float(-lp.sum())
        count += int(mask.sum())
    return total / max(count, 1)


def evaluate(
    adapter: str,
    prompts: list[dict[str, str]],
    general: list[tuple[str, str]],
    base_model: str = "",
    max_new_tokens: int = 64,
) -> dict[str, Any]:
    from peft import PeftModel

    from train.models import load_causal_lm

    base, tok = load_causal_lm(base_model)
    model = PeftModel.from_pretrained(base, adapter)
    model.eval()
    rows, nll = [], {}
    texts = [p["prompt"] for p in prompts]
    for name in MODELS:
        if name == "reference":
            with model.disable_adapter():
                gens, nll[name] = (
                    generate(model, tok, texts, max_new_tokens),
                    mean_nll(model, tok, general),
                )
        else:
            gens, nll[name] = (
                generate(model, tok, texts, max_new_tokens),
                mean_nll(model, tok, general),
            )
        rows += [
            {"model": name, "prompt": p["prompt"], "kind": p["kind"], "response": g}
            for p, g in zip(prompts, gens, strict=True)
        ]
    return {"generations": rows, "retention_nll": nll}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    import polars as pl

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--adapter", required=True)
    ap.add_argument("--prompts", required=True, help="JSON lines with prompt and kind")
    ap.add_argument(
        "--general", required=True, help="Parquet with instruction and reference_output"
    )
    ap.add_argument("--out", required=True, help="Parquet of generations")
    ap.add_argument("--model", default="")
    ap.add_argument("--max-new-tokens", type=int, default=64)
    a = ap.parse_args(argv)
    with open(a.prompts, encoding="utf-8") as f:
        prompts = [json.loads(line) for line in f if line.strip()]
    general = [
        (r["instruction"], r["reference_output"])
        for r in pl.read_parquet(a.general).to_dicts()
        if r["reference_output"]
    ]
    result = evaluate(a.adapter, prompts, general, a.model, a.max_new_tokens)
    pl.DataFrame(result["generations"]).write_parquet(a.out)
    with reporter() as report:
        report.result({f"retention_nll_{k}": v for k, v in result["retention_nll"].items()})
    return result


if __name__ == "__main__":
    main()
