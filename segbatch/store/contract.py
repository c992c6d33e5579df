"""The output contract in code: OUTPUT's layout, the summary schema, and how files are named.

docs/output-contract.md describes it for people. Writers, readers, the report and eval import these
names; nothing else spells a directory name or a column list.
"""

from __future__ import annotations

import hashlib
import json
import posixpath
import re

import pyarrow as pa
from fsspec.core import strip_protocol

__all__ = [
    "CLASSES_METADATA_KEY",
    "CONFIDENCE_DIR",
    "EVAL_NAME",
    "FORWARD_PASS_COLUMN",
    "IMAGE_FIELDS",
    "IMAGE_ROW_SCHEMA",
    "IMAGE_TYPE",
    "LISTING_SCHEMA",
    "PASS_SCHEMA",
    "WRITTEN_SCHEMA",
    "check_schema",
    "MASKS_DIR",
    "MAX_SEGMENT_BYTES",
    "OUTPUT_DIRS",
    "OVERLAYS_DIR",
    "PALETTE",
    "REPORT_NAME",
    "RUNS_DIR",
    "SUMMARY_DIR",
    "SUMMARY_SCHEMA",
    "UnsafePathError",
    "confidence_relpath",
    "ground_truth_relpath",
    "input_relpath",
    "mask_name",
    "mask_relpath",
    "output_relpath",
    "overlay_relpath",
    "summary_metadata",
    "voc_palette",
]

MASKS_DIR = "masks"  # one PNG per ok input
SUMMARY_DIR = "summary"  # Parquet: one row per input per run
RUNS_DIR = "runs"  # one JSON record per run
OVERLAYS_DIR = "overlays"  # `run --overlays`: one JPEG per ok input
CONFIDENCE_DIR = "confidence"  # `run --confidence`: one 8-bit PNG per ok input, probability x 255
REPORT_NAME = "report.html"  # `segbatch report`
EVAL_NAME = "eval.json"  # `segbatch eval` (unless --json), shown by `segbatch report`
CLASSES_METADATA_KEY = b"segbatch.classes"  # summary schema metadata: JSON list of class names
#: Per row passed from the model to the driver: how many images shared the forward pass that labelled it
#: (0: none). The driver tallies it into forward passes; it is not a summary column.
FORWARD_PASS_COLUMN = "forward_pass"
#: Every folder of OUTPUT that segbatch writes: never listed as input when OUTPUT and INPUT overlap.
OUTPUT_DIRS = (MASKS_DIR, SUMMARY_DIR, RUNS_DIR, OVERLAYS_DIR, CONFIDENCE_DIR)

#: The summary's columns: the contract's first, then segbatch's documented extensions.
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
        # Extensions: the input's identity when it was read, for --redo-changed, and when the row was written.
        ("size", pa.int64()),
        ("etag", pa.string()),
        ("mtime", pa.float64()),
        ("written_at", pa.timestamp("ms", tz="UTC")),
        # With --confidence (null otherwise): mean of each pixel's largest softmax probability, and the
        # share of pixels whose largest probability is under --min-confidence.
        ("mean_confidence", pa.float32()),
        ("low_confidence_share", pa.float32()),
    ]
)


# -- The rows handed between the run's stages (docs/architecture.md) ---------------------------------------
# read (stages/listing, stages/manifest) --LISTING_SCHEMA--> DecodeImages (stages/decode) --PASS_SCHEMA-->
# Segmenter (stages/model) --IMAGE_ROW_SCHEMA--> WriteOutputs (stages/sinks) --WRITTEN_SCHEMA--> the driver,
# which also reads SUMMARY_SCHEMA's files. Each stage builds its output with its schema, reads only the
# columns its input schema declares, and tests/test_stage_schemas.py runs each one on real images.

#: Listing rows: one per input still to do (both input kinds, segbatch.stages.inputs).
LISTING_SCHEMA = pa.schema(
    [
        ("uri", pa.string()),  # the input as users name it: absolute path or URL
        ("path", pa.string()),  # the same input in its filesystem's own terms
        ("rel", pa.string()),  # path relative to INPUT; masks are named after it
        ("size", pa.int64()),
        ("etag", pa.string()),
        ("mtime", pa.float64()),  # seconds since the epoch
        # The model-input shape read from the image's header (0: not probed, or unreadable); decoding
        # computes the real one, so a wrong probe costs a smaller forward pass, never a wrong mask.
        ("model_h", pa.int32()),
        ("model_w", pa.int32()),
    ]
)

#: One input image's fields as they travel from decoding to writing: the listing's identity, then what
#: decoding found (displayed size after EXIF orientation, or the error that makes it an error row).
IMAGE_TYPE = pa.struct(
    [
        *(LISTING_SCHEMA.field(name) for name in ("uri", "path", "rel", "size", "etag", "mtime")),
        ("width", pa.int32()),
        ("height", pa.int32()),
        ("error", pa.string()),
    ]
)
IMAGE_FIELDS = tuple(f.name for f in IMAGE_TYPE)

