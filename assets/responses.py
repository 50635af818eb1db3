"""The starter slice: a judged LLM response per seed instruction."""

from typing import Optional

import polars as pl
from dagster import (
    AssetCheckExecutionContext,
    AssetCheckResult,
    AssetExecutionContext,
    AssetIn,
    AssetOut,
    Config,
    asset_check,
    multi_asset,
)

from assets.common import (
    accounting_result,
    dataset_metadata,
    dataset_outputs,
    first_parents,
    llm_metadata,
    rate_result,
    rows_in,
)
from assets.curation import curated_assets
from assets.export import export_asset
from assets.quality import suite_checks
from pipelines.resources import LLMResource
from quality.accounting import account
from quality.curation import CurationSpec
from synth.responses import ResponseSettings, ResponseTemplates, judged_responses


class JudgedResponsesConfig(Config, ResponseSettings):
    limit: Optional[int] = None  # only the first N seed instructions


@multi_asset(
    outs={
        "judged_responses": AssetOut(
            description="An LLM response per seed instruction, judged to follow it."
        ),
        "judged_responses_rejected": AssetOut(
            description="Responses that failed, were empty, or were judged off-instruction."
        ),
    },
    ins={"seed_instructions": AssetIn()},
    group_name="responses",
)
def judged_responses_assets(
    context: AssetExecutionContext,
    config: JudgedResponsesConfig,
    generator: LLMResource,
    judge: LLMResource,
    seed_instructions: pl.DataFrame,
):
    seeds = seed_instructions if config.limit is None else seed_instructions.head(config.limit)
    client, judge_client = generator.client(), judge.client()
    result = judged_responses(
        client, seeds, config, log=context.log.info, judge_client=judge_client
    )
    templates = ResponseTemplates()
    md = dataset_metadata(
        result.kept,
        result.rejected,
        result.n_in,
        **llm_metadata(client, judge_client),
        template_hashes={
            t.id: t.hash for t in (templates.plain, templates.with_input, templates.judge)
        },
    )
    yield from dataset_outputs("judged_responses", result.kept, result.rejected, md)


@asset_check(
    asset="judged_responses",
    blocking=True,
    additional_ins={
        "rejected": AssetIn("judged_responses_rejected"),
        "seeds": AssetIn("seed_instructions"),
    },
    description="Every seed instruction given to the asset is kept or rejected exactly once.",
)
def judged_responses_accounted(
    context: AssetCheckExecutionContext,
    kept: pl.DataFrame,
    rejected: pl.DataFrame,
    seeds: pl.DataFrame,
) -> AssetCheckResult:
    n_in = rows_in(context, "judged_responses")
    inputs = seeds["record_id"].to_list()[: n_in if n_in is not None else None]
    acc = account(
        inputs,
        first_parents(kept),
        first_parents(rejected),
    )
    return accounting_result(acc, n_in)


@asset_check(
    asset="judged_responses",
    additional_ins={"rejected": AssetIn("judged_responses_rejected")},
    description="Share of responses kept (judged to follow the instruction).",
)
def judged_responses_keep_rate(kept: pl.DataFrame, rejected: pl.DataFrame) -> AssetCheckResult:
    total = kept.height + rejected.height
    return rate_result(kept.height / total if total else 0.0, 0.5, at_least=True)


@asset_check(
    asset="judged_responses",
    description="Share of kept responses cut off by max_tokens (finish_reason 'length').",
)
def judged_responses_truncation_rate(kept: pl.DataFrame) -> AssetCheckResult:
    rate = (kept["finish_reason"] == "length").mean() if kept.height else 0.0
    return rate_result(float(rate), 0.5, at_least=False)


responses_curated_assets, responses_curated_checks = curated_assets(
    "responses_curated",
    "judged_responses",
    CurationSpec(
        family="responses",
        dedup_fields=("instruction", "input"),
        decontam_fields=("instruction", "input"),
    ),
    group="responses",
    doc="Judged responses after exact dedup, decontamination and near-dedup of their instructions: the SFT set.",
)

responses_curated_export = export_asset(
    "responses", group="responses", checks=responses_curated_checks
)

assets = [judged_responses_assets, responses_curated_assets, responses_curated_export]
checks = [
    judged_responses_accounted,
    *suite_checks("judged_responses"),
    *responses_curated_checks,
    judged_responses_keep_rate,
    judged_responses_truncation_rate,
]
