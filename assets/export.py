"""Export of a curated dataset to a Hugging Face `datasets` dataset with a generated card."""

import polars as pl
from dagster import AssetExecutionContext, AssetIn, AssetKey, Config, MetadataValue, Output, asset

from pipelines.resources import QualityResource
from pipelines.status import latest_check_results, latest_materialization_metadata
from quality.export import CheckSummary, DatasetCardInfo, export_dataset

DEDUP_KEYS = (
    "stored_before",
    "duplicate_clusters",
    "dropped_exact_duplicate",
    "dropped_near_duplicate",
    "dropped_contaminated",
    "eval_items",
    "distinct_1",
    "distinct_2",
    "embedding_dispersion",
)


class ExportConfig(Config):
    path: str = ""  # empty = <home>/exports/<dataset>
    repo_id: str = ""  # push_to_hub target; needs HF_TOKEN and network


def export_asset(curated: str, seeds: str, family: str, group: str, description: str, checks: list):
    """`checks`: the check definitions of the curated asset, whose latest results the card lists."""
    check_keys = [k for c in checks for k in c.check_keys if k.asset_key == AssetKey(curated)]

    @asset(
        name=f"{curated}_export",
        ins={
            "data": AssetIn(curated),
            "rejected": AssetIn(f"{curated}_rejected"),
            "seeds": AssetIn(seeds),
        },
        group_name=group,
        description=f"{curated} saved as a Hugging Face dataset with a dataset card.",
    )
    def _export(
        context: AssetExecutionContext,
        config: ExportConfig,
        quality: QualityResource,
        data: pl.DataFrame,
        rejected: pl.DataFrame,
        seeds: pl.DataFrame,
    ) -> Output[pl.DataFrame]:
        results = latest_check_results(context.instance, check_keys)
        produced = latest_materialization_metadata(context.instance, curated)
        reasons = dict(rejected["reason"].value_counts().iter_rows()) if rejected.height else {}
        info = DatasetCardInfo(
            family=family,
            name=curated,
            description=description,
            rows_in=int(produced.get("rows_in", data.height + rejected.height)),
            rejected={k: int(v) for k, v in reasons.items()},
            checks=[
                CheckSummary(
                    c["name"], bool(c["passed"]), c["severity"] or c["status"], c["detail"]
                )
                for c in results
            ],
            sources=sorted(set(seeds["source"].to_list())),
            dedup={k: produced[k] for k in DEDUP_KEYS if k in produced},
        )
        out = config.path or str(quality.exports_dir / curated)
        result = export_dataset(data, out, info, repo_id=config.repo_id or None)
        summary = pl.DataFrame(
            [{"path": result["path"], "rows": result["rows"], "pushed": result["pushed_to_hub"]}]
        )
        return Output(
            summary,
            metadata={
                "export_path": MetadataValue.path(result["path"]),
                "rows": result["rows"],
                "pushed_to_hub": result["pushed_to_hub"],
                "checks_in_card": len(results),
                "card": MetadataValue.md(result["card"]),
            },
        )

    return _export
