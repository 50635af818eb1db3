"""TRACE evaluation: generations, preference margins on held-out pairs and a retention
probe, for the reference model, the re-aligned one and the plain-DPO baseline (one
network: LoRA adapters off, the TRACE adapter, the baseline adapter).

    python -m train.trace_eval --adapter runs/x/adapter [--baseline-adapter runs/x/dpo_baseline]
        --prompts p.jsonl --general g.parquet --heldout pairs.parquet --out gens.parquet
        --margins-out margins.parquet

- Generations: greedy answers to the evaluation prompts (judged by the asset's evaluator).
- Margins: per held-out pair, log pi(the response the NEW policy prefers) - log pi(the
  other), summed over response tokens. RETAIN: chosen over rejected; INVERT: rejected
  over chosen. PUNISH pairs have no preferred response: their row carries the mean
  log-probability of the two violating responses instead (it should fall).
- Retention: mean per-token NLL of reference answers on a general set (higher = lost).
Everything runs on the training device, in batches.
"""

from __future__ import annotations

import argparse
import contextlib
import json
from typing import Any

import torch

from train.reporting import reporter
from train.sequences import collate, encode, sequence_logps, token_logps

MODELS = ("reference", "realigned", "dpo_baseline")


def encode_prompts(tok: Any, prompts: list[str], device: Any) -> dict[str, torch.Tensor]:
    """Chat-formatted, left-padded prompts for generation, on `device`."""
    texts = [
        tok.apply_chat_template(
            [{"role": "user", "content": p}], add_generation_prompt=True, tokenize=False
        )
        for p in prompts
    ]
    tok.padding_side = "left"
    try:
        enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    finally:
        tok.padding_side = "right"
    return {k: v.to(device) for k, v in enc.items()}


def generate(
    model: Any, tok: Any, prompts: list[str], max_new_tokens: int, batch_size: int = 8
) -> list[str]:
    """Greedy answers, in batches, on the model's device."""
    out: list[str] = []
    for i in range(0, len(prompts), batch_size):
        enc = encode_prompts(tok, prompts[i : i + batch_size], model.device)
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


def load_adapters(adapters: dict[str, str], base_model: str = "") -> tuple[Any, Any]:
    """The base model with each named adapter loaded (PEFT), on the training device."""
    from peft import PeftModel

    from train.models import load_causal_lm

    base, tok = load_causal_lm(base_model)
    (first, path), *rest = adapters.items()
    model = PeftModel.from_pretrained(base, path, adapter_name=first)
    for name, p in rest:
        model.load_adapter(p, adapter_name=name)
    model.eval()
    return model, tok


@contextlib.contextmanager
def using(model: Any, name: str):
    """Run the network as `name`: `reference` is the base with every adapter off."""
    if name == "reference":
        with model.disable_adapter():
            yield
    else:
        model.set_adapter(name)
        yield


def generate_off_and_on(
    adapter: str,
    prompts: list[str],
    names: tuple[str, str],
    base_model: str = "",
    max_new_tokens: int = 128,
) -> dict[str, list[str]]:
    """Greedy generations for every prompt from the base model and the trained network,
    keyed by the two names given. The base answers first, before any adapter (a staged
    adapter merges its earlier stages into the weights)."""
    from train.models import apply_adapters, load_causal_lm

    base, tok = load_causal_lm(base_model)
    base.eval()
    out = {names[0]: generate(base, tok, prompts, max_new_tokens)}
    model = apply_adapters(base, adapter)
    model.eval()
    out[names[1]] = generate(model, tok, prompts, max_new_tokens)
    return out


def mean_nll(model: Any, tok: Any, pairs: list[tuple[str, str]], max_length: int = 256) -> float:
    total, count = 0.0, 0
    for i in range(0, len(pairs), 8):
        batch = collate(
            [encode(tok, p, a, max_length) for p, a in pairs[i : i + 8]],
            tok.pad_token_id,
            model.device,
        )
        with torch.no_grad():
            logits = model(
                input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
            ).logits
        lp, mask = token_logps(logits, batch["labels"])
        total += float(-lp.sum())
        count += int(mask.sum())
    return total / max(count, 1)


