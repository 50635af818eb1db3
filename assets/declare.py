"""How a dataset step is declared: one decorator, and what Dagster gets from it.

A dataset step is a library call that turns its inputs and settings into the rows it keeps,
the rows it rejects (each with its reason) and what it reports:

    @dataset(
        "judged_responses",
        group="responses",
        ins=("seed_instructions",),
        description="An LLM response per seed instruction, judged to follow it.",
        rejected="Responses that failed, were empty, or were judged off-instruction.",
        accounted=Parents("seed_instructions", first_rows_in=True),
    )
    def judged_responses_assets(context, config: Cfg, generator: LLMResource, seed_instructions):
        result = judged_responses(generator.client(), seed_instructions, config)
        return Made(result.kept, result.rejected, result.n_in, {...})

From that come the multi-asset (`judged_responses` and its `judged_responses_rejected`
companion, and any `also` outputs), the metadata every dataset reports (rows in / kept /
rejected by reason, a preview), the blocking `<name>_accounted` check (counts in = kept +
rejected, each input exactly once, read back from storage) and one check per expectation
suite declared for the asset in quality.suites. The function's own parameters say what it
needs: Dagster reads its config, resources and inputs from its signature, as for @asset.
A family module lists its steps in a `Definitions` (`family_definitions`), which
pipelines/definitions.py merges with the others.
"""

import inspect
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import polars as pl
from dagster import (
    AssetCheckExecutionContext,
    AssetCheckResult,
    AssetChecksDefinition,
    AssetCheckSeverity,
    AssetIn,
    AssetOut,
    AssetsDefinition,
    AutomationCondition,
    Config,
    Definitions,
    MetadataValue,
    Output,
    PartitionMapping,
    PartitionsDefinition,
    asset,
    asset_check,
    multi_asset,
)

from assets.common import dataset_metadata, first_parents, rejected_metadata, rows_in
from assets.quality import suite_checks
from quality.accounting import Accounting, account
from quality.suites import SUITES

# A training asset runs when it is missing or its data was updated, and only once every
# blocking check on the data it depends on passed (a failed gate keeps it waiting).
TRAIN_WHEN_GATES_PASS = (
    AutomationCondition.eager() & AutomationCondition.all_deps_blocking_checks_passed()
).with_label("train when gates pass")


@dataclass
class Made:
    """What a dataset step returns: kept rows, rejected rows (with `reason`), how many
    inputs it was given, what to report beside the standard counts, and any further
    outputs it declared in `also` (frame and metadata)."""

    kept: pl.DataFrame
    rejected: pl.DataFrame
    rows_in: int
    metadata: dict[str, Any] = field(default_factory=dict)
    also: dict[str, tuple[pl.DataFrame, dict[str, Any]]] = field(default_factory=dict)


# How the accounting check finds the inputs a step was given, and which of them each kept
# and rejected row came from. Each reads back what storage holds, not what the step said.
# A rule has `ins` (the further assets it reads, by parameter name), `ids` and
# `plan_problems`; a family with another way of planning writes its own (see trace.py).


class AccountingRule(Protocol):
    ins: Mapping[str, AssetIn]
    plan_problems: Callable[..., dict[str, Any]] | None

    def ids(self, context, asset: str, kept, rejected, frames) -> tuple[Iterable, list, list]: ...


@dataclass(frozen=True)
class Planned:
    """The step planned rows 0..rows_in-1 itself: a kept row carries its plan index in
    `index`, a rejected one in `source_index`. `plan_problems`, when given, compares the
    plan with the run's settings and returns what is off (empty: nothing)."""

    index: str = "plan_index"
    plan_problems: Callable[..., dict[str, Any]] | None = None
    ins: Mapping[str, AssetIn] = field(default_factory=dict)

    def ids(self, context, asset: str, kept, rejected, frames) -> tuple[Iterable, list, list]:
        n_in = rows_in(context, asset)
        return range(n_in or 0), kept[self.index].to_list(), rejected["source_index"].to_list()


