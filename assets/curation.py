"""Curated training datasets: exact dedup, decontamination and semantic near-dedup (LanceDB)."""

import polars as pl
from dagster import (
    AssetCheckExecutionContext,
    AssetCheckResult,
    AssetExecutionContext,
    AssetIn,
    AssetOut,
    Config,
    PartitionMapping,
    asset_check,
    multi_asset,
)

from assets.common import (
    accounting_result,
    dataset_metadata,
    dataset_outputs,
    rows_in,
)
from assets.plots import diversity_plot
from assets.quality import suite_checks
from pipelines.resources import QualityResource
from quality.accounting import account
from quality.curation import CurationSettings, CurationSpec, curate
from quality.decontam import benchmark_files_from_env, load_eval_items


class CurationConfig(Config, CurationSettings):
    pass


def curated_assets(
    name: str,
    source: str,
    spec: CurationSpec,
    group: str,
    doc: str,
    source_partition: PartitionMapping | None = None,
):
    """`name` and `name_rejected` from `source`, with accounting and expectation checks.
    `source_partition`: which partition of a partitioned source is curated."""

    @multi_asset(
        name=name,
        outs={
            name: AssetOut(description=doc),
            f"{name}_rejected": AssetOut(
                description=f"Rows of {source} dropped by curation (duplicate, near-duplicate, contaminated), with the reason."
            ),
        },
        ins={"data": AssetIn(source, partition_mapping=source_partition)},
        group_name=group,
    )
    def _curate(
        context: AssetExecutionContext,
        config: CurationConfig,
        quality: QualityResource,
        data: pl.DataFrame,
    ):
        files = [*config.benchmark_files, *quality.benchmark_files, *benchmark_files_from_env()]
        eval_items = load_eval_items(files)
        result = curate(
            data,
            spec,
            config,
            quality.store(),
            eval_items,
            asset=name,
            run_id=context.run_id,
            log=context.log.info,
        )
        md = dataset_metadata(
            result.kept,
            result.rejected,
            result.n_in,
            **result.metadata(),
            eval_items=len(eval_items),
            lancedb_table=f"{quality.lancedb_dir}/{spec.family}.lance",
        )
        if result.kept.height:
            md["diversity"] = diversity_plot(result.diversity, f"{name}: diversity")
        yield from dataset_outputs(name, result.kept, result.rejected, md)

    @asset_check(
        asset=name,
        name=f"{name}_accounted",
        blocking=True,
        additional_ins={
            "rejected": AssetIn(f"{name}_rejected"),
            "source": AssetIn(source, partition_mapping=source_partition),
        },
        description=f"Every row of {source} is kept or rejected exactly once.",
    )
    def _accounted(
        context: AssetCheckExecutionContext,
        kept: pl.DataFrame,
        rejected: pl.DataFrame,
        source: pl.DataFrame,
    ) -> AssetCheckResult:
        acc = account(
            source["record_id"].to_list(),
            kept["record_id"].to_list(),
            rejected["record_id"].to_list(),
        )
        return accounting_result(acc, rows_in(context, name))

    return _curate, [_accounted, *suite_checks(name)]
