"""MedAD rewards for GRPO: pure functions of a completion and the item it answers.

- format: 1 when the completion is exactly `<think>...</think><answer>X</answer>`.
- accuracy: 1 when the letter is the right one.
- consistency: 1 when the reasoning's claims neither contradict each other nor the
  image facts and back the chosen option; 0.25 when they are right about the image but
  say nothing on what was asked; 0 when they say nothing checkable at all, contradict
  the facts or argue for another option (and for a malformed completion). Silence thus
  earns less than a grounded argument, and an empty think nothing.

The weights (format 0.2, accuracy 0.6, consistency 0.2) are our assumption, not the
paper's: accuracy is what is verified, format and consistency keep the reasoning
honest. They are flags of the entry point (`--w-format`, ...).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from synth.medad.vqa import LETTERS, claim_problems, parse_claims, parse_completion, supports

SILENT_BUT_GROUNDED = 0.25


@dataclass(frozen=True)
class RewardWeights:
    format: float = 0.2
    accuracy: float = 0.6
    consistency: float = 0.2


def format_reward(text: str) -> float:
    return 1.0 if parse_completion(text) else 0.0


def accuracy_reward(text: str, answer: str) -> float:
    parsed = parse_completion(text)
    return 1.0 if parsed and parsed[1] == answer else 0.0


def consistency_reward(text: str, item: dict[str, Any]) -> float:
    parsed = parse_completion(text)
    if not parsed:
        return 0.0
    think, letter = parsed
    options = item["options"]
    if LETTERS.index(letter) >= len(options):
        return 0.0
    claims = parse_claims(think)
    if claim_problems(claims, item["facts"]):
        return 0.0
    backed = supports(claims, item["question_type"], options[LETTERS.index(letter)])
    if backed is None:
        return SILENT_BUT_GROUNDED if any(claims.values()) else 0.0
    return 1.0 if backed else 0.0


def rewards(
    text: str, item: dict[str, Any], w: RewardWeights = RewardWeights()
) -> dict[str, float]:
    """Each part and the weighted total. `item`: options, answer, question_type, facts."""
    parts = {
        "format": format_reward(text),
        "accuracy": accuracy_reward(text, item["answer"]),
        "consistency": consistency_reward(text, item),
    }
    parts["total"] = (
        w.format * parts["format"]
        + w.accuracy * parts["accuracy"]
        + w.consistency * parts["consistency"]
    )
    return parts
