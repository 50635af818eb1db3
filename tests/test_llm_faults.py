"""Fault injection with FaultyOpenAIServer (a deliberately faulty local server).

Every fault ends in success after a retry, or in a sample with a machine-readable
reason; nothing hangs and no request is lost.
"""

import time

import pytest

from synth.llm import GenerationParams, LLMClient, LLMRequest, OpenAICompatBackend, ResponseCache

from faulty_server import FaultyOpenAIServer


def run(server, n=1, timeout_s=5.0, max_retries=3, cache=None, concurrency=8):
    backend = OpenAICompatBackend(
        server.base_url, "faulty", timeout_s=timeout_s, max_retries=max_retries
    )
    client = LLMClient(backend, cache, max_concurrency=concurrency)
    reqs = [LLMRequest.chat(f"q{i}", params=GenerationParams(max_tokens=8)) for i in range(n)]
    t = time.perf_counter()
    out = client.generate(reqs)
    return out, client, backend, time.perf_counter() - t


def test_rate_limit_honours_retry_after_then_succeeds():
    with FaultyOpenAIServer("rate_limit", times=1, retry_after=1.0) as s:
        (r,), client, backend, elapsed = run(s)
    assert r.ok and r.text == "fault-free answer"
    assert backend.attempts == 2 and s.requests == 2
    assert elapsed >= 0.9  # waited for Retry-After, not the 0.5 s default backoff


@pytest.mark.parametrize("fault", ["server_error", "malformed_json", "truncated", "no_choices"])
def test_transient_fault_then_success(fault):
    with FaultyOpenAIServer(fault, times=1) as s:
        (r,), client, backend, _ = run(s)
    assert r.ok and r.text == "fault-free answer"
    assert s.requests == 2
    assert client.stats.errors == {}


@pytest.mark.parametrize(
    ("fault", "reason"),
    [
        ("rate_limit", "rate_limited"),
        ("server_error", "server_error"),
        ("malformed_json", "malformed_response"),
        ("truncated", "connection_error"),
        ("no_choices", "malformed_response"),
    ],
)
def test_persistent_fault_gives_a_reason_and_loses_nothing(fault, reason):
    with FaultyOpenAIServer(fault, retry_after=0.05) as s:
        out, client, backend, _ = run(s, n=3, max_retries=1)
    assert len(out) == 3
    assert [r.error for r in out] == [reason] * 3
    assert all(r.first.error_detail for r in out)
    assert client.stats.errors[reason] == 3
    assert s.requests == 6  # one try and one retry each


def test_hang_past_timeout_is_a_timeout_not_a_hang():
    with FaultyOpenAIServer("hang", hang_s=30) as s:
        (r,), client, _, elapsed = run(s, timeout_s=1.0, max_retries=1)
    assert r.error == "timeout"
    assert elapsed < 15


def test_failures_are_not_cached_and_a_rerun_retries_them(tmp_path):
    cache = ResponseCache(tmp_path / "c.sqlite")
    with FaultyOpenAIServer("server_error", times=2) as s:  # the first run: one try, one retry
        (r,), *_ = run(s, max_retries=1, cache=cache)
        assert r.error == "server_error"
        (r2,), client, *_ = run(s, max_retries=1, cache=cache)
    assert r2.ok and client.stats.calls == 1


def test_concurrency_is_bounded():
    with FaultyOpenAIServer("slow") as s:
        out, *_ = run(s, n=9, concurrency=3)
    assert all(r.ok for r in out)
    assert s.max_in_flight == 3


def test_server_without_structured_output_falls_back_to_parse_repair_retry():
    """A server that rejects response_format: the client parses and repairs instead."""
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}
    with FaultyOpenAIServer("ok") as s:
        backend = OpenAICompatBackend(s.base_url, "faulty", response_format="none")
        client = LLMClient(backend, None, schema_retries=1)
        (r,) = client.generate([LLMRequest.chat("give json", json_schema=schema)])
    # the faulty server always answers prose: one repair attempt, then a recorded reason
    assert r.error == "invalid_json"
    assert s.requests == 2
    assert "fault-free answer" in r.first.error_detail


def test_a_hung_server_costs_one_deadline_then_the_circuit_opens():
    """40 records against a server that never answers: the first calls wait out the
    request deadline (retries included), then the breaker rejects the rest at once."""
    with FaultyOpenAIServer("hang", hang_s=30) as s:
        backend = OpenAICompatBackend(s.base_url, "faulty", timeout_s=0.5, max_retries=2)
        client = LLMClient(backend, max_concurrency=4, deadline_s=1.0)
        reqs = [LLMRequest.chat(f"q{i}", params=GenerationParams(max_tokens=4)) for i in range(40)]
        out = client.generate(reqs)
    reasons = [r.error for r in out]
    assert all(reasons)  # nothing answered, nothing lost
    assert set(reasons) <= {"timeout", "deadline_exceeded", "circuit_open"}
    assert reasons.count("circuit_open") >= 40 - 8 - 4  # the window, plus those in flight
    assert client.stats.calls <= 8 + 4 and client.breaker.open
    assert "found no server" in out[-1].first.error_detail
    assert client.attempts >= client.stats.calls  # retries are counted as attempts


def test_generation_streams_with_a_bounded_window():
    """A generator of requests is consumed as results come back: never more than the
    window is taken ahead of what was handed out."""
    taken = 0

    def requests():
        nonlocal taken
        for i in range(200):
            taken += 1
            yield LLMRequest.chat(f"q{i}", params=GenerationParams(max_tokens=4))

    with FaultyOpenAIServer("ok") as s:
        client = LLMClient(OpenAICompatBackend(s.base_url, "faulty"), max_concurrency=8)
        seen, ahead = set(), 0
        for n, (i, resp) in enumerate(client.stream(requests(), window=16), 1):
            assert resp.ok
            seen.add(i)
            ahead = max(ahead, taken - n)
    assert seen == set(range(200)) and ahead <= 16 + 16 + 1  # the window and the hand-off queue
    assert s.max_in_flight <= 8
