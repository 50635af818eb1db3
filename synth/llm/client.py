"""LLMClient: cache, bounded concurrency, structured output and statistics over any backend."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterable, Iterator, Sequence
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


# Failures that mean the server is not answering (as opposed to answering badly).
UNREACHABLE = frozenset({"timeout", "connection_error", "deadline_exceeded"})


class CircuitBreaker:
    """Stops sending when most recent calls found no server: after `window` calls of which
    at least `threshold` share failed unreachable, every further call is rejected at once
    (`circuit_open`) instead of waiting out its timeout and retries, so a hung server costs
    minutes, not hours. It stays open for the rest of the client's life."""

    def __init__(self, window: int = 8, threshold: float = 0.75) -> None:
        self.window, self.threshold = window, threshold
        self.recent: list[bool] = []
        self.open = False
        self.why = ""

    def record(self, reachable: bool) -> None:
        self.recent = [*self.recent[-(self.window - 1) :], reachable]
        failed = self.recent.count(False)
        if len(self.recent) >= self.window and failed >= self.threshold * self.window:
            self.open = True
            self.why = (
                f"{failed} of the last {self.window} calls found no server (timeouts or "
                "connection errors): not sending more"
            )


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
        deadline_s: float | None = None,
        breaker: CircuitBreaker | None = None,
    ) -> None:
        self.backend = backend
        self.cache = cache
        self.max_concurrency = max_concurrency
        self.schema_retries = schema_retries
        # The model role this client fills (generator, judge, ...): provenance and metadata.
        self.role = role
        # Keeps one role's cache entries apart from another's on the same model, if set.
        self.cache_namespace = cache_namespace
        # A request's total time, retries included; past it the sample is `deadline_exceeded`.
        self.deadline_s = deadline_s
        self.breaker = breaker if breaker is not None else CircuitBreaker()
        self.stats = LLMStats()
        self._attempts_before = getattr(backend, "attempts", 0)

    @property
    def attempts(self) -> int:
        """HTTP attempts this client's calls made (retries included), where the backend
        counts them; calls count requests, attempts count what was sent."""
        return getattr(self.backend, "attempts", 0) - self._attempts_before

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

        async def run() -> list[LLMResponse]:
            try:
                return await self.agenerate(requests, on_done)
            finally:
                await self.release_loop()

        return asyncio.run(run())

    async def release_loop(self) -> None:
        """Close the backend's HTTP client of the running event loop (call before it ends)."""
        release = getattr(self.backend, "release_loop", None)
        if release is not None:
            await release()

    async def agenerate(
        self,
        requests: Sequence[LLMRequest],
        on_done: Callable[[int], None] | None = None,
    ) -> list[LLMResponse]:
        out: list[LLMResponse | None] = [None] * len(requests)
        async for i, resp in self.astream(requests):
            out[i] = resp
            if on_done is not None:
                on_done(i)
        return out  # type: ignore[return-value]

    def stream(
        self, requests: Iterable[LLMRequest], window: int | None = None
    ) -> Iterator[tuple[int, LLMResponse]]:
        """(index, response) as each request finishes, with at most `window` requests
        (default: 4 x max_concurrency) taken from `requests` and not yet handed back: the
        requests can be a generator over millions of records and memory stays flat."""
        import queue
        import threading

        done: queue.Queue = queue.Queue(maxsize=window or 4 * self.max_concurrency)
        end = object()

        def run() -> None:
            async def pump() -> None:
                try:
                    async for item in self.astream(requests, window):
                        await asyncio.to_thread(done.put, item)
                finally:
                    await self.release_loop()

            try:
                asyncio.run(pump())
                done.put(end)
            except BaseException as e:  # surfaced in the consumer
                done.put(e)

        worker = threading.Thread(target=run, name="llm-stream", daemon=True)
        worker.start()
        while (item := done.get()) is not end:
            if isinstance(item, BaseException):
                raise item
            yield item
        worker.join()

    async def astream(
        self, requests: Iterable[LLMRequest], window: int | None = None
    ) -> AsyncIterator[tuple[int, LLMResponse]]:
        """The async form of `stream`: a bounded window of requests in flight."""
        window = window or 4 * self.max_concurrency
        sem = asyncio.Semaphore(self.max_concurrency)
        start = time.perf_counter()

        async def one(i: int, req: LLMRequest) -> tuple[int, LLMResponse]:
            samples = await asyncio.gather(
                *(self._sample(req, k, sem) for k in range(req.params.n))
            )
            return i, LLMResponse(req, list(samples))

        pending: set[asyncio.Task] = set()
        try:
            for i, req in enumerate(requests):
                # An invalid schema is a programming or configuration error: stop before any
                # call it would make.
                if req.json_schema is not None:
                    check_schema(
                        req.json_schema, f"request {i} (template {req.template_id or '?'})"
                    )
                pending.add(asyncio.ensure_future(one(i, req)))
                if len(pending) >= window:
                    finished, pending = await asyncio.wait(
                        pending, return_when=asyncio.FIRST_COMPLETED
                    )
                    for task in finished:
                        yield task.result()
            while pending:
                finished, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                for task in finished:
                    yield task.result()
        finally:
            for task in pending:
                task.cancel()
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
            if self.breaker.open:
                self.stats.errors["circuit_open"] += 1
                return Sample(cache_key=key, error="circuit_open", error_detail=self.breaker.why)
            self.stats.calls += 1
            try:
                if self.deadline_s:
                    async with asyncio.timeout(self.deadline_s):
                        sample = await self.backend.complete(req, k)
                else:
                    sample = await self.backend.complete(req, k)
            except TimeoutError:
                self.stats.errors["deadline_exceeded"] += 1
                self.breaker.record(False)
                detail = (
                    f"no answer within the request deadline of {self.deadline_s}s, retries included"
                )
                return Sample(cache_key=key, error="deadline_exceeded", error_detail=detail)
            except BackendError as e:
                self.stats.errors[e.reason] += 1
                self.breaker.record(e.reason not in UNREACHABLE)
                return Sample(cache_key=key, error=e.reason, error_detail=e.detail)
            except Exception as e:  # a backend bug must not lose the record
                self.stats.errors["backend_exception"] += 1
                return Sample(
                    cache_key=key,
                    error="backend_exception",
                    error_detail=f"{type(e).__name__}: {e}",
                )
        self.breaker.record(True)
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
