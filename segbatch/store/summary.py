"""Reading the summary of OUTPUT: resume decisions, `segbatch status`, reports.

Readers ask for the columns they need only; resuming over 10^6 labelled images reads the `uri` and
`status` columns (plus the input identity for --redo-changed), never the rest.
"""

from __future__ import annotations

import json
import posixpath
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads

from segbatch._internal import _storage
from segbatch.store import compact
from segbatch.store.contract import CLASSES_METADATA_KEY, SUMMARY_SCHEMA


def dataset(output_url: str, storage_options: Mapping[str, Any] | None = None) -> pads.Dataset | None:
    """The summary as a pyarrow dataset, or None when OUTPUT has no summary yet."""
    found = _files(output_url, storage_options)
    return None if found is None else _open(*found)


#: Summary files one :func:`batches` scan opens at once. A pyarrow dataset keeps every fragment's Parquet
#: footer once it has read the fragment (~50 KiB for the summary's 18 columns), so one dataset over the
#: 3,376 files of a stopped 10^6-input run held ~180 MiB until the scan ended. Scans of 256 files grew the
#: process by 32 MiB over 2,853 small files, scans of 64 by 21 MiB, at no measurable cost in time.
FILES_PER_SCAN = 64


def batches(
    output_url: str,
    storage_options: Mapping[str, Any] | None = None,
    *,
    columns: Sequence[str],
    filter: pc.Expression | None = None,
) -> Iterator[pa.RecordBatch]:
    """The summary's rows as record batches, in memory that does not grow with the number of files."""
    found = _files(output_url, storage_options)
    if found is None:
        return
    fs, files = found
    for start in range(0, len(files), FILES_PER_SCAN):
        yield from _open(fs, files[start : start + FILES_PER_SCAN]).to_batches(columns=list(columns), filter=filter)


def _open(fs, files: list[str]) -> pads.Dataset:
    # Files from older segbatch versions may lack extension columns; the contract schema fills them null.
    return pads.dataset(files, schema=SUMMARY_SCHEMA, format="parquet", filesystem=_storage.to_pyarrow_fs(fs))


def _files(output_url: str, storage_options: Mapping[str, Any] | None) -> tuple[Any, list[str]] | None:
    """OUTPUT's summary filesystem and the files that readers take, or None when there are none."""
    # A listing from before a run must not hide the files the run wrote (s3fs then even reports them
    # missing): summary_folder drops the cached one.
    opened = compact.summary_folder(output_url, storage_options)
    if opened is None:
        return None
    fs, path = opened
    listed = _storage.retry(fs.find, path, what=f"list {path}")
    # Files that a finished merge replaced but a killed compaction left behind hold rows that the merged
    # file holds too: they are skipped (segbatch/store/compact.py).
    top = [p for p in listed if posixpath.dirname(p) == path.rstrip("/")]
    replaced = (
        compact.replaced_files(fs, path, [posixpath.basename(p) for p in top])
        if any(posixpath.basename(p).startswith(compact.MARKER_PREFIX) for p in top)
        else set()
    )
    files = [
        p
        for p in listed
        if p.endswith(".parquet")
        and not posixpath.basename(p).startswith((".", "_"))
        and not (posixpath.dirname(p) == path.rstrip("/") and posixpath.basename(p) in replaced)
    ]
    return (fs, files) if files else None


def read(
    output_url: str,
    storage_options: Mapping[str, Any] | None = None,
    *,
    columns: Sequence[str] | None = None,
    filter: pc.Expression | None = None,
) -> pa.Table:
    ds = dataset(output_url, storage_options)
    schema = SUMMARY_SCHEMA
    if ds is None:
        names = list(columns) if columns else schema.names
        return pa.schema([schema.field(n) for n in names]).empty_table()
    return ds.to_table(columns=list(columns) if columns else None, filter=filter)


IDENTITY_COLUMNS = ["size", "etag", "mtime"]  # what --redo-changed compares
DONE_CHUNK_ROWS = 2_000_000  # ok rows the driver holds at once while deciding what to skip


#: The order that puts each input's newest row first (docs/output-contract.md): the latest ``written_at``,
#: then the greater ``run_id`` (run ids start with their UTC start time); a row without them is older.
NEWEST_FIRST = [("uri", "ascending"), ("written_at", "descending"), ("run_id", "descending")]


def newest_first(table: pa.Table) -> tuple[pa.Table, pa.Array]:
    """``table`` (with ``uri``, ``written_at`` and ``run_id``) in :data:`NEWEST_FIRST` order, and a mask
    that is true on each input's newest row."""
    ordered = table.sort_by(NEWEST_FIRST)
    n = ordered.num_rows
    if n == 0:
        return ordered, pa.array([], pa.bool_())
    uris = ordered["uri"].combine_chunks()
    starts = pc.not_equal(uris.slice(1), uris.slice(0, n - 1)).fill_null(True)  # a row whose uri differs
    return ordered, pa.concat_arrays([pa.array([True]), starts])


def newest_per_uri(table: pa.Table) -> pa.Table:
    """The newest row of each input in ``table``, sorted by uri (see :data:`NEWEST_FIRST`)."""
    ordered, newest = newest_first(table)
    return ordered.filter(newest)


def written_since(since: float | None) -> pc.Expression | None:
    """Rows written at or after ``since`` (epoch seconds; identity.py's relabel_since), or None for all."""
    if since is None:
        return None
    return pc.field("written_at") >= pa.scalar(int(since * 1000), pa.timestamp("ms", tz="UTC"))


def done_filter(since: float | None) -> pc.Expression:
    """The rows that mark an input done: ok, and written since ``since`` when it is given."""
    where = pc.field("status") == "ok"
    since_expr = written_since(since)
    return where if since_expr is None else where & since_expr


def done_key_chunks(
    output_url: str,
    storage_options: Mapping[str, Any] | None = None,
    *,
    identity: bool = False,
    since: float | None = None,
    chunk_rows: int = DONE_CHUNK_ROWS,
) -> Iterator[pa.Table]:
    """The ``uri`` (with ``identity``, also size/ETag/mtime) of every ok row (written since ``since``:
    :func:`done_filter`), what a resumed run skips, in tables of at most about ``chunk_rows`` rows, so that the driver never holds the
    keys of a 10^7-row summary at once."""
    ds = dataset(output_url, storage_options)
    if ds is None:
        return
    columns = ["uri", *IDENTITY_COLUMNS] if identity else ["uri"]
    scanner = ds.scanner(columns=columns, filter=done_filter(since), batch_readahead=2, fragment_readahead=1)
    batches, rows = [], 0
    for batch in scanner.to_batches():
        if batch.num_rows:
            batches.append(batch)
            rows += batch.num_rows
        if rows >= chunk_rows:
            yield pa.Table.from_batches(batches)
            batches, rows = [], 0
    if batches:
        yield pa.Table.from_batches(batches)


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
