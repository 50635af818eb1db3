"""Quality checks shared by every family: expectation suites as Dagster asset checks."""

import polars as pl
from dagster import AssetCheckResult, AssetCheckSeverity, MetadataValue, asset_check

from assets.common import markdown_table
from assets.resources import QualityResource
from quality.expectations import Suite, validate
from quality.suites import SUITES


def suite_result(result) -> AssetCheckResult:
    md = result.metadata()
    failures = pl.DataFrame(
        [
            {
                "expectation": r["expectation"],
                "column": r["column"],
                "observed": str(r["observed"]),
                "threshold": str(r["threshold"]),
                "examples": ", ".join(map(str, r["examples"])),
            }
            for r in md["results"]
            if not r["success"]
        ]
    )
    metadata = {
        "suite": md["suite"],
        "rows": md["rows"],
        "evaluated": md["evaluated"],
        "failed": md["failed"],
        "results": MetadataValue.json(md["results"]),
    }
    if failures.height:
        metadata["failures"] = MetadataValue.md(markdown_table(failures))
    if result.docs_page:
        metadata["data_docs"] = MetadataValue.path(result.docs_page)
        metadata["data_docs_url"] = MetadataValue.url("file://" + result.docs_page)
    return AssetCheckResult(
        passed=result.success,
        severity=AssetCheckSeverity.ERROR
        if result.suite.severity == "error"
        else AssetCheckSeverity.WARN,
        metadata=metadata,
    )


def _suite_check(asset: str, suite: Suite):
    kind = suite.name.split(".")[1]

    @asset_check(
        asset=asset,
        name=f"{asset}_{kind}_suite",
        blocking=suite.severity == "error",
        description=(
            f"Great Expectations suite '{suite.name}' ({len(suite.expectations)} expectations, "
            f"{'ERROR: blocks downstream' if suite.severity == 'error' else 'WARN'})."
        ),
    )
    def _check(quality: QualityResource, data: pl.DataFrame) -> AssetCheckResult:
        return suite_result(validate(data, suite, quality.data_docs_dir))

    return _check


def suite_checks(asset: str) -> list:
    """One asset check per expectation suite declared for the asset in quality.suites."""
    return [_suite_check(asset, suite) for suite in SUITES[asset]]
