"""LanceDB tables of embedded records, one per family: what later batches are deduplicated against."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow as pa

from quality.embeddings import DIM


def _schema() -> pa.Schema:
    return pa.schema(
        [
            pa.field("record_id", pa.string()),
            pa.field("asset", pa.string()),
            pa.field("text", pa.string()),
            pa.field("parent_ids", pa.list_(pa.string())),
            pa.field("provenance_json", pa.string()),
            pa.field("run_id", pa.string()),
            pa.field("vector", pa.list_(pa.float32(), DIM)),
        ]
    )


class EmbeddingStore:
    """`<home>/lancedb/<family>.lance`: record id, text, lineage and the embedding of each kept record."""

    def __init__(self, path: str | Path) -> None:
        import lancedb

        self.path = Path(path)
        self.path.mkdir(parents=True, exist_ok=True)
        self.db = lancedb.connect(str(self.path))

    def _table(self, family: str, create: bool):
        if family in self.db.list_tables().tables:
            return self.db.open_table(family)
        return self.db.create_table(family, schema=_schema()) if create else None

    def count(self, family: str) -> int:
        table = self._table(family, create=False)
        return 0 if table is None else table.count_rows()

    def vectors(self, family: str) -> tuple[list[str], np.ndarray]:
        """All stored record ids and their vectors, in insertion order."""
        table = self._table(family, create=False)
        if table is None or table.count_rows() == 0:
            return [], np.empty((0, DIM), dtype=np.float32)
        data = table.to_arrow().select(["record_id", "vector"])
        flat = data.column("vector").combine_chunks().flatten().to_numpy(zero_copy_only=False)
        return data.column("record_id").to_pylist(), flat.reshape(-1, DIM).astype(np.float32)

    def upsert(
        self,
        family: str,
        asset: str,
        records: pl.DataFrame,
        texts: list[str],
        vectors: np.ndarray,
        run_id: str,
    ) -> None:
        """Insert new records, replace those whose record_id is already stored."""
        if records.height == 0:
            return
        provenance = (
            [json.dumps(p, default=str) for p in records["provenance"].to_list()]
            if "provenance" in records.columns
            else [""] * records.height
        )
        parents = (
            records["parent_ids"].to_list()
            if "parent_ids" in records.columns
            else [[]] * records.height
        )
        rows = pa.table(
            {
                "record_id": records["record_id"].to_list(),
                "asset": [asset] * records.height,
                "text": texts,
                "parent_ids": parents,
                "provenance_json": provenance,
                "run_id": [run_id] * records.height,
                "vector": pa.FixedSizeListArray.from_arrays(
                    pa.array(np.ascontiguousarray(vectors, dtype=np.float32).ravel()), DIM
                ),
            },
            schema=_schema(),
        )
        table = self._table(family, create=True)
        (
            table.merge_insert("record_id")
            .when_matched_update_all()
            .when_not_matched_insert_all()
            .execute(rows)
        )
