"""Stage 1, listing (Ray read tasks): which inputs a run processes, streamed into the run as it is found.

INPUT is split into shards in the driver by one bounded look at its top level (:func:`plan_shards`): the
files at the top are one shard, and its folders are spread over the others. Each shard is one Ray read
task (:class:`ListingDatasource`), so listing runs on the cluster's CPUs, beside decoding, and the driver
never holds the listing. A read task:

1. walks its folders in sorted order, one page at a time (a paginated, recursive ``ListObjectsV2`` on S3;
   ``os.scandir`` on local disk; ``fs.walk`` elsewhere) and cuts the stream into chunks of
   :data:`LIST_CHUNK_ROWS` rows;
2. drops the inputs that OUTPUT already holds an ok row for (:class:`DoneIndex`: only the summary row
   groups whose ``uri`` range a chunk touches are read; merged summary files are sorted by ``uri``);
3. with a batch size above one, reads each image's header for its model-input shape (:func:`probe_shape`)
   and cuts the rows into blocks of single-shape runs of ``batch_size`` rows (:class:`ShapeCutter`), so
   each forward pass is full without a central batching step. Only names travel here; no pixel does;
4. reports its counts (listed, skipped) to the driver through Ray's key-value store (segbatch/_internal/_tally.py).

A read task is a pure function of INPUT and OUTPUT's summary: Ray retries a dead one from the start.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import os
import posixpath
import stat
import time
from collections import OrderedDict
from collections.abc import Iterable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from segbatch._internal import _storage
from segbatch._internal.resources import LIST_TASK_CPUS, list_tasks_running
from segbatch.errors import InputError
from segbatch.stages.inputs import INPUT_KINDS
from segbatch.store import contract
from segbatch.store.contract import OUTPUT_DIRS

log = logging.getLogger(__name__)

#: The rows both input kinds hand to decoding; declared with the other hand-offs in the contract.
LISTING_SCHEMA = contract.LISTING_SCHEMA

LIST_CHUNK_ROWS = 1024  # listed rows looked up against the summary and probed together
PLAN_SCAN_ENTRIES = 1000  # top-level entries the driver looks at (one S3 page); a larger top level is one shard
MAX_SHARDS_PER_CPU = 2  # read tasks per cluster CPU at most: enough to list on every node
MIN_MAX_SHARDS = 8
BLOCK_ROWS = 32  # images per block handed to decoding (a decode task reads a block's images concurrently)
MAX_HELD_ROWS = 8192  # names a read task holds per shape while filling batches (~1 MB); past it, partial batches
PROBE_THREADS = 16  # concurrent header reads per read task: object stores answer each in tens of ms
PROBE_BYTES = 64 * 1024  # bytes read to find an image's size and EXIF orientation (JPEG headers fit)
REPORT_EVERY = 1.0  # seconds between a read task's count reports
# How far the listing may run ahead of the run: rows handed on to decoding and not yet seen written by the
# driver, per cluster CPU and at least. Without a bound, listing a large INPUT queued every block in Ray
# Data's buffers, whose references the driver holds (~9 KB each): RSS then grew with the input count.
# 2,000 per CPU keeps minutes of work queued on CPUs, and ~15 s for 64 CPUs feeding 16 GPUs at 8,000 img/s.
# The bound must stay well above what Ray Data holds back itself (a read task's rows until its block of
# STREAM_BLOCK_BYTES is full, ~100-300 names; a write task's bundle of 8): rows held there never reach
# the driver while their read task waits.
AHEAD_ROWS_PER_CPU = 2000
MIN_AHEAD_ROWS = 20_000
PACE_SLEEP = 0.5  # seconds a read task that is far enough ahead waits before it looks again
# A read task that has waited this long without the written count moving hands on one more chunk: a
# stalled count (actors still loading a model, or rows held somewhere the bound did not foresee) slows
# the listing down, and never stops a run.
PACE_PATIENCE = 30.0
EXIF_ORIENTATION = 0x0112
ORIENTATIONS_SWAPPING_AXES = (5, 6, 7, 8)  # EXIF orientations that rotate by 90 degrees


# --------------------------------------------------------------------------------------------------
# INPUT's names: which files count, and OUTPUT's own tree kept out
# --------------------------------------------------------------------------------------------------


def require_exists(fs, path: str, label: str) -> None:
    """Stop the run before any work when an input location is missing or unreadable."""
    try:
        exists = _storage.retry(fs.exists, path, what=f"check {label}")
    except PermissionError as exc:
        raise InputError(f"{label}: access denied ({exc})") from None
    if not exists:
        raise InputError(f"{label} does not exist (check the path, bucket name and credentials)")


def _wanted(name: str, extensions: frozenset[str]) -> bool:
    base = posixpath.basename(name)
    if base.startswith("."):  # hidden files, and our own temporaries
        return False
    _, dot, ext = base.rpartition(".")
    return bool(dot) and ext.lower() in extensions


def output_owned_dirs() -> tuple[str, ...]:
    """Folders of OUTPUT that segbatch writes; never listed as input when OUTPUT and INPUT overlap: the
    contract's list and every registered writer's folder, so a new writer's folder is never labelled by
    a rerun."""
    from segbatch.stages.writers import WRITERS

    extra = tuple(w.directory for _, w in WRITERS.items() if w.directory not in OUTPUT_DIRS)
    return OUTPUT_DIRS + extra


def _printable(text: str) -> str:
    """A local file name that is not valid UTF-8 comes back from the OS with surrogate escapes, which
    Arrow (and Parquet, and JSON) cannot hold: show its raw bytes as ``\\xNN`` instead. The backslash
    then makes the input an error row (mask_relpath refuses it), and the rest of the run goes on."""
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def excluded_prefixes(fs, root: str, output_url: str | None, storage_options: Mapping[str, Any] | None) -> list[str]:
    """Paths below INPUT's root that belong to OUTPUT's own tree, so a rerun never labels its own masks.

    OUTPUT strictly inside INPUT: all of OUTPUT. OUTPUT equal to INPUT (or above it): segbatch's own
    folders of OUTPUT (masks/, overlays/, summary/, runs/)."""
    if not output_url:
        return []
    try:
        out_fs, out_root = _storage.open_url(output_url, storage_options)
    except Exception:
        return []
    if out_fs.protocol != fs.protocol:
        return []
    out_root = out_root.rstrip("/")
    root = root.rstrip("/")
    if _storage.is_local(fs):
        # Compare where the two really are: INPUT or OUTPUT may be (or pass through) a symbolic link
        # into the other. The prefixes are then spelled below INPUT as the listing spells its paths.
        real_root, real_out = os.path.realpath(root), os.path.realpath(out_root)
        if real_out == real_root:
            return [_storage.join_path(root, d) for d in output_owned_dirs()]
        if _under(real_out, [real_root]):
            return [_storage.join_path(root, posixpath.relpath(real_out, real_root))]
        if _under(real_root, [_storage.join_path(real_out, d) for d in output_owned_dirs()]):
            return [root]  # INPUT is one of OUTPUT's own folders
        return []
    if out_root.startswith(root + "/"):
        return [out_root]
    if out_root == root or root.startswith(out_root + "/"):
        return [_storage.join_path(out_root, d) for d in output_owned_dirs()]
    return []


def _under(path: str, prefixes: list[str]) -> bool:
    return any(path == p or path.startswith(p + "/") for p in prefixes)


def _is_s3(fs) -> bool:
    return hasattr(fs, "call_s3")  # s3fs: its boto client lists pages of keys, as stored


# --------------------------------------------------------------------------------------------------
# Shards: planned in the driver by one bounded look at INPUT's top level
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Shard:
    """One read task's part of INPUT: top-level files (with their info), and folders walked recursively."""

    index: int
    files: tuple[tuple[str, dict], ...] = ()
    dirs: tuple[str, ...] = ()


