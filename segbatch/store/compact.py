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
import json
import logging
import os
import posixpath
import signal
import tempfile
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from segbatch._internal import _storage
from segbatch.store.contract import CLASSES_METADATA_KEY, SUMMARY_DIR, SUMMARY_SCHEMA

log = logging.getLogger(__name__)

# A merged file is sorted by `uri` (so a listing read task reads only the row groups whose `uri` range its
# chunk of names touches, segbatch/stages/listing.py's DoneIndex), and sorting holds the file's rows in memory:
MAX_ROWS = 262_144  # rows per merged file (~40-100 MB held while it is sorted)
MAX_BYTES = 128 * 1024**2  # about this many bytes per merged file, as held in memory before writing
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
    """One merged file being written: a local temporary file, the files it replaces."""

    classes: bytes | None
    local: bool
    folder: str
    tmp: str = ""
    writer: Any = None
    replaces: list[str] = field(default_factory=list)
    rows: int = 0
    pending: list[pa.Table] = field(default_factory=list)
    pending_bytes: int = 0  # bytes held (Arrow's in-memory size)

    def open(self, fs) -> None:
        metadata = {CLASSES_METADATA_KEY: self.classes} if self.classes is not None else None
        schema = SUMMARY_SCHEMA.with_metadata(metadata)
        if self.local:  # beside its final name: publishing is then one rename
            fs.makedirs(self.folder, exist_ok=True)
            self.tmp = posixpath.join(self.folder, f"{TMP_PREFIX}{uuid.uuid4().hex[:12]}.tmp")
        else:
            handle, self.tmp = tempfile.mkstemp(prefix="segbatch-merge-", suffix=".parquet")
            os.close(handle)
        self.writer = pq.ParquetWriter(self.tmp, schema, compression="zstd")

    def add(self, name: str, table: pa.Table) -> None:
        self.replaces.append(name)
        self.rows += table.num_rows
        self.pending.append(table)
        self.pending_bytes += table.nbytes

    def flush(self) -> None:
        """Write the held rows sorted by ``uri``: each row group then covers a narrow ``uri`` range."""
        if self.pending:
            table = pa.concat_tables(self.pending).sort_by("uri")
            self.writer.write_table(table, row_group_size=ROW_GROUP_ROWS)
            self.pending, self.pending_bytes = [], 0

    def full(self) -> bool:
        return self.rows >= MAX_ROWS or self.pending_bytes >= MAX_BYTES

    def discard(self) -> None:
        if self.writer is not None:
            self.writer.close()
        if self.tmp and os.path.exists(self.tmp):
            os.remove(self.tmp)


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
    merge.flush()
    merge.writer.close()
    merge.writer = None
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
