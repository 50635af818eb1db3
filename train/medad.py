"""MedAD training: stage 1 SFT in think/answer form, stage 2 GRPO with the verifiable
rewards of `train.medad_rewards`.

Two kinds of vision-language model behind one interface:
- `PrefixVLM` (the CPU default): a small convolutional vision encoder whose pooled
  features are projected into SmolLM2-135M's embedding space as prefix tokens; the
  encoder and projector train fully, the LM through LoRA.
- `HFVLM` (GPU): any Hugging Face image-text-to-text model from a local path
  (`--model PATH`, e.g. SmolVLM or Qwen2-VL), through its own processor, with LoRA.

GRPO is written here rather than taken from TRL: TRL's GRPOTrainer drives Hugging Face
models through their processors, and the prefix model has none. `grpo_loss` is the
clipped objective per token with an optional KL to the SFT policy (`--beta`, default 0
as in TRL), `--grpo-updates` updates per batch of generations (with one, the ratio is 1
and the clip never binds), advantages standardised within each prompt's group.
Completions may be as long as the longest SFT target plus a margin (measured, unless
`--max-completion-length` says otherwise), so the format reward is reachable.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from synth.medad.bases import decode_png
from synth.medad.vqa import prompt_text
from train.medad_rewards import RewardWeights, rewards
from train.reporting import run_training

VISION_FILE = "vision.pt"
CONFIG_FILE = "medad_vlm.json"


def image_tensor(png: bytes, size: int):
    """PNG bytes -> float tensor 3 x size x size, standardised."""
    import torch
    from skimage.transform import resize

    img = decode_png(png).astype(np.float32) / 255.0
    if img.ndim == 2:
        img = np.repeat(img[..., None], 3, axis=2)
    if img.shape[0] != size:
        img = resize(img, (size, size, 3), order=1, anti_aliasing=True)
    return (torch.from_numpy(np.ascontiguousarray(img.transpose(2, 0, 1))) - 0.5) / 0.25


def chat_prompt(tok: Any, text: str) -> str:
    return tok.apply_chat_template(
        [{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True
    )


class _SequenceScores:
    """What both model kinds derive from their `token_logprobs`."""

    def completion_logprobs(self, pngs, prompts, completions):
        """Per-sequence (sum of completion-token log-probs, completion-token count)."""
        lp, mask = self.token_logprobs(pngs, prompts, completions)
        return (lp * mask).sum(1), mask.sum(1)


class PrefixVLM(_SequenceScores):
    """Vision encoder -> `grid`x`grid` prefix tokens -> a causal LM with LoRA adapters."""

    def __init__(self, lm: Any, tok: Any, image_size: int, grid: int, device: str) -> None:
        import torch
        from torch import nn

        self.lm, self.tok, self.image_size, self.grid, self.device = (
            lm,
            tok,
            image_size,
            grid,
            device,
        )
        hidden = lm.get_input_embeddings().weight.shape[1]
        self.vision = nn.Sequential(
            nn.Conv2d(3, 32, 4, stride=4),
            nn.GELU(),
            nn.Conv2d(32, 64, 2, stride=2),
            nn.GELU(),
            nn.Conv2d(64, 128, 2, stride=2),
            nn.GELU(),
            nn.AdaptiveAvgPool2d(grid),
        ).to(device)
        self.project = nn.Linear(128, hidden).to(device)
        self.dtype = lm.get_input_embeddings().weight.dtype
        torch.nn.init.normal_(self.project.weight, std=0.02)

    def modules(self):
        return [self.vision, self.project]

    def trainable(self) -> list:
        return [p for m in (self.lm, *self.modules()) for p in m.parameters() if p.requires_grad]

    def named_trainable(self) -> dict[str, Any]:
        named = {f"lm.{n}": p for n, p in self.lm.named_parameters() if p.requires_grad}
        named |= {f"vision.{n}": p for n, p in self.vision.named_parameters()}
        named |= {f"project.{n}": p for n, p in self.project.named_parameters()}
        return named

    def _prefix(self, pngs: list[bytes]):
        import torch

        pix = torch.stack([image_tensor(p, self.image_size) for p in pngs]).to(self.device)
        feats = self.vision(pix).flatten(2).transpose(1, 2)  # B x grid^2 x 128
        return self.project(feats).to(self.dtype)

    def _embed(self, pngs: list[bytes], token_lists: list[list[int]], left_pad: bool):
        """Prefix + token embeddings, padded (left for generation), with the attention mask."""
        import torch

        prefix = self._prefix(pngs)
        emb = self.lm.get_input_embeddings()
        n = max(len(t) for t in token_lists)
        rows, masks = [], []
        for i, toks in enumerate(token_lists):
            ids = torch.tensor(toks, device=self.device)
            body = torch.cat([prefix[i], emb(ids)], 0)
            pad = n - len(toks)
            pad_emb = torch.zeros(pad, body.shape[1], dtype=body.dtype, device=self.device)
            ones = torch.ones(body.shape[0], dtype=torch.long, device=self.device)
            zeros = torch.zeros(pad, dtype=torch.long, device=self.device)
            rows.append(torch.cat([pad_emb, body] if left_pad else [body, pad_emb], 0))
            masks.append(torch.cat([zeros, ones] if left_pad else [ones, zeros], 0))
        return torch.stack(rows), torch.stack(masks)

    def token_logprobs(self, pngs: list[bytes], prompts: list[str], completions: list[list[int]]):
        """Each completion token's log-prob, B x T right-padded, and the B x T mask."""
        import torch

        p_ids = [
            self.tok(chat_prompt(self.tok, p), add_special_tokens=False)["input_ids"]
            for p in prompts
        ]
        seqs = [p + c for p, c in zip(p_ids, completions, strict=True)]
        embeds, mask = self._embed(pngs, seqs, left_pad=False)
        logits = self.lm(inputs_embeds=embeds, attention_mask=mask).logits.float()
        P = self.grid * self.grid
        per = []
        for i, (p, c) in enumerate(zip(p_ids, completions, strict=True)):
            start = P + len(p)  # first completion position in the sequence
            pred = logits[i, start - 1 : start - 1 + len(c)]
            target = torch.tensor(c, device=self.device)
            per.append(torch.log_softmax(pred, -1).gather(1, target[:, None]).squeeze(1))
        return _padded(per, self.device)

    def generate(
        self,
        pngs: list[bytes],
        prompts: list[str],
        max_new_tokens: int,
        temperature: float,
        sample: bool,
    ) -> list[list[int]]:
        import torch

        ids = [
            self.tok(chat_prompt(self.tok, p), add_special_tokens=False)["input_ids"]
            for p in prompts
        ]
        embeds, mask = self._embed(pngs, ids, left_pad=True)
        with torch.no_grad():
            out = self.lm.generate(
                inputs_embeds=embeds,
                attention_mask=mask,
                max_new_tokens=max_new_tokens,
                do_sample=sample,
                temperature=temperature if sample else None,
                top_p=None,
                top_k=None,
                pad_token_id=self.tok.pad_token_id,
                eos_token_id=self.tok.eos_token_id,
            )
        return [_until_eos(row.tolist(), self.tok.eos_token_id) for row in out]

    def save(self, out: Path, base_model: str) -> None:
        import torch

        self.lm.save_pretrained(out / "adapter")
        self.tok.save_pretrained(out / "adapter")
        torch.save(
            {"vision": self.vision.state_dict(), "project": self.project.state_dict()},
            out / VISION_FILE,
        )
        (out / CONFIG_FILE).write_text(
            json.dumps(
                {
                    "kind": "prefix",
                    "base_model": base_model,
                    "image_size": self.image_size,
                    "grid": self.grid,
                }
            )
        )


