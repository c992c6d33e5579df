"""Stage 5, sinks: run the output writers on each image, then write the batch's summary rows (Ray CPU tasks).

A batch's masks are written before its summary file, and a summary file appears whole or not at all,
so a row never points at a missing mask. The summary file's name is derived from the batch's inputs:
a retried task rewrites the same file instead of adding a second copy of its rows.
"""

from __future__ import annotations

import hashlib
import posixpath
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from segbatch._internal import _storage
from segbatch.stages.writers import MaskWriter, WriterContext, get_writer
from segbatch.store.contract import (
    FORWARD_PASS_COLUMN,
    IMAGE_ROW_SCHEMA,
    SUMMARY_DIR,
    SUMMARY_SCHEMA,
    WRITTEN_SCHEMA,
    check_schema,
    summary_metadata,
)

WRITE_THREADS = 16  # concurrent object writes per task; object stores reward parallel PUTs


class WriteOutputs:
    """Ray Data map step (CPU tasks): the writers (mask first) on every ok image, then the summary rows."""

    def __init__(self, context: WriterContext, writer_names: Sequence[str], *, run_id: str, model: str, weights: str):
        self._output = _storage.Location(context.output_url, context.storage_options)
        self._classes = context.classes
        self._run_id = run_id
        self._model = model
        self._weights = weights
        names = [MaskWriter.name, *(n for n in writer_names if n != MaskWriter.name)]
        self._writers = [get_writer(name)(context) for name in names]

    def __call__(self, batch: pa.Table) -> pa.Table:
        """Rows of :data:`IMAGE_ROW_SCHEMA` -> rows of :data:`WRITTEN_SCHEMA`, after the images' files and the
        block's summary file (:data:`SUMMARY_SCHEMA`) are written."""
        from segbatch.errors import is_fatal_write_error

        if batch.num_rows == 0:
            return WRITTEN_SCHEMA.empty_table()
        self._output.open()
        rows = check_schema(batch, IMAGE_ROW_SCHEMA, "model").to_pylist()

        def write_one(row: dict[str, Any]) -> dict[str, Any]:
            row["mask_uri"] = None
            if row["error"] is not None:
                return row
            try:
                mask = np.frombuffer(row["mask"], dtype=np.uint8).reshape(row["height"], row["width"])
                row["mask_uri"] = self._writers[0].write(row, mask)
                for writer in self._writers[1:]:
                    writer.write(row, mask)
            except Exception as exc:  # a failed write costs this image's row, not the batch
                if is_fatal_write_error(exc):
                    raise  # a full disk or read-only OUTPUT: every row would fail; the run stops instead
                row["error"] = f"cannot write mask: {type(exc).__name__}: {exc}"
            return row

        with ThreadPoolExecutor(min(WRITE_THREADS, max(1, len(rows)))) as pool:
            rows = list(pool.map(write_one, rows))
        table = self._summary_table(rows)
        if table.num_rows:
            self._write_summary(table)
        forward_passes = pa.array([r[FORWARD_PASS_COLUMN] for r in rows], pa.int32())
        out = table.select(WRITTEN_SCHEMA.names[:-1]).append_column(FORWARD_PASS_COLUMN, forward_passes)
        return out.cast(WRITTEN_SCHEMA)

    def _summary_table(self, rows: list[dict[str, Any]]) -> pa.Table:
        now = int(time.time() * 1000)
        cols: dict[str, list] = {name: [] for name in SUMMARY_SCHEMA.names}
        for row in rows:
            ok = row["error"] is None
            cols["uri"].append(row["uri"])
            cols["status"].append("ok" if ok else "error")
            cols["error"].append(None if ok else row["error"])
            cols["width"].append(row["width"] if ok else None)
            cols["height"].append(row["height"] if ok else None)
            cols["mask_uri"].append(row["mask_uri"] if ok else None)
            cols["pixel_counts"].append(row["pixel_counts"] if ok else None)
            cols["run_id"].append(self._run_id)
            cols["model"].append(self._model)
            cols["weights"].append(self._weights)
            cols["node_id"].append(row["node_id"])
            cols["device"].append(row["device"])
            cols["size"].append(row["size"])
            cols["etag"].append(row["etag"])
            cols["mtime"].append(row["mtime"])
            cols["written_at"].append(now)
            cols["mean_confidence"].append(row["mean_confidence"] if ok else None)
            cols["low_confidence_share"].append(row["low_confidence_share"] if ok else None)
        schema = SUMMARY_SCHEMA.with_metadata(summary_metadata(self._classes))
        return pa.table(cols, schema=schema)

    def _write_summary(self, table: pa.Table) -> None:
        digest = hashlib.sha1("\n".join(sorted(table["uri"].to_pylist())).encode()).hexdigest()[:16]
        name = f"part-{self._run_id}-{digest}.parquet"
        buf = pa.BufferOutputStream()
        pq.write_table(table, buf, compression="zstd")
        fs, root = self._output.open()
        _storage.write_atomic(
            fs, _storage.join_path(root, posixpath.join(SUMMARY_DIR, name)), buf.getvalue().to_pybytes()
        )
