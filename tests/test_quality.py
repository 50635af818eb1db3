"""The quality layer: dedup (exact, semantic, incremental in LanceDB), decontamination,
expectation suites with Data Docs, and a failed integrity suite stopping training."""

import json
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from dagster import DagsterInstance

from pipelines.definitions import build_definitions
from quality.curation import CurationSettings, CurationSpec, curate
from quality.decontam import EvalItem, load_eval_items
from quality.dedup import clustered_pairs, exact_clusters, exact_pairs
from quality.expectations import Suite, validate
from quality.store import EmbeddingStore
from quality.suites import SUITES
from synth.loaders import SHIPPED_SEEDS, load_instructions, load_preference_pairs

from conftest import trace_partition


def test_exact_dedup_links_duplicates_to_their_representative():
    df = pl.DataFrame(
        {
            "record_id": ["a", "b", "c", "d"],
            "text": ["Hello,  World!", "hello world", "Something else", "HELLO world."],
        }
    )
    got = exact_clusters(df, "text")
    assert got["cluster_id"].to_list() == ["a", "a", "c", "a"]
    assert got["is_representative"].to_list() == [True, False, True, False]


def planted(n: int, n_dupes: int, seed: int = 0) -> np.ndarray:
    """Clustered random vectors with `n_dupes` noisy copies planted at random rows."""
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(50, 64)).astype(np.float32)
    v = centers[rng.integers(0, 50, n)] + rng.normal(size=(n, 64)).astype(np.float32) * 1.5
    src, dst = rng.choice(n, (2, n_dupes), replace=False)
    v[dst] = v[src] + rng.normal(size=(n_dupes, 64)).astype(np.float32) * 0.1
    return v


def test_clustered_search_finds_what_the_exact_join_finds():
    v = planted(6000, 150)
    exact = exact_pairs(v, 0.9)
    found = clustered_pairs(v, 0.9, n_clusters=40, probes=3)
    assert len(exact) >= 140  # the planted pairs are there to be found
    recall = len(exact.as_set() & found.as_set()) / len(exact)
    assert recall >= 0.95, recall
    assert found.as_set() <= exact.as_set()  # nothing below the threshold
    assert (found.similarity >= 0.9).all() and (found.left < found.right).all()


def _rows(prompts):
    return pl.DataFrame(
        [
            {"record_id": f"r{i}", "parent_ids": [f"p{i}"], "prompt": p, "answer": "Sure."}
            for i, p in enumerate(prompts)
        ]
    )


SPEC = CurationSpec("demo", ("prompt", "answer"), ("prompt",))


def test_curation_keeps_or_rejects_every_row_and_is_incremental(tmp_path):
    store = EmbeddingStore(tmp_path / "lancedb")
    settings = CurationSettings(near_duplicate_threshold=0.9)
    evals = load_eval_items()
    first = _rows(
        [
            "How do I bake sourdough bread at home?",
            "how do I bake sourdough bread at home",  # exact after normalisation
            "How can I bake sourdough bread at home?",  # near-duplicate
            "Which common household cleaners are dangerous to mix, and why?",  # a TRACE eval prompt
            "Write a short poem about the sea.",
        ]
    )
    r = curate(first, SPEC, settings, store, evals, "demo", "run1")
    assert r.kept["record_id"].to_list() == ["r0", "r4"]
    reasons = dict(zip(r.rejected["record_id"], r.rejected["reason"], strict=True))
    assert reasons == {"r1": "exact_duplicate", "r2": "near_duplicate", "r3": "contaminated"}
    detail = dict(zip(r.rejected["record_id"], r.rejected["detail"], strict=True))
    assert "record r0" in detail["r1"] and "cluster r0" in detail["r2"]
    assert "eval item trace_eval_prompts:0" in detail["r3"]
    assert (
        json.loads(r.rejected.filter(pl.col("record_id") == "r2")["payload"][0])["cluster_id"]
        == "r0"
    )
    assert r.kept.filter(pl.col("record_id") == "r0")["cluster_size"][0] == 3
    assert r.rejected["parent_ids"].to_list() == [["p1"], ["p3"], ["p2"]]
    assert store.count("demo") == 2

    # a later batch is compared with what the store holds, not only with itself
    second = _rows(["How would I bake sourdough bread at home?", "Explain how tides work."])
    second = second.with_columns(pl.Series("record_id", ["s0", "s1"]))
    r2 = curate(second, SPEC, settings, store, evals, "demo", "run2")
    assert r2.stored_before == 2 and r2.kept["record_id"].to_list() == ["s1"]
    assert (
        "near-duplicate" in r2.rejected["detail"][0] and "earlier batch" in r2.rejected["detail"][0]
    )
    assert store.count("demo") == 3

    # re-curating the first batch: a record is never a duplicate of itself
    again = curate(first, SPEC, settings, store, evals, "demo", "run3")
    assert again.kept["record_id"].to_list() == ["r0", "r4"] and store.count("demo") == 3