#: The rows decoding hands to the model: one per forward pass.
PASS_SCHEMA = pa.schema(
    [
        ("pixels", pa.binary()),  # N resized images of one shape, N x in_h x in_w x 3 uint8, row-major
        ("in_h", pa.int32()),  # the model input's height (0: a row of failed inputs, no pixels)
        ("in_w", pa.int32()),
        ("images", pa.list_(IMAGE_TYPE)),  # the N images, in the order of their pixels
    ]
)

#: The rows the model hands to the writers: one per image, its fields, then what inference made of it.
IMAGE_ROW_SCHEMA = pa.schema(
    [
        *IMAGE_TYPE,
        ("mask", pa.binary()),  # height x width uint8 class ids, row-major; b"" for an error row
        ("pixel_counts", pa.list_(pa.int64())),  # pixels per class id; null for an error row
        # With per-pixel confidence asked for (RunConfig.computes_confidence), else null: height x width
        # uint8 (largest softmax probability x 255), its mean, the share under --min-confidence.
        ("confidence", pa.binary()),
        ("mean_confidence", pa.float32()),
        ("low_confidence_share", pa.float32()),
        ("node_id", pa.string()),  # the Ray node that ran the model
        ("device", pa.string()),  # e.g. "cpu", "cuda:0"
        (FORWARD_PASS_COLUMN, pa.int32()),
    ]
)

#: The rows the sinks hand back to the driver, once the images' files and the block's summary file are
#: written: the summary row's outcome and what the driver tallies (devices used, forward passes).
WRITTEN_SCHEMA = pa.schema(
    [
        SUMMARY_SCHEMA.field("uri"),
        SUMMARY_SCHEMA.field("status"),
        SUMMARY_SCHEMA.field("error"),
        SUMMARY_SCHEMA.field("device"),
        IMAGE_ROW_SCHEMA.field(FORWARD_PASS_COLUMN),
    ]
)


def check_schema(table: pa.Table, schema: pa.Schema, stage: str) -> pa.Table:
    """``table`` if its columns are ``schema``'s (names, order and types), else a TypeError naming the
    stage and the difference: a renamed or retyped column fails at its hand-off, not as nulls later."""
    got = table.schema.remove_metadata()
    if not got.equals(schema.remove_metadata()):
        want = {f.name: f.type for f in schema}
        have = {f.name: f.type for f in got}
        diff = sorted(
            f"{n}: {have.get(n, 'missing')} (declared {want.get(n, 'undeclared')})"
            for n in want.keys() | have.keys()
            if have.get(n) != want.get(n)
        )
        raise TypeError(f"{stage} rows do not match their declared schema: {'; '.join(diff) or 'column order'}")
    return table


def summary_metadata(classes: tuple[str, ...]) -> dict[bytes, bytes]:
    return {CLASSES_METADATA_KEY: json.dumps(list(classes)).encode()}


# Characters that break URLs or common filesystems get %XX escapes; escaping "%" too keeps names unique.
_ESCAPE = set('%?#\\:*"<>|') | {chr(c) for c in range(32)} | {"\x7f"}


class UnsafePathError(ValueError):
    """An input's relative name would place its mask outside OUTPUT."""


#: Longest name segment of a per-input output, in UTF-8 bytes with its suffix; most filesystems allow
#: 255, and a writer's temporary adds a dot, 12 hex digits and ".tmp". Longer segments are shortened.
MAX_SEGMENT_BYTES = 200
SHORTENED_MARK = "%~"  # never produced by escaping ("%" is always followed by two hex digits there)
_HASH_CHARS = 16


#: Segments a filesystem would read as "this folder", "the parent" or nothing, and their escaped names.
#: S3 keys may hold them (``p/./w.jpg``, ``p/a/../z.jpg``, ``p//x.jpg`` are three objects, none of them
#: ``p/w.jpg``, ``p/z.jpg`` or ``p/x.jpg``). "%2E" is the escape of ".", and "%_" is never produced by
#: escaping ("%" is always followed by two hex digits there), so no other name meets them.
EMPTY_SEGMENT = "%_"
DOT_SEGMENTS = {"": EMPTY_SEGMENT, ".": "%2E", "..": "%2E%2E"}


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