def _scan_top(fs, root: str, limit: int) -> tuple[list[tuple[str, dict]], list[str], bool]:
    """(files with info, folders, complete) at INPUT's top level, looking at no more than ``limit`` entries."""
    files: list[tuple[str, dict]] = []
    dirs: list[str] = []
    if _storage.is_local(fs):
        with os.scandir(root) as it:
            for n, entry in enumerate(it):
                if n >= limit:
                    return [], [], False
                path = _storage.join_path(root, entry.name)
                if entry.is_dir(follow_symlinks=False):
                    dirs.append(path)
                else:
                    files.append((path, {}))  # stat()ed by the read task
        return sorted(files), sorted(dirs), True
    if _is_s3(fs):
        bucket, _, key = root.partition("/")  # not split_path, which drops the "/" of a "p//" folder
        prefix = key + "/" if key else ""
        page = _storage.retry(
            fs.call_s3, "list_objects_v2", Bucket=bucket, Prefix=prefix, Delimiter="/", MaxKeys=limit, what="list"
        )
        if page.get("IsTruncated"):
            return [], [], False
        for obj in page.get("Contents", []):
            files.append((f"{bucket}/{obj['Key']}", _s3_info(obj)))
        for common in page.get("CommonPrefixes", []):
            # "p//" (keys with an empty segment) is the folder "p/" of its own: drop one slash only.
            dirs.append(f"{bucket}/{common['Prefix'][:-1]}")
        return sorted(files), sorted(dirs), True
    entries = _storage.retry(fs.ls, root, detail=True, what=f"list {root}")
    if len(entries) > limit:
        return [], [], False
    for info in entries:
        (dirs if info.get("type") == "directory" else files).append(
            info["name"] if info.get("type") == "directory" else (info["name"], info)
        )
    return sorted(files, key=lambda f: f[0]), sorted(dirs), True


def plan_shards(fs, root: str, excluded: list[str], max_shards: int) -> list[Shard]:
    """Read tasks for INPUT: its top-level files as one, its folders spread round-robin over the rest.
    A top level of more than :data:`PLAN_SCAN_ENTRIES` entries is walked by one task, which streams it."""
    files, dirs, complete = _scan_top(fs, root, PLAN_SCAN_ENTRIES)
    if not complete:
        return [Shard(0, dirs=(root,))]
    dirs = [d for d in dirs if not _under(d, excluded)]
    if not dirs:
        return [Shard(0, files=tuple(files))]
    tasks = max(1, min(max_shards - 1, len(dirs)))
    groups = [tuple(dirs[i::tasks]) for i in range(tasks)]
    shards = [Shard(0, files=tuple(files))] if files else []
    return shards + [Shard(len(shards) + i, dirs=g) for i, g in enumerate(groups)]