def test_exact_copies_follow_their_record_into_a_near_duplicate_cluster(tmp_path):
    store = EmbeddingStore(tmp_path / "lancedb")
    settings = CurationSettings(near_duplicate_threshold=0.9)
    curate(_rows(["How do I bake sourdough bread at home?"]), SPEC, settings, store, [], "d", "1")
    batch = _rows(
        [
            "How would I bake sourdough bread at home?",  # near-duplicate of stored r0
            "how would I bake sourdough bread at home",  # exact copy of the line above
        ]
    ).with_columns(pl.Series("record_id", ["s0", "s1"]))
    r = curate(batch, SPEC, settings, store, [], "d", "2")
    assert r.kept.height == 0
    reasons = dict(zip(r.rejected["record_id"], r.rejected["reason"], strict=True))
    assert reasons == {"s0": "near_duplicate", "s1": "exact_duplicate"}
    clusters = {
        d["record_id"]: json.loads(d["payload"])["cluster_id"] for d in r.rejected.to_dicts()
    }
    assert clusters == {"s0": "r0", "s1": "r0"}  # both point at the kept record
    assert r.cluster_sizes == [3]


def test_user_benchmark_files_decontaminate(tmp_path):
    bench = tmp_path / "mybench.jsonl"
    bench.write_text(
        json.dumps(
            {"id": "q7", "question": "What is the boiling point of water at sea level in Celsius?"}
        )
        + "\n"
    )
    items = load_eval_items([str(bench)])
    assert (
        EvalItem("mybench:q7", "What is the boiling point of water at sea level in Celsius?")
        in items
    )
    df = _rows(
        [
            "Quick one: what is the boiling point of water at sea level in celsius? thanks",
            "Name three rivers in Europe.",
        ]
    )
    r = curate(df, SPEC, CurationSettings(), EmbeddingStore(tmp_path / "db"), items, "x", "run")
    assert r.kept["record_id"].to_list() == ["r1"]
    assert "eval item mybench:q7 (ngram" in r.rejected["detail"][0]


def test_suite_reports_failing_records_and_writes_data_docs(tmp_path):
    pairs = load_preference_pairs(str(SHIPPED_SEEDS / "preference_pairs.jsonl")).kept
    (integrity,) = SUITES["seed_preference_pairs"]
    ok = validate(pairs, integrity, tmp_path / "docs")
    assert ok.success and len(ok.outcomes) == len(integrity.expectations)
    bad_id = pairs["record_id"][2]
    broken = pairs.with_columns(
        pl.when(pl.col("record_id") == bad_id)
        .then(pl.lit(""))
        .otherwise(pl.col("chosen"))
        .alias("chosen")
    )
    result = validate(broken, integrity, tmp_path / "docs")
    assert not result.success
    (failed,) = result.failed
    assert failed.column == "chosen" and failed.examples == [bad_id]
    assert failed.threshold == {"min_value": 1, "max_value": 20_000}
    assert result.docs_page.endswith(".html") and "chosen" in Path(result.docs_page).read_text()
    json.dumps(result.metadata())  # metadata is plain JSON
    # Every validation keeps its page (GX alone keeps only the last one's), and the index
    # lists them all and opens offline.
    (other,) = SUITES["seed_instructions"]
    third = validate(
        load_instructions(str(SHIPPED_SEEDS / "instructions.jsonl")).kept, other, tmp_path / "docs"
    )
    for r in (ok, result, third):
        assert Path(r.docs_page).exists()
    index = (tmp_path / "docs" / "index.html").read_text()
    assert index.count("<tr><td><a href=") == 3 and "FAILED 1 of" in index
    assert "http://" not in index and "https://" not in index
    for r in (ok, result, third):
        page = Path(r.docs_page).read_text()
        assert '<script src="https://' not in page and "bootstrapcdn" not in page


def test_drift_suite_warns_on_distribution_bounds():
    suite = Suite(
        "toy.drift",
        "warn",
        (("ExpectColumnMeanToBeBetween", {"column": "p", "min_value": 0.3, "max_value": 1.0}),),
    )
    low = validate(pl.DataFrame({"record_id": ["a", "b"], "p": [0.1, 0.2]}), suite)
    assert not low.success and low.outcomes[0].observed == pytest.approx(0.15)


def test_failed_integrity_suite_stops_training(tmp_path):
    seeds = tmp_path / "pairs.jsonl"
    text = (SHIPPED_SEEDS / "preference_pairs.jsonl").read_text()
    huge = {
        "chosen": "\n\nHuman: Tell me a story.\n\nAssistant: " + "once upon a time " * 1500,
        "rejected": "\n\nHuman: Tell me a story.\n\nAssistant: No.",
    }
    seeds.write_text(text.rstrip("\n") + "\n" + json.dumps(huge) + "\n")
    defs, instance = build_definitions(tmp_path), DagsterInstance.ephemeral()
    result = defs.resolve_job_def("trace").execute_in_process(
        instance=instance,
        partition_key=trace_partition(instance),
        raise_on_error=False,
        run_config={"ops": {"seed_preference_pairs": {"config": {"source": str(seeds)}}}},
    )
    checks = {e.asset_check_key.name: e for e in result.get_asset_check_evaluations()}
    suite = checks["seed_preference_pairs_integrity_suite"]
    assert not suite.passed
    failures = suite.metadata["failures"].value
    assert "expect_column_value_lengths_to_be_between" in failures and "chosen" in failures
    assert suite.metadata["data_docs"].value.endswith(".html")
    materialized = {e.asset_key.path[-1] for e in result.get_asset_materialization_events()}
    assert "seed_preference_pairs" in materialized
    assert not materialized & {"trace_triage", "trace_curated", "trace_model", "trace_weighted"}
