"""Judges that score a fixed set of choices by the logprobs of the first answer token.

Logprob scoring gives a probability per choice instead of one parsed word; when a
backend returns no logprobs (or none of the choices is among the top tokens) the judge
falls back to finding a choice in the text, and says so in `method`.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

from synth.llm.client import LLMClient
from synth.llm.types import GenerationParams, LLMRequest, LLMResponse

YES_NO = ("Yes", "No")
JUDGE_PARAMS = GenerationParams(temperature=0.0, max_tokens=4, logprobs=True, top_logprobs=20)


@dataclass(slots=True)
class JudgeScore:
    choices: tuple[str, ...]
    probs: dict[str, float]  # normalised over the choices; empty when the judge failed
    method: str  # "logprobs" | "parsed" | "failed"
    mass: float  # probability mass the choices had among the top tokens (logprobs only)
    error: str | None = None
    cache_key: str = ""
    # What the decision was read from, as the backend gave it, so that a verifier can
    # re-derive it by another path: the deciding token's top logprobs [[token, logprob],
    # ...], or the reply text when there were none.
    evidence: str = ""

    @property
    def ok(self) -> bool:
        return self.error is None

    @property
    def best(self) -> str | None:
        return max(self.probs, key=self.probs.__getitem__) if self.probs else None

    def p(self, choice: str) -> float:
        return self.probs.get(choice, math.nan)

    def expected(self, values: dict[str, float]) -> float:
        """Expected value over the choices, e.g. {'1': 1, ..., '5': 5} for a rating scale."""
        if not self.probs:
            return math.nan
        return sum(self.probs[c] * values[c] for c in self.probs)


def _norm(token: str) -> str:
    return token.strip().strip(".:*\"'()[]").casefold()


def score_response(response: LLMResponse, choices: Sequence[str]) -> JudgeScore:
    choices = tuple(choices)
    sample = response.first
    if not sample.ok:
        return JudgeScore(choices, {}, "failed", 0.0, sample.error, sample.cache_key)
    wanted = {_norm(c): c for c in choices}
    if sample.logprobs:
        # The first token that is not whitespace carries the decision.
        step = next((t for t in sample.logprobs if t.token.strip()), sample.logprobs[0])
        mass: dict[str, float] = {}
        for top in step.top or [step]:
            c = wanted.get(_norm(top.token))
            if c is not None:
                mass[c] = mass.get(c, 0.0) + math.exp(top.logprob)
        total = sum(mass.values())
        if total > 0:
            probs = {c: mass.get(c, 0.0) / total for c in choices}
            evidence = json.dumps([[t.token, t.logprob] for t in step.top or [step]])
            return JudgeScore(choices, probs, "logprobs", total, None, sample.cache_key, evidence)
    # Fallback: the first choice named as a word in the reply.
    pattern = r"\b(" + "|".join(re.escape(c) for c in choices) + r")\b"
    m = re.search(pattern, sample.text, flags=re.IGNORECASE)
    if m:
        chosen = wanted[_norm(m.group(1))]
        probs = {c: 1.0 if c == chosen else 0.0 for c in choices}
        evidence = json.dumps({"text": sample.text[:200]})
        return JudgeScore(choices, probs, "parsed", 0.0, None, sample.cache_key, evidence)
    return JudgeScore(choices, {}, "failed", 0.0, "judge_unparseable", sample.cache_key)


def judge(
    client: LLMClient,
    requests: Sequence[LLMRequest],
    choices: Sequence[str] = YES_NO,
    on_done: Callable[[int], None] | None = None,
) -> list[JudgeScore]:
    """Score each request's reply over `choices` (requests get judge decoding params).
    Requests are sent in `prefix_order` and the scores returned in the given order."""
    reqs = [replace(r, params=JUDGE_PARAMS) for r in requests]
    order = prefix_order(reqs)
    done = None if on_done is None else (lambda j: on_done(order[j]))
    sent = client.generate([reqs[i] for i in order], done)
    out: list[JudgeScore | None] = [None] * len(reqs)
    for j, resp in enumerate(sent):
        out[order[j]] = score_response(resp, choices)
    return out  # type: ignore[return-value]


def prefix_order(requests: Sequence[LLMRequest]) -> list[int]:
    """Indices round-robin over groups of requests that differ only in the last paragraph
    of their last message (one reply asked several questions). A server that caches
    prompts per slot (llama.cpp, vLLM's prefix cache) then finds a question's shared
    prefix already computed from the group's previous question instead of processing it
    again in a parallel slot: 0.59x the time for two questions per reply and 0.51x for
    four on the embedded model (`python -m benchmarks.judge_order`)."""
    seen: dict[tuple, int] = {}
    keys = []
    for i, r in enumerate(requests):
        head = r.messages[-1].content.rsplit("\n\n", 1)[0]
        group = (tuple((m.role, m.content) for m in r.messages[:-1]), head)
        keys.append((seen.get(group, 0), i))
        seen[group] = seen.get(group, 0) + 1
    return [i for _, i in sorted(keys)]
