"""Export of a curated dataset to a Hugging Face `datasets` dataset with a generated card."""

from dataclasses import dataclass
from typing import Optional

import polars as pl
from dagster import (
    AssetCheckKey,
    AssetExecutionContext,
    AssetIn,
    AssetKey,
    Config,
    DagsterInstance,
    MetadataValue,
    Output,
    asset,
)

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


@dataclass(frozen=True, slots=True)
class Exportable:
    """A family's curated dataset, the seed asset its sources are read from, and its card text."""

    family: str
    curated: str
    seeds: str
    description: str


EXPORTABLE = {
    "responses": Exportable(
        "responses",
        "responses_curated",
        "seed_instructions",
        "Instruction-following responses judged by an LLM, deduplicated and decontaminated: an SFT set.",
    ),
    "trace": Exportable(
        "trace",
        "trace_curated",
        "seed_preference_pairs",
        "Preference pairs triaged under a written policy (TRACE: RETAIN / INVERT / PUNISH), deduplicated and decontaminated.",
    ),
    "ultraprompt": Exportable(
        "ultraprompt",
        "ultraprompt_curated",
        "seed_instructions",
        "Instructions with their best and worst principle-guided rewrites from a Monte-Carlo tree search (UltraPrompt, P-Aligner), deduplicated and decontaminated.",
    ),
    "personaknob": Exportable(
        "personaknob",
        "personaknob_curated",
        "seed_personas",
        "Scenarios with active persona dimensions (anti-sycophancy, trustworthiness, empathy, creativity), a golden response and one judge-verified reject per active dimension (PersonaKnob, Dual Optimal), deduplicated and decontaminated.",
    ),
    "personaatlas": Exportable(
        "personaatlas",
        "personaatlas_curated",
        "seed_personas",
        "Multi-turn conversations between a simulated user with a hidden, partially observed persona and assistants that never see it, each user turn kept clean and as noised by a layered distractor (PersonaAtlas, PersonaGym), with near-duplicate queries removed.",
    ),
}


def card_info(
    instance: Optional[DagsterInstance],
    spec: Exportable,
    data: pl.DataFrame,
    rejected: pl.DataFrame,
    seeds: pl.DataFrame,
    check_keys: list[AssetCheckKey],
) -> DatasetCardInfo:
    """What the card says: counts, drops, latest check results and dedup stats from the instance."""
    results = latest_check_results(instance, check_keys) if instance is not None else []
    produced = (
        latest_materialization_metadata(instance, spec.curated) if instance is not None else {}
    )
    reasons = dict(rejected["reason"].value_counts().iter_rows()) if rejected.height else {}
    return DatasetCardInfo(
        family=spec.family,
        name=spec.curated,
        description=spec.description,
        rows_in=int(produced.get("rows_in", data.height + rejected.height)),
        rejected={k: int(v) for k, v in reasons.items()},
        checks=[
            CheckSummary(c["name"], bool(c["passed"]), c["severity"] or c["status"], c["detail"])
            for c in results
        ],
        sources=sorted(set(seeds["source"].to_list())),
        dedup={k: produced[k] for k in DEDUP_KEYS if k in produced},
    )


class ExportConfig(Config):
    path: str = ""  # empty = <home>/exports/<dataset>
    repo_id: str = ""  # push_to_hub target; needs HF_TOKEN and network


def export_asset(family: str, group: str, checks: list):
    """`checks`: the check definitions of the curated asset, whose latest results the card lists."""
    spec = EXPORTABLE[family]
    check_keys = [k for c in checks for k in c.check_keys if k.asset_key == AssetKey(spec.curated)]

    @asset(
        name=f"{spec.curated}_export",
        ins={
            "data": AssetIn(spec.curated),
            "rejected": AssetIn(f"{spec.curated}_rejected"),
            "seeds": AssetIn(spec.seeds),
        },
        group_name=group,
        description=f"{spec.curated} saved as a Hugging Face dataset with a dataset card.",
    )
    def _export(
        context: AssetExecutionContext,
        config: ExportConfig,
        quality: QualityResource,
        data: pl.DataFrame,
        rejected: pl.DataFrame,
        seeds: pl.DataFrame,
    ) -> Output[pl.DataFrame]:
        info = card_info(context.instance, spec, data, rejected, seeds, check_keys)
        out = config.path or str(quality.exports_dir / spec.curated)
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
                "checks_in_card": len(info.checks),
                "card": MetadataValue.md(result["card"]),
            },
        )

    return _export
