"""Stage 1, listing: which inputs a run should process.

The listing is an Arrow table with one row per input (:data:`LISTING_SCHEMA`). It is built in the driver
from a recursive listing of INPUT, one directory page at a time, and then filtered against the summary
of earlier runs by reading only its key columns.
"""

from __future__ import annotations

import logging
import math
import os
import posixpath
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from segbatch import _storage, summary
from segbatch.contract import OUTPUT_DIRS
from segbatch.errors import InputError

log = logging.getLogger(__name__)

LISTING_SCHEMA = pa.schema(
    [
        ("uri", pa.string()),  # the input as users name it: absolute path or URL
        ("path", pa.string()),  # the same input in its filesystem's own terms
        ("rel", pa.string()),  # path relative to INPUT; masks are named after it
        ("size", pa.int64()),
        ("etag", pa.string()),
        ("mtime", pa.float64()),  # seconds since the epoch
    ]
)


LISTING_BATCH_ROWS = 65_536  # rows held as Python objects before they move into an Arrow batch
# The listing goes to Ray in a number of blocks set by the cluster, not by the input count: the driver's
# bookkeeping grows with the blocks of a run (docs/benchmarks.md, "Driver memory"). Decoding takes
# batch-sized slices of a block (pipeline.DECODE_BATCH_ROWS), so large blocks do not mean large tasks.
BLOCKS_PER_CPU = 4  # enough blocks that every CPU of the cluster has decode work queued
MIN_INPUT_BLOCKS = 32
MAX_INPUT_BLOCKS = 10_000  # a cap for very large clusters; more only adds scheduling overhead


class ListedInputs:
    """The inputs of a listed INPUT (:class:`segbatch.inputs.Inputs`): listed in the driver, less the
    ones with an ok row in OUTPUT (all of them with ``redo_all``)."""

    def __init__(self, config: Any, relabel_since: float | None = None):
        listed = list_inputs(config.input, config.storage_options, config.extensions, exclude_output=config.output)
        check_output(config.output, config.storage_options)
        self.listed = listed.num_rows
        if not config.redo_all:
            # Ok rows written before relabel_since are an earlier model's (identity.py): not done.
            done = summary.done_key_chunks(
                config.output, config.storage_options, identity=config.redo_changed, since=relabel_since
            )
            listed = drop_done(listed, done, config.redo_changed)
        self.todo = listed

    @property
    def pending(self) -> int:
        return self.todo.num_rows

    def counts(self) -> tuple[int, int]:
        return self.listed, self.listed - self.todo.num_rows

    def dataset(self, batch_size: int):
        import ray

        from segbatch import _ray

        n = self.todo.num_rows
        blocks = min(MAX_INPUT_BLOCKS, max(MIN_INPUT_BLOCKS, BLOCKS_PER_CPU * int(_ray.cluster_cpus())))
        rows_per_block = max(batch_size, math.ceil(n / blocks))
        return ray.data.from_arrow([self.todo.slice(i, rows_per_block) for i in range(0, n, rows_per_block)])


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


#: Folders of OUTPUT that segbatch writes; never listed as input when OUTPUT and INPUT overlap. The
#: contract's list, so a folder added there (confidence/) is never labelled by a rerun.
OUTPUT_OWNED_DIRS = OUTPUT_DIRS


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
    if _is_local(fs):
        # Compare where the two really are: INPUT or OUTPUT may be (or pass through) a symbolic link
        # into the other. The prefixes are then spelled below INPUT as the listing spells its paths.
        real_root, real_out = os.path.realpath(root), os.path.realpath(out_root)
        if real_out == real_root:
            return [_storage.join_path(root, d) for d in OUTPUT_OWNED_DIRS]
        if _under(real_out, [real_root]):
            return [_storage.join_path(root, posixpath.relpath(real_out, real_root))]
        if _under(real_root, [_storage.join_path(real_out, d) for d in OUTPUT_OWNED_DIRS]):
            return [root]  # INPUT is one of OUTPUT's own folders
        return []
    if out_root.startswith(root + "/"):
        return [out_root]
    if out_root == root or root.startswith(out_root + "/"):
        return [_storage.join_path(out_root, d) for d in OUTPUT_OWNED_DIRS]
    return []


def _is_local(fs) -> bool:
    protocols = {fs.protocol} if isinstance(fs.protocol, str) else set(fs.protocol)
    return bool(protocols & {"file", "local"})


def _under(path: str, prefixes: list[str]) -> bool:
    return any(path == p or path.startswith(p + "/") for p in prefixes)


def _relative(path: str, root: str) -> str:
    """``path`` below ``root``, exactly as listed: S3 keys ``p/./w.jpg``, ``p/a/../z.jpg`` and ``p//x.jpg``
    are objects of their own, which posixpath.relpath would fold into ``w.jpg``, ``z.jpg`` and ``x.jpg``."""
    if root and path.startswith(root + "/"):
        return path[len(root) + 1 :]
    return posixpath.relpath(path, root) if path != root else posixpath.basename(path)


