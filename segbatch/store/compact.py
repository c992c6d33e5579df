"""Compaction: merge the summary's small files (one per write task, at most 64 rows) into few large ones.

A run ends by merging its own ``part-<run_id>-*.parquet`` files; ``segbatch compact OUTPUT`` merges every
``part-*`` file (runs that were killed, older versions) and merged files far below the target size.

A merged file ``merged-<hash>.parquet`` holds up to :data:`MAX_ROWS` rows or about :data:`MAX_BYTES`,
in row groups of :data:`ROW_GROUP_ROWS` rows, all columns of :data:`~segbatch.store.contract.SUMMARY_SCHEMA`;
files with different class names are never merged together. Each merge goes in four steps, so that a
kill at any point leaves every row present at least once and never twice as readers see it:

1. the merged file is written whole under a temporary name (local disk) or a local temporary file;
2. a marker ``summary/_compacting-<hash>.json`` names the merged file and the files it replaces;
3. the merged file is published under its name (a rename, or one upload that appears whole);
4. the replaced files are deleted, then the marker.

Readers (:func:`segbatch.store.summary.dataset`) skip every file that a marker names as replaced *when the
marker's merged file exists*; a marker whose merged file is missing (a kill between 2 and 3) changes
nothing. The next compaction first finishes what markers describe (step 4, or drops a marker whose
merged file never appeared), then merges.

Nothing may write into OUTPUT while a compaction runs (a write task retried after its file was merged
would bring the file back beside the merged copy of its rows): ``segbatch compact`` holds OUTPUT's lease
(segbatch/store/_lease.py), and a run compacts its own files under its lease, after all its write tasks ended.
"""

from __future__ import annotations

import hashlib
import heapq
import itertools
import json
import logging
import os
import posixpath
import signal
import tempfile
import uuid
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from segbatch._internal import _storage
from segbatch.store.contract import CLASSES_METADATA_KEY, SUMMARY_DIR, SUMMARY_SCHEMA

log = logging.getLogger(__name__)

# A merged file is sorted by `uri` (so a listing read task reads only the row groups whose `uri` range its
# chunk of names touches, segbatch/stages/listing.py's DoneIndex). The sort is external (_Merge): memory
# holds RUN_ROWS rows while a run is sorted, then one record batch per run and one row group.
MAX_ROWS = 262_144  # rows per merged file: fewer, larger files are fewer footers for every resume lookup
MAX_BYTES = 128 * 1024**2  # about this many bytes per merged file (Arrow's in-memory size of its rows)
RUN_ROWS = 16_384  # rows sorted in memory at once, then spilled to local disk as one sorted run
SPILL_BATCH_ROWS = 1_024  # rows per record batch of a run: what the merge reads from each run at once
# Runs are read back once, from local disk: a fast codec keeps the spill small without costing the merge.
_SPILL_OPTIONS = pa.ipc.IpcWriteOptions(compression="lz4")
ROW_GROUP_ROWS = 16_384  # rows per row group: a resume lookup reads one or two of them per 1,024 names
SMALL_MERGED_ROWS = MAX_ROWS // 4  # `segbatch compact` merges merged files smaller than this again
READ_CHUNK_FILES = 256  # small files fetched at once (concurrently on object stores)
DELETE_BATCH = 500  # files per delete call (S3 takes up to 1000 keys per request)
PART_PREFIX = "part-"
MERGED_PREFIX = "merged-"
MARKER_PREFIX = "_compacting-"
TMP_PREFIX = ".merging-"  # a merged file being written on local disk
KILL_ENV = "SEGBATCH_COMPACT_KILL_AT"  # tests: SIGKILL this process at a named step


