"""The distractor's layered, semantic-aware noise: which user messages get noise, which
layer and strategies, and the request that asks the LLM to apply them.

The plan is drawn from a seeded generator per message, so it is reproducible and the
realised noise rate and layer mix can be checked against the configuration.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

import yaml

from synth.llm import GenerationParams, LLMRequest
from synth.records import content_id

NOISE_FILE = Path(__file__).with_name("noise.yaml")
DISTRACT_ID = "personaatlas_distract"


@dataclass(frozen=True, slots=True)
class Strategy:
    name: str
    p: float
    instruct: str


@dataclass(frozen=True, slots=True)
class Layer:
    name: str
    weight: float
    strategies: tuple[Strategy, ...]


@dataclass(frozen=True, slots=True)
class NoisePlan:
    layer: str
    strategies: tuple[str, ...]


def load_noise(path: Path | str = NOISE_FILE) -> dict[str, Layer]:
    """The layers, validated; a bad entry is named (`noise.yaml: layers.X.strategies.Y.p`)."""
    path = Path(path)
    raw = yaml.safe_load(path.read_text())
    layers = raw.get("layers") if isinstance(raw, dict) else None
    if not isinstance(layers, dict) or not layers:
        raise ValueError(f"{path.name}: layers: needs a mapping of layer names")
    out = {}
    for name, spec in layers.items():
        where = f"{path.name}: layers.{name}"
        w = spec.get("layer_weight") if isinstance(spec, dict) else None
        if not isinstance(w, int | float) or w < 0:
            raise ValueError(f"{where}.layer_weight: needs a number >= 0")
        strategies = spec.get("strategies")
        if not isinstance(strategies, dict) or not strategies:
            raise ValueError(f"{where}.strategies: needs at least one strategy")
        parsed = []
        for s, d in strategies.items():
            p = d.get("p") if isinstance(d, dict) else None
            if not isinstance(p, int | float) or not 0 <= p <= 1:
                raise ValueError(f"{where}.strategies.{s}.p: needs a probability in [0, 1]")
            if not str(d.get("instruct", "")).strip():
                raise ValueError(f"{where}.strategies.{s}.instruct: needs an instruction")
            parsed.append(Strategy(str(s), float(p), str(d["instruct"]).strip()))
        out[str(name)] = Layer(str(name), float(w), tuple(parsed))
    if sum(layer.weight for layer in out.values()) <= 0:
        raise ValueError(f"{path.name}: layers: the layer weights sum to zero")
    return out


def layer_shares(layers: dict[str, Layer]) -> dict[str, float]:
    total = sum(layer.weight for layer in layers.values())
    return {n: layer.weight / total for n, layer in layers.items()}


def plan_noise(
    layers: dict[str, Layer], rate: float, seed: int, *where: object
) -> NoisePlan | None:
    """None (the message stays clean) with probability 1 - rate; else a layer drawn by
    weight and its strategies drawn independently, one of them at random when none was."""
    rng = random.Random(content_id("noise", seed, *where))
    if rng.random() >= rate:
        return None
    shares = layer_shares(layers)
    name = rng.choices(list(shares), weights=list(shares.values()))[0]
    chosen = tuple(s.name for s in layers[name].strategies if rng.random() < s.p)
    if not chosen:
        chosen = (rng.choice(layers[name].strategies).name,)
    return NoisePlan(name, chosen)


# Step 1 of the semantic-aware distractor: what the message asks for and its details, so
# the noise can target them (a slot to drop, a value to blur) instead of random words.
INTENT_ID = "personaatlas_intent"
INTENT_SCHEMA: dict = {
    "type": "object",
    "properties": {
        "intent": {"type": "string", "minLength": 1, "maxLength": 120},
        "slots": {
            "type": "array",
            "maxItems": 6,
            "items": {"type": "string", "minLength": 1, "maxLength": 60},
        },
    },
    "required": ["intent", "slots"],
    "additionalProperties": False,
}


def intent_request(message: str, params: GenerationParams) -> LLMRequest:
    user = (
        'What does this message to an AI assistant ask for? Answer in JSON with "intent": '
        'the request in a few words, and "slots": the specific details it gives (times, '
        f"places, numbers, names, constraints), each as a short phrase.\n\nMessage:\n{message}"
    )
    return LLMRequest.chat(user, None, params, INTENT_SCHEMA, INTENT_ID)


def distract_request(
    message: str,
    plan: NoisePlan,
    layers: dict[str, Layer],
    params: GenerationParams,
    intent: dict | None = None,
    persona: str = "",
) -> LLMRequest:
    """Step 2: the rewrite applying the drawn strategies, told the message's intent and
    slots (when extracted) and the writer's observed persona, so the noise stays in voice
    and hits the details."""
    how = {s.name: s.instruct for s in layers[plan.layer].strategies}
    steps = "\n".join(f"- {how[s]}" for s in plan.strategies)
    known = ""
    if intent:
        slots = "; ".join(intent.get("slots") or []) or "none"
        known = f"It asks for: {intent['intent']}. Its details: {slots}.\n"
    who = f"The writer:\n{persona}\n\n" if persona else ""
    user = (
        f"{who}Rewrite this message to an AI assistant the way this person, in a hurry, might "
        f"send it. {known}Apply these changes:\n{steps}\n\nMessage:\n{message}\n\n"
        "Write only the rewritten message."
    )
    return LLMRequest.chat(user, None, params, None, DISTRACT_ID)
