"""Training throughput of every training entry point against plain TRL, on one model.

    python -m benchmarks.gpu_training [--shape smollm2-360m] [--steps 20] [--batch-size 8]
    python -m benchmarks.gpu_training --smoke      # CPU: the tiny shape, two steps each (CI)

Each entry point trains a randomly initialised model of a real architecture (weights cannot
be downloaded here; throughput does not depend on their values) for a fixed number of
steps, and the same number of steps of plain TRL runs on the same model and data in the
same process:

| entry point | ours | plain TRL baseline |
|---|---|---|
| TRACE hybrid | `train.trace.fit_adapter` (impact-weighted DPO + NPO + KL) | `DPOTrainer` |
| P-Aligner SFT+DPO | `train.paligner.train` | `SFTTrainer` then `DPOTrainer` |
| PersonaKnob constrained DPO | `train.personaknob.train` | `DPOTrainer` |
| PPOpt SFT+GRPO | `train.ppopt.train` (judge rewards) | `SFTTrainer` then `GRPOTrainer` (a length reward) |
| MedAD SFT+GRPO, HF VLM | `train.medad.train` on a SmolVLM-shaped Idefics3 | none: MedAD's loop is its own |

Counting is model-agnostic: a global forward hook sees every forward of the causal LM and
adds its tokens (the attention mask's ones), as training tokens when autograd is on and
as inference tokens otherwise. Model FLOPs = 6 N per training token + 2 N per inference
token (N = the LM's parameters); MFU = those FLOPs per second over the device's peak
(bf16 dense: H100/H200 989 TFLOP/s, A100 312; `--peak-tflops` for others; not reported on
a CPU). Peak memory is CUDA's peak allocated per row, or the process's peak RSS on a CPU.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import polars as pl
import torch

PEAK_TFLOPS = {"H200": 989.4, "H100": 989.4, "A100": 312.0, "L40S": 362.1, "A10": 125.0}


class ForwardMeter:
    """Tokens through every forward of a causal LM (or VLM), split by autograd mode."""

    def __init__(self) -> None:
        self.train_tokens = self.infer_tokens = 0
        self.params = 0
        self._handle = torch.nn.modules.module.register_module_forward_hook(
            self._hook, with_kwargs=True
        )

    def _hook(self, module: torch.nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        name = type(module).__name__
        if not (name.endswith("ForCausalLM") or name.endswith("ForConditionalGeneration")):
            return
        ids = args[0] if args and torch.is_tensor(args[0]) else None
        mask = None
        if kwargs:
            ids = kwargs.get("input_ids", ids)
            mask = kwargs.get("attention_mask")
            if ids is None and kwargs.get("inputs_embeds") is not None:
                ids = kwargs["inputs_embeds"][..., 0]
        if ids is None:
            return
        n = int(mask.sum()) if mask is not None and mask.shape == ids.shape else ids.numel()
        if torch.is_grad_enabled():
            self.train_tokens += n
        else:
            self.infer_tokens += n
        self.params = max(self.params, sum(p.numel() for p in module.parameters()))

    def reset(self) -> None:
        self.train_tokens = self.infer_tokens = 0

    def close(self) -> None:
        self._handle.remove()


def device_peak_tflops(override: float | None) -> float | None:
    if override:
        return override
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    return next((v for k, v in PEAK_TFLOPS.items() if k in name), None)


def measure(name: str, fn: Callable[[], Any], steps: int, meter: ForwardMeter, peak: float | None):
    meter.reset()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t = time.perf_counter()
    fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t
    flops = 6 * meter.params * meter.train_tokens + 2 * meter.params * meter.infer_tokens
    if torch.cuda.is_available():
        memory = torch.cuda.max_memory_allocated() / 2**30
    else:
        memory = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    return {
        "trainer": name,
        "steps": steps,
        "seconds": round(seconds, 2),
        "step_s": round(seconds / max(steps, 1), 3),
        "train_tokens": meter.train_tokens,
        "infer_tokens": meter.infer_tokens,
        "tokens_per_s": round((meter.train_tokens + meter.infer_tokens) / seconds, 1),
        "peak_mem_gib": round(memory, 2),
        "mfu": round(flops / seconds / (peak * 1e12), 4) if peak else None,
    }


# ---------------------------------------------------------------- data


def pairs(n: int) -> list[dict[str, str]]:
    from synth.loaders import SHIPPED_SEEDS, load_preference_pairs

    rows = load_preference_pairs(str(SHIPPED_SEEDS / "preference_pairs.jsonl")).kept.to_dicts()
    return [rows[i % len(rows)] for i in range(n)]


def chat_pairs(rows: list[dict[str, str]]) -> Any:
    from datasets import Dataset

    return Dataset.from_list(
        [
            {
                "prompt": [{"role": "user", "content": r["prompt"]}],
                "chosen": [{"role": "assistant", "content": r["chosen"]}],
                "rejected": [{"role": "assistant", "content": r["rejected"]}],
            }
            for r in rows
        ]
    )


def trl_args(kind: str, out: str, steps: int, a: argparse.Namespace, **extra: Any) -> Any:
    from trl import DPOConfig, GRPOConfig, SFTConfig

    from train.models import training_device

    cuda = training_device() == "cuda"
    common = dict(
        output_dir=out,
        max_steps=steps,
        per_device_train_batch_size=a.batch_size,
        learning_rate=1e-4,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        use_cpu=not cuda,
        bf16=cuda,
        disable_tqdm=True,
        **extra,
    )
    cls = {"sft": SFTConfig, "dpo": DPOConfig, "grpo": GRPOConfig}[kind]
    return cls(**common)


def lora(model_dir: str) -> tuple[Any, Any]:
    from train.models import load_lora_policy

    model, tok, _ = load_lora_policy(model_dir, 16, 32, 0.0, 0)
    return model, tok


# ---------------------------------------------------------------- the runs


def run_all(a: argparse.Namespace, work: Path) -> list[dict[str, Any]]:
    from datasets import Dataset
    from trl import DPOTrainer, GRPOTrainer, SFTTrainer

    from train import medad, paligner, personaknob, ppopt
    from train.random_models import random_causal_lm, random_idefics3
    from train.trace import TraceConfig, fit_adapter

    model_dir = str(random_causal_lm(a.shape, work / "model"))
    meter, peak = ForwardMeter(), device_peak_tflops(a.peak_tflops)
    steps, n = a.steps, max(a.steps * a.batch_size, 8)
    rows = pairs(n)
    out: list[dict[str, Any]] = []

    def pair_file(extra: dict[str, Callable[[int], Any]]) -> str:
        path = work / f"pairs_{len(out)}.parquet"
        pl.DataFrame(
            [{**r, **{k: f(i) for k, f in extra.items()}} for i, r in enumerate(rows)]
        ).write_parquet(path)
        return str(path)

    def row(name: str, fn: Callable[[], Any], n_steps: int, baseline: str = "") -> None:
        r = measure(name, fn, n_steps, meter, peak)
        r["baseline"] = baseline
        out.append(r)
        print(json.dumps(r), flush=True)

    # TRACE hybrid vs plain DPO
    labels = ("RETAIN", "INVERT", "PUNISH")
    trace_rows = [
        dict(r, label=labels[i % 3], impact_weight=0.0 if i % 3 == 0 else 3.0 / n)
        for i, r in enumerate(rows)
    ]
    cfg = TraceConfig(
        output_dir=str(work / "trace"),
        max_steps=steps,
        per_device_train_batch_size=a.batch_size,
        learning_rate=1e-4,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        remove_unused_columns=False,
        use_cpu=not torch.cuda.is_available(),
        bf16=torch.cuda.is_available(),
        disable_tqdm=True,
        max_length=a.max_length,
    )
    row(
        "TRACE hybrid",
        lambda: fit_adapter(trace_rows, cfg, model_dir, "trace", str(work / "trace")),
        steps,
    )

    def plain_dpo(data: Any, tag: str) -> None:
        model, tok = lora(model_dir)
        args = trl_args("dpo", str(work / tag), steps, a, max_length=a.max_length)
        DPOTrainer(model=model, args=args, train_dataset=data, processing_class=tok).train()

    row("TRL DPOTrainer", lambda: plain_dpo(chat_pairs(rows), "dpo1"), steps, "TRACE hybrid")

    # P-Aligner SFT + DPO vs plain SFT + DPO
    sft_file = work / "sft.parquet"
    pl.DataFrame([{"prompt": r["prompt"], "completion": r["chosen"]} for r in rows]).write_parquet(
        sft_file
    )
    ns = argparse.Namespace(
        sft=str(sft_file),
        dpo=pair_file({}),
        output_dir=str(work / "paligner"),
        model=model_dir,
        max_steps=steps,
        dpo_steps=steps,
        batch_size=a.batch_size,
        learning_rate=1e-4,
        beta=0.1,
        lora_r=16,
        lora_alpha=32,
        max_length=a.max_length,
        seed=0,
    )
    row("P-Aligner SFT+DPO", lambda: paligner.train(ns, log=lambda *_: None), 2 * steps)

    def plain_sft_then(kind: str, tag: str, reward: Any = None) -> None:
        model, tok = lora(model_dir)
        sft = Dataset.from_list([paligner.chat_example(r["prompt"], r["chosen"]) for r in rows])
        args = trl_args("sft", str(work / f"{tag}_sft"), steps, a, max_length=a.max_length)
        SFTTrainer(model=model, args=args, train_dataset=sft, processing_class=tok).train()
        if kind == "dpo":
            args = trl_args("dpo", str(work / f"{tag}_dpo"), steps, a, max_length=a.max_length)
            DPOTrainer(
                model=model, args=args, train_dataset=chat_pairs(rows), processing_class=tok
            ).train()
        else:
            prompts = Dataset.from_list(
                [{"prompt": [{"role": "user", "content": r["prompt"]}]} for r in rows]
            )
            args = trl_args(
                "grpo",
                str(work / f"{tag}_grpo"),
                a.grpo_steps,
                a,
                num_generations=a.num_generations,
                max_completion_length=a.completion_length,
            )
            args.per_device_train_batch_size = a.num_generations
            GRPOTrainer(
                model=model,
                reward_funcs=[reward],
                args=args,
                train_dataset=prompts,
                processing_class=tok,
            ).train()

    row(
        "TRL SFTTrainer + DPOTrainer",
        lambda: plain_sft_then("dpo", "pa"),
        2 * steps,
        "P-Aligner SFT+DPO",
    )

    # PersonaKnob constrained DPO vs plain DPO
    dims = ["A", "T", "E", "C"]
    knob = argparse.Namespace(
        pairs=pair_file({"dims": lambda i: [dims[i % 4], dims[(i + 1) % 4]]}),
        output_dir=str(work / "knob"),
        model=model_dir,
        max_steps=steps,
        epsilon=0.5,
        tolerances="",
        dual_lr=1.0,
        plain_dpo_steps=0,  # the row times the constrained trainer alone
        batch_size=a.batch_size,
        learning_rate=1e-4,
        beta=0.1,
        lora_r=16,
        lora_alpha=32,
        max_length=a.max_length,
        seed=0,
    )
    row("PersonaKnob constrained DPO", lambda: personaknob.train(knob, log=lambda *_: None), steps)
    row(
        "TRL DPOTrainer",
        lambda: plain_dpo(chat_pairs(rows), "dpo2"),
        steps,
        "PersonaKnob constrained DPO",
    )

    # PPOpt SFT + GRPO (judge rewards) vs plain SFT + GRPO (a length reward)
    if a.judge:
        ppopt_file = work / "ppopt.parquet"
        pl.DataFrame(
            [
                {
                    "record_id": f"r{i}",
                    "split": "train",
                    "prompt": r["prompt"],
                    "completion": f"<REASONING>terse user</REASONING><PROMPT>{r['prompt']}</PROMPT>",
                    "persona": "prefers short answers",
                    "query": r["prompt"],
                }
                for i, r in enumerate(rows)
            ]
        ).write_parquet(ppopt_file)
        pp = argparse.Namespace(
            data=str(ppopt_file),
            output_dir=str(work / "ppopt"),
            model=model_dir,
            sft_steps=steps,
            grpo_steps=a.grpo_steps,
            num_generations=a.num_generations,
            max_completion_length=a.completion_length,
            temperature=0.7,
            kl_beta=0.1,
            rl_share=0.0,  # both stages on every row, as the plain baseline trains
            w_profile=0.3,
            w_task=0.7,
            judge=a.judge,
            batch_size=a.batch_size,
            learning_rate=1e-4,
            beta=0.1,
            lora_r=16,
            lora_alpha=32,
            max_length=a.max_length,
            seed=0,
        )
        row("PPOpt SFT+GRPO", lambda: ppopt.train(pp, log=lambda *_: None), steps + a.grpo_steps)

        def length_reward(completions: list, **_: Any) -> list[float]:
            return [min(len(str(c)), 200) / 200 for c in completions]

        row(
            "TRL SFTTrainer + GRPOTrainer",
            lambda: plain_sft_then("grpo", "pp", length_reward),
            steps + a.grpo_steps,
            "PPOpt SFT+GRPO",
        )

    # MedAD SFT + GRPO on a SmolVLM-shaped Idefics3
    vlm_dir = random_idefics3(work / "vlm", "tiny" if a.shape == "tiny" else "smolvlm")
    items, cases = medad_data(work)
    md = medad.parser().parse_args(
        [
            "--items",
            items,
            "--cases",
            cases,
            "--output-dir",
            str(work / "medad"),
            "--model",
            str(vlm_dir),
            "--sft-steps",
            str(steps),
            "--grpo-steps",
            str(a.grpo_steps),
            "--num-generations",
            str(a.num_generations),
            "--batch-size",
            str(min(a.batch_size, 4)),
            "--max-completion-length",
            str(a.completion_length),
        ]
    )
    row(
        "MedAD SFT+GRPO (HF VLM)",
        lambda: medad.train(md, log=lambda *_: None),
        steps + a.grpo_steps,
    )
    meter.close()
    return out


def medad_data(work: Path) -> tuple[str, str]:
    """A few MedAD cases and items from two shipped base images, as the assets make them."""
    from synth.medad.bases import load_allowlist, load_bases
    from synth.medad.cases import CaseSettings, build_cases
    from synth.medad.vqa import build_items

    keep = {"dipy_t1_coronal", "skimage_retina"}
    bases, _ = load_bases([e for e in load_allowlist() if e["id"] in keep], 64)
    s = CaseSettings(image_size=64, centers=2, cases_per_base=2)
    cases, _, _ = build_cases(bases, s)
    items, _, _ = build_items(cases, s.seed)
    items.write_parquet(work / "items.parquet")
    cases.write_parquet(work / "cases.parquet")
    return str(work / "items.parquet"), str(work / "cases.parquet")


def table(rows: list[dict[str, Any]], argv: list[str]) -> str:
    by = {r["trainer"] + "|" + r["baseline"]: r for r in rows}
    lines = [
        f"$ python -m benchmarks.gpu_training {' '.join(argv)}".rstrip(),
        "",
        "| trainer | steps | step (s) | tokens/s | peak mem (GiB) | MFU | ratio to plain TRL (tokens/s) |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        if r["baseline"]:
            continue
        base = next((b for k, b in by.items() if k.endswith("|" + r["trainer"])), None)
        ratio = (
            f"{r['tokens_per_s'] / base['tokens_per_s']:.2f}x"
            if base and base["tokens_per_s"]
            else "n/a (no TRL twin)"
        )
        mfu = "—" if r["mfu"] is None else f"{100 * r['mfu']:.1f}%"
        lines.append(
            f"| {r['trainer']} | {r['steps']} | {r['step_s']} | {r['tokens_per_s']} | {r['peak_mem_gib']} | {mfu} | {ratio} |"
        )
        if base:
            bmfu = "—" if base["mfu"] is None else f"{100 * base['mfu']:.1f}%"
            lines.append(
                f"| ↳ {base['trainer']} | {base['steps']} | {base['step_s']} | {base['tokens_per_s']} | {base['peak_mem_gib']} | {bmfu} | 1.00x |"
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    argv = sys.argv[1:] if argv is None else argv
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default="", help="tiny | smollm2-360m | qwen2.5-0.5b")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--grpo-steps", type=int, default=4)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--num-generations", type=int, default=8)
    ap.add_argument("--completion-length", type=int, default=64)
    ap.add_argument("--max-length", type=int, default=256)
    ap.add_argument("--peak-tflops", type=float, default=None)
    ap.add_argument(
        "--judge",
        default='{"role": "judge", "backend": "embedded"}',
        help="the PPOpt reward judge as JSON (LLMResource.subprocess_spec); '' skips PPOpt",
    )
    ap.add_argument("--smoke", action="store_true", help="tiny shape, 2 steps: a CPU smoke run")
    ap.add_argument("--json", default="", help="also write the rows here")
    a = ap.parse_args(argv)
    if a.smoke:
        a.shape, a.steps, a.grpo_steps, a.batch_size = "tiny", 2, 1, 2
        a.num_generations, a.completion_length, a.max_length = 2, 8, 96
    a.shape = a.shape or ("smollm2-360m" if torch.cuda.is_available() else "tiny")
    with tempfile.TemporaryDirectory() as tmp:
        rows = run_all(a, Path(tmp))
    device = (
        torch.cuda.get_device_name()
        if torch.cuda.is_available()
        else f"CPU ({os.cpu_count()} cores)"
    )
    print(f"\nshape {a.shape}, device {device}, batch {a.batch_size}, max_length {a.max_length}\n")
    print(table(rows, argv))
    if a.json:
        Path(a.json).write_text(json.dumps(rows, indent=2))
    return rows


if __name__ == "__main__":
    main()
