"""Where the demo's time goes: every step of the runs recorded in a Dagster instance, by
family and duration, from the instance's own step statistics.

    python -m benchmarks.demo_steps [--home DIR] [--top 25]

Run it after `make demo` (same $ALIGNFOUNDRY_HOME). Prints one table of the slowest
steps and one of the time per job.
"""

from __future__ import annotations

import argparse
import os
from collections import defaultdict


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--home", default=None, help="alignfoundry home (default $ALIGNFOUNDRY_HOME)")
    ap.add_argument("--top", type=int, default=25, help="slowest steps to list")
    args = ap.parse_args(argv)

    from assets.settings import home_dir

    os.environ.setdefault("DAGSTER_HOME", str(home_dir(args.home) / "dagster"))
    from dagster import DagsterInstance

    instance = DagsterInstance.get()
    steps, jobs = [], defaultdict(float)
    for run in instance.get_runs():
        for s in instance.get_run_step_stats(run.run_id):
            if s.start_time and s.end_time:
                took = s.end_time - s.start_time
                steps.append((took, run.job_name, s.step_key))
                jobs[run.job_name] += took
    steps.sort(reverse=True)
    print(f"{'seconds':>8}  {'job':24} step")
    for took, job, key in steps[: args.top]:
        print(f"{took:8.1f}  {job:24} {key}")
    print(f"\n{'seconds':>8}  job (sum of its steps)")
    for job, took in sorted(jobs.items(), key=lambda kv: -kv[1]):
        print(f"{took:8.1f}  {job}")


if __name__ == "__main__":
    main()
