"""A Dagster asset whose Pipes child sleeps until it is stopped: the subject of the tests
that a training child never outlives its step (tests/test_processes.py).

    python tests/sleeper_job.py MARKER HOME     # materializes it; the test kills this process
"""

import signal
import sys

from dagster import AssetExecutionContext, Config, DagsterInstance, asset, materialize

from assets.resources import TrainerResource


class SleeperConfig(Config):
    marker: str  # a number the child's command line carries, so the test can find it
    fail_after_s: int = 0  # > 0: the step fails (a timeout) while the child runs


@asset
def sleeper(context: AssetExecutionContext, config: SleeperConfig, trainer: TrainerResource):
    if config.fail_after_s:

        def timed_out(*_):
            raise TimeoutError(f"step timed out after {config.fail_after_s}s")

        signal.signal(signal.SIGALRM, timed_out)
        signal.alarm(config.fail_after_s)
    stmt = f"import time; time.sleep({config.marker})"
    trainer.launch(context, "timeit", ["-n", "1", "-r", "1", stmt])


def run(marker: str, home: str, fail_after_s: int = 0):
    return materialize(
        [sleeper],
        resources={"trainer": TrainerResource(runs_dir=f"{home}/runs", stop_grace_s=5)},
        run_config={
            "ops": {"sleeper": {"config": {"marker": marker, "fail_after_s": fail_after_s}}}
        },
        instance=DagsterInstance.ephemeral(),
        raise_on_error=False,
    )


if __name__ == "__main__":
    run(sys.argv[1], sys.argv[2])
