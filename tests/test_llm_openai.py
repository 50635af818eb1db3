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


def test_judge_sends_a_reply_s_questions_round_robin_and_answers_in_the_given_order():
    """prefix_order puts the second question about each reply after every reply's first
    (so a prompt-caching server reuses the reply's prefix); the scores still come back in
    the order asked. The reference server (a TEST DOUBLE) answers Yes/No per question."""
    from reference_server import Entry, ReferenceJudgeServer

    from synth.llm import judge, make_backend
    from synth.llm.judge import prefix_order
    from synth.personaknob.synthesis import verify_request

    asks = [
        ("r1", "Is it warm?"),
        ("r1", "Is it blunt?"),
        ("r2", "Is it warm?"),
        ("r2", "Is it blunt?"),
    ]
    reqs = [verify_request("hello", f"reply {r}", q) for r, q in asks]
    other = LLMRequest.chat("Something else entirely.")
    assert prefix_order([*reqs, other]) == [0, 2, 4, 1, 3]
    entries = [
        Entry(("reply r1", "warm"), choices={"Yes": 0.9, "No": 0.1}),
        Entry(("reply r1", "blunt"), choices={"Yes": 0.2, "No": 0.8}),
        Entry(("reply r2", "warm"), choices={"Yes": 0.3, "No": 0.7}),
        Entry(("reply r2", "blunt"), choices={"Yes": 0.6, "No": 0.4}),
    ]
    with ReferenceJudgeServer(entries) as server:
        client = LLMClient(make_backend("openai", model="reference", base_url=server.base_url))
        done: list[int] = []
        scores = judge(client, reqs, on_done=done.append)
    assert [round(s.p("Yes"), 2) for s in scores] == [0.9, 0.2, 0.3, 0.6]
    assert sorted(done) == [0, 1, 2, 3]  # progress reports the caller's indices
