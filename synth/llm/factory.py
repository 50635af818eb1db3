"""Build a backend from settings, failing fast with the setting named."""

from __future__ import annotations

from typing import Any

from synth.llm.backends import (
    BACKENDS,
    SERVERS,
    EmbeddedBackend,
    OpenAICompatBackend,
    PoolingRewardBackend,
    VLLMBackend,
    detect_server,
)


def probe_server(
    base_url: str, timeout_s: float = 5.0, api_key: str | None = None
) -> dict[str, Any]:
    """GET {base_url}/models: the reply, or ConnectionError naming the URL when no
    OpenAI-compatible server answers."""
    import httpx

    url = base_url.rstrip("/") + "/models"
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    try:
        r = httpx.get(url, timeout=timeout_s, headers=headers)
    except httpx.HTTPError as e:
        raise ConnectionError(
            f"LLM server at {base_url} (setting base_url) does not answer: {type(e).__name__}: {e}"
        ) from None
    if r.status_code >= 500:
        raise ConnectionError(
            f"LLM server at {base_url} (setting base_url) answered {r.status_code} to GET /models"
        )
    try:
        reply = r.json()
    except ValueError:
        return {}
    return reply if isinstance(reply, dict) else {}


def make_backend(
    backend: str,
    model: str = "",
    base_url: str = "",
    api_key: str | None = None,
    timeout_s: float = 60.0,
    max_retries: int = 4,
    response_format: str = "auto",
    n_parallel: int = 8,
    check_server: bool = True,
    server: str = "auto",
):
    if backend not in BACKENDS:
        raise ValueError(
            f"unknown LLM backend {backend!r} (setting backend): choose one of {', '.join(BACKENDS)}"
        )
    if server not in (*SERVERS, "auto"):
        raise ValueError(
            f"unknown server kind {server!r} (setting server): choose auto or one of {', '.join(SERVERS)}"
        )
    if backend == "embedded":
        return EmbeddedBackend(model_path=model, n_parallel=n_parallel)
    if backend in ("openai", "pooling"):
        if not base_url:
            raise ValueError(
                f"backend '{backend}' needs a server URL (setting base_url), e.g. http://127.0.0.1:8000/v1"
            )
        if not model:
            raise ValueError(f"backend '{backend}' needs a model name (setting model)")
        models = probe_server(base_url, min(timeout_s, 5.0), api_key) if check_server else None
        if backend == "pooling":
            return PoolingRewardBackend(base_url, model, api_key, timeout_s, max_retries)
        if server == "auto" and models is not None:
            server = detect_server(models)
        return OpenAICompatBackend(
            base_url, model, api_key, timeout_s, max_retries, response_format, server
        )
    if not model:
        raise ValueError("backend 'vllm' needs a model path or id (setting model)")
    return VLLMBackend(model)


def client_from_spec(spec: dict[str, Any] | str, check_server: bool = True):
    """An LLMClient for a model role described by `LLMResource.subprocess_spec` (a training
    subprocess rebuilds its judge this way); the API key comes from the environment."""
    import json
    import os

    from synth.llm.cache import ResponseCache
    from synth.llm.client import LLMClient

    s = json.loads(spec) if isinstance(spec, str) else dict(spec)
    try:
        backend = make_backend(
            s.get("backend", "embedded"),
            model=s.get("model", ""),
            base_url=s.get("base_url", ""),
            api_key=os.environ.get(s["api_key_var"]) if s.get("api_key_var") else None,
            timeout_s=float(s.get("timeout_s", 60.0)),
            max_retries=int(s.get("max_retries", 4)),
            response_format=s.get("response_format", "auto"),
            check_server=check_server,
            server=s.get("server", "auto"),
        )
    except (ValueError, ConnectionError, FileNotFoundError, ImportError) as e:
        raise type(e)(f"model role '{s.get('role', '?')}': {e}") from None
    cache = ResponseCache(s["cache_path"]) if s.get("cache_path") else None
    return LLMClient(
        backend,
        cache,
        int(s.get("max_concurrency", 8)),
        role=s.get("role", ""),
        cache_namespace=s.get("cache_namespace", ""),
        deadline_s=float(s["deadline_s"]) if s.get("deadline_s") else None,
    )
