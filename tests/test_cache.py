import multiprocessing as mp

from synth.llm import GenerationParams, LLMRequest, ResponseCache, Sample, Usage, cache_key


def req(text="hi", **params):
    return LLMRequest.chat(text, system="sys", params=GenerationParams(**params))


def test_key_hashes_what_changes_output_and_nothing_else():
    base = cache_key("embedded:m", req(), 0)
    assert cache_key("embedded:m", req(), 0) == base
    # n only says how many samples; each sample is keyed by its index
    assert cache_key("embedded:m", req(n=4), 0) == base
    assert cache_key("embedded:m", req(), 1) != base
    assert cache_key("embedded:m", req(seed=1), 0) != base
    assert cache_key("embedded:m", req(temperature=0.1), 0) != base
    assert cache_key("embedded:m", req("other"), 0) != base
    assert cache_key("openai:m", req(), 0) != base
    schema = LLMRequest.chat("hi", system="sys", json_schema={"type": "object"})
    assert cache_key("embedded:m", schema, 0) != base
    # the template id is provenance, not content
    tagged = LLMRequest.chat("hi", system="sys", template_id="t1")
    assert cache_key("embedded:m", tagged, 0) == base


def _writer(path, key):
    ResponseCache(path).put(key, "x", Sample(text="from another process", usage=Usage(1, 2)))


def test_cache_is_durable_across_processes_and_skips_failures(tmp_path):
    path = tmp_path / "c.sqlite"
    p = mp.get_context("spawn").Process(target=_writer, args=(str(path), "k1"))
    p.start()
    p.join(30)
    cache = ResponseCache(path)
    hit = cache.get("k1")
    assert hit is not None and hit.cached and hit.text == "from another process"
    assert hit.usage.completion_tokens == 2
    cache.put("k2", "x", Sample(error="timeout", error_detail="slow"))
    assert cache.get("k2") is None
    assert len(cache) == 1
