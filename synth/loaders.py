"""Seed loaders: preference pairs, instructions and personas from a local path or a
Hugging Face dataset id, read with `datasets`, normalised to one schema per kind.

A file that cannot be read fails fast with an error naming the file (and the line, for
JSON). A record that is present but unusable is rejected with the field named, so every
source row ends up either kept or rejected. JSON-lines files are read line by line, so
that a record with bytes that are not UTF-8, or an oversized one, costs only itself.
"""

from __future__ import annotations

import gzip
import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import polars as pl

from synth.records import (
    PROVENANCE_DTYPE,
    Provenance,
    Rejected,
    content_id,
    rejected_frame,
)

SHIPPED_SEEDS = Path(__file__).parent / "seeds"
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
# A text field longer than this is rejected as oversized (no seed is a book).
MAX_FIELD_CHARS = 100_000
_SURROGATE = re.compile("[\ud800-\udfff]")


class SeedSourceError(ValueError):
    """A seed source that cannot be used at all (missing, unreadable, wrong format)."""


@dataclass(slots=True)
class LoadResult:
    kept: pl.DataFrame
    rejected: pl.DataFrame
    n_in: int
    source: str


def _open_text(path: Path):
    return (
        gzip.open(path, "rt", encoding="utf-8")
        if path.suffix == ".gz"
        else path.open(encoding="utf-8")
    )


def _locate_json_error(path: Path) -> str | None:
    """Find the first line of a JSON-lines file that is not valid JSON, for the message."""
    try:
        with _open_text(path) as f:
            for lineno, line in enumerate(f, 1):
                if line.strip():
                    try:
                        json.loads(line)
                    except json.JSONDecodeError as e:
                        return f"{path}:{lineno}: invalid JSON ({e.msg} at column {e.colno})"
    except UnicodeDecodeError as e:
        return f"{path}: not UTF-8 text ({e.reason} at byte {e.start})"
    except (OSError, EOFError) as e:
        return f"{path}: cannot be read ({e})"
    return None


def _is_jsonl(path: Path) -> bool:
    return "".join(path.suffixes[-2:]).lower() in (".jsonl", ".jsonl.gz", ".ndjson")


# A row that stands for a line that could not be read: the loader rejects it alone.
UNREADABLE = "__unreadable__"


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """Rows of a JSON-lines file, each bad line costing only itself:
    - bytes that are not UTF-8 are kept as lone surrogates (surrogateescape), so the loader
      rejects that record naming the field;
    - a line that is not JSON becomes an `UNREADABLE` row (`invalid_json`, with file:line);
    - a gzip file cut short keeps the rows read before the cut and ends with an
      `UNREADABLE` row (`truncated_file`, with the compressed byte offset).
    Only a file where no line parses fails as a whole."""
    if path.stat().st_size == 0:
        raise SeedSourceError(f"{path}: the seed file is empty")
    rows: list[dict[str, Any]] = []
    with path.open("rb") as raw_file:
        f = gzip.GzipFile(fileobj=raw_file) if path.suffix == ".gz" else raw_file
        lineno = 0
        try:
            for lineno, raw in enumerate(f, 1):
                line = raw.decode("utf-8", errors="surrogateescape")
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as e:
                    detail = f"{path}:{lineno}: invalid JSON ({e.msg} at column {e.colno})"
                    rows.append({UNREADABLE: ("invalid_json", detail)})
                    continue
                rows.append(obj if isinstance(obj, dict) else {"_value": obj})
        except (OSError, EOFError) as e:
            if not rows:
                raise SeedSourceError(f"{path}: cannot be read ({e})") from None
            detail = (
                f"{path}: the file ends early after line {lineno} (compressed byte "
                f"{raw_file.tell()} of {path.stat().st_size}): {e}"
            )
            rows.append({UNREADABLE: ("truncated_file", detail)})
    if rows and all(UNREADABLE in r for r in rows):
        raise SeedSourceError(rows[0][UNREADABLE][1] + " (and no line of the file parses)")
    return rows


