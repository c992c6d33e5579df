"""Stage 5, sinks: encode masks, write them, then write the batch's summary rows (Ray CPU tasks).

A batch's masks are written before its summary file, and a summary file appears whole or not at all,
so a row never points at a missing mask. The summary file's name is derived from the batch's inputs:
a retried task rewrites the same file instead of adding a second copy of its rows.
"""

from __future__ import annotations

import hashlib
import io
import json
import posixpath
import re
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Mapping

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from segbatch import _storage

MASKS_DIR = "masks"
SUMMARY_DIR = "summary"
CLASSES_METADATA_KEY = b"segbatch.classes"
WRITE_THREADS = 16  # concurrent object writes per task; object stores reward parallel PUTs

#: The summary's columns: DESIGN.md's contract first, then segbatch's documented extensions.
SUMMARY_SCHEMA = pa.schema(
    [
        ("uri", pa.string()),
        ("status", pa.string()),
        ("error", pa.string()),
        ("width", pa.int32()),
        ("height", pa.int32()),
        ("mask_uri", pa.string()),
        ("pixel_counts", pa.list_(pa.int64())),
        ("run_id", pa.string()),
        ("model", pa.string()),
        ("weights", pa.string()),
        ("node_id", pa.string()),
        ("device", pa.string()),
        # Extensions (README "Summary extensions"): the input's identity when it was read, for
        # --redo-changed, and when the row was written.
        ("size", pa.int64()),
        ("etag", pa.string()),
        ("mtime", pa.float64()),
        ("written_at", pa.timestamp("ms", tz="UTC")),
    ]
)

# Characters that break URLs or common filesystems get %XX escapes; escaping "%" too keeps names unique.
_ESCAPE = set('%?#\\:*"<>|') | {chr(c) for c in range(32)} | {"\x7f"}


class UnsafePathError(ValueError):
    """An input's relative name would place its mask outside OUTPUT."""


#: Longest name segment of a mask, in UTF-8 bytes with its ".png"; most filesystems allow 255, and a
#: writer's temporary adds a dot, 12 hex digits and ".tmp". Longer segments are shortened (below).
MAX_SEGMENT_BYTES = 200
SHORTENED_MARK = "%~"  # never produced by escaping ("%" is always followed by two hex digits there)
_HASH_CHARS = 16


def _escape_segment(part: str) -> str:
    return "".join(f"%{ord(ch):02X}" if ch in _ESCAPE else ch for ch in part)


def _shorten(segment: str, original: str, limit: int) -> str:
    """``<head>%~<16 hex of sha256(original)>``: fits ``limit`` bytes, unique per original segment."""
    digest = hashlib.sha256(original.encode("utf-8", "surrogatepass")).hexdigest()[:_HASH_CHARS]
    budget = limit - len(SHORTENED_MARK) - _HASH_CHARS
    head = segment
    while len(head.encode("utf-8")) > budget:
        head = head[:-1]
    cut = head.rfind("%", max(0, len(head) - 2))
    if cut >= 0:  # never split a %XX escape
        head = head[:cut]
    return f"{head}{SHORTENED_MARK}{digest}"


def mask_relpath(rel: str) -> str:
    """``masks/<rel>.png`` for an input at ``rel`` below INPUT; the input's extension stays in the name,
    so ``a.jpg`` and ``a.png`` never collide.

    Unique per input: characters that break URLs or filesystems become ``%XX``; a folder segment ending
    in ``.png`` gets its last dot escaped (``x.jpg.png/`` -> ``x.jpg%2Epng/``), so it never meets the
    mask ``x.jpg.png`` of a file ``x.jpg``; a segment longer than :data:`MAX_SEGMENT_BYTES` keeps its
    head and ends in ``%~`` plus 16 hex digits of its sha256. Shortened names cannot be inverted by
    :func:`input_relpath`; the summary's ``uri`` and ``mask_uri`` map them back."""
    if not rel or rel.startswith("/"):
        raise UnsafePathError(f"input name {rel!r} is absolute or empty; its mask would leave OUTPUT")
    if "\\" in rel:
        raise UnsafePathError(f"input name {rel!r} holds a backslash (a file name that is not valid UTF-8 "
                              "shows its bytes as \\xNN); rename the file")
    parts = rel.split("/")
    if any(p in ("", ".", "..") for p in parts):
        raise UnsafePathError(f"input name {rel!r} has '', '.' or '..' segments; its mask would leave OUTPUT")
    out = []
    for i, part in enumerate(parts):
        last = i == len(parts) - 1
        segment = _escape_segment(part)
        if not last and segment.lower().endswith(".png"):
            segment = segment[:-4] + "%2E" + segment[-3:]
        limit = MAX_SEGMENT_BYTES - (len(".png") if last else 0)
        if len(segment.encode("utf-8")) > limit:
            segment = _shorten(segment, part, limit)
        out.append(segment)
    return posixpath.join(MASKS_DIR, "/".join(out) + ".png")


