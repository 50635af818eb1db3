"""LLMClient: cache, bounded concurrency, structured output and statistics over any backend."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from synth.llm.backends import Backend
from synth.llm.cache import ResponseCache, cache_key
from synth.llm.structured import check_schema, parse_structured
from synth.llm.types import BackendError, LLMRequest, LLMResponse, Message, Sample


@dataclass
class LLMStats:
    calls: int = 0
    cache_hits: int = 0
    cache_misses: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    wall_s: float = 0.0
    errors: Counter = field(default_factory=Counter)

    @property
    def calls_per_s(self) -> float:
        return self.calls / self.wall_s if self.wall_s > 0 else 0.0

    def as_metadata(self, prefix: str = "llm_") -> dict[str, Any]:
        md: dict[str, Any] = {
            f"{prefix}calls": self.calls,
            f"{prefix}cache_hits": self.cache_hits,
            f"{prefix}cache_misses": self.cache_misses,
            f"{prefix}prompt_tokens": self.prompt_tokens,
            f"{prefix}completion_tokens": self.completion_tokens,
            f"{prefix}calls_per_s": round(self.calls_per_s, 3),
            f"{prefix}wall_s": round(self.wall_s, 3),
        }
        for reason, n in sorted(self.errors.items()):
            md[f"{prefix}errors_{reason}"] = n
        return md


REPAIR_PROMPT = (
    "Your previous reply could not be used ({detail}). Reply again with only a JSON object "
    "that matches the requested schema, and nothing else."
)


class LLMClient:
    def __init__(
        self,
        backend: Backend,
        cache: ResponseCache | None = None,
        max_concurrency: int = 8,
        schema_retries: int = 2,
        role: str = "",
        cache_namespace: str = "",
    ) -> None:
        self.backend = backend
        self.cache = cache
        self.max_concurrency = max_concurrency
        self.schema_retries = schema_retries
        # The model role this client fills (generator, judge, ...): provenance and metadata.
        self.role = role
        # Keeps one role's cache entries apart from another's on the same model, if set.
        self.cache_namespace = cache_namespace
        self.stats = LLMStats()

    @property
    def identity(self) -> str:
        """Who answers, as the cache key sees it: backend kind, model and the namespace."""
        ident = self.backend.identity
        return f"{self.cache_namespace}/{ident}" if self.cache_namespace else ident

    @property
    def model_label(self) -> str:
        """`kind:model` of the backend, for people (metadata, provenance)."""
        return self.backend.identity

    def generate(
        self,
        requests: Sequence[LLMRequest],
        on_done: Callable[[int], None] | None = None,
    ) -> list[LLMResponse]:
        """Responses in request order. Never raises for a failed call: the sample has `error`."""
        return asyncio.run(self.agenerate(requests, on_done))

    async def agenerate(
        self,
        requests: Sequence[LLMRequest],
        on_done: Callable[[int], None] | None = None,
    ) -> list[LLMResponse]:
        # An invalid schema is a programming or configuration error: stop before any call.
        for i, r in enumerate(requests):
            if r.json_schema is not None:
                check_schema(r.json_schema, f"request {i} (template {r.template_id or '?'})")
        start = time.perf_counter()
        sem = asyncio.Semaphore(self.max_concurrency)

        async def one_request(i: int, req: LLMRequest) -> LLMResponse:
            samples = await asyncio.gather(
                *(self._sample(req, k, sem) for k in range(req.params.n))
            )
            if on_done is not None:
                on_done(i)
            return LLMResponse(req, list(samples))

        try:
            return list(await asyncio.gather(*(one_request(i, r) for i, r in enumerate(requests))))
        finally:
            self.stats.wall_s += time.perf_counter() - start

    async def _call(self, req: LLMRequest, k: int, sem: asyncio.Semaphore) -> Sample:
        key = cache_key(self.identity, req, k)
        if self.cache is not None:
            hit = self.cache.get(key)
            if hit is not None:
                self.stats.cache_hits += 1
                return hit
        self.stats.cache_misses += 1
        async with sem:
            self.stats.calls += 1
            try:
                sample = await self.backend.complete(req, k)
            except BackendError as e:
                self.stats.errors[e.reason] += 1
                return Sample(cache_key=key, error=e.reason, error_detail=e.detail)
            except Exception as e:  # a backend bug must not lose the record
                self.stats.errors["backend_exception"] += 1
                return Sample(
                    cache_key=key,
                    error="backend_exception",
                    error_detail=f"{type(e).__name__}: {e}",
                )
        sample.cache_key = key
        self.stats.prompt_tokens += sample.usage.prompt_tokens
        self.stats.completion_tokens += sample.usage.completion_tokens
        if self.cache is not None:
            self.cache.put(key, self.identity, sample)
        return sample

    async def _sample(self, req: LLMRequest, k: int, sem: asyncio.Semaphore) -> Sample:
        sample = await self._call(req, k, sem)
        if req.json_schema is None or not sample.ok:
            return sample
        current, first_key = req, sample.cache_key
        for attempt in range(self.schema_retries + 1):
            parsed, reason, detail = parse_structured(sample.text, req.json_schema)
            if reason is None:
                sample.parsed = parsed
                return sample
            if attempt == self.schema_retries:
                break
            # Repair: show the model its reply and the problem, ask again (a new cached call).
            current = replace(
                current,
                messages=current.messages
                + (
                    Message("assistant", sample.text),
                    Message("user", REPAIR_PROMPT.format(detail=detail[:200])),
                ),
            )
            retry = await self._call(current, k, sem)
            if not retry.ok:
                return retry
            sample = retry
        self.stats.errors[reason] += 1
        sample.error, sample.error_detail = reason, detail
        sample.cache_key = first_key
        return sample
