"""`alignfoundry`: what Dagster's own CLI does not do.

    alignfoundry config               the effective configuration (env, resources, paths)
    alignfoundry status               latest materialization, row count and checks per asset
    alignfoundry export FAMILY --to PATH [--repo-id ID]
    alignfoundry policy FILE          add a TRACE policy file's version as a triage partition
    alignfoundry run FAMILY|all [--scale demo|default] [--policy FILE]
                                      a family's jobs end to end, partitions included

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

from assets.settings import SettingsError


class CLIError(Exception):
    pass


def _defs():
    from pipelines.definitions import build_definitions

    return build_definitions()


def _instance():
    from dagster import DagsterInstance

    from assets.settings import ensure_instance_yaml

    if not os.environ.get("DAGSTER_HOME"):
        raise CLIError(
            "DAGSTER_HOME is not set: point it at the instance your runs used (make sets $PWD/.alignfoundry/dagster)"
        )
    ensure_instance_yaml()
    return DagsterInstance.get()


def effective_config() -> dict:
    from assets.settings import home_dir, load_settings, policy_files, role_summary
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
    from assets.status import latest_check_results

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
        partition = getattr(event, "partition", None) if event is not None else None
        rows.append(
            {
                "asset": key.to_user_string(),
                "partition": partition,  # of the latest materialization, for a partitioned asset
                "materialized": when,
                "rows": md.get("dagster/row_count", md.get("kept", md.get("rows"))),
                "rejected": md.get("rejected"),
                "checks": len(checks),
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
    print(f"{'asset':44} {'materialized (UTC)':20} {'rows':>7} {'rejected':>8}  checks")
    for r in rows:
        name = r["asset"] + (f" [{r['partition']}]" if r["partition"] else "")
        rows_s = "" if r["rows"] is None else str(r["rows"])
        rej = "" if r["rejected"] is None else str(r["rejected"])
        if not r["checks"]:
            checks = "-"
        else:
            checks = f"{r['checks_passed']} of {r['checks']} passed"
            checks += f", FAILED: {', '.join(r['checks_failed'])}" if r["checks_failed"] else ""
            checks += f", {r['checks_not_run']} not run" if r["checks_not_run"] else ""
        print(f"{name:44} {r['materialized']:20} {rows_s:>7} {rej:>8}  {checks}")


def cmd_export(args) -> None:
    from assets.export import EXPORTABLE, card_info
    from assets.settings import home_dir
    from quality.export import export_dataset

    spec = EXPORTABLE.get(args.family)
    if spec is None:
        raise CLIError(f"unknown family {args.family!r} (exportable: {', '.join(EXPORTABLE)})")
    storage = home_dir() / "storage"
    frames = {}
    for name in spec.inputs():
        path = storage / f"{name}.parquet"
        if not path.exists():
            raise CLIError(
                f"{name} has not been materialized (no {path}); run `alignfoundry run {spec.family}` first"
            )
        frames[name] = pl.read_parquet(path)
    instance = _instance() if os.environ.get("DAGSTER_HOME") else None
    keys = [
        k
        for k in _defs().get_repository_def().asset_graph.asset_check_keys
        if k.asset_key.to_user_string() == spec.curated
    ]
    data = spec.table(frames)
    info = card_info(
        instance, spec, data, frames[f"{spec.curated}_rejected"], frames[spec.seeds], keys
    )
    result = export_dataset(data, Path(args.to), info, repo_id=args.repo_id)
    pushed = f", pushed to {args.repo_id}" if result["pushed_to_hub"] else ""
    print(f"exported {result['rows']} rows of {spec.curated} to {result['path']}{pushed}")
    print(f"open it with: datasets.load_from_disk({str(result['path'])!r})")


def cmd_policy(args: argparse.Namespace) -> None:
    """What the policy sensor does for a watched file, by hand: the file's version becomes
    a partition of the triage, and the command that triages under it is printed."""
    from assets.partitions import TRACE_POLICY_VERSIONS
    from assets.settings import home_dir
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


def cmd_run(args: argparse.Namespace) -> None:
    """A family's jobs, as `pipelines.runner` plans them, recorded in the instance."""
    from assets.settings import home_dir
    from pipelines.definitions import build_definitions
    from pipelines.runner import FAMILIES, check_family, run_family, summary

    families = FAMILIES if args.family == "all" else (args.family,)
    if args.family != "all" and args.family not in FAMILIES:
        raise CLIError(f"unknown family {args.family!r} (families: {', '.join(FAMILIES)}, all)")
    instance, defs = _instance(), build_definitions(home_dir())
    if args.dry_run:
        for family in families:
            print("\n".join(check_family(defs, instance, family, args.scale, args.policy)))
        return
    failed = []
    for family in families:
        result = run_family(defs, instance, family, args.scale, args.policy, log=_err)
        print(summary(result))
        if not result.success:
            failed.append(family)
    if failed:
        raise CLIError(f"{', '.join(failed)} failed: see the runs in the UI (`make dev`)")


def _err(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    from assets.settings import quiet_environment

    quiet_environment()
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
    p = sub.add_parser("run", help="run a family's jobs end to end (partitions included)")
    p.add_argument(
        "family", help="responses, trace, ultraprompt, personaknob, personaatlas, medad or all"
    )
    p.add_argument("--scale", default="default", choices=("demo", "default"))
    p.add_argument(
        "--policy", default="", help="TRACE: the policy file (default: the shipped new policy)"
    )
    p.add_argument(
        "--dry-run", action="store_true", help="print the runs and check their config only"
    )
    p.set_defaults(fn=cmd_run)
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