@dataclass(frozen=True)
class Parents:
    """Every row of `source` (or of each of several sources, in order; only those `where`
    selects; only the first rows_in with `first_rows_in`) is the parent of exactly one
    kept or rejected row. A kept row names its parent in `parent_ids`, or, with
    `kept_key`, the input it came from in that column (with `kept_many`, several kept rows
    may come from one input: it counts once); a rejected row likewise (`rejected_key`)."""

    source: str | tuple[str, ...]
    where: pl.Expr | None = None
    first_rows_in: bool = False
    kept_key: str = ""
    kept_many: bool = False
    rejected_key: str = ""
    source_key: str = "record_id"
    partition_mapping: PartitionMapping | None = None  # which partition of the source
    plan_problems: Callable[..., dict[str, Any]] | None = None

    @property
    def sources(self) -> tuple[str, ...]:
        return (self.source,) if isinstance(self.source, str) else self.source

    @property
    def ins(self) -> Mapping[str, AssetIn]:
        return {s: AssetIn(s, partition_mapping=self.partition_mapping) for s in self.sources}

    def ids(self, context, asset: str, kept, rejected, frames) -> tuple[Iterable, list, list]:
        inputs = []
        for name in self.sources:
            source = frames[name]
            if self.where is not None:
                source = source.filter(self.where)
            inputs += source[self.source_key].to_list()
        if self.first_rows_in:
            n_in = rows_in(context, asset)
            inputs = inputs[: n_in if n_in is not None else None]
        kept_ids = kept[self.kept_key].to_list() if self.kept_key else first_parents(kept)
        if self.kept_many:
            kept_ids = sorted(set(kept_ids))
        if self.source_key != "record_id":  # a column of the source that repeats (persona_id)
            inputs = sorted(set(inputs))
        rejected_ids = (
            rejected[self.rejected_key].to_list() if self.rejected_key else first_parents(rejected)
        )
        return inputs, kept_ids, rejected_ids


@dataclass(frozen=True)
class SourceRows:
    """Rows 0..rows_in-1 of a file the step read: kept and rejected rows carry their
    `source_index` (seed loaders)."""

    plan_problems: Callable[..., dict[str, Any]] | None = None
    ins: Mapping[str, AssetIn] = field(default_factory=dict)

    def ids(self, context, asset: str, kept, rejected, frames) -> tuple[Iterable, list, list]:
        n_in = rows_in(context, asset)
        total = n_in if n_in is not None else kept.height + rejected.height
        return range(total), kept["source_index"].to_list(), rejected["source_index"].to_list()


def accounting_result(
    acc: Accounting, reported_rows_in: int | None, problems: Mapping[str, Any] | None = None
) -> AssetCheckResult:
    passed = acc.ok and (reported_rows_in is None or reported_rows_in == acc.n_in)
    metadata = {
        **acc.metadata(),
        "reported_rows_in": -1 if reported_rows_in is None else reported_rows_in,
        "rule": "rows_in == kept + rejected, each input exactly once",
    }
    if problems is not None:
        metadata["plan_off_by"] = dict(problems)
    return AssetCheckResult(
        passed=passed and not problems, severity=AssetCheckSeverity.ERROR, metadata=metadata
    )


@dataclass
class Dataset:
    """A declared dataset step: its multi-asset and the checks that come with it."""

    name: str
    asset: AssetsDefinition
    checks: list[AssetChecksDefinition]


