"""The README demo: materialize the `demo` job on the embedded defaults and print a summary.

    make demo            # or: python -m pipelines.demo [--limit N]

Runs are recorded in the Dagster instance under $ALIGNFOUNDRY_HOME/dagster, so
`make dev` shows them in the UI afterwards.
"""

from __future__ import annotations

import argparse
import os
import sys
import time


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Materialize the demo job and print what it made.")
    ap.add_argument("--limit", type=int, default=None, help="only the first N seed instructions")
    ap.add_argument(
        "--home",
        default=None,
        help="alignfoundry home (default $ALIGNFOUNDRY_HOME or .alignfoundry)",
    )
    args = ap.parse_args(argv)

    from pipelines.definitions import build_definitions, home_dir

    home = home_dir(args.home)
    os.environ.setdefault("DAGSTER_HOME", str(home / "dagster"))
    os.makedirs(os.environ["DAGSTER_HOME"], exist_ok=True)
    from dagster import DagsterInstance

    defs = build_definitions(home)
    run_config: dict = {"loggers": {"console": {"config": {"log_level": "INFO"}}}}
    if args.limit is not None:
        run_config["ops"] = {"judged_responses_assets": {"config": {"limit": args.limit}}}
    start = time.perf_counter()
    result = defs.resolve_job_def("demo").execute_in_process(
        instance=DagsterInstance.get(), run_config=run_config, raise_on_error=False
    )
    elapsed = time.perf_counter() - start

    print(
        f"\nalignfoundry demo: run {result.run_id} {'succeeded' if result.success else 'FAILED'} in {elapsed:.0f}s"
    )
    print(f"home: {home}\n")
    print(f"{'asset':34} {'rows_in':>8} {'kept':>6} {'rejected':>9}  dropped")
    for ev in result.get_asset_materialization_events():
        md = {k: v.value for k, v in ev.materialization.metadata.items()}
        if "rows_in" not in md:
            continue
        dropped = (
            ", ".join(f"{k[8:]}={v}" for k, v in md.items() if k.startswith("dropped_")) or "-"
        )
        print(
            f"{ev.asset_key.to_user_string():34} {md['rows_in']:>8} {md['kept']:>6} {md['rejected']:>9}  {dropped}"
        )
    print(f"\n{'check':44} result")
    failed = 0
    for ev in result.get_asset_check_evaluations():
        failed += not ev.passed
        verdict = "passed" if ev.passed else f"FAILED ({ev.severity.value})"
        print(f"{ev.asset_check_key.name:44} {verdict}")
    for ev in result.get_asset_materialization_events():
        if ev.asset_key.to_user_string().endswith("_export"):
            md = ev.materialization.metadata
            print(
                f"\nexported {md['rows'].value} rows as a Hugging Face dataset: {md['export_path'].value}"
            )
    print(f"Data Docs (Great Expectations): {home / 'data_docs' / 'index.html'}")
    print(
        "\nOpen the UI with `make dev` (http://127.0.0.1:3000) to browse assets, metadata and checks."
    )
    return 0 if result.success else 1


if __name__ == "__main__":
    sys.exit(main())