def input_relpath(mask_rel: str) -> str:
    """The inverse of :func:`mask_relpath`: ``masks/<escaped rel>.png`` -> rel. A shortened name
    (``%~`` in it) raises ValueError: look its input up in the summary by ``mask_uri``."""
    prefix = MASKS_DIR + "/"
    if not (mask_rel.startswith(prefix) and mask_rel.endswith(".png")) or len(mask_rel) <= len(prefix) + 4:
        raise ValueError(f"{mask_rel!r} is not a mask name (masks/<name>.png)")
    if SHORTENED_MARK in mask_rel:
        raise ValueError(f"{mask_rel!r} is a shortened mask name; the summary's uri/mask_uri map it to its input")
    name = mask_rel[len(prefix):]
    # Only the characters in _ESCAPE are ever escaped, "%" among them, so every %XX is one escape.
    return re.sub(r"%([0-9A-F]{2})", lambda m: chr(int(m.group(1), 16)), name[:-len(".png")])


def voc_palette(num_colors: int = 256) -> list[int]:
    """The PASCAL VOC colour map (bit-interleaved class id), flattened RGB for ``Image.putpalette``."""
    palette = []
    for i in range(num_colors):
        r = g = b = 0
        c = i
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        palette += [r, g, b]
    return palette


_PALETTE = voc_palette()


def encode_png(mask: np.ndarray, compress_level: int) -> bytes:
    """A single-channel palette PNG whose pixel values are the class ids."""
    height, width = mask.shape
    image = Image.frombytes("P", (width, height), np.ascontiguousarray(mask, dtype=np.uint8).tobytes())
    image.putpalette(_PALETTE)
    buf = io.BytesIO()
    image.save(buf, format="PNG", compress_level=compress_level)
    return buf.getvalue()


def summary_metadata(classes: tuple[str, ...]) -> dict[bytes, bytes]:
    return {CLASSES_METADATA_KEY: json.dumps(list(classes)).encode()}


class WriteOutputs:
    """Ray Data map step (CPU tasks): PNG-encode masks, write them, then write the summary rows."""

    def __init__(self, output_url: str, storage_options: Mapping[str, Any], *, run_id: str, model: str,
                 weights: str, classes: tuple[str, ...], compress_level: int,
                 extra_writers: tuple[Callable[..., None], ...] = ()):
        self._output_url = _storage.absolute_url(output_url)
        self._output = _storage.Location(output_url, storage_options)
        self._run_id = run_id
        self._model = model
        self._weights = weights
        self._classes = classes
        self._compress_level = compress_level
        self._extra_writers = extra_writers

    def _write_mask(self, rel: str, mask: np.ndarray) -> str:
        relpath = mask_relpath(rel)
        fs, root = self._output.open()
        _storage.write_atomic(fs, _storage.join_path(root, relpath),
                              encode_png(mask, self._compress_level))
        return _storage.join_url(self._output_url, relpath)

    def __call__(self, batch: pa.Table) -> pa.Table:
        from segbatch.preflight import is_fatal_write_error

        self._output.open()
        rows = batch.to_pylist()

        def write_one(row: dict[str, Any]) -> dict[str, Any]:
            if row["error"] is not None:
                return row
            try:
                mask = np.frombuffer(row["mask"], dtype=np.uint8).reshape(row["height"], row["width"])
                row["mask_uri"] = self._write_mask(row["rel"], mask)
                for writer in self._extra_writers:
                    writer(self, row, mask)
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
        return table.select(["uri", "status", "error"])

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
            cols["mask_uri"].append(row.get("mask_uri") if ok else None)
            cols["pixel_counts"].append(row["pixel_counts"] if ok else None)
            cols["run_id"].append(self._run_id)
            cols["model"].append(self._model)
            cols["weights"].append(self._weights)
            cols["node_id"].append(row.get("node_id"))
            cols["device"].append(row.get("device"))
            cols["size"].append(row.get("size"))
            cols["etag"].append(row.get("etag"))
            cols["mtime"].append(row.get("mtime"))
            cols["written_at"].append(now)
        schema = SUMMARY_SCHEMA.with_metadata(summary_metadata(self._classes))
        return pa.table(cols, schema=schema)

    def _write_summary(self, table: pa.Table) -> None:
        digest = hashlib.sha1("\n".join(sorted(table["uri"].to_pylist())).encode()).hexdigest()[:16]
        name = f"part-{self._run_id}-{digest}.parquet"
        buf = pa.BufferOutputStream()
        pq.write_table(table, buf, compression="zstd")
        fs, root = self._output.open()
        _storage.write_atomic(fs, _storage.join_path(root, posixpath.join(SUMMARY_DIR, name)), buf.getvalue().to_pybytes())
