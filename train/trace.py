"""TRACE re-alignment (arXiv 2511.02623): impact scores and the hybrid loss.

    python -m train.trace --data triaged.parquet --output-dir runs/trace/adapter [--model PATH]
        [--max-steps 4] [--heldout-fraction 0.25] [--dpo-baseline true]

- A label-stratified share of the pairs is held out (never trained on): the evaluation
  measures the preference margin toward the new policy on them.
- Impact score of a conflict pair = <grad of the DPO loss on a small gold batch,
  grad of the pair's own loss>, both at the reference weights, on the trainable (LoRA)
  parameters; clamped at zero and normalised to sum one over INVERT+PUNISH pairs. When
  every score clamps to zero every weight is 0 (and the trace_weighted check fails).
  The pair's loss is DPO on the swapped pair for INVERT and NPO on both responses for
  PUNISH. The gold batch (Algorithm 2): up to a third RETAIN pairs, up to a third swapped
  INVERT pairs, the rest PUNISH prompts with a compliant response over the violating one.
- Hybrid loss = sum_INVERT w * DPO(swapped) + sum_PUNISH w * (NPO(chosen) + NPO(rejected))
  + alpha_kl * KL(pi_ref || pi_theta) on RETAIN responses (token level).
- The baseline (`--dpo-baseline`): plain DPO on the pairs' original labels (chosen over
  rejected), same pairs, start, steps and learning rate, saved beside the TRACE adapter.
Defaults follow the paper: beta 0.3, alpha_kl 0.1, LoRA r 32 / alpha 16 on q_proj and v_proj.
The reference model is the same network with its LoRA adapters disabled. Every batch is
built on the model's device (bf16 on a GPU).
"""

from __future__ import annotations

import argparse
import json
import math
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from transformers import Trainer
from trl import DPOConfig

from train.paligner import tensors_changed
from train.reporting import reporter
from train.sequences import collate, encode, sequence_logps

LABELS = ("RETAIN", "INVERT", "PUNISH")
CONFLICT = ("INVERT", "PUNISH")


@dataclass
class TraceConfig(DPOConfig):
    """TRL's DPO configuration, extended with TRACE's own knobs."""

    beta: float = 0.3
    alpha_kl: float = field(
        default=0.1, metadata={"help": "weight of the KL retention term on RETAIN pairs"}
    )
    gold_batch_size: int = field(
        default=12, metadata={"help": "pairs in the gold batch for impact scores"}
    )
    impact_gamma: float = field(
        default=1.0, metadata={"help": "damping: scores are divided by gamma"}
    )
    lora_r: int = 32
    lora_alpha: int = 16
    lora_dropout: float = 0.1
    max_length: int | None = 256


def add_lora(model: Any, cfg: TraceConfig) -> Any:
    from peft import LoraConfig, get_peft_model

    lora = LoraConfig(
        r=cfg.lora_r,
        lora_alpha=cfg.lora_alpha,
        lora_dropout=cfg.lora_dropout,
        target_modules=["q_proj", "v_proj"],
        bias="none",
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, lora)


# ---------------------------------------------------------------- sequences and losses


def dpo_loss(
    pc: torch.Tensor, pr: torch.Tensor, rc: torch.Tensor, rr: torch.Tensor, beta: float
) -> torch.Tensor:
    """-log sigmoid(beta * ((log pi(y+) - log ref(y+)) - (log pi(y-) - log ref(y-))))."""
    return -F.logsigmoid(beta * ((pc - rc) - (pr - rr)))


def npo_loss(p: torch.Tensor, r: torch.Tensor, beta: float) -> torch.Tensor:
    """Negative preference optimisation on one response: -log sigmoid(-beta (log pi - log ref))."""
    return -F.logsigmoid(-beta * (p - r))


