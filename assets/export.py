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

from assets.resources import QualityResource
from assets.status import latest_check_results, latest_materialization_metadata
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
    """A family's curated dataset, the seed asset its sources are read from, its card text,
    the upstream `_rejected` tables the card counts, and (MedAD) the images joined in."""

    family: str
    curated: str
    seeds: str
    description: str
    upstream_rejected: tuple[str, ...] = ()
    images: str = ""  # an asset with record_id and image_png, joined on the data's case_id

    def inputs(self) -> tuple[str, ...]:
        """Every table the export reads, in the order `frames` holds them."""
        extra = (self.images,) if self.images else ()
        return (self.curated, f"{self.curated}_rejected", self.seeds, *extra)

    def table(self, frames: dict[str, pl.DataFrame]) -> pl.DataFrame:
        """The rows exported: the curated table, with each case's image for MedAD."""
        data = frames[self.curated]
        if not self.images:
            return data
        images = frames[self.images].select(
            pl.col("record_id").alias("case_id"), pl.col("image_png").alias("image")
        )
        return data.join(images, on="case_id", how="left")

    def sources(self, seeds: pl.DataFrame) -> list[str]:
        if "licence" in seeds.columns:  # allow-listed files that carry their own licence
            return sorted({f"{r['entry_id']}|{r['licence']}" for r in seeds.iter_rows(named=True)})
        return sorted(set(seeds["source"].to_list()))


EXPORTABLE = {
    "responses": Exportable(
        "responses",
        "responses_curated",
        "seed_instructions",
        "Instruction-following responses judged by an LLM, deduplicated and decontaminated: an SFT set.",
        ("seed_instructions_rejected", "judged_responses_rejected"),
    ),
    "trace": Exportable(
        "trace",
        "trace_curated",
        "seed_preference_pairs",
        "Preference pairs triaged under a written policy (TRACE: RETAIN / INVERT / PUNISH), deduplicated and decontaminated.",
        ("seed_preference_pairs_rejected", "trace_triage_rejected"),
    ),
    "ultraprompt": Exportable(
        "ultraprompt",
        "ultraprompt_curated",
        "seed_instructions",
        "Instructions with their best and worst principle-guided rewrites from a Monte-Carlo tree search (UltraPrompt, P-Aligner), deduplicated and decontaminated.",
        ("seed_instructions_rejected", "ultraprompt_seeds_rejected", "ultraprompt_rejected"),
    ),
    "personaknob": Exportable(
        "personaknob",
        "personaknob_curated",
        "seed_personas",
        "Scenarios with active persona dimensions (anti-sycophancy, trustworthiness, empathy, creativity), a golden response and one judge-verified reject per active dimension (PersonaKnob, Dual Optimal), deduplicated and decontaminated.",
        ("seed_personas_rejected", "personaknob_scenarios_rejected", "personaknob_rejected"),
    ),
    "personaatlas": Exportable(
        "personaatlas",
        "personaatlas_curated",
        "seed_personas",
        "Multi-turn conversations between a simulated user with a hidden, partially observed persona and assistants that never see it, each user turn kept clean and as noised by a layered distractor (PersonaAtlas, PersonaGym), with near-duplicate queries removed.",
        (
            "seed_personas_rejected",
            "personaatlas_personas_rejected",
            "personaatlas_trajectories_rejected",
        ),
    ),
    "medad": Exportable(
        "medad",
        "medad_vqa",
        "medad_bases",
        "Multiple-choice medical anomaly VQA on real base images with synthetic lesions and per-center acquisition shifts; every answer derived from the saved lesion mask, with a think/answer reasoning (MedAD). The `image` column is each item's case image.",
        ("medad_bases_rejected", "medad_cases_rejected"),
        images="medad_cases",
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
    """What the card says: counts, drops here and upstream, latest check results and dedup
    stats from the instance."""
    results = latest_check_results(instance, check_keys) if instance is not None else []
    produced = (
        latest_materialization_metadata(instance, spec.curated) if instance is not None else {}
    )
    upstream = {}
    for name in spec.upstream_rejected if instance is not None else ():
        md = latest_materialization_metadata(instance, name)
        if md:
            stage = name.removesuffix("_rejected")
            upstream[stage] = {
                k.removeprefix("dropped_"): int(v)
                for k, v in md.items()
                if k.startswith("dropped_")
            }
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
        sources=spec.sources(seeds),
        dedup={k: produced[k] for k in DEDUP_KEYS if k in produced},
        upstream_rejected=upstream,
    )


class ExportConfig(Config):
    path: str = ""  # empty = <home>/exports/<dataset>
    repo_id: str = ""  # push_to_hub target; needs HF_TOKEN and network


def export_asset(family: str, group: str, checks: list):
    """`<curated>_export`: the family's curated dataset as a Hugging Face dataset, with a
    card that lists the latest result of `checks` on the curated asset (check definitions,
    or declared steps: their checks)."""
    spec = EXPORTABLE[family]
    defs = [d for c in checks for d in (c.checks if hasattr(c, "checks") else [c])]
    check_keys = [k for c in defs for k in c.check_keys if k.asset_key == AssetKey(spec.curated)]

    @asset(
        name=f"{spec.curated}_export",
        ins={f"t{i}": AssetIn(name) for i, name in enumerate(spec.inputs())},
        group_name=group,
        description=f"{spec.curated} saved as a Hugging Face dataset with a dataset card.",
    )
    def _export(
        context: AssetExecutionContext, config: ExportConfig, quality: QualityResource, **tables
    ) -> Output[pl.DataFrame]:
        frames = {name: tables[f"t{i}"] for i, name in enumerate(spec.inputs())}
        data = spec.table(frames)
        info = card_info(
            context.instance,
            spec,
            data,
            frames[f"{spec.curated}_rejected"],
            frames[spec.seeds],
            check_keys,
        )
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