@dataclass
class CompactReport:
    files_before: int = 0  # summary files that were candidates
    files_merged: int = 0  # of which merged away
    merged_written: int = 0
    rows: int = 0
    markers_finished: int = 0  # unfinished merges of an earlier, killed compaction that were completed

    def __str__(self) -> str:
        text = (
            f"segbatch compact: merged {self.files_merged} summary files ({self.rows} rows) into {self.merged_written}"
        )
        if self.markers_finished:
            text += f"; finished {self.markers_finished} interrupted merge(s)"
        return text


def _kill_point(name: str) -> None:
    if os.environ.get(KILL_ENV) == name:
        os.kill(os.getpid(), signal.SIGKILL)


def _is_temporary(name: str) -> bool:
    """A merged file being written (``.merging-*.tmp``), or any other hidden temporary that
    ``_storage.write_atomic`` writes before its rename (``._compacting-<hash>.json.<12 hex>.tmp``, the
    marker of step 2; ``.part-*.parquet.<12 hex>.tmp`` of a write task): a kill between its write and
    its rename leaves it. Nothing writes into summary/ while a compaction runs, so none is in use."""
    return name.startswith(TMP_PREFIX) or (name.startswith(".") and name.endswith(".tmp"))


def marker_name(merged: str) -> str:
    return MARKER_PREFIX + merged[len(MERGED_PREFIX) : -len(".parquet")] + ".json"


def replaced_files(fs, folder: str, names: Iterable[str]) -> set[str]:
    """Basenames of files that a finished merge replaced, from the markers among ``names`` (the folder's
    basenames as listed); only markers whose merged file is among ``names`` count."""
    names = set(names)
    markers = sorted(n for n in names if n.startswith(MARKER_PREFIX) and n.endswith(".json"))
    out: set[str] = set()
    for name in markers:
        marker = _read_marker(fs, posixpath.join(folder, name))
        if marker is not None and marker["merged"] in names:
            out.update(marker["replaces"])
    return out


def _read_marker(fs, path: str) -> dict[str, Any] | None:
    try:
        return json.loads(_storage.retry(fs.cat_file, path, what=f"read {path}"))
    except FileNotFoundError:  # finished and removed since the listing
        return None


def _conform(table: pa.Table) -> pa.Table:
    """A summary file's rows in the contract's columns: missing extension columns become nulls."""
    columns = []
    for f in SUMMARY_SCHEMA:
        if f.name in table.column_names:
            columns.append(table[f.name].cast(f.type))
        else:
            columns.append(pa.nulls(table.num_rows, f.type))
    return pa.Table.from_arrays(columns, schema=SUMMARY_SCHEMA)