def read_source(source: str, split: str = "train") -> Any:
    """A `datasets.Dataset` from a local file or folder, or from a Hugging Face dataset id."""
    import datasets

    datasets.disable_progress_bars()
    path = Path(source).expanduser()
    if path.exists():
        if path.is_dir():
            if (path / "dataset_info.json").exists() or (path / "state.json").exists():
                ds = datasets.load_from_disk(str(path))
                return ds[split] if isinstance(ds, datasets.DatasetDict) else ds
            return datasets.load_dataset(str(path), split=split)
        suffixes = "".join(path.suffixes[-2:]).lower()
        builder = next(
            (
                b
                for ext, b in ((".json", "json"), (".parquet", "parquet"), (".csv", "csv"))
                if ext in suffixes
            ),
            None,
        )
        if builder is None:
            raise SeedSourceError(
                f"{path}: unsupported seed file type (use .jsonl, .json, .parquet or .csv)"
            )
        if path.stat().st_size == 0:
            raise SeedSourceError(f"{path}: the seed file is empty")
        if builder == "json":
            located = _locate_json_error(path)
            if located:
                raise SeedSourceError(located)
        try:
            return datasets.load_dataset(builder, data_files=str(path), split="train")
        except Exception as e:
            raise SeedSourceError(f"{path}: cannot be read as {builder}: {e}") from None
    if HUB_ID.match(source) and not source.startswith((".", "/")):
        try:
            return datasets.load_dataset(source, split=split)
        except Exception as e:
            raise SeedSourceError(
                f"dataset id {source!r} (split {split!r}) could not be loaded: {type(e).__name__}: {e}"
            ) from None
    raise SeedSourceError(f"seed source {source!r}: no such file or folder, and not a dataset id")


def count_source_records(source: str, split: str = "train") -> int:
    return len(read_source(source, split))


Problem = tuple[str, str]  # (reason, detail naming the record and field)


def _field(
    row: dict[str, Any], name: str, where: str, kind: type = str
) -> tuple[Any, Problem | None]:
    """Validate one required field: (value, None) or (None, problem)."""
    value = row.get(name)
    if value is None:
        return None, ("missing_field", f"{where}: field '{name}' is missing")
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        return None, (
            "wrong_type",
            f"{where}: field '{name}' should be {kind.__name__}, got {type(value).__name__}",
        )
    if kind is str and not value.strip():
        return None, ("empty_field", f"{where}: field '{name}' is empty")
    return value, None


def _bad_text(value: Any, name: str, where: str) -> Problem | None:
    """Non-UTF-8 bytes or an oversized text anywhere in a field, named by its path."""
    if isinstance(value, str):
        if bad := _SURROGATE.search(value):
            return (
                "not_utf8",
                f"{where}: field '{name}' has bytes that are not UTF-8 (at character {bad.start()})",
            )
        if len(value) > MAX_FIELD_CHARS:
            return (
                "oversized",
                f"{where}: field '{name}' has {len(value)} characters (limit {MAX_FIELD_CHARS})",
            )
    elif isinstance(value, dict):
        for k, v in value.items():
            if bad := _bad_text(v, f"{name}.{k}", where):
                return bad
    elif isinstance(value, list):
        for k, v in enumerate(value):
            if bad := _bad_text(v, f"{name}[{k}]", where):
                return bad
    return None


