"""The code location loads, every job resolves, the slice materializes in-process and from the CLI."""

import base64
import io
import subprocess
from pathlib import Path

import datasets
import polars as pl
from dagster import DagsterInstance
from PIL import Image

from pipelines.definitions import build_definitions
from synth.responses import JUDGE_FOLLOWS, RESPOND_PLAIN, RESPOND_WITH_INPUT

from conftest import materialize_cmd

REPO = Path(__file__).resolve().parent.parent


def test_definitions_load_and_every_job_resolves(tmp_path):
    defs = build_definitions(tmp_path)
    repo = defs.get_repository_def()
    names = {j.name for j in repo.get_all_jobs()}
    assert {"seeds", "responses", "demo"} <= names
    for name in names:
        assert repo.get_job(name).name == name
    keys = {k.to_user_string() for k in repo.asset_graph.get_all_asset_keys()}
    for asset in (
        "seed_instructions",
        "seed_preference_pairs",
        "seed_personas",
        "judged_responses",
    ):
        assert asset in keys and f"{asset}_rejected" in keys


def test_the_slice_materializes_with_lineage_and_passing_checks(tmp_path):
    defs = build_definitions(tmp_path)
    result = defs.resolve_job_def("responses").execute_in_process(
        instance=DagsterInstance.ephemeral(),
        run_config={"ops": {"judged_responses_assets": {"config": {"limit": 5}}}},
    )
    assert result.success
    checks = {e.asset_check_key.name: e.passed for e in result.get_asset_check_evaluations()}
    assert checks["judged_responses_accounted"] and checks["judged_responses_integrity_suite"]
    assert checks["seed_instructions_accounted"]

    kept = pl.read_parquet(tmp_path / "storage" / "judged_responses.parquet")
    rejected = pl.read_parquet(tmp_path / "storage" / "judged_responses_rejected.parquet")
    seeds = pl.read_parquet(tmp_path / "storage" / "seed_instructions.parquet")
    assert kept.height + rejected.height == 5
    parents = {p[0] for p in kept["parent_ids"].to_list() + rejected["parent_ids"].to_list()}
    assert parents == set(seeds["record_id"].head(5).to_list())
    for prov in kept["provenance"].to_list():
        assert prov["backend"] == "embedded" and prov["model"].endswith(".gguf")
        assert prov["template_hash"] in (RESPOND_PLAIN.hash, RESPOND_WITH_INPUT.hash)
        assert len(prov["cache_keys"]) == 1 and len(prov["cache_keys"][0]) == 64
    assert set(kept["judge_template_hash"]) <= {JUDGE_FOLLOWS.hash}
    assert kept["judge_p_follows"].is_between(0, 1).all()

    (mat,) = [
        e
        for e in result.get_asset_materialization_events()
        if e.asset_key.path == ["judged_responses"]
    ]
    md = {k: v.value for k, v in mat.materialization.metadata.items()}
    assert md["rows_in"] == 5 and md["kept"] == kept.height and md["rejected"] == rejected.height
    assert (
        md["llm_calls"] + md["llm_cache_hits"]
        == 5 + kept.height + rejected.filter(pl.col("stage") == "judge").height
    )
    assert md["llm_completion_tokens"] > 0

    # curated and exported: a Hugging Face dataset with a card that lists the checks
    curated = pl.read_parquet(tmp_path / "storage" / "responses_curated.parquet")
    dropped = pl.read_parquet(tmp_path / "storage" / "responses_curated_rejected.parquet")
    assert curated.height + dropped.height == kept.height
    export = tmp_path / "exports" / "responses_curated"
    ds = datasets.load_from_disk(str(export))
    assert ds.num_rows == curated.height and "cluster_id" in ds.column_names
    card = (export / "README.md").read_text()
    assert "| responses_curated_integrity_suite | ERROR | passed |" in card
    assert "Apache-2.0 (written for alignfoundry)" in card and "respond_" in card
    assert checks["responses_curated_integrity_suite"] and checks["responses_curated_accounted"]

    # the diversity plot in the metadata is a real PNG of a sensible size
    (cur,) = [
        e
        for e in result.get_asset_materialization_events()
        if e.asset_key.path == ["responses_curated"]
    ]
    plot = cur.materialization.metadata["diversity"].value
    png = base64.b64decode(plot.split("base64,", 1)[1].rstrip(")"))
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(io.BytesIO(png)) as img:
        assert img.format == "PNG" and 300 <= img.width <= 2000 and 150 <= img.height <= 1200


def test_cli_materialize_in_a_subprocess(tmp_path, cli_env):
    proc = subprocess.run(
        materialize_cmd("seed_personas,seed_personas_rejected"),
        cwd=REPO,
        env=cli_env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    personas = pl.read_parquet(tmp_path / "storage" / "seed_personas.parquet")
    assert personas.height == 16 and personas["record_id"].n_unique() == 16


def test_schedules_ship_stopped_and_target_family_jobs(tmp_path):
    from dagster import DefaultScheduleStatus, build_schedule_context, instance_for_test

    from conftest import trace_partition

    repo = build_definitions(tmp_path).get_repository_def()
    schedules = {s.name: s for s in repo.schedule_defs}
    assert set(schedules) == {"nightly_responses", "nightly_trace", "nightly_judges"}
    with instance_for_test() as instance:
        # Before any policy version is a partition, the nightly triage has nothing to run.
        tick = schedules["nightly_trace"].evaluate_tick(
            build_schedule_context(instance=instance, repository_def=repo)
        )
        assert not tick.run_requests and "no triage partition" in tick.skip_message
        version = trace_partition(instance)
        for name, s in schedules.items():
            assert s.default_status == DefaultScheduleStatus.STOPPED
            assert repo.get_job(s.job_name).name == name.removeprefix("nightly_")
            (request,) = s.evaluate_tick(
                build_schedule_context(instance=instance, repository_def=repo)
            ).run_requests
            assert request is not None
            if name == "nightly_trace":
                assert request.partition_key == version
    assert {
        "everything",
        "seeds",
        "responses",
        "trace",
        "ultraprompt",
        "personaknob",
        "personaatlas",
        "personaatlas_shards",
        "medad",
        "medad_centers",
        "judges",
    } <= {j.name for j in repo.get_all_jobs()}