# --------------------------------------------------------------------------------------------------
# Walking a shard: (path, info) in sorted order, streamed
# --------------------------------------------------------------------------------------------------


def _s3_info(obj: Mapping[str, Any]) -> dict:
    return {"size": obj.get("Size"), "ETag": obj.get("ETag"), "LastModified": obj.get("LastModified"), "type": "file"}


def _walk_s3(fs, top: str) -> Iterator[tuple[str, dict]]:
    """Every key below ``top``, in key order: a recursive listing, one page of 1,000 keys at a time. Keys
    with ".", ".." or empty segments are listed as stored: each is an object of its own."""
    bucket, _, key = top.partition("/")  # not split_path, which drops the "/" of a "p//" folder
    prefix = key + "/" if key else ""
    token = None
    while True:
        kwargs = {"Bucket": bucket, "Prefix": prefix, **({"ContinuationToken": token} if token else {})}
        page = _storage.retry(fs.call_s3, "list_objects_v2", what=f"list s3://{bucket}/{prefix}", **kwargs)
        for obj in page.get("Contents", []):
            if not obj["Key"].endswith("/"):  # a folder placeholder, not an object
                yield f"{bucket}/{obj['Key']}", _s3_info(obj)
        token = page.get("NextContinuationToken")
        if not page.get("IsTruncated") or not token:
            return


class _WalkStats:
    def __init__(self) -> None:
        self.links_skipped = 0


def _walk_local(top: str, stats: _WalkStats, excluded: list[str]) -> Iterator[tuple[str, dict]]:
    """Files below ``top`` in the byte order of their paths (a folder sorts as ``name/``), so that
    consecutive rows have close ``uri`` values. A folder's names are held while it is walked, not its
    files' info: each file is stat()ed when its turn comes."""
    try:
        with os.scandir(top) as it:
            entries = [(e.name + "/" if e.is_dir(follow_symlinks=False) else e.name, e) for e in it]
    except (FileNotFoundError, NotADirectoryError, PermissionError) as exc:
        log.warning("cannot list %s: %s", top, exc)
        return
    entries.sort(key=lambda item: item[0])
    for key, entry in entries:
        path = _storage.join_path(top, entry.name)
        if key.endswith("/"):
            if not _under(path, excluded):
                yield from _walk_local(path, stats, excluded)
            continue
        info = _local_info(path, entry)
        if info is None:
            stats.links_skipped += 1
            continue
        yield path, info


def _local_info(path: str, entry: Any = None) -> dict | None:
    """size and mtime of a file; a symbolic link is followed when it names a file (None otherwise)."""
    try:
        st = entry.stat(follow_symlinks=True) if entry is not None else os.stat(path)
    except OSError:
        return None
    if not stat.S_ISREG(st.st_mode):
        return None
    return {"size": st.st_size, "mtime": st.st_mtime, "type": "file"}


def _walk_fsspec(fs, top: str, stats: _WalkStats, excluded: list[str]) -> Iterator[tuple[str, dict]]:
    for dirpath, dirs, files in _storage.retry(lambda: fs.walk(top, detail=True), what=f"list {top}"):
        for d in [d for d in dirs if _under(_storage.join_path(dirpath, d), excluded)]:
            del dirs[d]  # walk() honours in-place pruning (topdown)
        for name, info in sorted(files.items()):
            if info.get("type", "file") != "file":
                continue
            yield info.get("name") or _storage.join_path(dirpath, name), info
        fs.invalidate_cache(dirpath)  # the filesystem's cached listing of this folder is not needed again


def _walk_shard(fs, shard: Shard, stats: _WalkStats, excluded: list[str]) -> Iterator[tuple[str, dict]]:
    for path, info in shard.files:
        if _storage.is_local(fs):
            info = _local_info(path)
            if info is None:
                stats.links_skipped += 1
                continue
        yield path, info
    for top in shard.dirs:
        if _storage.is_local(fs):
            yield from _walk_local(top, stats, excluded)
        elif _is_s3(fs):
            yield from _walk_s3(fs, top)
        else:
            yield from _walk_fsspec(fs, top, stats, excluded)


def _listed_chunks(
    fs, root: str, root_url: str, walk: Iterable[tuple[str, dict]], wanted: frozenset[str], excluded: list[str]
) -> Iterator[tuple[pa.Table, int]]:
    """Listing rows (shape not probed) in chunks of :data:`LIST_CHUNK_ROWS`, with how many names in each
    were not valid UTF-8."""
    columns: dict[str, list] = {name: [] for name in LISTING_SCHEMA.names[:6]}
    not_utf8 = 0
    for path, info in walk:
        if not _wanted(path, wanted) or (excluded and _under(path, excluded)):
            continue
        # The name below INPUT exactly as stored: object keys may hold "//", "." or ".." segments, and each
        # such key is its own input (no normalising, which would fold two keys into one).
        rel = path[len(root) + 1 :] if path.startswith(root + "/") else posixpath.basename(path)
        shown = _printable(path)
        if shown != path:
            not_utf8 += 1
            path, rel = shown, _printable(rel)
        size, etag, mtime = _storage.file_identity(info)
        # Not join_url: it would drop the leading empty segment of a key "p//x.jpg" (rel "/x.jpg").
        columns["uri"].append(root_url.rstrip("/") + "/" + rel)
        columns["path"].append(path)
        columns["rel"].append(rel)
        columns["size"].append(size)
        columns["etag"].append(etag)
        columns["mtime"].append(mtime)
        if len(columns["uri"]) >= LIST_CHUNK_ROWS:
            yield _with_shapes(columns), not_utf8
            columns, not_utf8 = {name: [] for name in columns}, 0
    if columns["uri"]:
        yield _with_shapes(columns), not_utf8


