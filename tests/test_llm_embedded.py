"""The embedded model (SmolLM2-135M-Instruct via llama.cpp) really generates and judges."""

import math

from synth.llm import GenerationParams, LLMClient, LLMRequest, ResponseCache, judge

PERSON = {
    "type": "object",
    "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
    "required": ["name", "age"],
}


def test_generates_chat_output(embedded_backend, tmp_path):
    client = LLMClient(embedded_backend, ResponseCache(tmp_path / "c.sqlite"))
    reqs = [
        LLMRequest.chat(
            f"Write one sentence about {w}.", params=GenerationParams(max_tokens=32, seed=3)
        )
        for w in ("rivers", "bread", "maps")
    ]
    out = client.generate(reqs)
    assert len(out) == 3
    for r in out:
        assert r.ok, r.first.error_detail
        assert r.text.strip()
        assert "<|im_start|>" not in r.text and "<|im_end|>" not in r.text
        assert r.first.finish_reason in ("stop", "length")
        assert 0 < r.first.usage.completion_tokens <= 32
        assert r.first.usage.prompt_tokens > 0
    assert client.stats.calls == 3 and client.stats.completion_tokens > 0


def test_n_samples_are_distinct_calls(embedded_backend, tmp_path):
    client = LLMClient(embedded_backend, ResponseCache(tmp_path / "c.sqlite"))
    (r,) = client.generate(
        [
            LLMRequest.chat(
                "Name an animal.", params=GenerationParams(n=3, max_tokens=8, temperature=1.0)
            )
        ]
    )
    assert len(r.samples) == 3
    assert len(set(r.cache_keys)) == 3
    assert client.stats.calls == 3


def test_judge_scores_by_logprobs(embedded_backend, tmp_path):
    client = LLMClient(embedded_backend, ResponseCache(tmp_path / "c.sqlite"))
    scores = judge(
        client,
        [
            LLMRequest.chat("Is water wet? Answer Yes or No."),
            LLMRequest.chat(
                "Rate the sentence 'The cat sat.' for grammar from 1 to 5. Answer with one digit."
            ),
        ],
        choices=("Yes", "No"),
    )
    s = scores[0]
    assert s.ok and s.method == "logprobs"
    assert math.isclose(sum(s.probs.values()), 1.0, rel_tol=1e-9)
    assert 0.0 < s.mass <= 1.0 + 1e-9
    assert s.best in ("Yes", "No")
    # a 1-5 scale scored from the same first token
    (rating,) = judge(
        client,
        [LLMRequest.chat("Rate 'The cat sat.' for grammar from 1 to 5. Answer with one digit.")],
        choices=("1", "2", "3", "4", "5"),
    )
    assert rating.ok
    assert 1.0 <= rating.expected({str(i): float(i) for i in range(1, 6)}) <= 5.0


def test_structured_output_matches_schema(embedded_backend, tmp_path):
    client = LLMClient(embedded_backend, ResponseCache(tmp_path / "c.sqlite"))
    (r,) = client.generate(
        [
            LLMRequest.chat(
                "Invent a person. Reply in JSON with name and age.",
                json_schema=PERSON,
                params=GenerationParams(max_tokens=64, temperature=0.2),
            )
        ]
    )
    assert r.ok, r.first.error_detail
    assert isinstance(r.parsed["name"], str) and isinstance(r.parsed["age"], int)
