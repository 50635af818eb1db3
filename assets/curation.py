"""Curated training datasets: exact dedup, decontamination and semantic near-dedup (LanceDB)."""

import polars as pl
from dagster import AssetExecutionContext, AssetIn, Config, PartitionMapping

from assets.declare import Made, Parents, dataset
from assets.plots import diversity_plot
from assets.resources import QualityResource
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
    """The curation step `name` (and `name_rejected`) of `source`, with its accounting and
    expectation checks. `source_partition`: which partition of a partitioned source is
    curated."""

    @dataset(
        name,
        group=group,
        ins={"data": AssetIn(source, partition_mapping=source_partition)},
        description=doc,
        rejected=f"Rows of {source} dropped by curation (duplicate, near-duplicate, contaminated), with the reason.",
        accounted=Parents(
            source,
            kept_key="record_id",
            rejected_key="record_id",
            partition_mapping=source_partition,
        ),
        op=name,
    )
    def curate_step(
        context: AssetExecutionContext,
        config: CurationConfig,
        quality: QualityResource,
        data: pl.DataFrame,
    ) -> Made:
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
        md = {
            **result.metadata(),
            "eval_items": len(eval_items),
            "lancedb_table": f"{quality.lancedb_dir}/{spec.family}.lance",
        }
        if result.kept.height:
            md["diversity"] = diversity_plot(result.diversity, f"{name}: diversity")
        return Made(result.kept, result.rejected, result.n_in, md)

    return curate_step
