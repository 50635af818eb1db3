"""The README demo: every dataset family end to end on the embedded model, at a small scale.

    make demo            # or: python -m pipelines.demo [--families trace,medad] [--workers 2]

For each family it runs the family's jobs (see `pipelines.runner`): generation, curation,
every check and gate, a few training steps through Dagster Pipes, the evaluation and the
export. Families are independent, so they run side by side in `--workers` processes
(default: one per two cores, at least two), the longest first: much of a family's time is
one core busy (imports, Dagster's bookkeeping, a child process starting), and another
family fills the other core. Then it prints what each made (rows in / kept / rejected by
reason), the checks, the training and evaluation numbers, where to look in the UI, and
the wall time. The runs are recorded in the Dagster instance under
$ALIGNFOUNDRY_HOME/dagster, so `make dev` shows them afterwards.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import sys
import time
import traceback
from concurrent.futures import ProcessPoolExecutor, as_completed
from typing import Any

# Longest first, roughly (measured on 2 cores at the demo scale: PersonaKnob about 4 min,
# TRACE 3.3, PersonaAtlas 3, UltraPrompt 2.2, MedAD 1.5, responses 0.3 in a worker of
# two), so that the last family to start is a short one and the workers finish together.
LONGEST_FIRST = ("personaknob", "trace", "ultraprompt", "personaatlas", "medad", "responses")

_worker_defs: dict[str, Any] = {}  # per worker process: definitions are built once


def _run_one(home: str, family: str, scale: str) -> tuple[str, bool, float, str]:
    """One family in a worker process: (family, succeeded, seconds, summary)."""
    from assets.settings import quiet_environment

    quiet_environment()
    os.environ.setdefault("DAGSTER_HOME", os.path.join(home, "dagster"))
    from dagster import DagsterInstance

    from pipelines.definitions import build_definitions
    from pipelines.runner import run_family, summary

    start = time.perf_counter()
    try:
        if home not in _worker_defs:
            _worker_defs[home] = build_definitions(home)
        result = run_family(
            _worker_defs[home],
            DagsterInstance.get(),
            family,
            scale,
            log=lambda line: print(line, flush=True),
        )
    except Exception:  # a family that crashes is reported now; the others go on
        trace = traceback.format_exc()
        print(f"  {family}: crashed\n{trace}", file=sys.stderr, flush=True)
        return family, False, time.perf_counter() - start, f"== {family}: CRASHED\n{trace}"
    return family, result.success, result.seconds, summary(result)


def default_workers() -> int:
    return max(2, (os.cpu_count() or 2) // 2)


def _share_cores(threads: int) -> None:
    """A worker's thread budget, for itself and the training children it starts (they
    inherit the environment): torch's OpenMP pool and llama.cpp's both spin while they
    wait, so two pools of two threads on two cores run slower than one of one each."""
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "ALIGNFOUNDRY_EMBEDDED_THREADS"):
        os.environ[var] = str(threads)


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
    ap.add_argument(
        "--workers",
        type=int,
        default=default_workers(),
        help="families run side by side (1 = one after another)",
    )
    args = ap.parse_args(argv)

    from assets.settings import ensure_instance_yaml, home_dir
    from pipelines.runner import FAMILIES
    from quality.expectations import write_index

    families = FAMILIES if args.families == "all" else tuple(args.families.split(","))
    if unknown := sorted(set(families) - set(FAMILIES)):
        ap.error(f"unknown families {unknown} (families: {', '.join(FAMILIES)})")
    home = home_dir(args.home)
    os.environ.setdefault("DAGSTER_HOME", str(home / "dagster"))
    ensure_instance_yaml()
    order = sorted(families, key=lambda f: LONGEST_FIRST.index(f))
    workers = max(1, min(args.workers, len(order)))
    print(
        f"alignfoundry demo: {len(families)} families at the {args.scale} scale in {workers}"
        f" worker process{'es' if workers > 1 else ''}, home {home}",
        flush=True,
    )
    start = time.perf_counter()
    # Create the instance's storage here, once: workers that all found none would race to
    # create the same SQLite tables.
    from dagster import DagsterInstance

    DagsterInstance.get().get_runs(limit=1)
    results: dict[str, tuple[str, bool, float, str]] = {}
    threads = max(1, (os.cpu_count() or 1) // workers)
    # spawn, not fork: polars and llama.cpp keep thread pools that a fork would break.
    spawn = multiprocessing.get_context("spawn")
    pool = ProcessPoolExecutor(workers, spawn, initializer=_share_cores, initargs=(threads,))
    with pool:
        futures = [pool.submit(_run_one, str(home), f, args.scale) for f in order]
        for future in as_completed(futures):
            family, ok, seconds, _ = results_entry = future.result()
            results[family] = results_entry
            print(f"  == {family} {'succeeded' if ok else 'FAILED'} in {seconds:.0f}s", flush=True)
    elapsed = time.perf_counter() - start
    # Each check rewrote the index as it went; once more now that every family is done.
    if (home / "data_docs" / "validations").exists():
        write_index(home / "data_docs")
    print()
    for family in families:
        print(results[family][3])
        print()
    ok = all(results[f][1] for f in families)
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
