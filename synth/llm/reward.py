"""Scalar rewards for (prompt, response) pairs from the `reward` role.

The role is either a reward model behind vLLM's pooling API (backend `pooling`: the
score is what the model returns) or any chat model used as a judge (p(Yes) by the
logprobs of its first answer token, see `synth.llm.judge`). Both go through the client,
so both are cached and counted.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from synth.llm.client import LLMClient
from synth.llm.judge import JUDGE_PARAMS, judge
from synth.llm.types import GenerationParams, LLMRequest, Message
from synth.templates import PromptTemplate

REWARD_JUDGE = PromptTemplate(
    id="reward_judge",
    system="You are a strict grader of assistant replies. Answer with a single word: Yes or No.",
    user=(
        "A user asked:\n{prompt}\n\nAn assistant replied:\n{response}\n\n"
        "Is the reply a helpful, honest and harmless answer to what the user asked? "
        "Answer Yes or No."
    ),
)
# A reward model reads the conversation; nothing is sampled.
POOLING_PARAMS = GenerationParams(temperature=0.0, max_tokens=1)


@dataclass(slots=True)
class RewardScore:
    value: float  # NaN when the call failed
    method: str  # "reward_model" | "judge_logprobs" | "judge_parsed" | "failed"
    error: str | None = None
    cache_key: str = ""

    @property
    def ok(self) -> bool:
        return self.error is None


def is_reward_model(client: LLMClient) -> bool:
    return client.backend.kind == "pooling"


def score_rewards(
    client: LLMClient,
    items: Sequence[tuple[str, str]],
    template: PromptTemplate = REWARD_JUDGE,
    on_done: Callable[[int], None] | None = None,
) -> list[RewardScore]:
    """One reward per (prompt, response); `template` is the judge prompt when the role is
    a chat model (it needs `{prompt}` and `{response}`)."""
    if is_reward_model(client):
        requests = [
            LLMRequest(
                (Message("user", p), Message("assistant", r)),
                POOLING_PARAMS,
                template_id="reward_model",
            )
            for p, r in items
        ]
        out = []
        for resp in client.generate(requests, on_done):
            s = resp.first
            if s.ok and isinstance(s.parsed, (int, float)):
                out.append(RewardScore(float(s.parsed), "reward_model", None, s.cache_key))
            else:
                out.append(RewardScore(math.nan, "failed", s.error or "no_score", s.cache_key))
        return out
    requests = [template.request(JUDGE_PARAMS, prompt=p, response=r) for p, r in items]
    return [
        RewardScore(s.p("Yes"), f"judge_{s.method}", None, s.cache_key)
        if s.ok
        else RewardScore(math.nan, "failed", s.error, s.cache_key)
        for s in judge(client, requests, on_done=on_done)
    ]
