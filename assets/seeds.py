"""Seed datasets read from files or Hugging Face datasets: instructions, preference pairs, personas."""

from collections.abc import Callable
from typing import Optional

from dagster import AssetExecutionContext, Config

from assets.declare import Dataset, Made, SourceRows, dataset, family_definitions
from assets.plots import histogram
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
) -> Dataset:
    @dataset(
        name,
        group="seeds",
        description=doc,
        rejected=f"Rows of the {name} source that could not be used, with the reason.",
        accounted=SourceRows(),
        op=name,
    )
    def load(context: AssetExecutionContext, config: SeedConfig) -> Made:
        source = config.source or str(SHIPPED_SEEDS / shipped)
        result = loader(source, split=config.split, limit=config.limit)
        context.log.info(
            f"{name}: {result.n_in} rows from {source}: {result.kept.height} kept, {result.rejected.height} rejected"
        )
        md: dict = {"source": source}
        if result.kept.height:
            md["length_histogram"] = histogram(
                result.kept[text_column].str.len_chars().to_list(),
                f"{name}: {text_column} length",
                "characters",
            )
        return Made(result.kept, result.rejected, result.n_in, md)

    return load


seed_instructions = _seed_assets(
    "seed_instructions",
    load_instructions,
    "instructions.jsonl",
    "Seed instructions (Self-Instruct/Alpaca format), one row per task.",
    "instruction",
)
seed_preference_pairs = _seed_assets(
    "seed_preference_pairs",
    load_preference_pairs,
    "preference_pairs.jsonl",
    "Preference pairs (HH-RLHF or PKU-SafeRLHF) parsed into history, prompt, chosen and rejected.",
    "prompt",
)
seed_personas = _seed_assets(
    "seed_personas",
    load_personas,
    "personas.jsonl",
    "One-sentence personas (Persona Hub format).",
    "persona",
)

defs = family_definitions(seed_instructions, seed_preference_pairs, seed_personas)
