"""Records shared by every family: stable ids, lineage, provenance, rejected rows.

A kept row carries `record_id` (content hash), `parent_ids` and a `provenance` struct.
A dropped row goes to the `<asset>_rejected` companion with a machine-readable `reason`
and a human `detail` naming the record and field, so counts in = kept + rejected.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

import polars as pl

ID_LENGTH = 20


def content_id(*parts: Any) -> str:
    """Stable id of a record: a hash of its identifying content (canonical JSON)."""
    canonical = json.dumps(parts, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()[:ID_LENGTH]


def template_hash(*texts: str) -> str:
    return hashlib.sha256("\x1f".join(texts).encode("utf-8")).hexdigest()[:12]


@dataclass(slots=True)
class Provenance:
    """How a record was made. Seeds from a file have backend `source` and no template.

    `backend`/`model`/`role` name what wrote the record's content; `roles` lists every
    model role that shaped it (the writer first, then e.g. the judge that kept it), each
    as {role, backend, model}.
    """

    backend: str
    model: str = ""
    template_id: str = ""
    template_hash: str = ""
    params_json: str = ""
    seed: int | None = None
    cache_keys: list[str] = field(default_factory=list)
    role: str = ""
    roles: list[dict[str, str]] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    @staticmethod
    def of_client(
        client: Any, template_id: str, also: tuple[Any, ...] = (), **rest: Any
    ) -> Provenance:
        """Provenance of a record an LLM client generated: its backend, model and role,
        and the roles of the clients in `also` that judged or shaped it."""
        roles = [role_entry(c) for c in (client, *also) if c is not None]
        return Provenance(
            client.backend.kind,
            client.backend.model,
            template_id,
            role=getattr(client, "role", ""),
            roles=roles,
            **rest,
        )


def role_entry(client: Any) -> dict[str, str]:
    return {
        "role": getattr(client, "role", "") or "",
        "backend": client.backend.kind,
        "model": client.backend.model,
    }


ROLE_DTYPE = pl.Struct({"role": pl.Utf8, "backend": pl.Utf8, "model": pl.Utf8})
PROVENANCE_DTYPE = pl.Struct(
    {
        "backend": pl.Utf8,
        "model": pl.Utf8,
        "template_id": pl.Utf8,
        "template_hash": pl.Utf8,
        "params_json": pl.Utf8,
        "seed": pl.Int64,
        "cache_keys": pl.List(pl.Utf8),
        "role": pl.Utf8,
        "roles": pl.List(ROLE_DTYPE),
    }
)

LINEAGE_SCHEMA: dict[str, pl.DataType] = {
    "record_id": pl.Utf8(),
    "parent_ids": pl.List(pl.Utf8),
    "provenance": PROVENANCE_DTYPE,
}

REJECTED_SCHEMA: dict[str, pl.DataType] = {
    "record_id": pl.Utf8(),
    "parent_ids": pl.List(pl.Utf8),
    "stage": pl.Utf8(),
    "reason": pl.Utf8(),
    "detail": pl.Utf8(),
    "source": pl.Utf8(),
    "source_index": pl.Int64(),
    "payload": pl.Utf8(),  # the record as it was when dropped, as JSON
}


@dataclass(slots=True)
class Rejected:
    record_id: str
    stage: str
    reason: str
    detail: str
    parent_ids: list[str] = field(default_factory=list)
    source: str = ""
    source_index: int | None = None
    payload: Any = None

    def as_row(self) -> dict[str, Any]:
        return {
            "record_id": self.record_id,
            "parent_ids": self.parent_ids,
            "stage": self.stage,
            "reason": self.reason,
            "detail": self.detail,
            "source": self.source,
            "source_index": self.source_index,
            "payload": json.dumps(self.payload, ensure_ascii=False, default=str),
        }


def rejected_frame(rows: Iterable[Rejected]) -> pl.DataFrame:
    return pl.DataFrame([r.as_row() for r in rows], schema=REJECTED_SCHEMA)


def frame(rows: list[dict[str, Any]], schema: dict[str, pl.DataType]) -> pl.DataFrame:
    """Rows to a frame with an exact schema (an empty result keeps its columns)."""
    return pl.DataFrame(rows, schema=schema)


def drop_counts(rejected: pl.DataFrame) -> dict[str, int]:
    """{'dropped_<reason>': n} for materialization metadata."""
    counts = Counter(rejected["reason"].to_list()) if rejected.height else Counter()
    return {f"dropped_{reason}": n for reason, n in sorted(counts.items())}
