"""MedAD (MedAD-R1 style): real base images from wheels, synthetic lesions behind seeded
acquisition centers, mask-verified multiple-choice VQA with think-then-answer reasoning,
SFT + GRPO of a small vision-language model, and per-type / per-center evaluation."""

import contextlib
import json
import os
import re
from collections import Counter

import polars as pl
from dagster import (
    AssetCheckExecutionContext,
    AssetCheckResult,
    AssetCheckSeverity,
    AssetExecutionContext,
    AssetIn,
    Config,
    MetadataValue,
    Output,
    StaticPartitionsDefinition,
    asset_check,
)

from assets.common import llm_metadata, markdown_table, preview_frame, run_settings, shard_settings
from assets.declare import (
    LoraTrainingConfig,
    Made,
    Parents,
    Planned,
    dataset,
    evaluation,
    family_definitions,
    gate,
    gate_result,
    training,
)
from assets.export import export_asset
from assets.plots import bar_plot, contact_sheet, grouped_bar_plot, histogram, sft_grpo_curves
from assets.resources import LLMResource, TrainerResource
from assets.status import latest_materialization_metadata
from quality.medad import (
    answer_problems,
    balance_report,
    coverage_report,
    phi_hits,
    subject_leaks,
)
from synth.medad.bases import (
    ALLOWLIST,
    bases_frame,
    bases_from_frame,
    decode_png,
    load_allowlist,
    load_bases,
    read_dicom_phi,
)
from synth.medad.cases import (
    CaseSettings,
    build_cases,
    center_names,
    center_profiles,
    plan_cases,
)
from synth.medad.vqa import QUESTION_TYPES, build_items
from synth.records import Rejected, rejected_frame

GROUP = "medad"
# Fewer verified training items than this teach nothing: the gate blocks training.
MIN_TRAINING_ITEMS = 8


class MedADSettings(CaseSettings):
    allowlist: str = ""  # empty = the shipped synth/medad/bases.yaml
    paraphrase_rate: float = 0.0  # share of reasonings the LLM rewrites (claims re-verified)

    def allowlist_path(self) -> str:
        return self.allowlist or str(ALLOWLIST)


class MedADConfig(Config, MedADSettings):
    pass


def _panels(df: pl.DataFrame, n: int) -> list[dict]:
    return [
        {
            "image": decode_png(r["image_png"]),
            "mask": decode_png(r["mask_png"]) if "mask_png" in r else None,
            "label": r["label"],
        }
        for r in df.head(n).to_dicts()
    ]


@dataset(
    "medad_bases",
    group=GROUP,
    description="Base images from the reviewed allow-list (modality, anatomy, licence, de-identified DICOM header, tissue mask); normal bases and the real-anomaly evaluation slice.",
    rejected="Allow-list entries that could not be loaded or gave an unusable image, with the reason.",
    accounted=None,  # loading is all-or-reason per entry: see medad_bases_rejected
)
def medad_base_assets(context: AssetExecutionContext, config: MedADConfig) -> Made:
    entries = load_allowlist(config.allowlist_path())
    bases, failures = load_bases(entries, config.image_size)
    kept = bases_frame(bases)
    rejected = rejected_frame(
        Rejected(what, "bases", reason, detail, [e["id"]], "allowlist", entries.index(e), e)
        for e, reason, detail, what in failures
    )
    md = {
        "settings": config.model_dump_json(),
        **{f"role_{k}": v for k, v in Counter(kept["role"].to_list()).items()},
    }
    md["preview"] = MetadataValue.md(
        markdown_table(kept.select("base_id", "role", "modality", "anatomy", "licence"), width=60)
    )
    md["bases"] = contact_sheet(
        [
            {"image": decode_png(r["image_png"]), "mask": None, "label": r["base_id"]}
            for r in kept.to_dicts()
        ],
        "MedAD base images (allow-list)",
    )
    return Made(kept, rejected, len(entries), md)


# One partition per acquisition center. The count is fixed when the code location loads
# (ALIGNFOUNDRY_MEDAD_CENTERS, default 4) and must equal the `centers` setting.
MEDAD_CENTERS = StaticPartitionsDefinition(
    center_names(int(os.environ.get("ALIGNFOUNDRY_MEDAD_CENTERS", "4")))
)