def dataset(
    name: str,
    *,
    group: str,
    description: str,
    rejected: str,
    accounted: AccountingRule | None,
    ins: Sequence[str] | Mapping[str, AssetIn] = (),
    also: Mapping[str, str] | None = None,
    partitions_def: PartitionsDefinition | None = None,
    accounted_description: str = "",
    op: str = "",
) -> Callable[[Callable[..., Made]], Dataset]:
    """Declare a dataset step (see the module's docstring). `accounted`: how its accounting
    check finds its inputs (None: no such check, e.g. for shards that a merge accounts
    for). `ins`: asset names (the
    function's parameters of the same names), or parameter name -> AssetIn; `also`: more
    outputs, name -> description, that the step returns in `Made.also`; `op`: the op's
    name in run config (default: the function's)."""
    inputs = dict(ins) if isinstance(ins, Mapping) else {n: AssetIn(n) for n in ins}
    outs = {
        name: AssetOut(description=description),
        f"{name}_rejected": AssetOut(description=rejected),
        **{k: AssetOut(description=v) for k, v in (also or {}).items()},
    }

    def declare(fn: Callable[..., Made]) -> Dataset:
        def compute(*args: Any, **kwargs: Any):
            made = fn(*args, **kwargs)
            for out, (frame, md) in made.also.items():
                yield Output(frame, output_name=out, metadata=md or {"rows": frame.height})
            md = dataset_metadata(made.kept, made.rejected, made.rows_in, **made.metadata)
            yield Output(made.kept, output_name=name, metadata=md)
            yield Output(
                made.rejected,
                output_name=f"{name}_rejected",
                metadata=rejected_metadata(made.rejected),
            )

        # Dagster reads config, resources and inputs off the declared function's signature.
        sig = inspect.signature(fn)
        compute.__signature__ = sig.replace(return_annotation=inspect.Signature.empty)  # ty: ignore[unresolved-attribute]
        compute.__name__ = op or fn.__name__
        compute.__doc__ = fn.__doc__
        compute.__module__ = fn.__module__
        step = multi_asset(
            name=op or fn.__name__,
            outs=outs,
            ins=inputs,
            partitions_def=partitions_def,
            group_name=group,
        )(compute)
        checks = suite_checks(name) if name in SUITES else []
        if accounted is not None:
            text = accounted_description or _accounting_text(accounted)
            checks.insert(0, accounting_check(name, accounted, text))
        return Dataset(name, step, checks)

    return declare


def _accounting_text(rule: AccountingRule) -> str:
    if isinstance(rule, Parents):
        sources = " and ".join(rule.sources)
        return f"Every row of {sources} is kept or rejected exactly once."
    if isinstance(rule, SourceRows):
        return "Every source row is kept or rejected exactly once."
    return "No planned row lost: planned = kept + rejected, each exactly once."


def accounting_check(name: str, rule: AccountingRule, description: str) -> AssetChecksDefinition:
    """The blocking `<name>_accounted` check: what storage holds for `name` and its
    `_rejected` companion accounts for every input exactly once, and rows_in as reported."""

    def check(context: AssetCheckExecutionContext, kept, rejected, **frames) -> AssetCheckResult:
        inputs, kept_ids, rejected_ids = rule.ids(context, name, kept, rejected, frames)
        acc = account(inputs, kept_ids, rejected_ids)
        problems = None
        if rule.plan_problems is not None:
            problems = rule.plan_problems(context, kept, rejected, rows_in(context, name))
        return accounting_result(acc, rows_in(context, name), problems)

    frame = inspect.Parameter.POSITIONAL_OR_KEYWORD
    params = [
        inspect.Parameter("context", frame, annotation=AssetCheckExecutionContext),
        inspect.Parameter("kept", frame, annotation=pl.DataFrame),
        inspect.Parameter("rejected", frame, annotation=pl.DataFrame),
        *(inspect.Parameter(k, frame, annotation=pl.DataFrame) for k in rule.ins),
    ]
    check.__signature__ = inspect.Signature(params, return_annotation=AssetCheckResult)  # ty: ignore[unresolved-attribute]
    check.__name__ = f"{name}_accounted"
    return asset_check(
        asset=name,
        name=f"{name}_accounted",
        blocking=True,
        additional_ins={"rejected": AssetIn(f"{name}_rejected"), **rule.ins},
        description=description,
    )(check)


# Training, its gates and its evaluation.


class LoraTrainingConfig(Config):
    """What every LoRA training entry point takes (`--batch-size` ...); a family's training
    config adds its own and may change these defaults."""

    batch_size: int = 2
    learning_rate: float = 2e-4
    lora_r: int = 16
    lora_alpha: int = 32
    seed: int = 0