def _with_shapes(columns: dict[str, list]) -> pa.Table:
    """Listing rows with their shape not probed yet (0, 0)."""
    zeros = pa.array(np.zeros(len(columns["uri"]), dtype=np.int32))
    return pa.table({**columns, "model_h": zeros, "model_w": zeros}, schema=LISTING_SCHEMA)


# --------------------------------------------------------------------------------------------------
# What is done already: the summary's ok rows, read by uri range
# --------------------------------------------------------------------------------------------------


class DoneIndex:
    """OUTPUT's ok rows, looked up by ``uri`` range without holding them: the ``uri`` min/max of every
    summary row group is read once (from the files' footers); a chunk of listed rows reads only the row
    groups whose range overlaps its own, and the last few row groups read stay cached (consecutive chunks
    fall in the same ones, since both the listing and merged summary files are sorted by ``uri``)."""

    CACHED_ROW_GROUPS = 4

    def __init__(
        self,
        output_url: str,
        storage_options: Mapping[str, Any] | None,
        identity: bool,
        since: float | None,
        rows_of_run: str | None = None,
        run_id: str = "",
    ):
        from segbatch.store import summary

        self._identity = identity
        self._columns = ["uri", *summary.IDENTITY_COLUMNS] if identity else ["uri"]
        if rows_of_run is not None:
            self._filter = pc.field("run_id") == rows_of_run
        else:
            # Rows of the running run itself are never "done before": a read task that Ray retries mid-run
            # must list exactly what its first attempt listed, though write tasks have added rows since.
            other_run = pc.field("run_id").is_null() | (pc.field("run_id") != run_id)
            self._filter = summary.done_filter(since) & other_run
        self._groups: list[tuple[str | None, str | None, Any, int]] = []
        self._cache: OrderedDict[int, pa.Table] = OrderedDict()
        ds = summary.dataset(output_url, storage_options)
        for fragment in ds.get_fragments() if ds is not None else ():
            meta = fragment.metadata
            column = _column_index(meta, "uri")
            for rg in range(meta.num_row_groups):
                lo = hi = None
                if column is not None:
                    st = meta.row_group(rg).column(column).statistics
                    if st is not None and st.has_min_max:
                        lo, hi = st.min, st.max
                self._groups.append((lo, hi, fragment, rg))

    @property
    def row_groups(self) -> int:
        return len(self._groups)

    def _load(self, index: int) -> pa.Table:
        if index in self._cache:
            self._cache.move_to_end(index)
            return self._cache[index]
        from segbatch.store.contract import SUMMARY_SCHEMA

        _, _, fragment, rg = self._groups[index]
        table = fragment.subset(row_group_ids=[rg]).to_table(
            schema=SUMMARY_SCHEMA, columns=self._columns, filter=self._filter
        )
        self._cache[index] = table
        if len(self._cache) > self.CACHED_ROW_GROUPS:
            self._cache.popitem(last=False)
        return table

    def drop(self, chunk: pa.Table) -> pa.Table:
        """``chunk`` without the inputs that have an ok row (see :func:`drop_done`)."""
        if chunk.num_rows == 0 or not self._groups:
            return chunk
        bounds = pc.min_max(chunk["uri"])
        lo, hi = bounds["min"].as_py(), bounds["max"].as_py()
        touched = [
            self._load(i)
            for i, (g_lo, g_hi, _, _) in enumerate(self._groups)
            if g_lo is None or g_hi is None or not (g_hi < lo or g_lo > hi)
        ]
        return drop_done(chunk, touched, self._identity)


def _column_index(meta, name: str) -> int | None:
    if meta.num_row_groups == 0:
        return None
    group = meta.row_group(0)
    for i in range(group.num_columns):
        if group.column(i).path_in_schema == name:
            return i
    return None


# --------------------------------------------------------------------------------------------------
# Shapes: read from the image header, so that forward passes can be filled before decoding
# --------------------------------------------------------------------------------------------------


def probe_shape(fs, path: str, size: int | None, resize: Any) -> tuple[int, int]:
    """The model-input (height, width) of one image from its header (EXIF orientation applied, then the
    weights' resize); (0, 0) when the header cannot be read. Reads at most about :data:`PROBE_BYTES`."""
    if not size:
        return 0, 0
    from PIL import Image

    try:
        opener = open(path, "rb") if _storage.is_local(fs) else fs.open(path, "rb", block_size=PROBE_BYTES)
        with opener as f, Image.open(f) as image:
            width, height = image.size
            if image.getexif().get(EXIF_ORIENTATION) in ORIENTATIONS_SWAPPING_AXES:
                width, height = height, width
    except Exception:  # decoding reports what is wrong with the file; a probe only groups
        return 0, 0
    return resize.output_size(width, height)