@dataclass
class _Merge:
    """One merged file being written, by an external merge sort whose memory does not grow with the file.

    Small files come in chunks of :data:`READ_CHUNK_FILES`, each combined into one table at once (thousands
    of small Arrow tables cost ~24 KiB each beyond their rows: 3,313 one-file tables of 25,184 rows held
    ~100 MiB). Every :data:`RUN_ROWS` rows are sorted by ``uri`` and spilled as a *run* to a local Arrow
    IPC file; publishing merges the runs, :data:`ROW_GROUP_ROWS` rows at a time, into the Parquet file.
    """

    classes: bytes | None
    local: bool
    folder: str
    tmp: str = ""  # the merged Parquet file being written
    writer: Any = None
    spill: str = ""  # the sorted runs, on local disk
    spill_writer: Any = None
    runs: list[tuple[int, int]] = field(default_factory=list)  # (first record batch, rows) of each run
    batches: int = 0  # record batches spilled so far
    replaces: list[str] = field(default_factory=list)
    rows: int = 0
    bytes: int = 0  # Arrow's in-memory size of every row added
    tables: list[pa.Table] = field(default_factory=list)  # small files not yet combined
    combined: list[pa.Table] = field(default_factory=list)  # chunks combined, not yet spilled
    held_rows: int = 0  # rows in `combined`

    def open(self, fs) -> None:
        metadata = {CLASSES_METADATA_KEY: self.classes} if self.classes is not None else None
        schema = SUMMARY_SCHEMA.with_metadata(metadata)
        if self.local:  # beside its final name: publishing is then one rename
            fs.makedirs(self.folder, exist_ok=True)
            self.tmp = posixpath.join(self.folder, f"{TMP_PREFIX}{uuid.uuid4().hex[:12]}.tmp")
            # Beside it too, so that the next compaction removes it after a kill (_is_temporary).
            self.spill = posixpath.join(self.folder, f"{TMP_PREFIX}{uuid.uuid4().hex[:12]}.runs.tmp")
        else:
            self.tmp = _local_temporary(".parquet")
            self.spill = _local_temporary(".arrow")
        self.writer = pq.ParquetWriter(self.tmp, schema, compression="zstd")
        self.spill_writer = pa.ipc.new_file(self.spill, SUMMARY_SCHEMA, options=_SPILL_OPTIONS)

    def add(self, name: str, table: pa.Table) -> None:
        self.replaces.append(name)
        self.rows += table.num_rows
        self.bytes += table.nbytes
        self.tables.append(table)
        if len(self.tables) >= READ_CHUNK_FILES:
            self._combine()

    def full(self) -> bool:
        return self.rows >= MAX_ROWS or self.bytes >= MAX_BYTES

    def _combine(self) -> None:
        if self.tables:
            table = pa.concat_tables(self.tables).combine_chunks()
            self.tables = []
            self.combined.append(table)
            self.held_rows += table.num_rows
        if self.held_rows >= RUN_ROWS:
            self._spill()

    def _spill(self) -> None:
        """Write the held rows, sorted by ``uri``, as one run of record batches."""
        if not self.combined:
            return
        table = pa.concat_tables(self.combined).sort_by("uri")
        self.combined, self.held_rows = [], 0
        self.runs.append((self.batches, table.num_rows))
        for batch in table.to_batches(max_chunksize=SPILL_BATCH_ROWS):
            self.spill_writer.write_batch(batch)
            self.batches += 1

    def write(self) -> None:
        """Merge the runs into the Parquet file: each row group holds the next ROW_GROUP_ROWS rows in ``uri``
        order, so row groups cover narrow, disjoint ``uri`` ranges."""
        self._combine()
        self._spill()
        self.spill_writer.close()
        self.spill_writer = None
        with pa.OSFile(self.spill, "rb") as source:
            reader = pa.ipc.open_file(source)
            for group in _merge_runs(reader, self.runs, ROW_GROUP_ROWS):
                self.writer.write_table(group, row_group_size=ROW_GROUP_ROWS)
        os.remove(self.spill)
        self.spill = ""
        self.writer.close()
        self.writer = None

    def discard(self) -> None:
        for writer in (self.writer, self.spill_writer):
            if writer is not None:
                writer.close()
        self.writer = self.spill_writer = None
        for path in (self.tmp, self.spill):
            if path and os.path.exists(path):
                os.remove(path)


def _local_temporary(suffix: str) -> str:
    handle, path = tempfile.mkstemp(prefix="segbatch-merge-", suffix=suffix)
    os.close(handle)
    return path


def _merge_runs(reader, runs: list[tuple[int, int]], group_rows: int) -> Iterator[pa.Table]:
    """The rows of sorted runs (record batches of ``reader``) in ``uri`` order, ``group_rows`` at a time.

    A k-way merge of the runs' ``uri`` values decides how many rows each run gives to the next group; those
    rows are a contiguous slice of each run, read batch by batch, and only the group is sorted in memory.
    Memory: one record batch per run, and one group.
    """

    def uris(run: int, first: int, rows: int) -> Iterator[tuple[str, int]]:
        batch = first
        while rows > 0:
            values = reader.get_batch(batch).column("uri").to_pylist()
            for uri in values:
                yield uri, run
            rows -= len(values)
            batch += 1

    cursors = [_RunCursor(reader, first, rows) for first, rows in runs]
    order = heapq.merge(*(uris(i, first, rows) for i, (first, rows) in enumerate(runs)))
    while True:
        taken = [0] * len(runs)
        n = 0
        for _, run in itertools.islice(order, group_rows):
            taken[run] += 1
            n += 1
        if n == 0:
            return
        pieces = [cursors[i].take(k) for i, k in enumerate(taken) if k]
        yield pa.concat_tables(pieces).sort_by("uri")