def _case_sheet(cases: pl.DataFrame, title: str, n: int) -> MetadataValue:
    sample = (
        cases.filter(pl.col("split") != "real_anomaly")
        .sort("abnormal", "plan_index", descending=[True, False])
        .with_columns(
            label=pl.col("base_id").str.slice(0, 14)
            + " "
            + pl.col("center")
            + pl.when(pl.col("abnormal"))
            .then(pl.lit(" n=") + pl.col("lesion_count").cast(pl.Utf8))
            .otherwise(pl.lit(" normal"))
        )
    )
    abnormal = sample.filter(pl.col("abnormal"))
    # One abnormal case per base first, so every modality shows, then normal ones.
    shown = pl.concat(
        [
            abnormal.unique("base_id", keep="first", maintain_order=True),
            sample.filter(~pl.col("abnormal")).head(6),
        ]
    )
    return contact_sheet(_panels(shown, n), title)


@dataset(
    "medad_center_cases",
    group=GROUP,
    ins=("medad_bases",),
    description="One acquisition center's cases (a partition per center): the normal bases with 0-3 synthetic lesions through that center's profile.",
    rejected="That center's planned cases dropped because a lesion did not fit in the tissue or was no longer visible (CNR below min_cnr).",
    partitions_def=MEDAD_CENTERS,
    accounted=None,  # the merge, medad_cases, accounts for every center's cases
)
def medad_center_case_assets(
    context: AssetExecutionContext, config: MedADConfig, medad_bases: pl.DataFrame
) -> Made:
    partitions = MEDAD_CENTERS.get_partition_keys()
    if config.centers != len(partitions):
        raise ValueError(
            f"medad config centers={config.centers}, but the medad_center_cases partitions are "
            f"{len(partitions)} centers (ALIGNFOUNDRY_MEDAD_CENTERS): make them equal"
        )
    center = context.partition_key
    kept, rejected, n_in = build_cases(
        bases_from_frame(medad_bases),
        config,
        log=context.log.info,
        centers={center},
        real_anomalies=False,
    )
    md: dict = {"settings": config.model_dump_json(), "center": center}
    if kept.height:
        md["abnormal_share"] = round(float(kept["abnormal"].mean()), 4)
        md["contact_sheet"] = _case_sheet(kept, f"MedAD {center}: cases with lesion contours", 12)
    return Made(kept, rejected, n_in, md)


@dataset(
    "medad_cases",
    group=GROUP,
    ins={
        # Missing partitions load as absent, so the body can name them.
        "medad_center_cases": AssetIn(metadata={"allow_missing_partitions": True}),
        "medad_center_cases_rejected": AssetIn(metadata={"allow_missing_partitions": True}),
        "medad_bases": AssetIn(),
    },
    description="Cases of every center merged, plus the real-anomaly slice: a base image with 0-3 synthetic lesions (label mask = the truth) through a seeded acquisition center; split train / test / heldout_center / real_anomaly.",
    rejected="Every center's dropped cases: a lesion that did not fit in the tissue or was no longer visible (CNR below min_cnr) after the center transform.",
    accounted=Planned("plan_index"),
    accounted_description="No planned case lost: planned = kept + rejected, each exactly once.",
)
def medad_case_assets(
    context: AssetExecutionContext,
    medad_center_cases: dict[str, pl.DataFrame],
    medad_center_cases_rejected: dict[str, pl.DataFrame],
    medad_bases: pl.DataFrame,
) -> Made:
    order = MEDAD_CENTERS.get_partition_keys()
    s = shard_settings(
        context,
        "medad_center_cases",
        order,
        medad_center_cases,
        MedADSettings,
        "backfill the center partitions first (the UI's Materialize all, or `dagster asset "
        "materialize --select medad_bases,medad_bases_rejected,medad_center_cases,"
        "medad_center_cases_rejected --partition CENTER -m pipelines.definitions` for each)",
    )
    bases = bases_from_frame(medad_bases)
    real, real_rejected, _ = build_cases(bases, s, centers=set(), real_anomalies=True)
    kept = pl.concat([*(medad_center_cases[c] for c in order), real]).sort("plan_index")
    rejected = pl.concat([*(medad_center_cases_rejected[c] for c in order), real_rejected])
    md: dict = {"settings": s.model_dump_json()}
    md["centers"] = MetadataValue.md(
        markdown_table(
            pl.DataFrame([vars(c) for c in center_profiles(s)]).with_columns(
                pl.col(pl.Float64).round(3)
            )
        )
    )
    if kept.height:
        md["per_split"] = MetadataValue.json(dict(Counter(kept["split"].to_list())))
        md["abnormal_share"] = round(float(kept["abnormal"].mean()), 4)
        cnr = [f["cnr"] for ls in kept["lesions"].to_list() for f in ls]
        if cnr:
            md["lesion_cnr"] = histogram(cnr, "lesion contrast-to-noise after the center", "CNR")
        md["contact_sheet"] = _case_sheet(kept, "MedAD cases with lesion contours (red)", 18)
    return Made(kept, rejected, len(plan_cases(bases, s)), md)