# --------------------------------------------------------------------------------------------------
# Blocks: single-shape runs of batch_size rows
# --------------------------------------------------------------------------------------------------


class ShapeCutter:
    """Cuts a stream of listing rows into blocks for decoding, each made of whole single-shape runs of
    ``batch_size`` rows (full forward passes), about ``block_rows`` rows a block.

    It holds names only, at most ``batch_size - 1`` per shape between releases and ``max_held_rows`` in
    all (past it the fullest shape goes as a partial run: many rare shapes cost small passes, not
    memory). :meth:`flush` releases the partial runs at the end of the task's input, spread over up to
    ``spread`` blocks so that a small run still reaches every inference actor."""

    def __init__(self, batch_size: int, block_rows: int, spread: int = 1, max_held_rows: int = MAX_HELD_ROWS):
        self.batch_size = max(1, batch_size)
        self.block_rows = max(self.batch_size, block_rows)
        self.spread = max(1, spread)
        self.max_held_rows = max_held_rows
        self._held: dict[tuple[int, int], list[pa.Table]] = {}
        self._counts: dict[tuple[int, int], int] = {}
        self._ready: list[pa.Table] = []  # whole runs, in the order they filled
        self._ready_rows = 0

    def add(self, rows: pa.Table) -> Iterator[pa.Table]:
        if self.batch_size == 1:
            self._push(rows)
        else:
            keys = list(zip(rows["model_h"].to_pylist(), rows["model_w"].to_pylist()))
            order: dict[tuple[int, int], list[int]] = {}
            for i, key in enumerate(keys):
                order.setdefault(key, []).append(i)
            for key, idx in order.items():
                self._held.setdefault(key, []).append(rows.take(pa.array(idx, pa.int64())))
                self._counts[key] = self._counts.get(key, 0) + len(idx)
                while self._counts.get(key, 0) >= self.batch_size:
                    self._push(self._take(key, self.batch_size))
            while sum(self._counts.values()) > self.max_held_rows:
                fullest = max(self._counts, key=self._counts.__getitem__)
                self._push(self._take(fullest, self._counts[fullest]))
        while self._ready_rows >= self.block_rows:
            yield self._block(self.block_rows)

    def flush(self) -> Iterator[pa.Table]:
        """The tail: the runs still held, whole ones and each shape's partial one, packed into blocks of at
        most ``per_block`` rows (first fit, largest run first), the full blocks first.

        Ray Data cuts the decode stage's batches at every ``block_rows`` rows across blocks, so a block
        short of that shifts every later cut into the middle of a run (one more, smaller forward pass):
        packed, the partial runs 11, 11, 5 and 5 of the mixed set at batch 16 make two blocks of 16, not
        blocks of 22 and 10 cut into 16 and 16 (23 passes for 320 images instead of 22)."""
        for key in sorted(self._counts, key=self._counts.__getitem__, reverse=True):
            self._push(self._take(key, self._counts[key]))
        if not self._ready_rows:
            return
        # No fuller than needed to give each of `spread` actors a block of its own.
        per_block = max(self.batch_size, math.ceil(self._ready_rows / self.spread))
        per_block = min(self.block_rows, math.ceil(per_block / self.batch_size) * self.batch_size)
        if self.batch_size == 1:  # names in listing order, any cut is a whole pass
            while self._ready_rows:
                yield self._block(per_block)
            return
        bins: list[list[pa.Table]] = []
        room: list[int] = []
        for run in sorted(self._ready, key=lambda r: r.num_rows, reverse=True):
            fits = next((i for i, free in enumerate(room) if run.num_rows <= free), None)
            if fits is None:
                bins.append([run])
                room.append(per_block - run.num_rows)
            else:
                bins[fits].append(run)
                room[fits] -= run.num_rows
        self._ready, self._ready_rows = [], 0
        for i in sorted(range(len(bins)), key=room.__getitem__):
            yield pa.concat_tables(bins[i]).combine_chunks()

    def _push(self, run: pa.Table) -> None:
        if run.num_rows:
            self._ready.append(run)
            self._ready_rows += run.num_rows

    def _block(self, rows: int) -> pa.Table:
        """Whole runs from the front of the ready list, about ``rows`` rows (a run is never split, except
        the pass-through runs of batch size 1)."""
        taken, n = [], 0
        while self._ready and n < rows:
            run = self._ready[0]
            if self.batch_size == 1 and n + run.num_rows > rows:
                taken.append(run.slice(0, rows - n))
                self._ready[0] = run.slice(rows - n)
                n = rows
                break
            taken.append(self._ready.pop(0))
            n += run.num_rows
        self._ready_rows -= n
        return pa.concat_tables(taken).combine_chunks()

    def _take(self, key: tuple[int, int], n: int) -> pa.Table:
        held = pa.concat_tables(self._held.pop(key))
        count = self._counts.pop(key)
        if count > n:
            self._held[key] = [held.slice(n)]
            self._counts[key] = count - n
        return held.slice(0, n)