class _RunCursor:
    """Reads one run's rows in order, any number at a time."""

    def __init__(self, reader, first: int, rows: int):
        self._reader, self._next, self._left = reader, first, rows
        self._batch: pa.RecordBatch | None = None
        self._offset = 0

    def take(self, n: int) -> pa.Table:
        pieces = []
        while n > 0:
            if self._batch is None or self._offset == self._batch.num_rows:
                self._batch, self._offset = self._reader.get_batch(self._next), 0
                self._next += 1
            k = min(n, self._batch.num_rows - self._offset)
            pieces.append(self._batch.slice(self._offset, k))
            self._offset += k
            n -= k
        return pa.Table.from_batches(pieces, schema=SUMMARY_SCHEMA)


def compact(
    output_url: str, storage_options: Mapping[str, Any] | None = None, *, run_id: str | None = None
) -> CompactReport:
    """Merge OUTPUT's small summary files; with ``run_id``, only that run's ``part-<run_id>-*`` files."""
    report = CompactReport()
    opened = summary_folder(output_url, storage_options)
    if opened is None:
        return report
    fs, folder = opened
    names = _list(fs, folder)
    for name in names:  # temporaries of a killed compaction
        if _is_temporary(name):
            _storage.retry(fs.rm_file, posixpath.join(folder, name), what=f"delete {name}")
    report.markers_finished = _finish_markers(fs, folder, names)
    if report.markers_finished:
        names = _list(fs, folder)
    candidates = _candidates(fs, folder, names, run_id)
    report.files_before = len(candidates)
    if len(candidates) < 2:  # one file is as compact as it gets
        return report
    local = _storage.is_local(fs)
    merges: dict[bytes | None, _Merge] = {}
    try:
        for start in range(0, len(candidates), READ_CHUNK_FILES):
            chunk = candidates[start : start + READ_CHUNK_FILES]
            paths = [posixpath.join(folder, n) for n in chunk]
            for name, raw in zip(chunk, _storage.read_many(fs, paths)):
                if isinstance(raw, FileNotFoundError):
                    continue  # gone since the listing (dropped by a redo cleanup)
                if isinstance(raw, BaseException):
                    raise raw
                table = pq.read_table(pa.BufferReader(raw))
                classes = (table.schema.metadata or {}).get(CLASSES_METADATA_KEY)
                merge = merges.get(classes)
                if merge is None:
                    merge = merges[classes] = _Merge(classes, local, folder)
                    merge.open(fs)
                merge.add(name, _conform(table))
                if merge.full():
                    _publish(fs, folder, merges.pop(classes), report)
        for classes in list(merges):
            _publish(fs, folder, merges.pop(classes), report)
    finally:
        for merge in merges.values():
            merge.discard()
    log.info("%s", report)
    return report


def finish_pending(output_url: str, storage_options: Mapping[str, Any] | None = None) -> int:
    """Finish the merges a killed compaction left behind (step 4); returns how many there were. The redo
    cleanup calls it first: it may delete a merged file whose rows are all superseded, and the files that
    file replaced must be gone by then."""
    opened = summary_folder(output_url, storage_options)
    if opened is None:
        return 0
    fs, folder = opened
    return _finish_markers(fs, folder, _list(fs, folder))


def summary_folder(output_url: str, storage_options: Mapping[str, Any] | None = None) -> tuple[Any, str] | None:
    """``(fs, path)`` of OUTPUT's summary folder, or None when there is none yet. fsspec filesystems are
    cached per process, with their listings: the folder's cached listing is dropped first, so files
    written since (by a run, or by a compaction) are seen."""
    fs, root = _storage.open_url(output_url, storage_options)
    folder = _storage.join_path(root, SUMMARY_DIR)
    fs.invalidate_cache(folder)
    if not _storage.retry(fs.exists, folder, what=f"check {folder}"):
        return None
    return fs, folder