@asset_check(
    asset="medad_cases",
    description="Class balance: the abnormal share of the synthetic cases is within 0.15 of abnormal_rate.",
)
def medad_class_balance(
    context: AssetCheckExecutionContext, cases: pl.DataFrame
) -> AssetCheckResult:
    s = run_settings(context, "medad_cases", MedADSettings)
    report = balance_report(cases, s.abnormal_rate)
    return AssetCheckResult(
        passed=report["passed"],
        severity=AssetCheckSeverity.WARN,
        metadata={
            k: MetadataValue.json(v) if isinstance(v, dict) else v for k, v in report.items()
        },
    )


@asset_check(
    asset="medad_cases",
    additional_ins={"bases": AssetIn("medad_bases")},
    description="Per-modality and per-center counts: every center and every modality of the normal bases has cases.",
)
def medad_case_counts(
    context: AssetCheckExecutionContext, cases: pl.DataFrame, bases: pl.DataFrame
) -> AssetCheckResult:
    s = run_settings(context, "medad_cases", MedADSettings)
    modalities = sorted(set(bases.filter(pl.col("role") == "normal")["modality"].to_list()))
    report = coverage_report(cases, [c.center for c in center_profiles(s)], modalities)
    return AssetCheckResult(
        passed=report["passed"],
        severity=AssetCheckSeverity.WARN,
        metadata={
            "per_center": bar_plot(report["per_center"], "cases per center", "cases"),
            "per_modality": MetadataValue.json(report["per_modality"]),
            "missing": report["missing"],
        },
    )


@dataset(
    "medad_vqa",
    group=GROUP,
    ins=("medad_cases",),
    description="Multiple-choice items (modality, anatomy, presence, 3x3 location, count, size, characterisation) with answers computed from the mask and a <think>...</think><answer>X</answer> completion.",
    rejected="Cases no item could be made from (an unreadable mask, a mask that disagrees with the recorded lesion count), with the reason.",
    accounted=Parents("medad_cases", kept_key="case_id", kept_many=True),
    accounted_description="No case lost: every case has items or a rejected row, never both.",
)
def medad_vqa_assets(
    context: AssetExecutionContext, generator: LLMResource, medad_cases: pl.DataFrame
) -> Made:
    s = run_settings(context, "medad_cases", MedADSettings)
    client = generator.client() if s.paraphrase_rate > 0 else None
    kept, rejected, n_in = build_items(
        medad_cases, s.seed, client, s.paraphrase_rate, log=context.log.info
    )
    md = llm_metadata(client)
    if kept.height:
        md["preview"] = MetadataValue.md(markdown_table(preview_frame(kept.drop("facts_json"))))
        md["items_per_type"] = bar_plot(
            {q: kept.filter(pl.col("question_type") == q).height for q in QUESTION_TYPES},
            "items per question type",
            "items",
        )
        md["answer_letters"] = MetadataValue.json(
            dict(sorted(Counter(kept["answer"].to_list()).items()))
        )
        md["paraphrase"] = MetadataValue.json(dict(Counter(kept["paraphrase"].to_list())))
        md["per_split"] = MetadataValue.json(dict(Counter(kept["split"].to_list())))
    return Made(kept, rejected, n_in, md)


