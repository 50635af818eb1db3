"""One request/response model shared by every backend."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any

ROLES = ("system", "user", "assistant")


@dataclass(frozen=True, slots=True)
class Message:
    role: str
    content: str

    def __post_init__(self) -> None:
        if self.role not in ROLES:
            raise ValueError(f"message role must be one of {ROLES}, got {self.role!r}")

    def as_dict(self) -> dict[str, str]:
        return {"role": self.role, "content": self.content}


@dataclass(frozen=True, slots=True)
class GenerationParams:
    """Decoding parameters. `n` samples are sent as n requests with seeds seed+i."""

    temperature: float = 0.7
    top_p: float = 1.0
    max_tokens: int = 256
    n: int = 1
    seed: int = 0
    stop: tuple[str, ...] = ()
    logprobs: bool = False
    top_logprobs: int = 0
    # llama.cpp loops on some prompts with tiny models; a mild penalty breaks it.
    repeat_penalty: float | None = None

    def __post_init__(self) -> None:
        if self.n < 1:
            raise ValueError(f"n must be >= 1, got {self.n}")
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {self.max_tokens}")

    def key_fields(self) -> dict[str, Any]:
        """What changes one sample's output: everything but n (samples are keyed by index)."""
        d = asdict(self)
        d.pop("n")
        d["stop"] = list(self.stop)
        return d


@dataclass(frozen=True, slots=True)
class LLMRequest:
    messages: tuple[Message, ...]
    params: GenerationParams = GenerationParams()
    json_schema: dict[str, Any] | None = None
    # Provenance only: which template rendered these messages. Not part of the cache key,
    # because the rendered messages already are.
    template_id: str = ""

    @staticmethod
    def chat(
        user: str,
        system: str | None = None,
        params: GenerationParams | None = None,
        json_schema: dict[str, Any] | None = None,
        template_id: str = "",
    ) -> LLMRequest:
        msgs = ([Message("system", system)] if system else []) + [Message("user", user)]
        return LLMRequest(tuple(msgs), params or GenerationParams(), json_schema, template_id)

    def message_dicts(self) -> list[dict[str, str]]:
        return [m.as_dict() for m in self.messages]


@dataclass(slots=True)
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0


@dataclass(slots=True)
class TopLogprob:
    token: str
    logprob: float


@dataclass(slots=True)
class TokenLogprob:
    token: str
    logprob: float
    top: list[TopLogprob] = field(default_factory=list)


@dataclass(slots=True)
class Sample:
    """One generated sample, or the reason there is none (`error` set, `text` empty)."""

    text: str = ""
    finish_reason: str = ""
    logprobs: list[TokenLogprob] | None = None
    usage: Usage = field(default_factory=Usage)
    parsed: Any = None
    cache_key: str = ""
    cached: bool = False
    error: str | None = None
    error_detail: str = ""

    @property
    def ok(self) -> bool:
        return self.error is None

    def to_json(self) -> str:
        return json.dumps(asdict(self), ensure_ascii=False)

    @staticmethod
    def from_json(raw: str) -> Sample:
        d = json.loads(raw)
        lps = d.get("logprobs")
        return Sample(
            text=d["text"],
            finish_reason=d["finish_reason"],
            logprobs=None
            if lps is None
            else [
                TokenLogprob(t["token"], t["logprob"], [TopLogprob(**x) for x in t["top"]])
                for t in lps
            ],
            usage=Usage(**d["usage"]),
            parsed=d.get("parsed"),
            cache_key=d.get("cache_key", ""),
            error=d.get("error"),
            error_detail=d.get("error_detail", ""),
        )


@dataclass(slots=True)
class LLMResponse:
    """All samples for one request; `text`/`parsed`/`ok` refer to the first."""

    request: LLMRequest
    samples: list[Sample]

    @property
    def first(self) -> Sample:
        return self.samples[0]

    @property
    def text(self) -> str:
        return self.first.text

    @property
    def parsed(self) -> Any:
        return self.first.parsed

    @property
    def ok(self) -> bool:
        return self.first.ok

    @property
    def error(self) -> str | None:
        return self.first.error

    @property
    def cache_keys(self) -> list[str]:
        return [s.cache_key for s in self.samples]


class BackendError(Exception):
    """A failed call with a machine-readable reason (`rate_limited`, `timeout`, ...)."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail
