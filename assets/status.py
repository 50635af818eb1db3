"""What the Dagster instance knows about an asset: latest materialization and check results."""

from __future__ import annotations

from typing import Any

from dagster import AssetCheckKey, AssetKey, DagsterInstance


def latest_check_results(
    instance: DagsterInstance, check_keys: list[AssetCheckKey]
) -> list[dict[str, Any]]:
    """name, status, passed, severity and a short detail of each check's latest execution."""
    records = instance.event_log_storage.get_latest_asset_check_execution_by_key(check_keys)
    out = []
    for key in sorted(check_keys, key=lambda k: k.name):
        rec = records.get(key)
        evaluation = None
        if rec is not None and rec.event is not None and rec.event.dagster_event is not None:
            evaluation = rec.event.dagster_event.event_specific_data
        passed = getattr(evaluation, "passed", None)
        severity = getattr(getattr(evaluation, "severity", None), "value", "")
        md = getattr(evaluation, "metadata", {}) or {}
        detail = ", ".join(
            f"{k}={md[k].value}"
            for k in ("observed", "threshold", "failed", "rows_in", "kept", "rejected")
            if k in md
        )
        out.append(
            {
                "name": key.name,
                "asset": key.asset_key.to_user_string(),
                "status": rec.status.value if rec is not None else "never run",
                "passed": passed,
                "severity": severity,
                "detail": detail,
            }
        )
    return out


def latest_materialization_metadata(
    instance: DagsterInstance, asset: str, partition: str | None = None
) -> dict[str, Any]:
    """Metadata of the asset's latest materialization (of one partition, if given)."""
    if partition is None:
        event = instance.get_latest_materialization_event(AssetKey(asset))
        materialization = event.asset_materialization if event else None
    else:
        from dagster import AssetRecordsFilter

        records = instance.fetch_materializations(
            AssetRecordsFilter(asset_key=AssetKey(asset), asset_partitions=[partition]), limit=1
        ).records
        materialization = records[0].asset_materialization if records else None
    if materialization is None:
        return {}
    return {k: v.value for k, v in materialization.metadata.items()}
