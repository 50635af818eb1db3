"""The starter slice: a judged LLM response per seed instruction."""

from typing import Optional

import polars as pl
from dagster import AssetCheckResult, AssetExecutionContext, AssetIn, Config, asset_check

from assets.common import llm_metadata, rate_result
from assets.curation import curated_assets
from assets.declare import Made, Parents, dataset, family_definitions
from assets.export import export_asset
from assets.resources import LLMResource
from quality.curation import CurationSpec
from synth.responses import ResponseSettings, ResponseTemplates, judged_responses


class JudgedResponsesConfig(Config, ResponseSettings):
    limit: Optional[int] = None  # only the first N seed instructions


@dataset(
    "judged_responses",
    group="responses",
    ins=("seed_instructions",),
    description="An LLM response per seed instruction, judged to follow it.",
    rejected="Responses that failed, were empty, or were judged off-instruction.",
    accounted=Parents("seed_instructions", first_rows_in=True),
    accounted_description="Every seed instruction given to the asset is kept or rejected exactly once.",
)
def judged_responses_assets(
    context: AssetExecutionContext,
    config: JudgedResponsesConfig,
    generator: LLMResource,
    judge: LLMResource,
    seed_instructions: pl.DataFrame,
) -> Made:
    seeds = seed_instructions if config.limit is None else seed_instructions.head(config.limit)
    client, judge_client = generator.client(), judge.client()
    result = judged_responses(
        client, seeds, config, log=context.log.info, judge_client=judge_client
    )
    templates = ResponseTemplates()
    md = {
        **llm_metadata(client, judge_client),
        "template_hashes": {
            t.id: t.hash for t in (templates.plain, templates.with_input, templates.judge)
        },
    }
    return Made(result.kept, result.rejected, result.n_in, md)


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


responses_curated = curated_assets(
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

responses_curated_export = export_asset("responses", group="responses", checks=[responses_curated])

defs = family_definitions(
    judged_responses_assets,
    judged_responses_keep_rate,
    judged_responses_truncation_rate,
    responses_curated,
    responses_curated_export,
)
