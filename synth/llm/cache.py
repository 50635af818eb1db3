"""Content-addressed response cache, written durably the moment each response arrives.

The key hashes what changes a sample's output (backend+model identity, messages, decoding
parameters, schema, seed, sample index) and never batch size or concurrency. A crashed
run resumes from what was written; an unchanged re-run makes zero calls.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
import threading
import time
from pathlib import Path

from synth.llm.types import LLMRequest, Sample


def cache_key(identity: str, request: LLMRequest, sample_index: int) -> str:
    payload = {
        "identity": identity,
        "messages": request.message_dicts(),
        "params": request.params.key_fields(),
        "schema": request.json_schema,
        "sample_index": sample_index,
    }
    canonical = json.dumps(payload, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


class ResponseCache:
    """SQLite in WAL mode: safe across the processes of a multiprocess Dagster run."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._local = threading.local()
        with self._conn() as c:
            c.execute(
                "CREATE TABLE IF NOT EXISTS responses ("
                " key TEXT PRIMARY KEY, identity TEXT, sample TEXT, created REAL)"
            )

    def _conn(self) -> sqlite3.Connection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = sqlite3.connect(self.path, timeout=60, isolation_level=None)
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=NORMAL")
            self._local.conn = conn
        return conn

    def get(self, key: str) -> Sample | None:
        row = self._conn().execute("SELECT sample FROM responses WHERE key=?", (key,)).fetchone()
        if row is None:
            return None
        sample = Sample.from_json(row[0])
        sample.cached = True
        return sample

    def put(self, key: str, identity: str, sample: Sample) -> None:
        # Failures are not cached: a re-run should try them again.
        if not sample.ok:
            return
        self._conn().execute(
            "INSERT OR REPLACE INTO responses (key, identity, sample, created) VALUES (?,?,?,?)",
            (key, identity, sample.to_json(), time.time()),
        )

    def __len__(self) -> int:
        return self._conn().execute("SELECT COUNT(*) FROM responses").fetchone()[0]

    def close(self) -> None:
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()
            self._local.conn = None