# --------------------------------------------------------------------------------------------------
# The read task
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ListingSettings:
    """Everything a listing read task needs; built in the driver, pickled into the tasks."""

    run_id: str
    input_url: str
    storage_options: Mapping[str, Any]
    extensions: frozenset[str]
    output_url: str | None
    redo_all: bool = False
    redo_changed: bool = False
    since: float | None = None  # ok rows written before this (epoch s) are an earlier model's: not done
    batch_size: int = 1
    block_rows: int = BLOCK_ROWS
    spread: int = 1
    resize: Any = None  # segbatch.stages.decode.ResizeSpec, for probing shapes; None: no probing
    excluded: tuple[str, ...] = field(default_factory=tuple)
    # Set to check a run: then an input counts as done when that run wrote any row for it, ok or error.
    rows_of_run: str | None = None
    # Rows the run's listing may hand on beyond those the driver has seen written (Pace); None: no bound.
    max_ahead: int | None = None


class Pace:
    """Keeps a run's listing at most ``max_ahead`` rows ahead of what the driver has seen written: the
    read tasks' handed-on rows (Ray's key-value store, segbatch/_internal/_tally.py) against the driver's
    count. A read task that is ahead waits; rows it still holds do not count, so the rows that the run
    waits for are on their way (:data:`MIN_AHEAD_ROWS` says why the bound must be large), and a count
    that does not move for :data:`PACE_PATIENCE` lets one more chunk go. A driver that never says (a
    run's check, tools) never paces."""

    def __init__(self, run_id: str, max_ahead: int):
        self.run_id, self.max_ahead = run_id, max_ahead

    def wait(self) -> None:
        from segbatch._internal import _tally

        last, since = None, time.monotonic()
        while True:
            written = _tally.written(self.run_id)
            if written is None or _tally.totals(self.run_id).emitted - written <= self.max_ahead:
                return
            if written != last:
                last, since = written, time.monotonic()
            elif time.monotonic() - since >= PACE_PATIENCE:
                return
            time.sleep(PACE_SLEEP)


def read_shard(settings: ListingSettings, shard: Shard, report: bool = True) -> Iterator[pa.Table]:
    """The blocks of one shard: listed, less what is done, cut into single-shape runs."""
    fs, root = _storage.open_url(settings.input_url, settings.storage_options)
    root_url = _storage.absolute_url(settings.input_url)
    excluded = list(settings.excluded)
    stats = _WalkStats()
    done = None
    if not settings.redo_all and settings.output_url:
        done = DoneIndex(
            settings.output_url,
            settings.storage_options,
            settings.redo_changed and settings.rows_of_run is None,
            settings.since,
            settings.rows_of_run,
            settings.run_id,
        )
    probing = settings.resize is not None and settings.batch_size > 1
    cutter = ShapeCutter(settings.batch_size, settings.block_rows, settings.spread)
    listed = skipped = emitted = not_utf8 = 0
    last_report = time.monotonic()
    part = f"list-{shard.index:05d}"
    pace = Pace(settings.run_id, settings.max_ahead) if report and settings.max_ahead else None
    with ThreadPoolExecutor(PROBE_THREADS) if probing else contextlib.nullcontext() as pool:
        walk = _walk_shard(fs, shard, stats, excluded)
        for chunk, bad_names in _listed_chunks(fs, root, root_url, walk, settings.extensions, excluded):
            listed += chunk.num_rows
            not_utf8 += bad_names
            if done is not None:
                kept = done.drop(chunk)
                skipped += chunk.num_rows - kept.num_rows
                chunk = kept
            if probing and chunk.num_rows:
                probe = functools.partial(probe_shape, fs, resize=settings.resize)
                shapes = list(pool.map(probe, chunk["path"].to_pylist(), chunk["size"].to_pylist()))
                chunk = _set_shapes(chunk, shapes)
            for block in cutter.add(chunk):
                emitted += block.num_rows
                yield block
            if report and time.monotonic() - last_report >= REPORT_EVERY:
                _report(settings.run_id, part, listed, skipped, emitted, finished=False)
                if pace is not None:
                    pace.wait()
                last_report = time.monotonic()
        for block in cutter.flush():
            emitted += block.num_rows
            yield block
    if stats.links_skipped:
        log.warning(
            "skipped %d symbolic link(s) to folders or to nothing (links to files are followed)", stats.links_skipped
        )
    if not_utf8:
        log.warning("%d file name(s) are not valid UTF-8; each gets an error row", not_utf8)
    if report:
        _report(settings.run_id, part, listed, skipped, emitted, finished=True)


def _set_shapes(chunk: pa.Table, shapes: list[tuple[int, int]]) -> pa.Table:
    h = pa.array([s[0] for s in shapes], pa.int32())
    w = pa.array([s[1] for s in shapes], pa.int32())
    chunk = chunk.set_column(chunk.schema.get_field_index("model_h"), "model_h", h)
    return chunk.set_column(chunk.schema.get_field_index("model_w"), "model_w", w)


def _report(run_id: str, part: str, listed: int, skipped: int, emitted: int, finished: bool) -> None:
    from segbatch._internal import _tally

    _tally.put(run_id, part, listed, skipped, finished, emitted=emitted)


