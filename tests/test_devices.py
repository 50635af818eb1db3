"""One device policy for train/: every tensor an entry point builds follows the model.

There is no GPU here, so the model goes to PyTorch's `meta` device instead: a second
device on which nothing is computed. A forward pre-hook asserts that every tensor that
reaches the model sits on the model's device. A batch built on the CPU while the model is
elsewhere (the TRACE bug: `collate` and the impact-score code building CPU tensors while
the model sits on CUDA) fails the hook here exactly as it would fail on a GPU. Values
cannot be read back from `meta`, so a step may stop at its first `.item()`, after the
forwards the hook has checked.
"""

import pytest
import torch

from train.trace import TraceConfig, _dpo_on, _flat_grad, add_lora, collate, encode, loss_terms
from train.trace_eval import encode_prompts, preference_margins


class DeviceGuard:
    """Counts the model's forward passes and fails on an input off the model's device."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.device = next(model.parameters()).device
        self.forwards = 0
        model.register_forward_pre_hook(self.check, with_kwargs=True)

    def check(self, module, args, kwargs):
        for name, value in [*enumerate(args), *kwargs.items()]:
            if torch.is_tensor(value):
                assert value.device == self.device, (
                    f"input {name!r} is on {value.device}, the model on {self.device}"
                )
        self.forwards += 1


def run_until_values(step) -> None:
    """Run `step`; on `meta` it may stop where it first reads a value back."""
    try:
        step()
    except (RuntimeError, NotImplementedError) as e:
        if "meta" not in str(e):
            raise


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    from train.models import EMBEDDED_CACHE_NAME, load_causal_lm, model_cache_dir

    cached = model_cache_dir() / EMBEDDED_CACHE_NAME
    if not (cached / "config.json").exists():
        load_causal_lm("")  # the first load writes the plain copy
    tok = AutoTokenizer.from_pretrained(cached)
    tok.pad_token = tok.pad_token or tok.eos_token
    return tok


def meta_lora_model(vocab: int):
    """A small Llama (SmolLM2's tokenizer and vocabulary) with LoRA, on the meta device."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=vocab,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    cfg._attn_implementation = "eager"  # sdpa's mask shortcut reads mask values
    with torch.device("meta"):
        model = LlamaForCausalLM(cfg)
    return add_lora(model, TraceConfig(output_dir="unused", report_to=[], use_cpu=True))


ROWS = [
    {"prompt": "Q1", "chosen": "a", "rejected": "b", "label": "INVERT", "impact_weight": 0.5},
    {"prompt": "Q2", "chosen": "c", "rejected": "d", "label": "PUNISH", "impact_weight": 0.5},
    {"prompt": "Q3", "chosen": "e", "rejected": "f", "label": "RETAIN", "impact_weight": 0.0},
]


def test_the_hook_catches_a_batch_left_on_the_cpu(tokenizer):
    model = meta_lora_model(len(tokenizer))
    guard = DeviceGuard(model)
    batch = collate([encode(tokenizer, "Q", "A", 32)], tokenizer.pad_token_id)  # the old bug
    with pytest.raises(AssertionError, match="is on cpu, the model on meta"):
        model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    assert guard.forwards == 0


def test_trace_training_steps_follow_the_model(tokenizer):
    model = meta_lora_model(len(tokenizer))
    guard = DeviceGuard(model)
    cfg = TraceConfig(output_dir="unused", report_to=[], use_cpu=True, max_length=32)
    terms = loss_terms(model, tokenizer, ROWS, cfg)  # DPO (INVERT), NPO (PUNISH), KL (RETAIN)
    assert {t.device.type for t in terms.values()} == {"meta"} and guard.forwards >= 6
    baseline = loss_terms(model, tokenizer, ROWS, cfg, objective="dpo")
    assert baseline["loss_dpo"].device.type == "meta"
    # the impact score's gradient on the gold batch
    params = [p for p in model.parameters() if p.requires_grad]
    gold = _dpo_on(model, tokenizer, [("Q", "good", "bad")], cfg.beta, 32).mean()
    assert _flat_grad(gold, params).device.type == "meta"


def test_trace_evaluation_follows_the_model(tokenizer):
    model = meta_lora_model(len(tokenizer))
    guard = DeviceGuard(model)
    run_until_values(lambda: preference_margins(model, tokenizer, ROWS, 32))
    assert guard.forwards == 1
    # generation: HF's generate reads values before its first forward, so check its input
    enc = encode_prompts(tokenizer, ["Name a fruit.", "Say hi."], model.device)
    run_until_values(lambda: model(**enc))
    assert guard.forwards == 2


def test_the_medad_prefix_vlm_follows_the_model(tokenizer):
    import io

    from PIL import Image

    from train.medad import PrefixVLM

    lm = meta_lora_model(len(tokenizer))
    vlm = PrefixVLM(lm, tokenizer, image_size=32, grid=2, device="meta")
    guard = DeviceGuard(lm)
    buf = io.BytesIO()
    Image.new("RGB", (40, 40), (120, 30, 30)).save(buf, format="PNG")
    pngs = [buf.getvalue()] * 2
    completions = [tokenizer("A", add_special_tokens=False)["input_ids"]] * 2
    run_until_values(lambda: vlm.completion_logprobs(pngs, ["Which?", "What?"], completions))
    assert guard.forwards == 1
    assert next(vlm.vision.parameters()).device.type == "meta"


def test_personaknob_constraint_rows_follow_the_batch():
    from train.personaknob import constrained_dpo_trainer

    class Base:  # only the static helper is exercised; TRL's trainer needs real weights
        pass

    rows_of = constrained_dpo_trainer(Base)._rows
    inputs = {
        "input_ids": torch.zeros(4, 3, dtype=torch.long, device="meta"),
        "ref_chosen_logps": torch.zeros(2, device="meta"),
        "note": "kept",
    }
    out = rows_of(inputs, torch.tensor([1]), 2)  # the row indices come from a CPU mask
    assert out["input_ids"].shape == (2, 3) and out["input_ids"].device.type == "meta"
    assert out["ref_chosen_logps"].shape == (1,) and out["note"] == "kept"
