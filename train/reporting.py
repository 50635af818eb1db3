"""How a training entry point reports back: over Dagster Pipes when an asset launched it,
on stdout when a person did. `dagster_pipes` is the small protocol package, imported
only when Pipes is in use."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any


class Reporter:
    def __init__(self, pipes: Any = None) -> None:
        self.pipes = pipes

    def log(self, message: str) -> None:
        if self.pipes is not None:
            self.pipes.log.info(message)
        else:
            print(message, flush=True)

    def result(self, metadata: dict[str, Any]) -> None:
        """Metadata for the asset that launched us (the key it named, for a multi-asset)."""
        if self.pipes is not None:
            self.pipes.report_asset_materialization(
                metadata=metadata, asset_key=self.pipes.extras.get("report_asset_key")
            )
        else:
            plain = {
                k: v["raw_value"] if isinstance(v, dict) and "raw_value" in v else v
                for k, v in metadata.items()
            }
            print(json.dumps(plain, indent=2, default=str))

    def training_result(
        self, result: dict[str, Any], scalars: tuple[str, ...], json_keys: tuple[str, ...] = ()
    ) -> None:
        """A training run's metadata: the named scalars, `history` and the other JSON
        values, and `output_dir` as a path."""
        md = {k: result[k] for k in scalars}
        md |= {k: {"raw_value": result[k], "type": "json"} for k in ("history", *json_keys)}
        md["output_dir"] = {"raw_value": result["output_dir"], "type": "path"}
        self.result(md)


@contextmanager
def reporter() -> Iterator[Reporter]:
    if "DAGSTER_PIPES_CONTEXT" not in os.environ:
        yield Reporter()
        return
    from dagster_pipes import open_dagster_pipes

    with open_dagster_pipes() as pipes:
        yield Reporter(pipes)


def run_training(
    argv: list[str] | None,
    parser: Any,
    train: Any,
    scalars: tuple[str, ...],
    json_keys: tuple[str, ...] = (),
) -> dict[str, Any]:
    """A training entry point's main: parse the flags, train with the reporter's log, and
    report the result (`Reporter.training_result`)."""
    a = parser().parse_args(argv)
    with reporter() as report:
        result = train(a, report.log)
        report.training_result(result, scalars, json_keys)
    return result
