"""Loading causal LMs for training: any local path or hub id, or the embedded SmolLM2.

The embedded model ships as a Q4_1 GGUF; transformers dequantizes it to fp32, which
takes about 40 s on 2 cores. The first load saves a plain fp32 copy (about 520 MB) in a
cache folder so later loads take seconds.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

EMBEDDED_CACHE_NAME = "smollm2-135m-instruct-fp32"


def model_cache_dir() -> Path:
    return Path(
        os.environ.get("ALIGNFOUNDRY_MODEL_CACHE")
        or Path.home() / ".cache" / "alignfoundry" / "models"
    )


def training_device() -> str:
    """The one device every entry point trains and evaluates on: the GPU when there is one."""
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def training_dtype(device: str) -> Any:
    """bf16 on a CUDA device that supports it, fp32 otherwise (bf16 on this CPU is ~12x slower)."""
    import torch

    if device.startswith("cuda") and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


def load_causal_lm(model: str = "", device: str | None = None) -> tuple[Any, Any]:
    """(model on `device` in its training dtype, tokenizer). `model` empty = the embedded
    SmolLM2-135M-Instruct; `device` None = `training_device()`."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    device = device or training_device()
    torch_dtype = training_dtype(device)
    if model:
        tok = AutoTokenizer.from_pretrained(model)
        lm = AutoModelForCausalLM.from_pretrained(model, dtype=torch_dtype)
    else:
        cached = model_cache_dir() / EMBEDDED_CACHE_NAME
        if (cached / "config.json").exists():
            tok = AutoTokenizer.from_pretrained(cached)
            lm = AutoModelForCausalLM.from_pretrained(cached, dtype=torch_dtype)
        else:
            from synth.llm import embedded_model_path

            gguf = embedded_model_path()
            tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
            lm = AutoModelForCausalLM.from_pretrained(
                str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32
            )
            # save_pretrained refuses a GGUF-loaded model until the quantizer traces are gone.
            lm.hf_quantizer = None
            if hasattr(lm.config, "quantization_config"):
                del lm.config.quantization_config
            tmp = cached.with_name(cached.name + f".tmp{os.getpid()}")
            lm.save_pretrained(tmp)
            tok.save_pretrained(tmp)
            try:
                tmp.rename(cached)
            except OSError:  # another process saved it first (a rename onto a folder fails)
                shutil.rmtree(tmp)
            # Reload the plain copy: a GGUF-loaded model still looks quantized to Trainer.
            del lm
            tok = AutoTokenizer.from_pretrained(cached)
            lm = AutoModelForCausalLM.from_pretrained(cached, dtype=torch_dtype)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return lm.to(device), tok


LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]


def load_lora_policy(
    model: str, lora_r: int, lora_alpha: int, dropout: float, seed: int
) -> tuple[Any, Any, bool]:
    """(peft model with fresh LoRA adapters, tokenizer, on_cuda): bf16 on a GPU, fp32 on CPU."""
    import torch
    from peft import LoraConfig, get_peft_model

    device = training_device()
    torch.manual_seed(seed)
    base, tok = load_causal_lm(model, device)
    config = LoraConfig(
        r=lora_r,
        lora_alpha=lora_alpha,
        lora_dropout=dropout,
        target_modules=LORA_TARGETS,
        task_type="CAUSAL_LM",
    )
    return get_peft_model(base, config), tok, device == "cuda"


STAGES_FILE = "stages.json"


def freeze_as_reference(model: Any, lora_config: Any) -> Any:
    """Merge the trained adapters into the weights and start fresh ones on top: the model
    trained so far (e.g. after SFT) becomes the reference that `disable_adapter()` gives,
    which is what DPO's and GRPO's reference should be (the SFT policy, not the base)."""
    from peft import get_peft_model

    return get_peft_model(model.merge_and_unload(), lora_config)


def save_stages(stages: list[tuple[str, Any]], out_dir: str | Path, tok: Any) -> Path:
    """Save a sequence of adapters trained one on top of the other (each after merging the
    ones before) as `out_dir/<stage>/` with `out_dir/stages.json` naming their order."""
    import json

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / STAGES_FILE).write_text(json.dumps([name for name, _ in stages]))
    for name, adapter_model in stages:
        if adapter_model is not None:
            adapter_model.save_pretrained(out / name)
    tok.save_pretrained(out)
    return out


def apply_adapters(base: Any, adapter_dir: str | Path) -> Any:
    """A PEFT model: the adapter at `adapter_dir` on `base`, or, for a folder written by
    `save_stages`, every stage but the last merged in order and the last one on top."""
    import json

    from peft import PeftModel

    path = Path(adapter_dir)
    if not (path / STAGES_FILE).exists():
        return PeftModel.from_pretrained(base, path)
    *merged, last = json.loads((path / STAGES_FILE).read_text())
    for name in merged:
        base = PeftModel.from_pretrained(base, path / name).merge_and_unload()
    return PeftModel.from_pretrained(base, path / last)