@asset_check(
    asset="medad_vqa",
    blocking=True,
    additional_ins={"cases": AssetIn("medad_cases"), "bases": AssetIn("medad_bases")},
    description="Verifier: every answer recomputed from its case's mask and its base's allow-list metadata; the reasoning's claims agree with those facts and back the answer. Must hold for 100% of items.",
)
def medad_answers_verified(
    items: pl.DataFrame, cases: pl.DataFrame, bases: pl.DataFrame
) -> AssetCheckResult:
    problems = answer_problems(items, cases, bases)
    verified = items.height - len(problems)
    return AssetCheckResult(
        passed=items.height > 0 and not problems,
        severity=AssetCheckSeverity.ERROR,
        metadata={
            "items": items.height,
            "verified": verified,
            "verified_share": round(verified / items.height, 4) if items.height else 0.0,
            "examples": problems[:10],
        },
    )


@asset_check(
    asset="medad_vqa",
    blocking=True,
    additional_ins={
        "bases": AssetIn("medad_bases"),
        "bases_rejected": AssetIn("medad_bases_rejected"),
        "cases": AssetIn("medad_cases"),
        "cases_rejected": AssetIn("medad_cases_rejected"),
        "items_rejected": AssetIn("medad_vqa_rejected"),
    },
    description="No PHI: the identifying values of every allow-listed DICOM file, folder sources included (names, ids, dates, UIDs, institutions, addresses), appear in no cell of any MedAD output, images included, nor in the Dagster metadata of the MedAD steps.",
)
def medad_no_phi(
    context: AssetCheckExecutionContext,
    items: pl.DataFrame,
    bases: pl.DataFrame,
    bases_rejected: pl.DataFrame,
    cases: pl.DataFrame,
    cases_rejected: pl.DataFrame,
    items_rejected: pl.DataFrame,
) -> AssetCheckResult:
    s = run_settings(context, "medad_cases", MedADSettings)
    phi = read_dicom_phi(load_allowlist(s.allowlist_path()))
    hits = phi_hits(
        {
            "medad_bases": bases,
            "medad_bases_rejected": bases_rejected,
            "medad_cases": cases,
            "medad_cases_rejected": cases_rejected,
            "medad_vqa": items,
            "medad_vqa_rejected": items_rejected,
            "dagster_metadata": _step_metadata(context),
        },
        phi,
    )
    return AssetCheckResult(
        passed=not hits,
        severity=AssetCheckSeverity.ERROR,
        metadata={"identifying_values_scanned": len(phi), "hits": len(hits), "examples": hits[:10]},
    )


def _step_metadata(context: AssetCheckExecutionContext) -> pl.DataFrame:
    """Every metadata entry of the latest materialization of each MedAD step (each
    center partition too) as text: `asset[partition].key` -> value."""
    rows = []
    steps = [(a, None) for a in ("medad_bases", "medad_cases", "medad_vqa")]
    steps += [("medad_center_cases", c) for c in MEDAD_CENTERS.get_partition_keys()]
    for asset, partition in steps:
        for k, v in latest_materialization_metadata(context.instance, asset, partition).items():
            where = f"{asset}[{partition}]" if partition else asset
            rows.append({"entry": f"{where}.{k}", "value": _as_text(v)})
    return pl.DataFrame(rows, schema={"entry": pl.Utf8, "value": pl.Utf8})


# A plot or contact sheet inlined in markdown: its pixels are the tables' images, scanned
# as bytes already; as base64 text a short id would match by chance.
_INLINE_IMAGE = re.compile(r"data:image/[a-z+]+;base64,[A-Za-z0-9+/=]+")


