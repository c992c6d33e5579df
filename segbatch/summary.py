"""Reading the summary of OUTPUT: resume decisions, `segbatch status`, reports.

Readers ask for the columns they need only; resuming over 10^6 labelled images reads the `uri` and
`status` columns (plus the input identity for --redo-changed), never the rest.
"""

from __future__ import annotations

import json
from typing import Any, Mapping, Sequence

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads

from segbatch import _storage
from segbatch.contract import CLASSES_METADATA_KEY, SUMMARY_DIR, SUMMARY_SCHEMA


def dataset(output_url: str, storage_options: Mapping[str, Any] | None = None) -> pads.Dataset | None:
    """The summary as a pyarrow dataset, or None when OUTPUT has no summary yet."""
    fs, root = _storage.open_url(output_url, storage_options)
    path = _storage.join_path(root, SUMMARY_DIR)
    # fsspec filesystems are cached per process, with their listings: a listing from before a run must
    # not hide the files the run wrote (s3fs then even reports them missing).
    fs.invalidate_cache(path)
    if not _storage.retry(fs.exists, path, what=f"check {path}"):
        return None
    files = [p for p in _storage.retry(fs.find, path, what=f"list {path}") if p.endswith(".parquet")
             and not p.rsplit("/", 1)[-1].startswith((".", "_"))]
    if not files:
        return None
    # Files from older segbatch versions may lack extension columns; the contract schema fills them null.
    return pads.dataset(files, schema=SUMMARY_SCHEMA, format="parquet", filesystem=_storage.to_pyarrow_fs(fs))


def read(output_url: str, storage_options: Mapping[str, Any] | None = None, *,
         columns: Sequence[str] | None = None, filter: pc.Expression | None = None) -> pa.Table:
    ds = dataset(output_url, storage_options)
    schema = SUMMARY_SCHEMA
    if ds is None:
        names = list(columns) if columns else schema.names
        return pa.schema([schema.field(n) for n in names]).empty_table()
    return ds.to_table(columns=list(columns) if columns else None, filter=filter)


def done_keys(output_url: str, storage_options: Mapping[str, Any] | None = None, *,
              since: float | None = None) -> pa.Table:
    """uri (and input identity) of every ok row: what a resumed run skips. With ``since`` (epoch seconds,
    identity.py's relabel_since) only rows written since then count."""
    where = pc.field("status") == "ok"
    if since is not None:
        where = where & (pc.field("written_at") >= pa.scalar(int(since * 1000), pa.timestamp("ms", tz="UTC")))
    return read(output_url, storage_options, columns=["uri", "size", "etag", "mtime"], filter=where)


def classes(output_url: str, storage_options: Mapping[str, Any] | None = None) -> list[str] | None:
    """Class names from the newest summary file's schema metadata."""
    ds = dataset(output_url, storage_options)
    if ds is None:
        return None
    for fragment in reversed(list(ds.get_fragments())):
        meta = fragment.physical_schema.metadata or {}
        if CLASSES_METADATA_KEY in meta:
            return json.loads(meta[CLASSES_METADATA_KEY])
    return None
