"""`dagster dev` on 127.0.0.1 loads workspace.yaml and serves the asset graph."""

from dagster_dev import dagster_dev


def test_dagster_dev_serves_the_asset_graph(cli_env):
    with dagster_dev(cli_env) as (_, nodes):
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
        assert groups["medad_cases"] == groups["medad_eval"] == "medad"
