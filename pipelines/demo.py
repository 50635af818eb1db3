"""The README demo: every dataset family end to end on the embedded model, at a small scale.

    make demo            # or: python -m pipelines.demo [--families trace,medad] [--scale demo]

For each family it runs the family's jobs (see `pipelines.runner`): generation, curation,
every check and gate, a few training steps through Dagster Pipes, the evaluation and the
export. Then it prints what each made (rows in / kept / rejected by reason), the checks,
the training and evaluation numbers, where to look in the UI, and the wall time. The runs
are recorded in the Dagster instance under $ALIGNFOUNDRY_HOME/dagster, so `make dev`
shows them afterwards.
"""

from __future__ import annotations

import argparse
import os
import sys
import time


def main(argv: list[str] | None = None) -> int:
    from assets.settings import quiet_environment

    quiet_environment()
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--home",
        default=None,
        help="alignfoundry home (default $ALIGNFOUNDRY_HOME or .alignfoundry)",
    )
    ap.add_argument("--families", default="all", help="comma-separated, or all")
    ap.add_argument("--scale", default="demo", choices=("demo", "default"))
    args = ap.parse_args(argv)

    from assets.settings import ensure_instance_yaml, home_dir
    from pipelines.runner import FAMILIES, run_family, summary

    home = home_dir(args.home)
    os.environ.setdefault("DAGSTER_HOME", str(home / "dagster"))
    ensure_instance_yaml()
    families = FAMILIES if args.families == "all" else tuple(args.families.split(","))
    from dagster import DagsterInstance

    from pipelines.definitions import build_definitions

    start = time.perf_counter()
    defs, instance = build_definitions(home), DagsterInstance.get()
    print(f"alignfoundry demo: {len(families)} families at the {args.scale} scale, home {home}")
    results = []
    for family in families:
        results.append(run_family(defs, instance, family, args.scale))
    elapsed = time.perf_counter() - start
    print()
    for r in results:
        print(summary(r))
        print()
    ok = all(r.success for r in results)
    print(f"Data Docs (Great Expectations): {home / 'data_docs' / 'index.html'}")
    print(f"Exports (Hugging Face datasets with cards): {home / 'exports'}")
    print(
        "Open the UI with `make dev` (http://127.0.0.1:3000): Lineage shows every family's group."
    )
    print(
        f"\nalignfoundry demo {'finished' if ok else 'FAILED'} in {elapsed:.0f}s ({elapsed / 60:.1f} min)"
    )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