def _as_text(value) -> str:
    """A metadata value as the text a reader would see (JSON for plain data; Dagster's
    own records, such as a table schema, by their repr), inlined images left out."""
    text = None
    if isinstance(value, dict | list):
        with contextlib.suppress(Exception):  # a record inside (iterating it raises): repr
            text = json.dumps(value, default=str)
    if text is None:
        text = value if isinstance(value, str) else repr(value)
    return _INLINE_IMAGE.sub("data:image;base64,(image)", text)


@gate(
    "medad_vqa",
    f"at least {MIN_TRAINING_ITEMS} training items; no subject (base image, or volume of slices) both in the training items and in the test, held-out-center or real-anomaly items; every training completion well-formed.",
    ins={"bases": "medad_bases"},
)
def medad_vqa_ready_for_training(items: pl.DataFrame, bases: pl.DataFrame) -> AssetCheckResult:
    return training_gate(items, bases)


def training_gate(items: pl.DataFrame, bases: pl.DataFrame) -> AssetCheckResult:
    from synth.medad.vqa import parse_completion

    train = items.filter(pl.col("split") == "train")
    leaks = subject_leaks(items, bases)
    malformed = sum(parse_completion(c) is None for c in train["completion"].to_list())
    return gate_result(
        train.height,
        MIN_TRAINING_ITEMS,
        "train_items",
        details={
            "question_types": sorted(set(train["question_type"].to_list())),
            "shared_subjects": leaks,
        },
        subjects_in_train_and_eval=len(leaks),
        malformed_completions=malformed,
    )


class MedADTrainConfig(LoraTrainingConfig):
    # 12 steps at 2e-3 are about what the 135M prefix model needs to write the
    # think/answer form, so that GRPO's rewards are not all zero.
    sft_steps: int = 12
    grpo_steps: int = 2
    num_generations: int = 4
    max_completion_length: int = 0  # 0 = the longest SFT target plus 8 tokens
    temperature: float = 1.0
    beta: float = 0.0  # KL to the SFT policy
    epsilon: float = 0.2  # ratio clip
    grpo_updates: int = 1  # updates per batch of generations
    w_format: float = 0.2
    w_accuracy: float = 0.6
    w_consistency: float = 0.2
    learning_rate: float = 2e-3  # SFT
    grpo_learning_rate: float = 1e-5
    grid: int = 4


def _training_inputs(run_dir, items: pl.DataFrame, cases: pl.DataFrame) -> list[str]:
    items_path, cases_path = run_dir / "items.parquet", run_dir / "cases.parquet"
    items.write_parquet(items_path)
    cases.select("record_id", "image_png").write_parquet(cases_path)
    return ["--items", str(items_path), "--cases", str(cases_path)]


@training("medad_model", group=GROUP, ins=("medad_vqa", "medad_cases"))
def medad_model(
    context: AssetExecutionContext,
    config: MedADTrainConfig,
    trainer: TrainerResource,
    medad_vqa: pl.DataFrame,
    medad_cases: pl.DataFrame,
) -> Output[pl.DataFrame]:
    """The MedAD vision-language model: think/answer SFT, then GRPO with the format,
    accuracy and consistency rewards, trained out of process through Pipes. On a CPU a
    prefix VLM on SmolLM2-135M; with ALIGNFOUNDRY_BASE_MODEL a local HF VLM."""
    run_dir = trainer.run_dir(f"medad-{context.run_id}")
    s = run_settings(context, "medad_cases", MedADSettings)
    args = [
        *_training_inputs(run_dir, medad_vqa, medad_cases),
        "--output-dir",
        str(run_dir / "model"),
        "--image-size",
        str(s.image_size),
    ]
    if trainer.base_model:
        args += ["--model", trainer.base_model]
    reported = trainer.launch_reported(context, "train.medad", [*args, *trainer.flags(config)])
    history = reported["history"]
    keys = (
        "final_sft_loss",
        "final_reward",
        "train_items",
        "trainable_tensors_changed",
        "trainable_tensors",
        "sft_tokens_per_s",
        "grpo_completions_per_s",
        "device",
    )
    md = {k: reported[k] for k in keys}
    md["model_dir"] = MetadataValue.path(str(reported["output_dir"]))
    md["history"] = MetadataValue.json(history)
    md.update(sft_grpo_curves(history, "MedAD", ("format", "accuracy", "consistency")))
    summary = pl.DataFrame(
        [{"model_dir": str(reported["output_dir"]), **{k: reported[k] for k in keys}}]
    )
    return Output(summary, metadata=md)