def output_relpath(rel: str, folder: str, suffix: str) -> str:
    """``<folder>/<escaped rel><suffix>`` for an input at ``rel`` below INPUT. The input's extension stays
    in the name, so ``a.jpg`` and ``a.png`` never collide; every per-input output is named this way.

    Unique per input: characters that break URLs or filesystems become ``%XX``; a folder segment ending
    in ``suffix`` gets that suffix's dot escaped (``x.jpg.png/`` -> ``x.jpg%2Epng/``), so it never meets
    the output ``x.jpg.png`` of a file ``x.jpg``; a segment longer than :data:`MAX_SEGMENT_BYTES` keeps
    its head and ends in ``%~`` plus 16 hex digits of its sha256; a ``.``, ``..`` or empty folder segment
    (legal in S3 keys) becomes ``%2E``, ``%2E%2E`` or ``%_``. Shortened names cannot be inverted by
    :func:`input_relpath`; the summary's ``uri`` and ``mask_uri`` map them back."""
    if not rel:
        raise UnsafePathError("input name is empty; it names no file")
    if "\\" in rel:
        raise UnsafePathError(
            f"input name {rel!r} holds a backslash (a file name that is not valid UTF-8 "
            "shows its bytes as \\xNN); rename the file"
        )
    parts = rel.split("/")
    if parts[-1] in DOT_SEGMENTS:
        raise UnsafePathError(f"input name {rel!r} ends in '/', '/.' or '/..': it names a folder, not a file")
    out = []
    for i, part in enumerate(parts):
        last = i == len(parts) - 1
        if part in DOT_SEGMENTS:  # legal in an S3 key, each a different object: kept apart, inside OUTPUT
            out.append(DOT_SEGMENTS[part])
            continue
        segment = "".join(f"%{ord(ch):02X}" if ch in _ESCAPE else ch for ch in part)
        if not last and segment.lower().endswith(suffix.lower()) and suffix.startswith("."):
            cut = len(segment) - len(suffix)
            segment = segment[:cut] + "%2E" + segment[cut + 1 :]
        limit = MAX_SEGMENT_BYTES - (len(suffix.encode()) if last else 0)
        if len(segment.encode("utf-8")) > limit:
            segment = _shorten(segment, part, limit)
        out.append(segment)
    return posixpath.join(folder, "/".join(out) + suffix)


def mask_relpath(rel: str) -> str:
    """``masks/<rel>.png``."""
    return output_relpath(rel, MASKS_DIR, ".png")


def overlay_relpath(rel: str) -> str:
    """``overlays/<rel>.jpg``: the mask's name (same escaping, same uniqueness) under overlays/."""
    return output_relpath(rel, OVERLAYS_DIR, ".jpg")


def confidence_relpath(rel: str) -> str:
    """``confidence/<rel>.png``: named like the mask, under confidence/."""
    return output_relpath(rel, CONFIDENCE_DIR, ".png")


def input_relpath(mask_rel: str) -> str:
    """The inverse of :func:`mask_relpath`: ``masks/<escaped rel>.png`` -> rel. A shortened name
    (``%~`` in it) raises ValueError: look its input up in the summary by ``mask_uri``."""
    prefix = MASKS_DIR + "/"
    if not (mask_rel.startswith(prefix) and mask_rel.endswith(".png")) or len(mask_rel) <= len(prefix) + 4:
        raise ValueError(f"{mask_rel!r} is not a mask name (masks/<name>.png)")
    if SHORTENED_MARK in mask_rel:
        raise ValueError(f"{mask_rel!r} is a shortened mask name; the summary's uri/mask_uri map it to its input")
    name = mask_rel[len(prefix) : -len(".png")]
    # Every %XX is one escape: "%" itself is always escaped, "%~" marks a shortened name (refused above),
    # and a whole segment "%_" is an empty one.
    return "/".join(
        "" if part == EMPTY_SEGMENT else re.sub(r"%([0-9A-F]{2})", lambda m: chr(int(m.group(1), 16)), part)
        for part in name.split("/")
    )


def mask_name(mask_uri: str, uri: str, masks_prefix: str) -> str:
    """The mask's name below OUTPUT (``masks/...png``), checked against the input's uri.

    A mask of this OUTPUT starts with ``<OUTPUT>/masks/``. When OUTPUT was moved or copied since the run
    (its rows still name the old place), every ``/masks/`` in the URI is tried, and the one whose input
    name the input's uri ends with wins.
    """
    path = strip_protocol(mask_uri)
    if path.startswith(masks_prefix):
        return MASKS_DIR + "/" + path[len(masks_prefix) :]
    marker = "/" + MASKS_DIR + "/"
    start = path.find(marker)
    while start >= 0:
        candidate = path[start + 1 :]
        try:
            rel = input_relpath(candidate)
        except ValueError:
            rel = None
        if rel is not None and (uri == rel or uri.endswith("/" + rel)):
            return candidate
        start = path.find(marker, start + 1)
    raise ValueError(f"mask {mask_uri} is not below {masks_prefix} and does not match its input's name")


def ground_truth_relpath(rel: str) -> str:
    """``dir/name.jpg`` -> ``dir/name.png``: where the ground truth of an input sits below GT."""
    return posixpath.splitext(rel)[0] + ".png"


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


#: The masks' palette, flattened RGB: masks, overlays, exports and the report's legend share it.
PALETTE = voc_palette()
