"""What the cache promises: resume after a kill, zero calls when unchanged, and a
changed template regenerates only the records that use it."""

from collections import Counter
from dataclasses import replace
from pathlib import Path

from synth.llm import EmbeddedBackend, LLMClient, ResponseCache
from synth.loaders import SHIPPED_SEEDS, load_instructions
from synth.responses import RESPOND_WITH_INPUT, ResponseTemplates, judged_responses

import resume_worker
from conftest import kill_once_cached


class CountingBackend:
    """The real embedded backend, counting calls per template (instrumentation, not a fake)."""

    def __init__(self, inner):
        self.inner = inner
        self.kind, self.model, self.identity = inner.kind, inner.model, inner.identity
        self.supports_response_format = inner.supports_response_format
        self.calls: Counter = Counter()

    async def complete(self, request, sample_index):
        self.calls[request.template_id or "?"] += 1
        return await self.inner.complete(request, sample_index)


def test_killed_run_resumes_with_only_the_missing_calls(tmp_path):
    cache_path = tmp_path / "cache.sqlite"
    done_before_kill = kill_once_cached(Path(resume_worker.__file__), cache_path, 4, 240)
    total = len(resume_worker.TOPICS)
    assert 4 <= done_before_kill < total

    client = LLMClient(EmbeddedBackend(n_parallel=2), ResponseCache(cache_path), max_concurrency=2)
    out = client.generate(resume_worker.requests())
    assert all(r.ok for r in out)
    assert client.stats.cache_hits == done_before_kill
    assert client.stats.calls == total - done_before_kill


def test_unchanged_rerun_makes_zero_calls_and_one_template_change_only_its_records(
    embedded_backend, tmp_path
):
    seeds = load_instructions(str(SHIPPED_SEEDS / "instructions.jsonl"), limit=8).kept
    with_input = int((seeds["input"] != "").sum())
    assert 0 < with_input < seeds.height
    cache = ResponseCache(tmp_path / "cache.sqlite")

    first = CountingBackend(embedded_backend)
    out1 = judged_responses(LLMClient(first, cache), seeds)
    assert first.calls["respond_plain"] == seeds.height - with_input
    assert first.calls["respond_with_input"] == with_input

    again = CountingBackend(embedded_backend)
    client = LLMClient(again, cache)
    out2 = judged_responses(client, seeds)
    assert sum(again.calls.values()) == 0 and client.stats.calls == 0
    assert out2.kept.equals(out1.kept) and out2.rejected.equals(out1.rejected)

    changed = ResponseTemplates(
        with_input=replace(RESPOND_WITH_INPUT, user="Task: {instruction}\n\nGiven:\n{input}")
    )
    third = CountingBackend(embedded_backend)
    out3 = judged_responses(LLMClient(third, cache), seeds, templates=changed)
    assert third.calls["respond_with_input"] == with_input
    assert third.calls["respond_plain"] == 0
    # only the regenerated responses are judged again
    assert third.calls["judge_follows_instruction"] <= with_input
    assert out3.kept.height + out3.rejected.height == seeds.height
    new_hash = changed.with_input.hash
    assert new_hash != RESPOND_WITH_INPUT.hash
    hashes = {p["template_id"]: p["template_hash"] for p in out3.kept["provenance"].to_list()}
    assert hashes.get("respond_with_input", new_hash) == new_hash
