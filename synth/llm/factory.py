"""Build a backend from settings, failing fast with the setting named."""

from __future__ import annotations

from synth.llm.backends import BACKENDS, EmbeddedBackend, OpenAICompatBackend, VLLMBackend


def probe_server(base_url: str, timeout_s: float = 5.0, api_key: str | None = None) -> None:
    """Raise ConnectionError, naming the URL, unless an OpenAI-compatible server answers."""
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
):
    if backend not in BACKENDS:
        raise ValueError(
            f"unknown LLM backend {backend!r} (setting backend): choose one of {', '.join(BACKENDS)}"
        )
    if backend == "embedded":
        return EmbeddedBackend(model_path=model, n_parallel=n_parallel)
    if backend == "openai":
        if not base_url:
            raise ValueError(
                "backend 'openai' needs a server URL (setting base_url), e.g. http://127.0.0.1:8000/v1"
            )
        if not model:
            raise ValueError("backend 'openai' needs a model name (setting model)")
        if check_server:
            probe_server(base_url, min(timeout_s, 5.0), api_key)
        return OpenAICompatBackend(
            base_url, model, api_key, timeout_s, max_retries, response_format
        )
    if not model:
        raise ValueError("backend 'vllm' needs a model path or id (setting model)")
    return VLLMBackend(model)