def training(
    name: str, *, group: str, ins: Sequence[str], deps: Sequence[str] = ()
) -> Callable[[Callable[..., Any]], AssetsDefinition]:
    """Declare a training asset: it reads `ins` and waits until every blocking check on
    what it depends on passed (TRAIN_WHEN_GATES_PASS); `deps`: further gated tables it
    depends on without reading them."""
    return asset(
        name=name,
        group_name=group,
        ins={i: AssetIn(i) for i in ins},
        deps=list(deps),
        automation_condition=TRAIN_WHEN_GATES_PASS,
    )


def evaluation(
    name: str, *, group: str, ins: Sequence[str]
) -> Callable[[Callable[..., Any]], AssetsDefinition]:
    """Declare an evaluation asset: it reads the trained model's summary and the held-out
    data in `ins`, and runs whenever it is asked (never by itself)."""
    return asset(name=name, group_name=group, ins={i: AssetIn(i) for i in ins})


def gate(
    asset_name: str, requires: str, ins: Mapping[str, str] | None = None
) -> Callable[[Callable[..., AssetCheckResult]], AssetChecksDefinition]:
    """Declare the blocking check that gates training on `asset_name` (while it fails, the
    training asset downstream does not run); `requires`: what it checks, in words; `ins`:
    parameter name -> a further asset it reads."""
    return asset_check(
        asset=asset_name,
        blocking=True,
        additional_ins={k: AssetIn(v) for k, v in (ins or {}).items()},
        description=f"Gate before training: {requires}",
    )


def trained_output(
    reported: Mapping[str, Any], row: Mapping[str, Any], metadata: Mapping[str, Any]
) -> Output[pl.DataFrame]:
    """A training asset's output: one row (the adapter's directory, `row`, how many
    trainable tensors changed), with `metadata` and what every training asset reports:
    the device, the adapter directory and the changed tensors."""
    adapter = str(reported["output_dir"])
    changed = int(reported["trainable_tensors_changed"])
    summary = pl.DataFrame([{"adapter_dir": adapter, **row, "trainable_tensors_changed": changed}])
    md = {
        **metadata,
        "trainable_tensors_changed": changed,
        "device": str(reported["device"]),
        "adapter_dir": MetadataValue.path(adapter),
    }
    return Output(summary, metadata=md)


def gate_result(
    observed: int,
    threshold: int,
    what: str,
    details: Mapping[str, Any] | None = None,
    holds: bool = True,
    **problems: int | float,
) -> AssetCheckResult:
    """A blocking gate before training: at least `threshold` of `what`, every problem
    count zero, and `holds` (a further condition, its values in `details`). Metadata:
    observed_<what>, the threshold, the details and each problem's count."""
    return AssetCheckResult(
        passed=observed >= threshold and holds and not any(problems.values()),
        severity=AssetCheckSeverity.ERROR,
        metadata={
            f"observed_{what}": observed,
            "threshold": threshold,
            **(details or {}),
            **problems,
        },
    )


def problems_result(
    problems: Sequence[Any], blocking: bool = True, **metadata: Any
) -> AssetCheckResult:
    """A property check that recomputes something from the stored rows: it passes when it
    finds no problem; the count and the first ten (rows or messages) go into the metadata."""
    if isinstance(problems, pl.DataFrame):
        examples = problems.head(10).to_dicts()
    else:
        examples = list(problems[:10])
    return AssetCheckResult(
        passed=len(problems) == 0,
        severity=AssetCheckSeverity.ERROR if blocking else AssetCheckSeverity.WARN,
        metadata={
            **metadata,
            "observed_problems": len(problems),
            "threshold": 0,
            "examples": examples,
        },
    )


def family_definitions(*parts: Any) -> Definitions:
    """A family's Definitions from its declared steps, assets and checks, in any mix
    (lists and tuples are flattened)."""
    assets: list[Any] = []
    checks: list[Any] = []

    def add(part: Any) -> None:
        if isinstance(part, Dataset):
            assets.append(part.asset)
            checks.extend(part.checks)
        elif isinstance(part, AssetChecksDefinition):
            checks.append(part)
        elif isinstance(part, (list, tuple)):
            for p in part:
                add(p)
        else:
            assets.append(part)

    for part in parts:
        add(part)
    return Definitions(assets=assets, asset_checks=checks)