def token_kl(ref_logits: torch.Tensor, logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """KL(pi_ref || pi_theta) per token, averaged over the response tokens in `mask`."""
    kl = (ref_logits.softmax(-1) * (ref_logits.log_softmax(-1) - logits.log_softmax(-1))).sum(-1)
    mask = mask.to(kl.dtype)
    return (kl * mask).sum() / mask.sum().clamp(min=1.0)


def training_pair(row: dict[str, Any]) -> tuple[str, str, str]:
    """(prompt, preferred, dispreferred) as trained: INVERT pairs are swapped."""
    if row["label"] == "INVERT":
        return row["prompt"], row["rejected"], row["chosen"]
    return row["prompt"], row["chosen"], row["rejected"]


# ---------------------------------------------------------------- impact scores


def gold_batch(rows: list[dict[str, Any]], size: int, seed: int = 0) -> list[tuple[str, str, str]]:
    rng = random.Random(seed)
    by = {lab: [r for r in rows if r["label"] == lab] for lab in ("RETAIN", "INVERT", "PUNISH")}
    third = size // 3
    gold = [training_pair(r) for r in rng.sample(by["RETAIN"], min(third, len(by["RETAIN"])))]
    gold += [training_pair(r) for r in rng.sample(by["INVERT"], min(third, len(by["INVERT"])))]
    compliant = [training_pair(r)[1] for r in by["RETAIN"] + by["INVERT"]]
    if compliant:
        for r in rng.sample(by["PUNISH"], min(size - len(gold), len(by["PUNISH"]))):
            gold.append((r["prompt"], rng.choice(compliant), r["chosen"]))
    return gold


def _pair_batch(
    tok: Any, triples: list[tuple[str, str, str]], max_length: int, device: Any
) -> dict[str, torch.Tensor]:
    """Preferred responses first, then dispreferred ones, in one padded batch."""
    enc = [encode(tok, p, a, max_length) for p, a, _ in triples] + [
        encode(tok, p, b, max_length) for p, _, b in triples
    ]
    return collate(enc, tok.pad_token_id, device)


def _flat_grad(loss: torch.Tensor, params: list[torch.Tensor]) -> torch.Tensor:
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    return torch.cat(
        [
            (g if g is not None else torch.zeros_like(p)).reshape(-1)
            for g, p in zip(grads, params, strict=True)
        ]
    )


def _dpo_on(
    model: Any, tok: Any, triples: list[tuple[str, str, str]], beta: float, max_length: int
) -> torch.Tensor:
    batch = _pair_batch(tok, triples, max_length, model.device)
    n = len(triples)
    pol = sequence_logps(model, batch)
    with torch.no_grad(), model.disable_adapter():
        ref = sequence_logps(model, batch)
    return dpo_loss(pol[:n], pol[n:], ref[:n], ref[n:], beta)


def _npo_on(
    model: Any, tok: Any, prompt: str, responses: list[str], beta: float, max_length: int
) -> torch.Tensor:
    batch = collate(
        [encode(tok, prompt, r, max_length) for r in responses], tok.pad_token_id, model.device
    )
    pol = sequence_logps(model, batch)
    with torch.no_grad(), model.disable_adapter():
        ref = sequence_logps(model, batch)
    return npo_loss(pol, ref, beta)


def impact_scores(
    model: Any, tok: Any, rows: list[dict[str, Any]], cfg: TraceConfig, progress: Any = None
) -> tuple[list[float], list[float]]:
    """(normalised impact weight per row, raw score per row), at the current (reference)
    weights: <g_gold, g_i> / gamma, clamped at zero and divided by the sum over
    INVERT+PUNISH. RETAIN rows weigh 0. When every conflict score clamps to zero, every
    weight is 0: there is no pair to re-align on, and the trace_weighted check says so
    (no silent fallback to uniform weights)."""
    model.eval()  # no LoRA dropout while measuring
    params = [p for p in model.parameters() if p.requires_grad]
    gold = gold_batch(rows, cfg.gold_batch_size, cfg.seed)
    if not gold:
        raise ValueError("impact scores need at least one RETAIN or INVERT pair for the gold batch")
    g_gold = _flat_grad(_dpo_on(model, tok, gold, cfg.beta, cfg.max_length).mean(), params)
    raw: list[float] = []
    for r in rows:
        if r["label"] == "INVERT":
            loss = _dpo_on(model, tok, [training_pair(r)], cfg.beta, cfg.max_length).sum()
        elif r["label"] == "PUNISH":
            loss = _npo_on(
                model, tok, r["prompt"], [r["chosen"], r["rejected"]], cfg.beta, cfg.max_length
            ).sum()
        else:
            raw.append(0.0)
            continue
        raw.append(float(torch.dot(g_gold, _flat_grad(loss, params))) / cfg.impact_gamma)
        if progress is not None:
            progress()
    return normalise_impact(raw, [r["label"] for r in rows]), raw


def normalise_impact(raw: list[float], labels: list[str]) -> list[float]:
    """max(0, score) / sum of the clamped conflict scores; 0 for RETAIN and when that sum is 0."""
    clamped = [max(0.0, s) if lab in CONFLICT else 0.0 for s, lab in zip(raw, labels, strict=True)]
    total = sum(clamped)
    return [c / total if total > 0 else 0.0 for c in clamped]


def split_heldout(
    rows: list[dict[str, Any]], fraction: float, seed: int
) -> tuple[list[int], list[int]]:
    """(train indices, held-out indices), stratified by label and seeded: every label keeps
    round(fraction x its count) pairs out of training (at least one when it has two)."""
    rng = random.Random(seed)
    train_idx, held = [], []
    for lab in sorted({r["label"] for r in rows}):
        idx = [i for i, r in enumerate(rows) if r["label"] == lab]
        k = round(fraction * len(idx))
        if fraction > 0 and len(idx) >= 2:
            k = max(k, 1)
        k = min(k, len(idx) - 1) if len(idx) > 1 else 0
        out = set(rng.sample(idx, k))
        held += sorted(out)
        train_idx += [i for i in idx if i not in out]
    return sorted(train_idx), sorted(held)


# ---------------------------------------------------------------- training


def loss_terms(
    model: Any, tok: Any, rows: list[dict[str, Any]], cfg: TraceConfig, objective: str = "trace"
) -> dict[str, torch.Tensor]:
    """Each term of the objective on `rows` (alpha_kl not yet applied): for TRACE the
    weighted DPO on swapped INVERT pairs, the weighted NPO on both PUNISH responses and the
    token-level KL(ref || theta) on RETAIN chosen responses; for the baseline, plain DPO."""
    zero = torch.zeros((), device=model.device)
    if objective == "dpo":
        triples = [(r["prompt"], r["chosen"], r["rejected"]) for r in rows]
        return {"loss_dpo": _dpo_on(model, tok, triples, cfg.beta, cfg.max_length).mean()}
    terms = {"loss_invert": zero, "loss_punish": zero, "loss_kl": zero}
    inv = [r for r in rows if r["label"] == "INVERT"]
    if inv:
        w = torch.tensor([r["impact_weight"] for r in inv], device=model.device)
        dpo = _dpo_on(model, tok, [training_pair(r) for r in inv], cfg.beta, cfg.max_length)
        terms["loss_invert"] = (w * dpo).sum()
    for r in (r for r in rows if r["label"] == "PUNISH"):
        npo = _npo_on(
            model, tok, r["prompt"], [r["chosen"], r["rejected"]], cfg.beta, cfg.max_length
        )
        terms["loss_punish"] = terms["loss_punish"] + r["impact_weight"] * npo.sum()
    ret = [r for r in rows if r["label"] == "RETAIN"]
    if ret:
        batch = collate(
            [encode(tok, r["prompt"], r["chosen"], cfg.max_length) for r in ret],
            tok.pad_token_id,
            model.device,
        )
        inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
        logits = model(**inputs).logits[:, :-1].float()
        with torch.no_grad(), model.disable_adapter():
            ref_logits = model(**inputs).logits[:, :-1].float()
        terms["loss_kl"] = token_kl(ref_logits, logits, batch["labels"][:, 1:] != -100)
    return terms


class TraceTrainer(Trainer):
    """transformers' Trainer with TRACE's hybrid loss over mixed batches of triaged pairs.

    `objective="dpo"` is the baseline the paper compares with: plain DPO on the pairs as
    they were labelled before the new policy (chosen over rejected, every pair, unweighted).
    """

    def __init__(
        self,
        *args: Any,
        trace_config: TraceConfig,
        tokenizer: Any,
        objective: str = "trace",
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        if objective not in ("trace", "dpo"):
            raise ValueError(f"objective must be trace or dpo, got {objective!r}")
        self.cfg, self.tok, self.objective = trace_config, tokenizer, objective
        self.components: dict[str, list[float]] = {
            "loss_invert": [],
            "loss_punish": [],
            "loss_kl": [],
            "loss_dpo": [],
        }

    def compute_loss(
        self,
        model: Any,
        inputs: dict[str, Any],
        return_outputs: bool = False,
        num_items_in_batch: Any = None,
    ):
        terms = loss_terms(model, self.tok, inputs["rows"], self.cfg, self.objective)
        for k, v in terms.items():
            self.components[k].append(float(v.detach()))
        loss = sum(
            (self.cfg.alpha_kl * v if k == "loss_kl" else v for k, v in terms.items()),
            torch.zeros((), device=model.device),
        )
        return (loss, None) if return_outputs else loss

    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        if "loss" in logs:
            for k, vals in self.components.items():
                if vals:
                    logs[k] = sum(vals) / len(vals)
                    vals.clear()
        super().log(logs, *args, **kwargs)


def fit_adapter(
    rows: list[dict[str, Any]],
    cfg: TraceConfig,
    model_name: str,
    objective: str,
    output_dir: str,
    report: Any = print,
) -> dict[str, Any]:
    """Fresh LoRA adapters on the base model, trained with `objective` on `rows` (for TRACE
    they carry their impact weights); saved to `output_dir`."""
    from dataclasses import replace

    from datasets import Dataset

    from train.models import load_causal_lm

    torch.manual_seed(cfg.seed)
    base, tok = load_causal_lm(model_name)
    model = add_lora(base, cfg)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    ds = Dataset.from_list([{"row": json.dumps(r)} for r in rows])
    trainer = TraceTrainer(
        model=model,
        args=replace(cfg, output_dir=output_dir),
        train_dataset=ds,
        data_collator=lambda feats: {"rows": [json.loads(f["row"]) for f in feats]},
        trace_config=cfg,
        tokenizer=tok,
        objective=objective,
    )
    report(f"{objective}: {cfg.max_steps} steps on {len(rows)} pairs")
    trainer.train()
    changed = tensors_changed(before, model)
    history = [h for h in trainer.state.log_history if "loss" in h]
    Path(output_dir).mkdir(parents=True, exist_ok=True)
    model.save_pretrained(output_dir)
    tok.save_pretrained(output_dir)
    return {
        "history": history,
        "final_loss": history[-1]["loss"] if history else math.nan,
        "trainable_tensors_changed": changed,
        "trainable_tensors": len(before),
        "device": str(model.device),
    }


def train(
    rows: list[dict[str, Any]],
    cfg: TraceConfig,
    model_name: str = "",
    report: Any = print,
    heldout_fraction: float = 0.0,
    dpo_baseline: bool = False,
) -> dict[str, Any]:
    """Hold out a label-stratified share of the pairs, measure impact scores on the rest,
    train TRACE's hybrid loss there (and, with `dpo_baseline`, plain DPO on the original
    labels of the same pairs, from the same start, for the same steps). Returns metrics,
    the log histories, and per input row its split, impact weight and raw impact score."""
    from train.models import load_causal_lm

    train_idx, held_idx = split_heldout(rows, heldout_fraction, cfg.seed)
    train_rows = [rows[i] for i in train_idx]
    counts = {lab: sum(r["label"] == lab for r in train_rows) for lab in LABELS}
    report(f"triaged pairs in training: {counts}; held out: {len(held_idx)}")

    torch.manual_seed(cfg.seed)
    base, tok = load_causal_lm(model_name)
    weights, raw = impact_scores(add_lora(base, cfg), tok, train_rows, cfg)
    del base
    positive = sum(w > 0 for w in weights)
    conflicts = sum(r["label"] in CONFLICT for r in train_rows)
    if conflicts and not positive:
        report(
            f"WARNING: all {conflicts} conflict pairs have an impact score <= 0 against the gold "
            "batch: every weight is 0 and only the KL term trains"
        )
    weighted = [dict(r, impact_weight=w) for r, w in zip(train_rows, weights, strict=True)]
    out = fit_adapter(weighted, cfg, model_name, "trace", cfg.output_dir, report)
    result: dict[str, Any] = {
        "counts": counts,
        "heldout": len(held_idx),
        "conflict_pairs": conflicts,
        "positive_impact_pairs": positive,
        **out,
        "output_dir": cfg.output_dir,
    }
    if dpo_baseline:
        base_dir = str(Path(cfg.output_dir).parent / "dpo_baseline")
        b = fit_adapter(train_rows, cfg, model_name, "dpo", base_dir, report)
        result |= {
            "baseline_dir": base_dir,
            "baseline_history": b["history"],
            "baseline_final_loss": b["final_loss"],
        }
    # Per input row: its split and weight (held-out rows weigh 0 and never trained).
    split = ["heldout"] * len(rows)
    weight, score = [0.0] * len(rows), [0.0] * len(rows)
    for k, i in enumerate(train_idx):
        split[i], weight[i], score[i] = "train", weights[k], raw[k]
    result |= {"split": split, "impact_weights": weight, "impact_scores": score}
    return result


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        description="TRACE hybrid re-alignment on a triaged Parquet table."
    )
    ap.add_argument(
        "--data", required=True, help="Parquet with prompt, chosen, rejected, label (and pair_id)"
    )
    ap.add_argument("--output-dir", required=True)
    ap.add_argument(
        "--model", default="", help="local path or hub id; empty = the embedded SmolLM2-135M"
    )
    ap.add_argument("--max-steps", type=int, default=4)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--learning-rate", type=float, default=1e-4)
    ap.add_argument("--beta", type=float, default=0.3)
    ap.add_argument("--alpha-kl", type=float, default=0.1)
    ap.add_argument("--gold-batch-size", type=int, default=12)
    ap.add_argument("--max-length", type=int, default=256, help="tokens per prompt+response")
    ap.add_argument("--heldout-fraction", type=float, default=0.25, help="per label, never trained")
    ap.add_argument(
        "--dpo-baseline",
        type=lambda v: str(v).lower() in ("1", "true", "yes"),
        default=True,
        help="also train plain DPO on the original labels (the paper's baseline)",
    )
    ap.add_argument("--seed", type=int, default=0)
    return ap


def main(argv: list[str] | None = None) -> dict[str, Any]:
    import polars as pl

    from train.models import training_device

    a = parser().parse_args(argv)
    cuda = training_device() == "cuda"
    cfg = TraceConfig(
        output_dir=a.output_dir,
        max_steps=a.max_steps,
        per_device_train_batch_size=a.batch_size,
        learning_rate=a.learning_rate,
        beta=a.beta,
        alpha_kl=a.alpha_kl,
        gold_batch_size=a.gold_batch_size,
        seed=a.seed,
        max_length=a.max_length,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        remove_unused_columns=False,
        use_cpu=not cuda,
        bf16=cuda,
        gradient_checkpointing=False,
        disable_tqdm=True,
    )
    rows = pl.read_parquet(a.data).select("prompt", "chosen", "rejected", "label").to_dicts()
    with reporter() as report:
        result = train(rows, cfg, a.model, report.log, a.heldout_fraction, a.dpo_baseline)
        scalars = ("final_loss", "trainable_tensors_changed", "heldout", "conflict_pairs")
        scalars += ("positive_impact_pairs", "device")
        json_keys = ("impact_weights", "impact_scores", "split", "counts")
        if a.dpo_baseline:
            scalars += ("baseline_final_loss", "baseline_dir")
            json_keys += ("baseline_history",)
        report.training_result(result, scalars, json_keys)
    return result


if __name__ == "__main__":
    main()