class ListingDatasource:
    """A Ray Data datasource of one read task per shard (built lazily: ray is imported by the caller)."""

    def __new__(cls, settings: ListingSettings, shards: list[Shard]):
        from ray.data import Datasource, ReadTask
        from ray.data.block import BlockMetadata

        class _Datasource(Datasource):
            def get_name(self) -> str:
                return "ListImages"

            def estimate_inmemory_data_size(self) -> int | None:
                return None

            def get_read_tasks(self, parallelism, per_task_row_limit=None, data_context=None):
                meta = BlockMetadata(num_rows=None, size_bytes=None, input_files=None, exec_stats=None)
                return [
                    ReadTask(functools.partial(read_shard, settings, shard), meta, schema=LISTING_SCHEMA)
                    for shard in shards
                ]

        return _Datasource()


# --------------------------------------------------------------------------------------------------
# The pipeline's view: ListedInputs
# --------------------------------------------------------------------------------------------------


@INPUT_KINDS.register
class ListedInputs:
    """The inputs of a listed INPUT (:class:`segbatch.stages.inputs.Inputs`): planned in the driver, listed by
    Ray read tasks during the run, less the ones with an ok row in OUTPUT (all of them with ``redo_all``)."""

    name = "listed"

    @classmethod
    def selected_by(cls, config: Any) -> bool:
        return bool(config.input)

    parts_known = True  # the driver knows the read tasks' number, so it knows when listing is complete

    def __init__(self, config: Any, relabel_since: float | None = None, run_id: str = "plan"):
        self._config = config
        fs, root = _open_input(config.input, config.storage_options)
        check_output(config.output, config.storage_options)
        self._fs, self._root = fs, root
        self._excluded = excluded_prefixes(fs, root, config.output, config.storage_options)
        self._settings = ListingSettings(
            run_id=run_id,
            input_url=config.input,
            storage_options=dict(config.storage_options),
            extensions=frozenset(e.lower() for e in config.extensions),
            output_url=config.output,
            redo_all=config.redo_all,
            redo_changed=config.redo_changed,
            since=relabel_since,
            excluded=tuple(self._excluded),
        )
        self.shards: list[Shard] = []
        self._check_not_empty()

    def _check_not_empty(self) -> None:
        """Refuse an INPUT whose top level shows no image and no folder before anything starts."""
        files, dirs, complete = _scan_top(self._fs, self._root, PLAN_SCAN_ENTRIES)
        wanted = self._settings.extensions
        if complete and not any(_wanted(p, wanted) for p, _ in files) and not dirs:
            raise self.no_images_error()

    def no_images_error(self) -> InputError:
        return _no_images_error(self._config.input, self._settings.extensions)

    def plan(
        self,
        *,
        run_id: str,
        batch_size: int,
        spread: int,
        max_shards: int,
        resize: Any,
        block_rows: int = BLOCK_ROWS,
    ) -> None:
        block = max(block_rows, batch_size)
        self._settings = ListingSettings(
            **{
                **self._settings.__dict__,
                "run_id": run_id,
                "batch_size": batch_size,
                "block_rows": math.ceil(block / batch_size) * batch_size,
                "spread": spread,
                "resize": resize,
            }
        )
        self.shards = plan_shards(self._fs, self._root, self._excluded, max_shards)

    @property
    def block_rows(self) -> int:
        return self._settings.block_rows

    @property
    def parts(self) -> int:
        """Read tasks of the run: each reports its counts once when it has listed everything."""
        return len(self.shards)

    @property
    def run_id(self) -> str:
        return self._settings.run_id

    def verification(self, run_id: str) -> ListedInputs:
        """The same listing, less every input run ``run_id`` wrote a row for: what that run missed."""
        import copy

        check = copy.copy(self)
        check._settings = ListingSettings(
            **{
                **self._settings.__dict__,
                "run_id": f"{run_id}-check",
                "rows_of_run": run_id,
                "redo_all": False,
                "batch_size": 1,
                "resize": None,
            }
        )
        return check

    def dataset(self):
        """The lazy Ray Dataset of the listing rows still to do (after :meth:`plan`); needs a running Ray."""
        import ray

        from segbatch._internal import _ray

        cpus = _ray.cluster_cpus()
        running = min(len(self.shards), list_tasks_running(cpus))
        ahead = max(MIN_AHEAD_ROWS, int(cpus * AHEAD_ROWS_PER_CPU))
        settings = ListingSettings(**{**self._settings.__dict__, "max_ahead": ahead})
        return ray.data.read_datasource(
            ListingDatasource(settings, self.shards),
            num_cpus=LIST_TASK_CPUS,
            concurrency=running,
            override_num_blocks=len(self.shards),
        )

    def todo(self) -> pa.Table:
        """Every listing row still to do, listed in this process (tests and tools; a run never does this)."""
        return self._list_here()[0]

    def counts(self) -> tuple[int, int]:
        """(inputs listed, of which skipped as already labelled), listed in this process like :meth:`todo`."""
        return self._list_here()[1:]

    def _list_here(self) -> tuple[pa.Table, int, int]:
        if not self.shards:
            self.plan(run_id="local", batch_size=1, spread=1, max_shards=MIN_MAX_SHARDS, resize=None)
        settings = ListingSettings(**{**self._settings.__dict__, "redo_all": True})
        listed = sum(t.num_rows for shard in self.shards for t in read_shard(settings, shard, report=False))
        tables = [t for shard in self.shards for t in read_shard(self._settings, shard, report=False)]
        todo = pa.concat_tables(tables).sort_by("uri") if tables else LISTING_SCHEMA.empty_table()
        return todo, listed, listed - todo.num_rows


