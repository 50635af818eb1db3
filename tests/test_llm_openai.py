"""The OpenAI-compatible backend against a real llama.cpp server on 127.0.0.1."""

from synth.llm import (
    GenerationParams,
    LLMClient,
    LLMRequest,
    OpenAICompatBackend,
    ResponseCache,
    judge,
)

PERSON = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}


def test_concurrent_requests(llama_server, tmp_path):
    backend = OpenAICompatBackend(llama_server, "smollm2")
    client = LLMClient(backend, ResponseCache(tmp_path / "c.sqlite"), max_concurrency=8)
    reqs = [
        LLMRequest.chat(
            f"Count from {i} to {i + 3}.", params=GenerationParams(max_tokens=16, seed=i)
        )
        for i in range(8)
    ]
    out = client.generate(reqs)
    assert [r.ok for r in out] == [True] * 8
    assert all(r.text.strip() for r in out)
    assert client.stats.calls == 8 and backend.attempts == 8
    # an unchanged re-run is served from the cache: zero calls
    again = LLMClient(backend, ResponseCache(tmp_path / "c.sqlite"))
    assert [r.text for r in again.generate(reqs)] == [r.text for r in out]
    assert again.stats.calls == 0 and again.stats.cache_hits == 8


def test_logprob_judge_and_structured_output(llama_server, tmp_path):
    client = LLMClient(
        OpenAICompatBackend(llama_server, "smollm2"), ResponseCache(tmp_path / "c.sqlite")
    )
    (score,) = judge(client, [LLMRequest.chat("Is the sky blue on a clear day? Answer Yes or No.")])
    assert score.ok and score.method == "logprobs"
    assert abs(sum(score.probs.values()) - 1.0) < 1e-9
    (r,) = client.generate(
        [
            LLMRequest.chat(
                "Name a city. Reply in JSON.",
                json_schema=PERSON,
                params=GenerationParams(max_tokens=32),
            )
        ]
    )
    assert r.ok and isinstance(r.parsed["city"], str)