def response_logps(
    model: Any, tok: Any, items: list[tuple[str, str]], max_length: int = 256
) -> list[float]:
    """log pi(response | prompt), summed over the response tokens, per (prompt, response)."""
    out: list[float] = []
    for i in range(0, len(items), 8):
        batch = collate(
            [encode(tok, p, r, max_length) for p, r in items[i : i + 8]],
            tok.pad_token_id,
            model.device,
        )
        with torch.no_grad():
            out += [float(v) for v in sequence_logps(model, batch)]
    return out


def preference_margins(
    model: Any, tok: Any, pairs: list[dict[str, Any]], max_length: int = 256
) -> list[float]:
    """Per pair: the margin toward the new policy (RETAIN, INVERT), or the mean log-prob
    of the two violating responses (PUNISH). See the module docstring."""
    lp = response_logps(
        model,
        tok,
        [(p["prompt"], p[side]) for p in pairs for side in ("chosen", "rejected")],
        max_length,
    )
    out = []
    for k, p in enumerate(pairs):
        chosen, rejected = lp[2 * k], lp[2 * k + 1]
        if p["label"] == "RETAIN":
            out.append(chosen - rejected)
        elif p["label"] == "INVERT":
            out.append(rejected - chosen)
        else:
            out.append((chosen + rejected) / 2)
    return out


def evaluate(
    adapters: dict[str, str],
    prompts: list[dict[str, str]],
    general: list[tuple[str, str]],
    heldout: list[dict[str, Any]],
    base_model: str = "",
    max_new_tokens: int = 64,
    max_length: int = 256,
) -> dict[str, Any]:
    """`adapters` maps model names (realigned, dpo_baseline) to adapter folders."""
    model, tok = load_adapters(adapters, base_model)
    gens, margins, nll = [], [], {}
    texts = [p["prompt"] for p in prompts]
    for name in ("reference", *adapters):
        with using(model, name):
            out = generate(model, tok, texts, max_new_tokens)
            nll[name] = mean_nll(model, tok, general, max_length)
            ms = preference_margins(model, tok, heldout, max_length) if heldout else []
        gens += [
            {
                "model": name,
                "prompt": p["prompt"],
                "kind": p.get("kind", ""),
                "category": p.get("category", ""),
                "response": g,
            }
            for p, g in zip(prompts, out, strict=True)
        ]
        margins += [
            {"model": name, "pair_id": h.get("pair_id", str(i)), "label": h["label"], "margin": m}
            for i, (h, m) in enumerate(zip(heldout, ms, strict=True))
        ]
    return {"generations": gens, "margins": margins, "retention_nll": nll}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    import polars as pl

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--adapter", required=True, help="the TRACE adapter")
    ap.add_argument("--baseline-adapter", default="", help="the plain-DPO baseline's adapter")
    ap.add_argument("--prompts", required=True, help="JSON lines with prompt, kind, category")
    ap.add_argument(
        "--general", required=True, help="Parquet with instruction and reference_output"
    )
    ap.add_argument("--heldout", default="", help="Parquet of held-out triaged pairs")
    ap.add_argument("--out", required=True, help="Parquet of generations")
    ap.add_argument("--margins-out", default="", help="Parquet of per-pair margins")
    ap.add_argument("--model", default="")
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--max-length", type=int, default=256)
    a = ap.parse_args(argv)
    with open(a.prompts, encoding="utf-8") as f:
        prompts = [json.loads(line) for line in f if line.strip()]
    general = [
        (r["instruction"], r["reference_output"])
        for r in pl.read_parquet(a.general).to_dicts()
        if r["reference_output"]
    ]
    heldout = pl.read_parquet(a.heldout).to_dicts() if a.heldout else []
    adapters = {"realigned": a.adapter}
    if a.baseline_adapter:
        adapters["dpo_baseline"] = a.baseline_adapter
    result = evaluate(adapters, prompts, general, heldout, a.model, a.max_new_tokens, a.max_length)
    pl.DataFrame(result["generations"]).write_parquet(a.out)
    if a.margins_out:
        schema = {"model": pl.Utf8, "pair_id": pl.Utf8, "label": pl.Utf8, "margin": pl.Float64}
        pl.DataFrame(result["margins"], schema=schema).write_parquet(a.margins_out)
    with reporter() as report:
        report.result({f"retention_nll_{k}": v for k, v in result["retention_nll"].items()})
    return result


if __name__ == "__main__":
    main()