class MedADEvalConfig(Config):
    max_new_tokens: int = 0  # 0 = the longest target completion plus 8 tokens
    limit_per_type: int = 0  # items per (split, question type), seeded; 0 = every item
    batch_size: int = 8
    seed: int = 0


@evaluation("medad_eval", group=GROUP, ins=("medad_model", "medad_vqa", "medad_cases"))
def medad_eval(
    context: AssetExecutionContext,
    config: MedADEvalConfig,
    trainer: TrainerResource,
    medad_model: pl.DataFrame,
    medad_vqa: pl.DataFrame,
    medad_cases: pl.DataFrame,
) -> Output[pl.DataFrame]:
    """Accuracy per question type, per split (in-distribution test vs held-out center vs
    the real-anomaly slice) and per center, format rate and reasoning-answer consistency
    of the trained model, beside the chance, majority and always-yes baselines."""
    run_dir = trainer.run_dir(f"medad-eval-{context.run_id}")
    out = run_dir / "predictions.parquet"
    args = [
        "--model-dir",
        medad_model["model_dir"][0],
        *_training_inputs(run_dir, medad_vqa, medad_cases),
        "--out",
        str(out),
    ]
    trainer.launch(context, "train.medad_eval", [*args, *trainer.flags(config)])
    table = pl.read_parquet(out)

    def rates(by: str) -> pl.DataFrame:
        return (
            table.group_by(by)
            .agg(
                pl.len().alias("items"),
                pl.col("correct").mean().alias("accuracy"),
                pl.col("chance").mean().alias("chance"),
                pl.col("majority_correct").mean().alias("majority"),
                pl.col("always_yes_correct").mean().alias("always_yes"),
                pl.col("format_ok").mean().alias("format_ok"),
                pl.col("consistency").mean().alias("consistency"),
            )
            .sort(by)
            .with_columns(pl.col(pl.Float64).round(4))
        )

    per_type, per_split, per_center = rates("question_type"), rates("split"), rates("center")
    md = {
        "items": table.height,
        "accuracy": round(float(table["correct"].mean()), 4),
        "majority_baseline": round(float(table["majority_correct"].mean()), 4),
        "chance_baseline": round(float(table["chance"].mean()), 4),
        "format_ok": round(float(table["format_ok"].mean()), 4),
        "consistency": round(float(table["consistency"].mean()), 4),
        **{f"accuracy_{r['split']}": r["accuracy"] for r in per_split.to_dicts()},
        "per_question_type": MetadataValue.md(markdown_table(per_type)),
        "accuracy_vs_baselines": grouped_bar_plot(
            {
                name: dict(
                    zip(per_type["question_type"].to_list(), per_type[col].to_list(), strict=True)
                )
                for name, col in (
                    ("model", "accuracy"),
                    ("majority", "majority"),
                    ("chance", "chance"),
                )
            },
            "MedAD accuracy per question type against baselines",
            "accuracy",
        ),
        "per_split": MetadataValue.md(markdown_table(per_split)),
        "per_center": MetadataValue.md(markdown_table(per_center)),
        "accuracy_by_split": bar_plot(
            dict(zip(per_split["split"].to_list(), per_split["accuracy"].to_list(), strict=True)),
            "MedAD accuracy: test vs held-out center vs real",
            "accuracy",
        ),
    }
    return Output(table, metadata=md)


defs = family_definitions(
    medad_base_assets,
    medad_center_case_assets,
    medad_case_assets,
    medad_class_balance,
    medad_case_counts,
    medad_vqa_assets,
    medad_answers_verified,
    medad_no_phi,
    medad_vqa_ready_for_training,
    medad_model,
    medad_eval,
    export_asset(
        "medad",
        group=GROUP,
        checks=[
            medad_vqa_assets,
            medad_answers_verified,
            medad_no_phi,
            medad_vqa_ready_for_training,
        ],
    ),
)
