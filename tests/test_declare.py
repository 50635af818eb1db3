"""A sixth family from declarations alone: the multi-asset and its `_rejected` companion,
the standard metadata and the accounting check come from `@dataset`, and the accounting
check fails when a step loses a row (read back from storage, not from the step)."""

import polars as pl
from dagster import AssetExecutionContext, Config, DagsterInstance, materialize

from assets.declare import Made, Parents, SourceRows, dataset, family_definitions, gate, gate_result
from assets.resources import ParquetIOManager


class ToyConfig(Config):
    lines: list[str] = ["a cat", "", "the quick fox", "dog"]
    lose_one: bool = False  # a broken step: drops a row without rejecting it


def _rejected(rows: list[dict]) -> pl.DataFrame:
    schema = {"record_id": pl.Utf8, "reason": pl.Utf8, "detail": pl.Utf8, "source_index": pl.Int64}
    return pl.DataFrame(rows, schema={**schema, "parent_ids": pl.List(pl.Utf8)})


@dataset(
    "toy_lines",
    group="toy",
    description="Lines from the config.",
    rejected="Empty lines.",
    accounted=SourceRows(),
)
def toy_line_assets(context: AssetExecutionContext, config: ToyConfig) -> Made:
    kept, rejected = [], []
    for i, line in enumerate(config.lines):
        rid = f"line-{i}"
        if line:
            kept.append({"record_id": rid, "text": line, "source_index": i})
        else:
            rejected.append(
                {
                    "record_id": rid,
                    "reason": "empty",
                    "detail": "",
                    "source_index": i,
                    "parent_ids": [],
                }
            )
    kept_df = pl.DataFrame(kept)
    return Made(
        kept_df,
        _rejected(rejected),
        len(config.lines),
        {"longest": int(kept_df["text"].str.len_chars().max())},
    )


@dataset(
    "toy_words",
    group="toy",
    ins=("toy_lines",),
    description="Lines of two words or more.",
    rejected="Lines of one word.",
    accounted=Parents("toy_lines"),
)
def toy_word_assets(config: ToyConfig, toy_lines: pl.DataFrame) -> Made:
    kept, rejected = [], []
    for r in toy_lines.iter_rows(named=True):
        words = r["text"].split()
        row = {"record_id": r["record_id"] + "-w", "parent_ids": [r["record_id"]]}
        if len(words) >= 2:
            kept.append({**row, "words": len(words)})
        else:
            rejected.append({**row, "reason": "one_word", "detail": r["text"], "source_index": 0})
    if config.lose_one:
        kept = kept[1:]
    return Made(pl.DataFrame(kept), _rejected(rejected), toy_lines.height)


@gate("toy_words", "at least 2 lines of two words or more.")
def toy_words_ready_for_training(words: pl.DataFrame):
    return gate_result(words.height, 2, "lines")


toy = family_definitions(toy_line_assets, toy_word_assets, toy_words_ready_for_training)


def _materialize(tmp_path, lose_one: bool = False):
    config = {"config": {"lose_one": lose_one}}
    return materialize(
        [*toy.assets, *toy.asset_checks],
        resources={"io_manager": ParquetIOManager(base_dir=str(tmp_path / "storage"))},
        run_config={"ops": {"toy_line_assets": config, "toy_word_assets": config}},
        instance=DagsterInstance.ephemeral(),
        raise_on_error=False,
    )


def test_a_toy_family_from_declarations_materializes_with_its_checks(tmp_path):
    result = _materialize(tmp_path)
    assert result.success
    checks = {e.asset_check_key.name: e for e in result.get_asset_check_evaluations()}
    assert set(checks) == {
        "toy_lines_accounted",
        "toy_words_accounted",
        "toy_words_ready_for_training",
    }
    assert all(c.passed for c in checks.values())
    assert checks["toy_words_accounted"].metadata["rows_in"].value == 3
    md = {
        e.asset_key.to_user_string(): e.materialization.metadata
        for e in result.get_asset_materialization_events()
    }
    lines = md["toy_lines"]
    assert (lines["rows_in"].value, lines["kept"].value, lines["rejected"].value) == (4, 3, 1)
    assert lines["dropped_empty"].value == 1 and lines["longest"].value == 13
    assert (
        md["toy_words"]["kept"].value == 2
        and md["toy_words_rejected"]["dropped_one_word"].value == 1
    )
    stored = pl.read_parquet(tmp_path / "storage" / "toy_words_rejected.parquet")
    assert stored["parent_ids"].to_list() == [["line-3"]]


def test_the_declared_accounting_check_fails_when_a_step_loses_a_row(tmp_path):
    result = _materialize(tmp_path, lose_one=True)
    checks = {e.asset_check_key.name: e for e in result.get_asset_check_evaluations()}
    accounted = checks["toy_words_accounted"]
    assert not accounted.passed
    assert accounted.metadata["missing"].value == 1
    # Blocking: a failed accounting check fails the run.
    assert not result.success
