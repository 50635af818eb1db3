"""Randomly initialised models of real architectures, saved like a downloaded checkpoint.

No weights can be downloaded on these machines, and throughput does not depend on the
weights' values: a model built from its architecture's config, saved with SmolLM2's
tokenizer, stands in for the real checkpoint in benchmarks and wiring tests. Shapes:

- `tiny`: a two-layer Llama for CPU smoke runs;
- `smollm2-360m`: SmolLM2-360M's shape (32 layers, hidden 960, 15 heads, 5 KV heads);
- `qwen2.5-0.5b`: Qwen2.5-0.5B's shape (24 layers, hidden 896, 14 heads, 2 KV heads),
  with SmolLM2's vocabulary so that the same tokenizer serves;
- for MedAD, `random_idefics3`: SmolVLM's architecture (Idefics3), tiny or SmolVLM-256M-like.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

LM_SHAPES: dict[str, dict[str, Any]] = {
    "tiny": dict(
        model_type="llama",
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    ),
    "smollm2-360m": dict(
        model_type="llama",
        hidden_size=960,
        intermediate_size=2560,
        num_hidden_layers=32,
        num_attention_heads=15,
        num_key_value_heads=5,
        tie_word_embeddings=True,
    ),
    "qwen2.5-0.5b": dict(
        model_type="qwen2",
        hidden_size=896,
        intermediate_size=4864,
        num_hidden_layers=24,
        num_attention_heads=14,
        num_key_value_heads=2,
        tie_word_embeddings=True,
    ),
}

# A chat template for Idefics3 processors: ChatML with an <image> placeholder.
VLM_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m.role }}\n{% if m.content is string %}{{ m.content }}"
    "{% else %}{% for c in m.content %}{% if c.type == 'image' %}<image>{% else %}{{ c.text }}"
    "{% endif %}{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def embedded_tokenizer() -> Any:
    """SmolLM2's tokenizer (from the embedded model), with a pad token."""
    from transformers import AutoTokenizer

    from train.models import EMBEDDED_CACHE_NAME, load_causal_lm, model_cache_dir

    cached = model_cache_dir() / EMBEDDED_CACHE_NAME
    if not (cached / "config.json").exists():
        load_causal_lm("", "cpu")  # the first load writes the plain copy
    tok = AutoTokenizer.from_pretrained(cached)
    tok.pad_token = tok.pad_token or tok.eos_token
    return tok


def random_causal_lm(shape: str, path: str | Path, seed: int = 0, **overrides: Any) -> Path:
    """A causal LM of `shape` (config fields in `overrides` replace the shape's) with
    random weights, saved with the tokenizer at `path`."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    if shape not in LM_SHAPES:
        raise ValueError(f"unknown shape {shape!r}: choose one of {', '.join(LM_SHAPES)}")
    tok = embedded_tokenizer()
    spec = dict(LM_SHAPES[shape]) | overrides
    config = AutoConfig.for_model(
        spec.pop("model_type"),
        vocab_size=len(tok),
        pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id,
        bos_token_id=tok.bos_token_id,
        **spec,
    )
    torch.manual_seed(seed)
    AutoModelForCausalLM.from_config(config).save_pretrained(path)
    tok.save_pretrained(path)
    return Path(path)


def random_idefics3(path: str | Path, size: str = "tiny", seed: int = 0) -> Path:
    """An Idefics3 (SmolVLM's architecture) with random weights, saved with its processor."""
    import torch
    from transformers import (
        Idefics3Config,
        Idefics3ForConditionalGeneration,
        Idefics3ImageProcessor,
        Idefics3Processor,
        LlamaConfig,
    )
    from transformers.models.idefics3.configuration_idefics3 import Idefics3VisionConfig

    tok = embedded_tokenizer()
    tok.add_special_tokens(
        {
            "additional_special_tokens": [
                "<fake_token_around_image>",
                "<image>",
                "<end_of_utterance>",
                "<global-img>",
            ]
        }
    )
    big = size != "tiny"
    text = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=576 if big else 64,
        intermediate_size=1536 if big else 128,
        num_hidden_layers=30 if big else 2,
        num_attention_heads=9 if big else 4,
        num_key_value_heads=3 if big else 2,
        pad_token_id=tok.pad_token_id,
    )
    vision = Idefics3VisionConfig(
        hidden_size=768 if big else 32,
        intermediate_size=3072 if big else 64,
        num_hidden_layers=12 if big else 1,
        num_attention_heads=12 if big else 2,
        image_size=512 if big else 64,
        patch_size=16,
    )
    config = Idefics3Config(
        text_config=text.to_dict(),
        vision_config=vision.to_dict(),
        image_token_id=tok.convert_tokens_to_ids("<image>"),
        scale_factor=4 if big else 2,
    )
    torch.manual_seed(seed)
    Idefics3ForConditionalGeneration(config).save_pretrained(path)
    edge = 512 if big else 64
    images = Idefics3ImageProcessor(
        size={"longest_edge": edge}, max_image_size={"longest_edge": edge}, do_image_splitting=False
    )
    seq = 64 if big else 4
    Idefics3Processor(images, tok, image_seq_len=seq, chat_template=VLM_TEMPLATE).save_pretrained(
        path
    )
    return Path(path)