def _printable(value: Any) -> Any:
    """A rejected record as it can be stored: bad bytes replaced, huge texts cut."""
    if isinstance(value, str):
        value = value.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
        return value if len(value) <= 1000 else value[:1000] + f"… [{len(value)} characters]"
    if isinstance(value, dict):
        return {k: _printable(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_printable(v) for v in value]
    return value


class _Rows:
    """The rows of a source: a `datasets.Dataset`, or a list read from JSON lines."""

    def __init__(self, source: str, split: str) -> None:
        path = Path(source).expanduser()
        if path.is_file() and _is_jsonl(path):
            self.rows: Any = read_jsonl(path)
            self.columns = sorted({k for r in self.rows if UNREADABLE not in r for k in r})
        else:
            self.rows = read_source(source, split)
            self.columns = list(self.rows.column_names)

    def __len__(self) -> int:
        return len(self.rows)

    def head(self, n: int):
        if isinstance(self.rows, list):
            return iter(self.rows[:n])
        return iter(self.rows.select(range(n)) if n < len(self.rows) else self.rows)


def _load(
    source: str,
    split: str,
    limit: int | None,
    kind: str,
    required_any: tuple[tuple[str, ...], ...],
    parse: Callable[[dict[str, Any], str], dict[str, Any] | Problem],
    schema: dict[str, pl.DataType],
) -> LoadResult:
    ds = _Rows(source, split)
    columns = set(ds.columns)
    if not any(set(req) <= columns for req in required_any):
        expected = " or ".join("{" + ", ".join(r) + "}" for r in required_any)
        raise SeedSourceError(
            f"{source}: not a {kind} source: expected columns {expected}, found {sorted(columns)}"
        )
    n_in = len(ds) if limit is None else min(limit, len(ds))
    kept: list[dict[str, Any]] = []
    rejected: list[Rejected] = []
    first_seen: dict[str, int] = {}
    prov = Provenance(backend="source", model=source).as_dict()
    for i, row in enumerate(ds.head(n_in)):
        where = f"{source} record {i}"
        if UNREADABLE in row:
            reason, detail = row[UNREADABLE]
            rejected.append(
                Rejected(content_id(kind, source, i), "load", reason, detail, [], source, i, {})
            )
            continue
        out = next((bad for k, v in row.items() if (bad := _bad_text(v, k, where))), None) or parse(
            row, where
        )
        if isinstance(out, tuple):
            reason, detail = out
            rid = content_id(kind, source, i)
            rejected.append(Rejected(rid, "load", reason, detail, [], source, i, _printable(row)))
            continue
        rid = content_id(kind, *(out[k] for k in schema if k not in _BOOKKEEPING))
        if rid in first_seen:
            rejected.append(
                Rejected(
                    rid,
                    "load",
                    "duplicate",
                    f"{where}: same content as record {first_seen[rid]}",
                    [],
                    source,
                    i,
                    _printable(row),
                )
            )
            continue
        first_seen[rid] = i
        kept.append(
            {
                **out,
                "record_id": rid,
                "parent_ids": [],
                "source": source,
                "source_index": i,
                "provenance": prov,
            }
        )
    return LoadResult(pl.DataFrame(kept, schema=schema), rejected_frame(rejected), n_in, source)


_BOOKKEEPING = {"record_id", "parent_ids", "source", "source_index", "provenance"}
_COMMON: dict[str, pl.DataType] = {
    "record_id": pl.Utf8(),
    "parent_ids": pl.List(pl.Utf8),
    "source": pl.Utf8(),
    "source_index": pl.Int64(),
    "provenance": PROVENANCE_DTYPE,
}

# ---------------------------------------------------------------- instructions

INSTRUCTION_SCHEMA: dict[str, pl.DataType] = {
    **_COMMON,
    "source_id": pl.Utf8(),
    "instruction": pl.Utf8(),
    "input": pl.Utf8(),
    "reference_output": pl.Utf8(),
    "is_classification": pl.Boolean(),
}


def instruction_text(row: dict[str, Any]) -> str:
    """A seed instruction as one prompt: the instruction, then its input when it has one."""
    return f"{row['instruction']}\n\n{row['input']}" if row.get("input") else row["instruction"]


_MARKUP = re.compile(r"<[^>]*>|&[a-z]+;|[`*_#>|~\-=\[\](){}]")


def _no_content(text: str, name: str, where: str) -> Problem | None:
    """A text that is only whitespace, markup or punctuation (`<p></p>`, `***`)."""
    if not re.search(r"\w", _MARKUP.sub(" ", text)):
        return ("no_content", f"{where}: field '{name}' has no words, only markup {text[:40]!r}")
    return None


def _parse_instruction(row: dict[str, Any], where: str) -> dict[str, Any] | Problem:
    instruction, bad = _field(row, "instruction", where)
    if bad:
        return bad
    if bad := _no_content(instruction, "instruction", where):
        return bad
    inp, out = row.get("input") or "", row.get("output") or ""
    instances = row.get("instances")
    if instances is not None:
        if not isinstance(instances, list) or not all(isinstance(x, dict) for x in instances):
            return ("wrong_type", f"{where}: field 'instances' should be a list of objects")
        if instances:
            inp, out = instances[0].get("input") or "", instances[0].get("output") or ""
    if not isinstance(inp, str) or not isinstance(out, str):
        return ("wrong_type", f"{where}: instance 'input'/'output' should be text")
    return {
        "source_id": str(row.get("id") or row.get("name") or ""),
        "instruction": instruction.strip(),
        "input": inp.strip(),
        "reference_output": out.strip(),
        "is_classification": bool(row.get("is_classification") or False),
    }


def load_instructions(source: str, split: str = "train", limit: int | None = None) -> LoadResult:
    """Self-Instruct seed tasks ({instruction, instances}) or Alpaca rows ({instruction, input, output})."""
    return _load(
        source,
        split,
        limit,
        "instruction",
        (("instruction",),),
        _parse_instruction,
        INSTRUCTION_SCHEMA,
    )


# ---------------------------------------------------------------- preference pairs

TURN_DTYPE = pl.Struct({"role": pl.Utf8, "content": pl.Utf8})
PREFERENCE_SCHEMA: dict[str, pl.DataType] = {
    **_COMMON,
    "source_format": pl.Utf8(),
    "history": pl.List(TURN_DTYPE),
    "prompt": pl.Utf8(),
    "chosen": pl.Utf8(),
    "rejected": pl.Utf8(),
}
_TURN = re.compile(r"\n\n(Human|Assistant):[ ]?")


class DialogueError(ValueError):
    pass


def parse_dialogue(text: str) -> list[tuple[str, str]]:
    """'\\n\\nHuman: ...\\n\\nAssistant: ...' into [(role, content)], strictly alternating."""
    text = "\n\n" + text.lstrip("\n") if not text.startswith("\n\n") else text
    parts = _TURN.split(text)
    if parts[0].strip():
        raise DialogueError("text before the first 'Human:' turn")
    turns = [
        ("user" if parts[i] == "Human" else "assistant", parts[i + 1].strip())
        for i in range(1, len(parts), 2)
    ]
    if not turns:
        raise DialogueError("no 'Human:'/'Assistant:' turns")
    for k, (role, _) in enumerate(turns):
        if role != ("user" if k % 2 == 0 else "assistant"):
            raise DialogueError(f"turn {k + 1} is '{role}' out of order")
    if turns[-1][0] != "assistant":
        raise DialogueError("does not end with an 'Assistant:' turn")
    return turns


def split_pair(chosen: str, rejected: str) -> tuple[list[tuple[str, str]], str, str]:
    """Shared history and the two final assistant responses of an HH-RLHF pair."""
    c, r = parse_dialogue(chosen), parse_dialogue(rejected)
    if c[:-1] != r[:-1]:
        raise DialogueError("chosen and rejected dialogues differ before the final response")
    return c[:-1], c[-1][1], r[-1][1]


def _identical(chosen: str, rejected: str, where: str) -> Problem | None:
    """A pair whose two responses are the same teaches no preference."""
    if " ".join(chosen.split()) == " ".join(rejected.split()):
        return ("identical_pair", f"{where}: fields 'chosen' and 'rejected' are the same response")
    return None


def _parse_pair(row: dict[str, Any], where: str) -> dict[str, Any] | Problem:
    if "response_0" in row:  # PKU-SafeRLHF
        prompt, bad = _field(row, "prompt", where)
        r0, bad0 = _field(row, "response_0", where)
        r1, bad1 = _field(row, "response_1", where)
        safer, bad2 = _field(row, "safer_response_id", where, int)
        for b in (bad, bad0, bad1, bad2):
            if b:
                return b
        if safer not in (0, 1):
            return (
                "invalid_value",
                f"{where}: field 'safer_response_id' should be 0 or 1, got {safer}",
            )
        chosen, rejected = (r0, r1) if safer == 0 else (r1, r0)
        if bad := _identical(chosen, rejected, where):
            return bad
        return {
            "source_format": "pku-saferlhf",
            "history": [{"role": "user", "content": prompt.strip()}],
            "prompt": prompt.strip(),
            "chosen": chosen.strip(),
            "rejected": rejected.strip(),
        }
    chosen, bad = _field(row, "chosen", where)
    rejected, bad2 = _field(row, "rejected", where)
    if bad or bad2:
        return bad or bad2
    try:
        history, c, r = split_pair(chosen, rejected)
    except DialogueError as e:
        return ("unparseable_dialogue", f"{where}: {e}")
    for name, text in (("chosen", c), ("rejected", r)):
        if not text:
            return ("empty_field", f"{where}: field '{name}' has an empty final assistant response")
    if bad := _identical(c, r, where):
        return bad
    return {
        "source_format": "hh-rlhf",
        "history": [{"role": role, "content": content} for role, content in history],
        "prompt": history[-1][1],
        "chosen": c,
        "rejected": r,
    }


def load_preference_pairs(
    source: str, split: str = "train", limit: int | None = None
) -> LoadResult:
    """HH-RLHF dialogues ({chosen, rejected}) or PKU-SafeRLHF rows ({prompt, response_0/1, safer_response_id})."""
    return _load(
        source,
        split,
        limit,
        "preference pair",
        (("chosen", "rejected"), ("prompt", "response_0", "response_1", "safer_response_id")),
        _parse_pair,
        PREFERENCE_SCHEMA,
    )


# ---------------------------------------------------------------- personas

PERSONA_SCHEMA: dict[str, pl.DataType] = {**_COMMON, "persona": pl.Utf8()}


def _parse_persona(row: dict[str, Any], where: str) -> dict[str, Any] | Problem:
    persona, bad = _field(row, "persona", where)
    if bad or (bad := _no_content(persona, "persona", where)):
        return bad
    return {"persona": persona.strip()}


def load_personas(source: str, split: str = "train", limit: int | None = None) -> LoadResult:
    """Persona Hub rows ({persona})."""
    return _load(source, split, limit, "persona", (("persona",),), _parse_persona, PERSONA_SCHEMA)
