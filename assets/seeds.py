"""Seed datasets read from files or Hugging Face datasets: instructions, preference pairs, personas."""

from collections.abc import Callable
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
    rows_in,
)
from assets.plots import histogram
from assets.quality import suite_checks
from quality.accounting import account
from synth.loaders import (
    SHIPPED_SEEDS,
    LoadResult,
    load_instructions,
    load_personas,
    load_preference_pairs,
)


class SeedConfig(Config):
    source: str = ""  # a local file/folder or a Hugging Face dataset id; empty = the shipped seeds
    split: str = "train"
    limit: Optional[int] = None


def _seed_assets(
    name: str, loader: Callable[..., LoadResult], shipped: str, doc: str, text_column: str
):
    @multi_asset(
        name=name,
        outs={
            name: AssetOut(description=doc, is_required=True),
            f"{name}_rejected": AssetOut(
                description=f"Rows of the {name} source that could not be used, with the reason."
            ),
        },
        group_name="seeds",
    )
    def _load(context: AssetExecutionContext, config: SeedConfig):
        source = config.source or str(SHIPPED_SEEDS / shipped)
        result = loader(source, split=config.split, limit=config.limit)
        context.log.info(
            f"{name}: {result.n_in} rows from {source}: {result.kept.height} kept, {result.rejected.height} rejected"
        )
        md = dataset_metadata(result.kept, result.rejected, result.n_in, source=source)
        if result.kept.height:
            md["length_histogram"] = histogram(
                result.kept[text_column].str.len_chars().to_list(),
                f"{name}: {text_column} length",
                "characters",
            )
        yield from dataset_outputs(name, result.kept, result.rejected, md)

    @asset_check(
        asset=name,
        name=f"{name}_accounted",
        blocking=True,
        additional_ins={"rejected": AssetIn(f"{name}_rejected")},
        description="Every source row is kept or rejected exactly once.",
    )
    def _accounted(
        context: AssetCheckExecutionContext, kept: pl.DataFrame, rejected: pl.DataFrame
    ) -> AssetCheckResult:
        n_in = rows_in(context, name)
        inputs = range(n_in if n_in is not None else kept.height + rejected.height)
        acc = account(inputs, kept["source_index"].to_list(), rejected["source_index"].to_list())
        return accounting_result(acc, n_in)

    return _load, [_accounted, *suite_checks(name)]


seed_instructions, seed_instructions_checks = _seed_assets(
    "seed_instructions",
    load_instructions,
    "instructions.jsonl",
    "Seed instructions (Self-Instruct/Alpaca format), one row per task.",
    "instruction",
)
seed_preference_pairs, seed_preference_pairs_checks = _seed_assets(
    "seed_preference_pairs",
    load_preference_pairs,
    "preference_pairs.jsonl",
    "Preference pairs (HH-RLHF or PKU-SafeRLHF) parsed into history, prompt, chosen and rejected.",
    "prompt",
)
seed_personas, seed_personas_checks = _seed_assets(
    "seed_personas",
    load_personas,
    "personas.jsonl",
    "One-sentence personas (Persona Hub format).",
    "persona",
)

assets = [seed_instructions, seed_preference_pairs, seed_personas]
checks = [*seed_instructions_checks, *seed_preference_pairs_checks, *seed_personas_checks]
