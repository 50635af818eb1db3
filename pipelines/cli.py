"""`alignfoundry`: what Dagster's own CLI does not do.

    alignfoundry config               the effective configuration (env, resources, paths)
    alignfoundry status               latest materialization, row count and checks per asset
    alignfoundry export FAMILY --to PATH [--repo-id ID]
    alignfoundry policy FILE          add a TRACE policy file's version as a triage partition

Errors are one line on stderr and a non-zero exit code.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import sys
from pathlib import Path

import polars as pl

from pipelines.settings import SettingsError


class CLIError(Exception):
    pass


def _defs():
    from pipelines.definitions import build_definitions

    return build_definitions()


def _instance():
    from dagster import DagsterInstance

    if not os.environ.get("DAGSTER_HOME"):
        raise CLIError(
            "DAGSTER_HOME is not set: point it at the instance your runs used (make sets $PWD/.alignfoundry/dagster)"
        )
    return DagsterInstance.get()


def effective_config() -> dict:
    from pipelines.definitions import home_dir, policy_files
    from pipelines.settings import load_settings, role_summary
    from quality.decontam import benchmark_files_from_env

    home = home_dir()
    settings = load_settings()
    return {
        "home": str(home),
        "config_file": settings.path or "(none: set ALIGNFOUNDRY_CONFIG to use one)",
        "dagster_home": os.environ.get("DAGSTER_HOME", "(unset: runs are not kept)"),
        "storage": str(home / "storage"),
        "lancedb": str(home / "lancedb"),
        "data_docs": str(home / "data_docs"),
        "exports": str(home / "exports"),
        "llm_cache": str(home / "llm_cache.sqlite"),
        "roles": role_summary(settings),
        "family_settings": settings.families,
        "trainer_base_model": os.environ.get("ALIGNFOUNDRY_BASE_MODEL") or "(embedded SmolLM2)",
        "policy_files": policy_files(),
        "benchmark_files": benchmark_files_from_env(),
    }


def cmd_config(args) -> None:
    cfg = effective_config()
    if args.json:
        print(json.dumps(cfg, indent=2))
        return
    import yaml

    print(yaml.safe_dump(cfg, sort_keys=False).rstrip())


def status_rows(defs, instance) -> list[dict]:
    from pipelines.status import latest_check_results

    graph = defs.get_repository_def().asset_graph
    rows = []
    for key in sorted(graph.get_all_asset_keys(), key=lambda k: k.to_user_string()):
        event = instance.get_latest_materialization_event(key)
        md = {}
        when = "never"
        if event is not None and event.asset_materialization is not None:
            md = {k: v.value for k, v in event.asset_materialization.metadata.items()}
            when = dt.datetime.fromtimestamp(event.timestamp, dt.UTC).strftime("%Y-%m-%d %H:%M:%S")
        checks = latest_check_results(
            instance, [k for k in graph.asset_check_keys if k.asset_key == key]
        )
        rows.append(
            {
                "asset": key.to_user_string(),
                "materialized": when,
                "rows": md.get("dagster/row_count", md.get("kept", md.get("rows"))),
                "rejected": md.get("rejected"),
                "checks_passed": sum(c["passed"] is True for c in checks),
                "checks_failed": [c["name"] for c in checks if c["passed"] is False],
                "checks_not_run": sum(c["passed"] is None for c in checks),
            }
        )
    return rows


def cmd_status(args) -> None:
    rows = status_rows(_defs(), _instance())
    if args.json:
        print(json.dumps(rows, indent=2, default=str))
        return
    print(f"{'asset':34} {'materialized (UTC)':20} {'rows':>7} {'rejected':>8}  checks")
    for r in rows:
        failed = f", FAILED: {', '.join(r['checks_failed'])}" if r["checks_failed"] else ""
        not_run = f", {r['checks_not_run']} not run" if r["checks_not_run"] else ""
        rows_s = "" if r["rows"] is None else str(r["rows"])
        rej = "" if r["rejected"] is None else str(r["rejected"])
        print(
            f"{r['asset']:34} {r['materialized']:20} {rows_s:>7} {rej:>8}  {r['checks_passed']} passed{failed}{not_run}"
        )


def cmd_export(args) -> None:
    from assets.export import EXPORTABLE, card_info
    from pipelines.definitions import home_dir
    from quality.export import export_dataset

    spec = EXPORTABLE.get(args.family)
    if spec is None:
        raise CLIError(f"unknown family {args.family!r} (exportable: {', '.join(EXPORTABLE)})")
    storage = home_dir() / "storage"
    frames = {}
    for name in (spec.curated, f"{spec.curated}_rejected", spec.seeds):
        path = storage / f"{name}.parquet"
        if not path.exists():
            raise CLIError(
                f"{name} has not been materialized (no {path}); run `dagster job execute -m pipelines.definitions -j {spec.family}` first"
            )
        frames[name] = pl.read_parquet(path)
    instance = _instance() if os.environ.get("DAGSTER_HOME") else None
    defs = _defs()
    keys = [
        k
        for k in defs.get_repository_def().asset_graph.asset_check_keys
        if k.asset_key.to_user_string() == spec.curated
    ]
    info = card_info(
        instance,
        spec,
        frames[spec.curated],
        frames[f"{spec.curated}_rejected"],
        frames[spec.seeds],
        keys,
    )
    result = export_dataset(frames[spec.curated], Path(args.to), info, repo_id=args.repo_id)
    pushed = f", pushed to {args.repo_id}" if result["pushed_to_hub"] else ""
    print(f"exported {result['rows']} rows of {spec.curated} to {result['path']}{pushed}")


def cmd_policy(args: argparse.Namespace) -> None:
    """What the policy sensor does for a watched file, by hand: the file's version becomes
    a partition of the triage, and the command that triages under it is printed."""
    from pipelines.definitions import home_dir
    from pipelines.partitions import TRACE_POLICY_VERSIONS
    from synth.trace.policy import PolicyError, load_policy

    try:
        policy = load_policy(args.file)
    except PolicyError as e:
        raise CLIError(str(e)) from None
    instance = _instance()
    known = instance.get_dynamic_partitions(TRACE_POLICY_VERSIONS.name)
    if policy.version not in known:
        instance.add_dynamic_partitions(TRACE_POLICY_VERSIONS.name, [policy.version])
    state = "already a partition" if policy.version in known else "added as a partition"
    config = home_dir() / "policies" / f"{policy.version}.yaml"  # JSON, which is YAML
    config.parent.mkdir(parents=True, exist_ok=True)
    path = str(Path(args.file).resolve())
    config.write_text(json.dumps({"ops": {"trace_policy": {"config": {"path": path}}}}))
    tags = json.dumps({"dagster/partition": policy.version})
    print(f"{policy.name} version {policy.version}: {state} of trace_policy_versions")
    print(
        "triage under it: dagster job execute -m pipelines.definitions -j trace "
        f"--tags '{tags}' -c {config}"
    )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="alignfoundry", description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="command", required=True)
    p = sub.add_parser("config", help="print the effective configuration")
    p.add_argument("--json", action="store_true")
    p.set_defaults(fn=cmd_config)
    p = sub.add_parser("status", help="latest materialization, rows and checks per asset")
    p.add_argument("--json", action="store_true")
    p.set_defaults(fn=cmd_status)
    p = sub.add_parser("export", help="export a family's curated dataset with its card")
    p.add_argument("family")
    p.add_argument("--to", required=True, help="output folder")
    p.add_argument("--repo-id", default=None, help="also push_to_hub (needs HF_TOKEN and network)")
    p.set_defaults(fn=cmd_export)
    p = sub.add_parser("policy", help="add a TRACE policy file's version as a triage partition")
    p.add_argument("file")
    p.set_defaults(fn=cmd_policy)
    args = ap.parse_args(argv)
    try:
        args.fn(args)
    except CLIError as e:
        print(f"alignfoundry: error: {e}", file=sys.stderr)
        return 2
    except SettingsError as e:
        print(f"alignfoundry: error: {e}", file=sys.stderr)
        return 2
    except (OSError, ValueError) as e:
        print(f"alignfoundry: error: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
