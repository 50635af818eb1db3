"""`dagster dev` on 127.0.0.1 loads workspace.yaml, serves the asset graph, and runs a
partition backfill launched the way the UI launches one."""

import time

import httpx
from dagster_dev import dagster_dev

LAUNCH_BACKFILL = """
mutation($params: LaunchBackfillParams!) {
  launchPartitionBackfill(backfillParams: $params) {
    __typename
    ... on LaunchBackfillSuccess { backfillId }
    ... on PythonError { message }
    ... on InvalidSubsetError { message }
  }
}"""
BACKFILL_STATUS = """
query($id: String!) {
  partitionBackfillOrError(backfillId: $id) { ... on PartitionBackfill { status } }
}"""
MEDAD_SHARDS = (
    "medad_bases",
    "medad_bases_rejected",
    "medad_center_cases",
    "medad_center_cases_rejected",
)


def test_dagster_dev_serves_the_asset_graph_and_runs_a_center_backfill(cli_env, tmp_path):
    with dagster_dev(cli_env) as (url, nodes):
        groups = {"/".join(n["assetKey"]["path"]): n["groupName"] for n in nodes}
        assert groups["seed_instructions"] == "seeds"
        assert groups["judged_responses"] == "responses"
        assert groups["judged_responses_rejected"] == "responses"
        assert groups["trace_curated"] == "trace" and groups["judge_calibration"] == "quality"
        assert (
            groups["ultraprompt_trees"] == "ultraprompt"
            and groups["paligner_eval"] == "ultraprompt"
        )
        assert groups["personaknob_pairs"] == groups["personaknob_eval"] == "personaknob"
        assert groups["personaatlas_trajectories"] == groups["personaatlas_eval"] == "personaatlas"
        assert (
            groups["medad_cases"] == groups["medad_center_cases"] == groups["medad_eval"] == "medad"
        )

        # The UI's "Materialize" on partitioned assets with two partitions picked: an asset
        # backfill, which dagster dev's daemon turns into runs.
        params = {
            "assetSelection": [{"path": [a]} for a in MEDAD_SHARDS],
            "partitionNames": ["center_1", "center_2"],
            "fromFailure": False,
        }
        r = httpx.post(
            f"{url}/graphql",
            json={"query": LAUNCH_BACKFILL, "variables": {"params": params}},
            timeout=30,
        )
        launched = r.json()["data"]["launchPartitionBackfill"]
        assert launched["__typename"] == "LaunchBackfillSuccess", launched
        status, deadline = None, time.monotonic() + 240
        while time.monotonic() < deadline and status not in (
            "COMPLETED",
            "COMPLETED_SUCCESS",
            "FAILED",
            "COMPLETED_FAILED",
            "CANCELED",
        ):
            time.sleep(2)
            r = httpx.post(
                f"{url}/graphql",
                json={"query": BACKFILL_STATUS, "variables": {"id": launched["backfillId"]}},
                timeout=30,
            )
            status = r.json()["data"]["partitionBackfillOrError"]["status"]
        assert status in ("COMPLETED", "COMPLETED_SUCCESS"), status
    shards = tmp_path / "storage" / "medad_center_cases"
    assert sorted(p.name for p in shards.iterdir()) == ["center_1.parquet", "center_2.parquet"]
    assert (tmp_path / "storage" / "medad_bases.parquet").exists()