def _list(fs, folder: str) -> list[str]:
    fs.invalidate_cache(folder)
    return sorted(posixpath.basename(p) for p in _storage.retry(fs.ls, folder, detail=False, what=f"list {folder}"))


def _candidates(fs, folder: str, names: list[str], run_id: str | None) -> list[str]:
    if run_id is not None:
        prefix = f"{PART_PREFIX}{run_id}-"
        return [n for n in names if n.startswith(prefix) and n.endswith(".parquet")]
    parts = [n for n in names if n.startswith(PART_PREFIX) and n.endswith(".parquet")]
    small = []
    for name in names:
        if name.startswith(MERGED_PREFIX) and name.endswith(".parquet"):
            path = posixpath.join(folder, name)
            with fs.open(path, "rb") as f:
                if pq.ParquetFile(f).metadata.num_rows < SMALL_MERGED_ROWS:
                    small.append(name)
    # One small merged file alone gains nothing from being rewritten.
    return parts + (small if len(small) + len(parts) > 1 else [])


def _publish(fs, folder: str, merge: _Merge, report: CompactReport) -> None:
    merge.write()
    digest = hashlib.sha1("\n".join(sorted(merge.replaces)).encode()).hexdigest()[:16]
    name = f"{MERGED_PREFIX}{digest}.parquet"
    path = posixpath.join(folder, name)
    marker = posixpath.join(folder, marker_name(name))
    try:
        _kill_point("written")
        body = json.dumps({"merged": name, "replaces": sorted(merge.replaces)}, indent=0).encode()
        _storage.write_atomic(fs, marker, body)
        _kill_point("marked")
        if merge.local:
            _storage.retry(fs.mv, merge.tmp, path, what=f"rename to {path}")
        else:
            _storage.retry(fs.put_file, merge.tmp, path, what=f"upload {path}")
    finally:
        merge.discard()
    _kill_point("published")
    _finish(fs, folder, marker, name, merge.replaces)
    report.files_merged += len(merge.replaces)
    report.merged_written += 1
    report.rows += merge.rows


def _finish(fs, folder: str, marker: str, merged: str, replaces: list[str]) -> None:
    """Step 4: delete the replaced files (never the merged file itself), then the marker."""
    paths = [posixpath.join(folder, n) for n in replaces if n != merged]
    for i in range(0, len(paths), DELETE_BATCH):
        batch = paths[i : i + DELETE_BATCH]
        try:
            _storage.retry(fs.rm, batch, what=f"delete {len(batch)} merged summary files")
        except FileNotFoundError:
            for p in batch:  # some were gone already: delete the rest one by one
                try:
                    _storage.retry(fs.rm_file, p, what=f"delete {p}")
                except FileNotFoundError:
                    pass
        if i == 0:
            _kill_point("deleting")
    _storage.retry(fs.rm_file, marker, what=f"delete {marker}")


def _finish_markers(fs, folder: str, names: list[str]) -> int:
    """Complete the merges an earlier compaction left behind; returns how many markers were handled."""
    present = set(names)
    handled = 0
    for name in names:
        if not (name.startswith(MARKER_PREFIX) and name.endswith(".json")):
            continue
        path = posixpath.join(folder, name)
        marker = _read_marker(fs, path)
        if marker is None:
            continue
        if marker["merged"] in present:
            _finish(fs, folder, path, marker["merged"], marker["replaces"])
        else:  # killed before the merged file was published: the small files are still the truth
            _storage.retry(fs.rm_file, path, what=f"delete {path}")
        handled += 1
    return handled


__all__ = ["CompactReport", "compact", "finish_pending", "replaced_files"]
