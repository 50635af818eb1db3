"""Great Expectations 1.x suites, declared in code and run in an ephemeral context.

A suite is a list of (expectation class name, kwargs), so that declaring suites costs
nothing at import; GX itself (4-5 s to import) loads only when a suite runs. Frames are
polars; GX validates pandas, so the frame is converted at the boundary: list columns
become their lengths and struct columns become "is present" booleans (the names stay, so
schema expectations still see every column).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import tempfile
import threading
from dataclasses import dataclass, field
from html import escape as html_escape
from pathlib import Path
from typing import Any, Literal

import polars as pl

Severity = Literal["error", "warn"]
ExpectationDecl = tuple[str, dict[str, Any]]
THRESHOLD_KEYS = (
    "min_value",
    "max_value",
    "mostly",
    "value_set",
    "column_set",
    "exact_match",
    "value",
    "type_",
)


@dataclass(frozen=True, slots=True)
class Suite:
    name: str  # "<asset>.<integrity|drift>"
    severity: Severity  # error: integrity (can gate); warn: drift-like
    expectations: tuple[ExpectationDecl, ...]


@dataclass(slots=True)
class Outcome:
    expectation: str
    column: str
    success: bool
    observed: Any
    threshold: dict[str, Any]
    unexpected_count: int
    examples: list[Any] = field(default_factory=list)  # failing record ids (or values)


@dataclass(slots=True)
class SuiteResult:
    suite: Suite
    rows: int
    outcomes: list[Outcome]
    docs_page: str | None = None

    @property
    def success(self) -> bool:
        return all(o.success for o in self.outcomes)

    @property
    def failed(self) -> list[Outcome]:
        return [o for o in self.outcomes if not o.success]

    def metadata(self) -> dict[str, Any]:
        """Observed value, threshold and failing examples per expectation (JSON-able)."""
        return {
            "suite": self.suite.name,
            "rows": self.rows,
            "evaluated": len(self.outcomes),
            "failed": len(self.failed),
            "results": [
                {
                    "expectation": o.expectation,
                    "column": o.column,
                    "success": o.success,
                    "observed": _jsonable(o.observed),
                    "threshold": _jsonable(o.threshold),
                    "unexpected_count": o.unexpected_count,
                    "examples": _jsonable(o.examples),
                }
                for o in self.outcomes
            ],
        }


def _jsonable(x: Any) -> Any:
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, list | tuple | set):
        return [_jsonable(v) for v in x]
    if hasattr(x, "item"):  # numpy scalars
        return x.item()
    if isinstance(x, float) and x != x:
        return None
    return x if isinstance(x, str | int | float | bool) or x is None else str(x)


def to_pandas(df: pl.DataFrame):
    """The boundary: nested columns to lengths / presence, then pandas."""
    exprs = []
    for name, dtype in df.schema.items():
        if isinstance(dtype, pl.List | pl.Array):
            exprs.append(pl.col(name).list.len().alias(name))
        elif isinstance(dtype, pl.Struct):
            exprs.append(pl.col(name).is_not_null().alias(name))
        else:
            exprs.append(pl.col(name))
    return df.select(exprs).to_pandas()


def _context(docs_dir: Path | None):
    import great_expectations as gx
    from great_expectations.data_context.types.base import ProgressBarsConfig

    logging.getLogger("great_expectations").setLevel(logging.ERROR)
    ctx = gx.get_context(mode="ephemeral")
    ctx.variables.progress_bars = ProgressBarsConfig(globally=False)
    # An ephemeral context makes a temporary docs site of its own; drop it, keep ours only.
    for name, site in dict(ctx.variables.data_docs_sites or {}).items():
        shutil.rmtree(site.get("store_backend", {}).get("base_directory", ""), ignore_errors=True)
        ctx.delete_data_docs_site(name)
    if docs_dir is not None:
        ctx.add_data_docs_site(
            site_name="alignfoundry",
            site_config={
                "class_name": "SiteBuilder",
                "store_backend": {
                    "class_name": "TupleFilesystemStoreBackend",
                    "base_directory": str(docs_dir),
                },
                "site_index_builder": {"class_name": "DefaultSiteIndexBuilder"},
            },
        )
    return ctx


def validate(
    df: pl.DataFrame,
    suite: Suite,
    docs_dir: str | Path | None = None,
    id_column: str = "record_id",
    max_examples: int = 10,
) -> SuiteResult:
    """Run one suite on a frame; with docs_dir, also write Data Docs HTML there."""
    import great_expectations as gx
    import great_expectations.expectations as gxe

    docs = Path(docs_dir) if docs_dir is not None else None
    # GX rebuilds its whole site from the validations of its (ephemeral) context, which
    # would delete every other suite's page: render into a scratch site, then keep the
    # page in ours (see `keep_page`).
    scratch = Path(tempfile.mkdtemp(prefix="gx-docs-")) if docs is not None else None
    ctx = _context(scratch)
    batch_def = (
        ctx.data_sources.add_pandas("alignfoundry")
        .add_dataframe_asset(suite.name.split(".")[0])
        .add_batch_definition_whole_dataframe("all_rows")
    )
    gx_suite = ctx.suites.add(gx.ExpectationSuite(name=suite.name))
    for cls_name, kwargs in suite.expectations:
        gx_suite.add_expectation(getattr(gxe, cls_name)(**kwargs))
    validation = ctx.validation_definitions.add(
        gx.ValidationDefinition(name=suite.name, data=batch_def, suite=gx_suite)
    )
    actions = (
        [gx.checkpoint.UpdateDataDocsAction(name="docs", site_names=["alignfoundry"])]
        if docs
        else []
    )
    result_format: dict[str, Any] = {
        "result_format": "COMPLETE" if id_column in df.columns else "SUMMARY",
        "partial_unexpected_count": max_examples,
    }
    if id_column in df.columns:
        result_format["unexpected_index_column_names"] = [id_column]
    checkpoint = ctx.checkpoints.add(
        gx.Checkpoint(
            name=f"{suite.name}.checkpoint",
            validation_definitions=[validation],
            actions=actions,
            result_format=result_format,
        )
    )
    run = checkpoint.run(batch_parameters={"dataframe": to_pandas(df)})
    (validation_result,) = run.run_results.values()
    outcomes = []
    for r in validation_result.results:
        cfg, res = r.expectation_config, r.result or {}
        kwargs = {k: v for k, v in cfg.kwargs.items() if k != "batch_id"}
        index_list = res.get("unexpected_index_list") or []
        examples = [
            e.get(id_column) if isinstance(e, dict) else e for e in index_list[:max_examples]
        ] or list(res.get("partial_unexpected_list") or [])[:max_examples]
        outcomes.append(
            Outcome(
                expectation=cfg.type,
                column=str(kwargs.get("column", kwargs.get("column_list", ""))),
                success=bool(r.success),
                observed=res.get(
                    "observed_value",
                    {
                        "unexpected_count": res.get("unexpected_count", 0),
                        "unexpected_percent": res.get("unexpected_percent", 0.0),
                    },
                ),
                threshold={k: kwargs[k] for k in THRESHOLD_KEYS if k in kwargs},
                unexpected_count=int(res.get("unexpected_count") or 0),
                examples=examples,
            )
        )
    result = SuiteResult(suite, df.height, outcomes)
    if docs is not None and scratch is not None:
        result.docs_page = keep_page(scratch, docs, result)
        shutil.rmtree(scratch, ignore_errors=True)
    return result


_REMOTE = re.compile(
    r"<(?:script[^>]*\ssrc|link[^>]*\shref|img[^>]*\ssrc)=\"https?://[^\"]*\"[^>]*>"
    r"(?:\s*</script>)?",
    re.I,
)
OFFLINE_STYLE = (
    "<style>body{font-family:system-ui,sans-serif;margin:1.5em;color:#222}"
    "table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #ccc;padding:3px 8px;"
    "vertical-align:top}.d-none,.collapse:not(.show){display:none}</style>"
)


def keep_page(scratch: Path, docs: Path, result: SuiteResult) -> str:
    """Move the validation page GX rendered in `scratch` into `docs`, keeping its path
    (so its relative links to `static/` hold), with the CDN scripts and styles it asks
    for replaced by a small inline style: a page and the index open offline. Then
    rewrite `docs/index.html` to list every page kept so far."""
    pages = sorted(scratch.joinpath("validations").rglob("*.html"))
    if not pages:
        return str(docs / "index.html")
    src = pages[-1]
    dst = docs / src.relative_to(scratch)
    dst.parent.mkdir(parents=True, exist_ok=True)
    html = _REMOTE.sub("", src.read_text(encoding="utf-8"))
    _write_atomically(dst, html.replace("</head>", OFFLINE_STYLE + "</head>", 1))
    if not (docs / "static").exists():
        # Copied aside, then renamed: a check in another process either finds the whole
        # folder or copies its own (the first rename wins, the others are dropped).
        staged = Path(tempfile.mkdtemp(prefix=".static-", dir=docs))
        shutil.copytree(scratch / "static", staged / "static")
        with contextlib.suppress(OSError):
            staged.joinpath("static").rename(docs / "static")
        shutil.rmtree(staged, ignore_errors=True)
    summary = {
        "suite": result.suite.name,
        "severity": result.suite.severity,
        "success": result.success,
        "evaluated": len(result.outcomes),
        "failed": len(result.failed),
        "rows": result.rows,
        "page": str(dst.relative_to(docs)),
    }
    _write_atomically(dst.with_suffix(".json"), json.dumps(summary))
    write_index(docs)
    return str(dst)


def _write_atomically(path: Path, text: str) -> None:
    """Write beside `path`, then rename over it: checks of several runs at once share
    these pages and the index, and a reader must never see half a file."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def write_index(docs: Path) -> Path:
    """A plain HTML index of every kept validation page, newest first per suite, with no
    external assets."""
    rows = [json.loads(p.read_text()) for p in docs.joinpath("validations").rglob("*.json")]
    rows.sort(key=lambda r: (r["suite"], r["page"]), reverse=True)
    body = []
    for r in sorted(rows, key=lambda r: r["suite"]):
        status = "passed" if r["success"] else f"FAILED {r['failed']} of {r['evaluated']}"
        colour = "#2a7d2a" if r["success"] else "#b00020"
        when = Path(r["page"]).parent.name
        body.append(
            f'<tr><td><a href="{html_escape(r["page"])}">{html_escape(r["suite"])}</a></td>'
            f'<td>{r["severity"]}</td><td style="color:{colour}">{status}</td>'
            f"<td>{r['rows']}</td><td>{html_escape(when)}</td></tr>"
        )
    index = docs / "index.html"
    _write_atomically(
        index,
        '<!doctype html><html><head><meta charset="utf-8"><title>alignfoundry Data Docs</title>'
        + OFFLINE_STYLE
        + "</head><body><h1>alignfoundry Data Docs</h1>"
        f"<p>{len(rows)} validations (Great Expectations); each row opens its page.</p>"
        "<table><tr><th>suite</th><th>severity</th><th>result</th><th>rows</th><th>run</th></tr>"
        + "".join(body)
        + "</table></body></html>",
    )
    return index