def _with_keys_below_empty_segments(fs, dirpath: str, files: Mapping[str, Any]) -> list[tuple[str, Any]]:
    """A walk() page's files, plus the keys below ``<dirpath>//``. An object store lists keys that start
    with ``<dirpath>//`` (``p//x.jpg``) as a folder with an empty name, and walk() never enters it; a
    prefix search below ``dirpath`` finds them, every level down, so walk() sees none of them twice."""
    page = sorted(files.items())
    if not any(name == "" and info.get("type") == "directory" for name, info in page):
        return page
    found = _storage.retry(lambda: fs.find(dirpath, prefix="/", detail=True), what=f"list {dirpath}//")
    extra = [
        (path, info)
        for path, info in sorted(found.items())
        if path.startswith(dirpath + "//") and info.get("type", "file") == "file"
    ]
    return [(name, info) for name, info in page if name != ""] + extra


def list_inputs(
    url: str, storage_options: Mapping[str, Any] | None, extensions: Iterable[str], exclude_output: str | None = None
) -> pa.Table:
    """List INPUT recursively and keep files with one of ``extensions`` (case-insensitive).

    ``exclude_output`` (OUTPUT's URL) keeps OUTPUT's own tree out of the listing when the two overlap.
    Symbolic links to files are followed; links to folders and broken links are skipped and counted."""
    fs, root = _storage.open_url(url, storage_options)
    root_url = _storage.absolute_url(url)
    wanted = frozenset(e.lower() for e in extensions)
    fs.invalidate_cache(root)  # a cached listing from earlier in this process would miss new files
    require_exists(fs, root, f"INPUT {url}")
    looked_for = ", ".join(f".{e}" for e in sorted(wanted))
    if _storage.retry(fs.isfile, root, what=f"check {url}"):
        raise InputError(
            f"INPUT {url} is a file, not a folder: pass the folder that holds it, or list it in a --manifest file"
        )
    excluded = excluded_prefixes(fs, root, exclude_output, storage_options)
    links_skipped = 0
    not_utf8 = 0

    columns: dict[str, list] = {name: [] for name in LISTING_SCHEMA.names}
    batches: list[pa.RecordBatch] = []
    # walk() hands back one directory page at a time, so the driver never holds the backend's whole
    # detailed listing, only the few columns kept below.
    for dirpath, dirs, files in _storage.retry(lambda: fs.walk(root, detail=True), what=f"list {url}"):
        if excluded:
            for d in [d for d in dirs if _under(_storage.join_path(dirpath, d), excluded)]:
                del dirs[d]  # walk() honours in-place pruning (topdown)
        for name, info in _with_keys_below_empty_segments(fs, dirpath, files):
            if not _wanted(name, wanted):
                continue
            if info.get("type", "file") != "file":
                if not info.get("islink"):
                    continue
                try:  # a symbolic link: follow it when it names a file
                    info = {**fs.info(info.get("name") or _storage.join_path(dirpath, name)), "name": info.get("name")}
                except OSError:
                    info = {"type": "broken"}
                if info.get("type") != "file":
                    links_skipped += 1
                    continue
            path = info.get("name") or _storage.join_path(dirpath, name)
            if excluded and _under(path, excluded):
                continue
            rel = _relative(path, root)
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
        # Drop the filesystem's cached copy of this folder's listing (s3fs keeps every page's info dicts,
        # ~1 KB a key), and move the rows into Arrow (~170 B a key) once a batch is full.
        fs.invalidate_cache(dirpath)
        if len(columns["uri"]) >= LISTING_BATCH_ROWS:
            batches.append(pa.record_batch(columns, schema=LISTING_SCHEMA))
            columns = {name: [] for name in LISTING_SCHEMA.names}
    batches.append(pa.record_batch(columns, schema=LISTING_SCHEMA))
    table = pa.Table.from_batches(batches, schema=LISTING_SCHEMA)
    if links_skipped:
        log.warning(
            "INPUT %s: skipped %d symbolic link(s) to folders or to nothing (links to files are followed)",
            url,
            links_skipped,
        )
    if not_utf8:
        log.warning("INPUT %s: %d file name(s) are not valid UTF-8; each gets an error row", url, not_utf8)
    if table.num_rows == 0:
        raise InputError(
            f"INPUT {url}: no images found (looked for files ending in {looked_for}, "
            "case-insensitive, hidden files skipped; change the list with --extensions)"
        )
    return table.sort_by("uri")


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
    ``mtime`` where present), as one table or as chunks of it (:func:`segbatch.summary.done_key_chunks`):
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