class HFVLM(_SequenceScores):
    """A Hugging Face image-text-to-text model from a local path, with LoRA on its
    language model, driven through its own processor and chat template."""

    def __init__(
        self,
        path: str,
        device: str,
        lora_r: int = 16,
        lora_alpha: int = 32,
        adapter: Path | None = None,
    ) -> None:
        """Fresh LoRA adapters on the model at `path`, or the trained ones in `adapter`
        (saved with their processor by `save`)."""
        from peft import LoraConfig, PeftModel, get_peft_model
        from transformers import AutoModelForImageTextToText, AutoProcessor

        from train.models import training_dtype

        self.path, self.device = path, device
        self.processor = AutoProcessor.from_pretrained(adapter or path)
        self.tok = self.processor.tokenizer
        dtype = training_dtype(device)
        model = AutoModelForImageTextToText.from_pretrained(path, dtype=dtype).to(device)
        if adapter is not None:
            self.lm = PeftModel.from_pretrained(model, adapter)
            return
        config = LoraConfig(
            r=lora_r,
            lora_alpha=lora_alpha,
            target_modules=r".*(language_model|text_model).*\.(q_proj|k_proj|v_proj|o_proj)$",
            task_type="CAUSAL_LM",
        )
        self.lm = get_peft_model(model, config)

    def trainable(self) -> list:
        return [p for p in self.lm.parameters() if p.requires_grad]

    def named_trainable(self) -> dict[str, Any]:
        return {n: p for n, p in self.lm.named_parameters() if p.requires_grad}

    def _inputs(self, pngs: list[bytes], texts: list[str]):
        from PIL import Image

        images = [[Image.fromarray(decode_png(p)).convert("RGB")] for p in pngs]
        self.tok.padding_side = "left"
        return self.processor(text=texts, images=images, return_tensors="pt", padding=True).to(
            self.device
        )

    def _prompts(self, prompts: list[str]) -> list[str]:
        msgs = [
            [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": p}]}]
            for p in prompts
        ]
        return [self.processor.apply_chat_template(m, add_generation_prompt=True) for m in msgs]

    def token_logprobs(self, pngs, prompts, completions):
        import torch

        texts = [
            p + self.tok.decode(c) for p, c in zip(self._prompts(prompts), completions, strict=True)
        ]
        inputs = self._inputs(pngs, texts)
        logits = self.lm(**inputs).logits.float()
        per = []
        for i, c in enumerate(completions):  # left padding: the completion ends the row
            n = len(c)
            target = inputs["input_ids"][i, -n:]
            pred = logits[i, -n - 1 : -1]
            per.append(torch.log_softmax(pred, -1).gather(1, target[:, None]).squeeze(1))
        return _padded(per, self.device)

    def generate(self, pngs, prompts, max_new_tokens, temperature, sample):
        import torch

        inputs = self._inputs(pngs, self._prompts(prompts))
        with torch.no_grad():
            out = self.lm.generate(
                **inputs,
                max_new_tokens=max_new_tokens,
                do_sample=sample,
                temperature=temperature if sample else None,
                pad_token_id=self.tok.pad_token_id,
            )
        new = out[:, inputs["input_ids"].shape[1] :]
        return [_until_eos(row.tolist(), self.tok.eos_token_id) for row in new]

    def save(self, out: Path, base_model: str) -> None:
        self.lm.save_pretrained(out / "adapter")
        self.processor.save_pretrained(out / "adapter")
        (out / CONFIG_FILE).write_text(json.dumps({"kind": "hf", "base_model": base_model}))


def _padded(rows: list, device: str):
    """Variable-length 1-D tensors -> (B x T right-padded with 0, B x T float mask)."""
    import torch
    from torch.nn.utils.rnn import pad_sequence

    lengths = torch.tensor([len(r) for r in rows])  # on the host: shapes are known anywhere
    mask = torch.arange(int(lengths.max()))[None, :] < lengths[:, None]
    return pad_sequence(rows, batch_first=True), mask.float().to(device)


def _until_eos(tokens: list[int], eos: int) -> list[int]:
    return tokens[: tokens.index(eos) + 1] if eos in tokens else tokens


def is_hf_vlm(model: str) -> bool:
    """A local Hugging Face vision-language model: its config has a vision part."""
    config = Path(model) / "config.json" if model else None
    return bool(config and config.exists() and "vision_config" in json.loads(config.read_text()))


def build_model(model: str, image_size: int, grid: int, lora_r: int, lora_alpha: int, seed: int):
    import torch

    from train.models import load_lora_policy, training_device

    torch.manual_seed(seed)
    device = training_device()
    if is_hf_vlm(model):
        return HFVLM(model, device, lora_r, lora_alpha)
    lm, tok, _ = load_lora_policy(model, lora_r, lora_alpha, 0.0, seed)
    return PrefixVLM(lm, tok, image_size, grid, device)


def load_trained(model_dir: str):
    """The trained model saved by `train`, ready to generate."""
    import torch
    from peft import PeftModel

    from train.models import load_causal_lm, training_device

    out = Path(model_dir)
    cfg = json.loads((out / CONFIG_FILE).read_text())
    device = training_device()
    if cfg["kind"] == "hf":
        return HFVLM(cfg["base_model"], device, adapter=out / "adapter")
    base, tok = load_causal_lm(cfg["base_model"], device)
    lm = PeftModel.from_pretrained(base, out / "adapter")
    vlm = PrefixVLM(lm, tok, cfg["image_size"], cfg["grid"], device)
    state = torch.load(out / VISION_FILE, map_location=device)
    vlm.vision.load_state_dict(state["vision"])
    vlm.project.load_state_dict(state["project"])
    return vlm


def load_items(items_path: str, cases_path: str, splits: tuple[str, ...]) -> list[dict[str, Any]]:
    """The items of `splits`, joined with their case image, facts decoded."""
    items = pl.read_parquet(items_path).filter(pl.col("split").is_in(splits))
    images = pl.read_parquet(cases_path).select(pl.col("record_id").alias("case_id"), "image_png")
    rows = items.join(images, on="case_id", how="left").to_dicts()
    missing = [r["record_id"] for r in rows if r["image_png"] is None]
    if missing:
        raise ValueError(f"items {missing[:3]}: case_id: no image in {cases_path}")
    for r in rows:
        r["facts"] = json.loads(r["facts_json"])
        r["prompt"] = prompt_text(r["question"], r["options"])
    return rows


def completion_budget(tok: Any, targets: list[str], margin: int = 8) -> int:
    """Tokens a completion may use: the longest SFT target (with its end token) and a
    margin, so that neither SFT nor GRPO cuts a target before its answer."""
    return max(len(tok(t, add_special_tokens=False)["input_ids"]) + 1 for t in targets) + margin


def group_advantages(rewards_by_group):
    """GRPO's advantage: each reward standardised within its prompt's group of
    generations (rows = prompts); a group whose rewards are all equal gets 0."""
    mean = rewards_by_group.mean(1, keepdim=True)
    return (rewards_by_group - mean) / (rewards_by_group.std(1, keepdim=True) + 1e-4)


def grpo_loss(lp, old_lp, ref_lp, mask, adv, epsilon: float, beta: float):
    """The clipped GRPO objective per token, averaged over each completion's tokens, then
    over completions: -min(r A, clip(r, 1-eps, 1+eps) A) + beta KL(pi || ref), r the
    ratio to the policy that generated, KL the k3 estimator exp(q) - q - 1 with
    q = ref - logp. Returns (loss, mean KL per token)."""
    import torch

    ratio = torch.exp(lp - old_lp)
    a = adv[:, None]
    per_token = -torch.minimum(ratio * a, torch.clamp(ratio, 1 - epsilon, 1 + epsilon) * a)
    kl = torch.zeros_like(lp)
    if ref_lp is not None:
        q = ref_lp - lp
        kl = torch.exp(q) - q - 1
        per_token = per_token + beta * kl
    per_seq = (per_token * mask).sum(1) / mask.sum(1)
    kl_mean = float(((kl * mask).sum() / mask.sum()).detach())
    return per_seq.mean(), kl_mean


def grpo_update(vlm, opt, pngs, prompts, gen, adv, reference, a) -> tuple[float, float]:
    """`a.grpo_updates` optimiser steps of `grpo_loss` on one batch of generations (token
    ids `gen`, advantages `adv`), the ratio taken to the policy that generated them and
    the KL to `reference` (trainable tensors; None = no KL). Returns (loss, KL) of the
    last update."""
    import torch

    ref_lp = None
    if reference is not None:
        with torch.no_grad(), _weights(vlm, reference):
            ref_lp, _ = vlm.token_logprobs(pngs, prompts, gen)
    old_lp = None
    for _ in range(a.grpo_updates):
        lp, mask = vlm.token_logprobs(pngs, prompts, gen)
        if old_lp is None:
            old_lp = lp.detach()
        loss, kl = grpo_loss(lp, old_lp, ref_lp, mask, adv.to(lp.device), a.epsilon, a.beta)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return loss.item(), kl


class _weights:
    """Within the block, the model's trainable tensors hold `state` (the SFT policy, the
    KL reference); the current ones come back after."""

    def __init__(self, vlm: Any, state: dict[str, Any]) -> None:
        self.named, self.state = vlm.named_trainable(), state

    def __enter__(self) -> None:
        self.saved = {n: p.detach().clone() for n, p in self.named.items()}
        for n, p in self.named.items():
            p.data.copy_(self.state[n])

    def __exit__(self, *exc: Any) -> None:
        for n, p in self.named.items():
            p.data.copy_(self.saved[n])


def train(a: argparse.Namespace, log) -> dict[str, Any]:
    import torch

    rows = load_items(a.items, a.cases, ("train",))
    if not rows:
        raise ValueError(f"{a.items}: no rows with split == 'train'")
    vlm = build_model(a.model, a.image_size, a.grid, a.lora_r, a.lora_alpha, a.seed)
    params = vlm.trainable()
    before = {n: p.detach().clone() for n, p in vlm.named_trainable().items()}
    opt = torch.optim.AdamW(params, lr=a.learning_rate)
    rng = np.random.default_rng(a.seed)
    w = RewardWeights(a.w_format, a.w_accuracy, a.w_consistency)
    tok = vlm.tok
    eos = tok.eos_token_id
    max_len = a.max_completion_length or completion_budget(tok, [r["completion"] for r in rows])
    log(f"medad: completions up to {max_len} tokens")

    sft_history, tokens, t0 = [], 0, time.perf_counter()
    for step in range(1, a.sft_steps + 1):
        batch = [
            rows[i] for i in rng.choice(len(rows), min(a.batch_size, len(rows)), replace=False)
        ]
        comp = [tok(r["completion"], add_special_tokens=False)["input_ids"] + [eos] for r in batch]
        comp = [c[:max_len] for c in comp]
        sums, counts = vlm.completion_logprobs(
            [r["image_png"] for r in batch], [r["prompt"] for r in batch], comp
        )
        loss = -(sums.sum() / counts.sum())
        opt.zero_grad()
        loss.backward()
        opt.step()
        tokens += int(counts.sum())
        sft_history.append({"step": step, "loss": round(loss.item(), 5)})
        log(f"medad sft step {step}/{a.sft_steps}: loss {loss.item():.4f}")
    sft_s = time.perf_counter() - t0

    # A fresh optimiser at its own rate: policy-gradient steps at the SFT rate undo the
    # think/answer form in one or two updates (measured: format 0.88 -> 0.25).
    opt = torch.optim.AdamW(params, lr=a.grpo_learning_rate)
    reference = (
        {n: p.detach().clone() for n, p in vlm.named_trainable().items()} if a.beta else None
    )
    grpo_history, completions_done, t0 = [], 0, time.perf_counter()
    for step in range(1, a.grpo_steps + 1):
        batch = [
            rows[i] for i in rng.choice(len(rows), min(a.batch_size, len(rows)), replace=False)
        ]
        group = [r for r in batch for _ in range(a.num_generations)]
        pngs, prompts = [r["image_png"] for r in group], [r["prompt"] for r in group]
        vlm.lm.eval()
        gen = vlm.generate(pngs, prompts, max_len, a.temperature, sample=True)
        vlm.lm.train()
        texts = [tok.decode(g, skip_special_tokens=True) for g in gen]
        parts = [rewards(t, r, w) for t, r in zip(texts, group, strict=True)]
        total = torch.tensor([p["total"] for p in parts]).view(len(batch), a.num_generations)
        adv = group_advantages(total).flatten()
        gen = [g if g else [eos] for g in gen]
        loss, kl = grpo_update(vlm, opt, pngs, prompts, gen, adv, reference, a)
        completions_done += len(group)
        entry = {"step": step, "loss": round(loss, 5), "kl": round(kl, 5)}
        entry |= {
            k: round(float(np.mean([p[k] for p in parts])), 4)
            for k in ("total", "format", "accuracy", "consistency")
        }
        entry["reward"] = entry.pop("total")
        entry["completion_tokens"] = round(float(np.mean([len(g) for g in gen])), 1)
        grpo_history.append(entry)
        log(
            f"medad grpo step {step}/{a.grpo_steps}: reward {entry['reward']:.3f} (format {entry['format']:.2f}, accuracy {entry['accuracy']:.2f}, consistency {entry['consistency']:.2f})"
        )
    grpo_s = time.perf_counter() - t0

    changed = sum(not torch.equal(before[n], p.detach()) for n, p in vlm.named_trainable().items())
    out = Path(a.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    vlm.save(out, a.model)
    return {
        "history": {"sft": sft_history, "grpo": grpo_history},
        "final_sft_loss": sft_history[-1]["loss"] if sft_history else math.nan,
        "final_reward": grpo_history[-1]["reward"] if grpo_history else math.nan,
        "train_items": len(rows),
        "sft_tokens_per_s": round(tokens / sft_s, 1) if sft_s else 0.0,
        "grpo_completions_per_s": round(completions_done / grpo_s, 3) if grpo_s else 0.0,
        "trainable_tensors_changed": changed,
        "trainable_tensors": len(before),
        "output_dir": str(out),
        "device": vlm.device,
    }


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        description="MedAD: think/answer SFT, then GRPO with verifiable rewards."
    )
    ap.add_argument("--items", required=True, help="Parquet of the medad_vqa asset")
    ap.add_argument("--cases", required=True, help="Parquet of the medad_cases asset (images)")
    ap.add_argument("--output-dir", required=True)
    ap.add_argument(
        "--model",
        default="",
        help="empty = prefix VLM on the embedded SmolLM2; a causal LM path = prefix VLM on it; a local HF vision-language model (config with vision_config) = that VLM",
    )
    ap.add_argument("--image-size", type=int, default=128)
    ap.add_argument("--grid", type=int, default=4, help="prefix tokens per side (grid^2 tokens)")
    ap.add_argument("--sft-steps", type=int, default=12)
    ap.add_argument("--grpo-steps", type=int, default=2)
    ap.add_argument("--num-generations", type=int, default=4)
    ap.add_argument(
        "--max-completion-length",
        type=int,
        default=0,
        help="0 = the longest SFT target plus 8 tokens",
    )
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--beta", type=float, default=0.0, help="KL to the SFT policy; 0 = none")
    ap.add_argument("--epsilon", type=float, default=0.2, help="ratio clip")
    ap.add_argument(
        "--grpo-updates", type=int, default=1, help="updates per batch of generations (mu)"
    )
    ap.add_argument("--w-format", type=float, default=0.2)
    ap.add_argument("--w-accuracy", type=float, default=0.6)
    ap.add_argument("--w-consistency", type=float, default=0.2)
    ap.add_argument("--batch-size", type=int, default=2)
    ap.add_argument("--learning-rate", type=float, default=2e-3, help="SFT")
    ap.add_argument("--grpo-learning-rate", type=float, default=1e-5)
    ap.add_argument("--lora-r", type=int, default=16)
    ap.add_argument("--lora-alpha", type=int, default=32)
    ap.add_argument("--seed", type=int, default=0)
    return ap


def main(argv: list[str] | None = None) -> dict[str, Any]:
    return run_training(
        argv,
        parser,
        train,
        (
            "final_sft_loss",
            "final_reward",
            "train_items",
            "sft_tokens_per_s",
            "grpo_completions_per_s",
            "trainable_tensors_changed",
            "trainable_tensors",
            "device",
        ),
    )


if __name__ == "__main__":
    main()