def list_inputs(
    url: str,
    storage_options: Mapping[str, Any] | None,
    extensions: Iterable[str],
    exclude_output: str | None = None,
    *,
    batch_size: int = 1,
    resize: Any = None,
) -> pa.Table:
    """List INPUT recursively in this process and keep files with one of ``extensions`` (case-insensitive),
    sorted by ``uri``. Runs list in Ray read tasks instead (:class:`ListedInputs`); tools and tests use this.

    ``exclude_output`` (OUTPUT's URL) keeps OUTPUT's own tree out of the listing when the two overlap.
    Symbolic links to files are followed; links to folders and broken links are skipped and counted.
    With ``resize`` and a ``batch_size`` above 1, each image's header is read for its model-input shape,
    as a run's read tasks do."""
    fs, root = _open_input(url, storage_options)
    excluded = excluded_prefixes(fs, root, exclude_output, storage_options)
    settings = ListingSettings(
        run_id="local",
        input_url=url,
        storage_options=dict(storage_options or {}),
        extensions=frozenset(e.lower() for e in extensions),
        output_url=None,
        excluded=tuple(excluded),
        batch_size=batch_size,
        block_rows=LIST_CHUNK_ROWS,
        resize=resize,
    )
    tables = [t for shard in plan_shards(fs, root, excluded, 1) for t in read_shard(settings, shard, report=False)]
    table = pa.concat_tables(tables) if tables else LISTING_SCHEMA.empty_table()
    if table.num_rows == 0:
        raise _no_images_error(url, settings.extensions)
    return table.sort_by("uri")


def _no_images_error(url: str, extensions: Iterable[str]) -> InputError:
    looked_for = ", ".join(f".{e}" for e in sorted(extensions))
    return InputError(
        f"INPUT {url}: no images found (looked for files ending in {looked_for}, "
        "case-insensitive, hidden files skipped; change the list with --extensions)"
    )


def _open_input(url: str, storage_options: Mapping[str, Any] | None):
    """INPUT's filesystem and root, refused before any work when missing, unreadable or a file."""
    fs, root = _storage.open_url(url, storage_options)
    fs.invalidate_cache(root)  # a cached listing from earlier in this process would miss new files
    require_exists(fs, root, f"INPUT {url}")
    if _storage.retry(fs.isfile, root, what=f"check {url}"):
        raise InputError(
            f"INPUT {url} is a file, not a folder: pass the folder that holds it, or list it in a --manifest file"
        )
    return fs, root


def check_output(url: str, storage_options: Mapping[str, Any] | None) -> None:
    """Fail before any work when OUTPUT cannot exist: its nearest existing ancestor must be more than the
    filesystem's bare root, so a missing bucket is caught while a missing folder or prefix is fine
    (writes create it)."""
    fs, path = _storage.open_url(url, storage_options)
    try:
        while path and not _storage.retry(fs.exists, path, what=f"check {url}"):
            parent = fs._parent(path)
            if not parent or parent == path:
                raise InputError(f"OUTPUT {url}: {path or url} does not exist (check the bucket name and credentials)")
            path = parent
    except PermissionError as exc:
        raise InputError(f"OUTPUT {url}: access denied ({exc})") from None


def drop_done(listing: pa.Table, done: pa.Table | Iterable[pa.Table], redo_changed: bool) -> pa.Table:
    """Remove inputs that already have an ``ok`` row.

    ``done`` holds the key columns of earlier ok rows (``uri`` and, for ``redo_changed``, ``size``/``etag``/
    ``mtime`` where present), as one table or as chunks of it (:func:`segbatch.store.summary.done_key_chunks`):
    the driver holds one chunk at a time besides the listing. With ``redo_changed`` an input whose size,
    ETag or mtime differs from its ok row is kept. The listing's order is kept.
    """
    if listing.num_rows == 0:
        return listing
    chunks = [done] if isinstance(done, pa.Table) else done
    uris = listing["uri"]
    seen = pa.array(np.zeros(listing.num_rows, dtype=bool))
    changed = seen
    for chunk in chunks:
        if chunk.num_rows == 0:
            continue
        # One hash table of the chunk's uris, probed by every listed uri: where it sits in the chunk.
        pos = pc.index_in(uris, value_set=chunk["uri"].combine_chunks())
        seen = pc.or_(seen, pc.is_valid(pos))
        if redo_changed:
            for key in (c for c in ("size", "etag", "mtime") if c in chunk.column_names):
                prev = chunk[key].combine_chunks().take(pos)
                # A comparison with a null (no ETag on a local file, no earlier row) is null: not a change.
                differs = pc.fill_null(pc.not_equal(listing[key], prev), False)
                changed = pc.or_(changed, differs)
    keep = pc.or_(pc.invert(seen), changed) if redo_changed else pc.invert(seen)
    return listing.filter(keep)
