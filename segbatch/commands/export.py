"""`segbatch export OUTPUT --format FORMAT DEST`: OUTPUT's masks as labels that annotation tools import.

Formats (one :class:`Exporter` subclass each, found by name through :func:`get_exporter`):

- ``coco``: COCO JSON, one annotation per (image, class present) with ``segmentation`` in COCO's
  compressed RLE (the encoding of pycocotools' ``mask.encode``), so the annotations of an image cover
  each of its pixels exactly once, background included.
- ``cvat``: CVAT's "Segmentation mask 1.1" import layout (labelmap.txt, SegmentationClass/ PNGs in the
  VOC palette of segbatch's own masks, ImageSets/Segmentation/default.txt), as a folder or a .zip.
- ``label-studio``: Label Studio tasks with ``brushlabels`` pre-annotations in Label Studio's brush RLE,
  plus the labeling config to paste (``labeling-config.xml``).

What is exported: the newest ok row of every input in OUTPUT's summary (error rows are skipped), sorted
by input URI. The export streams: masks are read a chunk at a time and each shard (``--shard-size``
images, 10,000 by default) is written to a local temporary file, then published whole to DEST, so
memory holds one chunk of masks, one shard's small per-image records (COCO's ``images`` list), and
the index of (uri, mask) rows, never all annotations. ``DEST/export.json`` lists the shards written.

Adding a format is one subclass with a ``name``, registered with ``@EXPORTERS.register`` (segbatch._internal.registry).
"""

from __future__ import annotations

import json
import math
import os
import posixpath
import sys
import tempfile
import time
import zipfile
from collections.abc import Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from typing import Any, ClassVar, TypeVar
from xml.sax.saxutils import quoteattr

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from segbatch import __version__
from segbatch._internal import _storage
from segbatch._internal.registry import Registry
from segbatch.errors import ConfigError, InputError
from segbatch.stages.manifest import manifest_rel
from segbatch.stages.overlay import background_ids, class_colour
from segbatch.store import summary
from segbatch.store.contract import input_relpath, mask_relpath
from segbatch.store.masks import locate_mask, mask_name_below, read_label_png

DEFAULT_SHARD_SIZE = 10_000  # images per shard file: a COCO shard of 10^4 images is tens of MB of JSON
READ_CHUNK = 64  # masks read (concurrently, on object stores) and encoded per step
ENCODE_THREADS = min(8, os.cpu_count() or 1)  # PNG decoding and numpy release the GIL for most of the work
INDEX_NAME = "export.json"  # DEST/export.json: what was exported and which shard files hold it
SHARD_DIGITS = 5  # shard numbers are zero-padded to this width, so names sort in order
MAX_NAME_BYTES = 255  # bytes in one file name segment on common filesystems (ext4, XFS, APFS, NTFS)

# Label Studio's brush RLE (thi.ng/rle-pack, as label_studio_sdk.converter.brush reads it): a 32-bit value
# count, a 5-bit word size minus one, four 4-bit run-length field widths minus one, then one code per run.
BRUSH_WORD_BITS = 8  # one byte per RGBA channel value
BRUSH_RUN_FIELD_BITS = (3, 4, 8, 16)  # the widths Label Studio's own encoder uses; runs up to 2^16 values
BRUSH_FOREGROUND = 255  # the brush's alpha (and R, G, B) value on painted pixels; 0 elsewhere
BRUSH_CHANNELS = 4  # Label Studio's brush masks are RGBA, every channel carrying the same value

T = TypeVar("T")


class ExportError(InputError):
    """Nothing can be exported: OUTPUT has no summary or no ok rows, or DEST is in use."""


class _SkipImage(Exception):
    """This image cannot go into the export (listed as failed); the rest can."""


@dataclass(frozen=True)
class ExportImage:
    """One input's newest ok result, with its mask decoded."""

    index: int  # position in the export (0-based, inputs sorted by URI): picks the shard
    uri: str  # the input as the summary names it
    name: str  # the input's path below INPUT (for a manifest: its URL without the scheme)
    width: int
    height: int
    model: str | None
    png: bytes  # the mask file as OUTPUT holds it
    mask: np.ndarray  # (height, width) class ids


@dataclass
class ExportResult:
    format: str
    dest: str
    images: int = 0
    shard_size: int = DEFAULT_SHARD_SIZE
    shards: list[dict[str, Any]] = field(default_factory=list)  # {"path": relative to DEST's folder, "images"}
    error_rows: int = 0  # the summary's error rows, skipped
    failed: list[tuple[str, str]] = field(default_factory=list)  # (uri, why) of ok rows that could not be exported
    notes: list[str] = field(default_factory=list)  # what to do next, printed after the counts

    def __str__(self) -> str:
        n = len(self.shards)
        dest = self.dest.rstrip("/")
        zipped = dest.lower().endswith(".zip")
        own = posixpath.basename(dest) if zipped else "."  # the shard that is DEST itself
        paths = [s["path"] or "." for s in self.shards]
        # Several zips are written beside DEST (cvat-00000.zip, ...), not into it: name their folder.
        into = posixpath.dirname(dest) + "/" if zipped and paths != [own] else dest
        if paths == [own]:
            shards = f"  1 shard (up to {self.shard_size} images a shard)"
        else:
            names = ", ".join(paths[:3]) + (", ..." if n > 3 else "")
            shards = f"  {n} shard{'s' if n != 1 else ''} of up to {self.shard_size} images: {names}"
        lines = [
            f"segbatch export: {self.images} images as {self.format} into {into}",
            shards,
            f"  skipped: {self.error_rows} error rows; {len(self.failed)} ok rows could not be exported",
        ]
        lines += [f"  failed: {uri}: {why}" for uri, why in self.failed[:10]]
        if len(self.failed) > 10:
            lines.append(f"  ... {len(self.failed) - 10} more failed")
        return "\n".join(lines + self.notes)


# -- mask encodings -----------------------------------------------------------------------------------


def coco_rle(binary: np.ndarray) -> dict[str, Any]:
    """COCO's compressed RLE of a 2-D boolean mask, as ``pycocotools.mask.encode`` writes it.

    Run lengths over the column-major pixels, alternating 0-runs and 1-runs and starting with a 0-run,
    written as LEB128-like groups of 5 bits in characters 48..111; from the fourth count on, each
    count is stored as its difference from the count two before (maskApi.c, ``rleToString``).
    """
    height, width = binary.shape
    flat = np.asarray(binary, dtype=bool).ravel(order="F")
    change = np.flatnonzero(flat[1:] != flat[:-1]) + 1
    counts = np.diff(np.concatenate(([0], change, [flat.size]))).tolist() if flat.size else []
    if flat.size and flat[0]:
        counts.insert(0, 0)  # the first run is always of zeros, here an empty one
    out = bytearray()
    for i, count in enumerate(counts):
        x = count - counts[i - 2] if i > 2 else count
        more = True
        while more:
            c = x & 0x1F
            x >>= 5  # arithmetic shift, as in C on a signed long
            more = x != -1 if c & 0x10 else x != 0
            out.append((c | 0x20 if more else c) + 48)
    return {"size": [int(height), int(width)], "counts": out.decode("ascii")}


def coco_bbox(binary: np.ndarray) -> list[int]:
    """``[x, y, width, height]`` of the mask's pixels, like ``pycocotools.mask.toBbox``; zeros if empty."""
    cols = np.flatnonzero(binary.any(axis=0))
    rows = np.flatnonzero(binary.any(axis=1))
    if not len(cols):
        return [0, 0, 0, 0]
    return [int(cols[0]), int(rows[0]), int(cols[-1] - cols[0] + 1), int(rows[-1] - rows[0] + 1)]


def brush_rle(binary: np.ndarray) -> list[int]:
    """Label Studio's brush RLE of a 2-D boolean mask: the bytes ``label_studio_sdk.converter.brush``'s
    ``mask2rle`` describes (the row-major RGBA image, 255 on the mask, 0 elsewhere), as a list of ints.

    Every run is written as a repeat code (1 bit), the index of its length field (2 bits), the length
    minus one, then the byte value; runs longer than the widest field allows are split.
    """
    flat = np.asarray(binary, dtype=bool).ravel()
    num = flat.size * BRUSH_CHANNELS
    change = np.flatnonzero(flat[1:] != flat[:-1]) + 1
    starts = np.concatenate(([0], change)) if flat.size else np.zeros(0, dtype=np.int64)
    lengths = np.diff(np.concatenate((starts, [flat.size]))).astype(np.int64) * BRUSH_CHANNELS
    values = np.where(flat[starts], BRUSH_FOREGROUND, 0).astype(np.int64)
    longest = 1 << BRUSH_RUN_FIELD_BITS[-1]
    pieces = (lengths + longest - 1) // longest
    if len(pieces) and pieces.max() > 1:  # split long runs into pieces of `longest`, the rest last
        last = np.cumsum(pieces) - 1
        split = np.full(int(pieces.sum()), longest, dtype=np.int64)
        split[last] = lengths - (pieces - 1) * longest
        lengths, values = split, np.repeat(values, pieces)
    limits = np.array([1 << b for b in BRUSH_RUN_FIELD_BITS[:-1]], dtype=np.int64)
    which = np.searchsorted(limits, lengths, side="left")  # the narrowest field that holds length - 1
    widths = np.asarray(BRUSH_RUN_FIELD_BITS, dtype=np.int64)[which]
    nbits = 1 + 2 + widths + BRUSH_WORD_BITS
    codes = (1 << (nbits - 1)) | (which << (widths + BRUSH_WORD_BITS)) | ((lengths - 1) << BRUSH_WORD_BITS) | values
    header = [(num, 32), (BRUSH_WORD_BITS - 1, 5)] + [(b - 1, 4) for b in BRUSH_RUN_FIELD_BITS]
    header_bits = "".join(f"{v:0{n}b}" for v, n in header)
    # Each code left-aligned in 32 bits, unpacked to bits, and cut to its own length, in order.
    aligned = (codes << (32 - nbits)).astype(">u4")
    bits = np.unpackbits(aligned.view(np.uint8).reshape(-1, 4), axis=1)
    bits = bits[np.arange(32)[None, :] < nbits[:, None]]
    stream = np.concatenate((np.frombuffer(header_bits.encode(), dtype=np.uint8) - ord("0"), bits))
    return np.packbits(stream).tolist()  # zero-padded to whole bytes, which the decoder never reads


# -- exporters ----------------------------------------------------------------------------------------


class Exporter:
    """Writes a stream of :class:`ExportImage` to DEST in one format, shard by shard.

    A subclass sets ``name`` and implements ``open_shard``, ``write`` and ``close_shard``;
    ``prepare`` (run on worker threads, so it must not touch the exporter's state) does the heavy
    per-image encoding. ``add`` is called in image order from one thread.
    """

    name: ClassVar[str] = ""
    description: ClassVar[str] = ""
    options: ClassVar[Mapping[str, Any]] = {}  # format-specific settings and their defaults

    def __init__(
        self,
        dest: str,
        *,
        classes: list[str],
        storage_options: Mapping[str, Any] | None = None,
        shard_size: int = DEFAULT_SHARD_SIZE,
        total: int = 0,
        source: str = "",
        **options: Any,
    ):
        unknown = sorted(set(options) - set(self.options))
        if unknown:
            raise ConfigError(
                unknown[0],
                f"format {self.name} takes no option {', '.join(unknown)}",
                f"it takes: {', '.join(self.options) or 'none'}",
            )
        self.settings = {**self.options, **{k: v for k, v in options.items() if v is not None}}
        self.dest = _storage.absolute_url(dest)
        self.fs, self.root = _storage.open_url(dest, storage_options)
        self.classes = list(classes)
        self.shard_size = shard_size
        self.shards_planned = max(1, math.ceil(total / shard_size))
        self.source = source
        self.shards: list[dict[str, Any]] = []
        self._shard: int | None = None
        self._shard_images = 0
        self._tmp = tempfile.TemporaryDirectory(prefix="segbatch-export-")

    # Hooks for subclasses.
    def check_dest(self) -> None:
        """Refuse a DEST that already holds files: stale shards of an earlier export would mix in."""
        if _storage.retry(self.fs.exists, self.root, what=f"check {self.dest}"):
            if not self.fs.isdir(self.root) or _storage.retry(self.fs.ls, self.root, what=f"list {self.dest}"):
                raise ExportError(f"DEST {self.dest} already exists and is not empty: choose another, or remove it")

    def prepare(self, image: ExportImage) -> Any:
        return None

    def open_shard(self, index: int) -> None:
        raise NotImplementedError

    def write(self, image: ExportImage, prepared: Any) -> None:
        """Add one image to the open shard; raise _SkipImage to leave it out (it is listed as failed)."""
        raise NotImplementedError

    def close_shard(self, index: int) -> str:
        """Publish the shard; returns its path relative to DEST's folder."""
        raise NotImplementedError

    def write_extras(self) -> list[str]:
        """Files beside the shards (a labeling config); returns notes for the user."""
        return []

    def index_root(self) -> str | None:
        """The folder that gets export.json (None: DEST is a single file)."""
        return self.root

    # Driving.
    def add(self, image: ExportImage, prepared: Any) -> None:
        shard = image.index // self.shard_size
        if shard != self._shard:
            self._close()
            self.open_shard(shard)
            self._shard, self._shard_images = shard, 0
        self.write(image, prepared)
        self._shard_images += 1

    def finish(self) -> list[str]:
        self._close()
        notes = self.write_extras()
        root = self.index_root()
        if root is not None:
            index = {
                "format": self.name,
                "source": self.source,
                "segbatch": __version__,
                "images": sum(s["images"] for s in self.shards),
                "shard_size": self.shard_size,
                "shards": self.shards,
                "classes": self.classes,
            }
            _storage.write_atomic(
                self.fs, _storage.join_path(root, INDEX_NAME), (json.dumps(index, indent=1) + "\n").encode()
            )
        self._tmp.cleanup()
        return notes

    def _close(self) -> None:
        if self._shard is not None:
            self.shards.append({"path": self.close_shard(self._shard), "images": self._shard_images})
            self._shard = None

    # Helpers for subclasses.
    def local(self, name: str) -> str:
        """A path in this export's local scratch folder."""
        return os.path.join(self._tmp.name, name)

    def publish(self, local_path: str, relpath: str) -> None:
        _storage.put_atomic(self.fs, local_path, _storage.join_path(self.root, relpath))
        os.remove(local_path)

    def shard_name(self, stem: str, index: int, suffix: str) -> str:
        return f"{stem}-{index:0{SHARD_DIGITS}d}{suffix}"


#: Export formats by name (``--format``); ``@EXPORTERS.register`` (or :func:`register`) adds one.
EXPORTERS: Registry[type[Exporter]] = Registry("export format", "format")

E = TypeVar("E", bound=type[Exporter])


def register(cls: E) -> E:
    """Class decorator: make an :class:`Exporter` subclass available under its ``name``."""
    return EXPORTERS.register(cls)


def formats() -> list[str]:
    return sorted(EXPORTERS.names())


def get_exporter(name: str) -> type[Exporter]:
    """The format registered as ``name``; an unknown name is a ConfigError listing the valid ones."""
    return EXPORTERS.get(name)


class _JsonArrayWriter:
    """Writes a JSON array to a local file one element at a time."""

    def __init__(self, path: str, head: str = "[", tail: str = "]"):
        self._file = open(path, "w", encoding="utf-8")
        self._file.write(head)
        self._tail = tail
        self._first = True

    def add(self, value: Any) -> None:
        self._file.write(("\n" if self._first else ",\n") + json.dumps(value, separators=(",", ":")))
        self._first = False

    def close(self, tail: str | None = None) -> None:
        self._file.write("\n" + (self._tail if tail is None else tail))
        self._file.close()


@EXPORTERS.register
class CocoExporter(Exporter):
    """COCO JSON shards ``DEST/coco-NNNNN.json``, each a complete COCO file for its images."""

    name = "coco"
    description = "COCO JSON, compressed RLE per (image, class present)"
    STEM = "coco"

    def __init__(self, dest: str, **kwargs: Any):
        super().__init__(dest, **kwargs)
        self._annotation_id = 0  # ids are unique across shards, so shards can be merged as they are
        self._categories = [{"id": i, "name": name, "supercategory": ""} for i, name in enumerate(self.classes)]

    def prepare(self, image: ExportImage) -> list[dict[str, Any]]:
        out = []
        for class_id in np.unique(image.mask).tolist():
            binary = image.mask == class_id
            out.append(
                {
                    "category_id": class_id,
                    "segmentation": coco_rle(binary),
                    "area": int(binary.sum()),
                    "bbox": coco_bbox(binary),
                    "iscrowd": 0,
                }
            )
        return out

    def open_shard(self, index: int) -> None:
        self._local = self.local(self.shard_name(self.STEM, index, ".json"))
        info = {
            "description": f"segbatch export of {self.source}",
            "version": __version__,
            "date_created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        head = (
            '{"info":'
            + json.dumps(info)
            + ',"licenses":[],"categories":'
            + json.dumps(self._categories)
            + ',"annotations":['
        )
        # COCO's images are small records; the annotations, where the RLE is, stream to the file.
        self._annotations = _JsonArrayWriter(self._local, head=head)
        self._images: list[dict[str, Any]] = []

    def write(self, image: ExportImage, prepared: list[dict[str, Any]]) -> None:
        image_id = image.index + 1  # COCO ids start at 1 by convention
        self._images.append(
            {
                "id": image_id,
                "file_name": image.name,
                "width": image.width,
                "height": image.height,
                "coco_url": image.uri,
                "segbatch_uri": image.uri,
            }
        )
        for annotation in prepared:
            self._annotation_id += 1
            self._annotations.add({"id": self._annotation_id, "image_id": image_id, **annotation})

    def close_shard(self, index: int) -> str:
        self._annotations.close(tail='],"images":' + json.dumps(self._images, separators=(",", ":")) + "}\n")
        name = posixpath.basename(self._local)
        self.publish(self._local, name)
        return name


@EXPORTERS.register
class CvatExporter(Exporter):
    """CVAT "Segmentation mask 1.1": a folder, or a .zip when DEST ends in .zip; with more than one
    shard, ``DEST/part-NNNNN/`` folders or ``NAME-NNNNN.zip`` files, each one task's upload."""

    name = "cvat"
    description = 'CVAT "Segmentation mask 1.1" (labelmap.txt, SegmentationClass/, ImageSets/)'
    CLASS_DIR = "SegmentationClass"
    LIST_PATH = "ImageSets/Segmentation/default.txt"
    LABELMAP = "labelmap.txt"
    CVAT_BACKGROUND = "background"  # the labelmap name CVAT (and VOC) give the background entry

    def __init__(self, dest: str, **kwargs: Any):
        super().__init__(dest, **kwargs)
        self.zipped = self.root.lower().endswith(".zip")
        untinted = background_ids(self.classes)
        lines = ["# label:color_rgb:parts:actions"]
        for class_id, name in enumerate(self.classes):
            # labelmap.txt has no escapes: a ":" would end the name and a line break start a new label.
            if class_id not in untinted and (":" in name or "\n" in name or "\r" in name):
                raise ExportError(
                    f"class {class_id} is named {name!r}: CVAT's labelmap.txt cannot hold ':' or a line break "
                    "in a label name (rename it in --classes, or export another format)"
                )
            r, g, b = class_colour(class_id)
            lines.append(f"{self.CVAT_BACKGROUND if class_id in untinted else name}:{r},{g},{b}::")
        self._labelmap = ("\n".join(lines) + "\n").encode()

    def check_dest(self) -> None:
        if not self.zipped:
            return super().check_dest()
        for index in range(self.shards_planned):
            path = _storage.join_path(posixpath.dirname(self.root), self._zip_name(index))
            if _storage.retry(self.fs.exists, path, what=f"check {path}"):
                raise ExportError(f"DEST {path} already exists: choose another, or remove it")

    def index_root(self) -> str | None:
        return None if self.zipped else self.root

    def _zip_name(self, index: int) -> str:
        base = posixpath.basename(self.root)
        return base if self.shards_planned == 1 else self.shard_name(base[: -len(".zip")], index, ".zip")

    def _part(self, index: int) -> str:
        return "" if self.shards_planned == 1 else self.shard_name("part", index, "")

    def open_shard(self, index: int) -> None:
        self._names: set[str] = set()  # CVAT names drop the extension: a.jpg and a.png would collide
        self._list = open(self.local(f"default-{index}.txt"), "w", encoding="utf-8")
        if self.zipped:
            self._zip = zipfile.ZipFile(self.local(self._zip_name(index)), "w", zipfile.ZIP_STORED)
            self._zip.writestr(self.LABELMAP, self._labelmap)

    def _put(self, index: int, relpath: str, data: bytes) -> None:
        if self.zipped:
            self._zip.writestr(relpath, data)  # PNGs are compressed already
        else:
            _storage.write_atomic(
                self.fs, _storage.join_path(self.root, posixpath.join(self._part(index), relpath)), data
            )

    def write(self, image: ExportImage, prepared: Any) -> None:
        name = posixpath.splitext(image.name)[0]
        if "\n" in name or "\r" in name:
            raise _SkipImage("its name holds a line break, which would split CVAT's one-name-per-line default.txt")
        if not self.zipped:
            longest = max(len(segment.encode("utf-8")) for segment in f"{name}.png".split("/"))
            if longest > MAX_NAME_BYTES:
                raise _SkipImage(
                    f"its CVAT mask name has a segment of {longest} bytes; a folder export holds at most "
                    f"{MAX_NAME_BYTES} (export to a .zip instead)"
                )
        if name in self._names:
            raise _SkipImage(
                f"its CVAT name {name!r} is taken by another input in this shard (CVAT names drop the extension)"
            )
        self._names.add(name)
        # The mask PNG as it is: palette indices are the class ids and its palette is the labelmap's colours.
        self._put(image.index // self.shard_size, f"{self.CLASS_DIR}/{name}.png", image.png)
        self._list.write(name + "\n")

    def close_shard(self, index: int) -> str:
        self._list.close()
        with open(self._list.name, "rb") as f:
            listing = f.read()
        os.remove(self._list.name)
        if self.zipped:
            self._zip.writestr(self.LIST_PATH, listing)
            self._zip.close()
            local = self._zip.filename
            name = self._zip_name(index)
            _storage.put_atomic(self.fs, local, _storage.join_path(posixpath.dirname(self.root), name))
            os.remove(local)
            return name
        part = self._part(index)
        self._put(index, self.LIST_PATH, listing)
        self._put(index, self.LABELMAP, self._labelmap)
        return part or "."


@EXPORTERS.register
class LabelStudioExporter(Exporter):
    """Label Studio task files ``DEST/tasks-NNNNN.json`` with brush pre-annotations, and
    ``DEST/labeling-config.xml`` for the project."""

    name = "label-studio"
    description = "Label Studio tasks with brushlabels pre-annotations (brush RLE)"
    options = {"from_name": "tag", "to_name": "image"}  # the names in Label Studio's brush examples
    STEM = "tasks"
    CONFIG_NAME = "labeling-config.xml"
    DATA_KEY = "image"  # the task field the config's <Image value="$image"> reads

    def prepare(self, image: ExportImage) -> list[dict[str, Any]]:
        results = []
        for class_id in np.unique(image.mask).tolist():
            results.append(
                {
                    "id": f"class-{class_id}",
                    "type": "brushlabels",  # unique within the task, as Label Studio asks
                    "from_name": self.settings["from_name"],
                    "to_name": self.settings["to_name"],
                    "original_width": image.width,
                    "original_height": image.height,
                    "image_rotation": 0,
                    "value": {
                        "format": "rle",
                        "rle": brush_rle(image.mask == class_id),
                        "brushlabels": [self._class_name(class_id)],
                    },
                }
            )
        return results

    def _class_name(self, class_id: int) -> str:
        return self.classes[class_id] if class_id < len(self.classes) else f"class {class_id}"

    def open_shard(self, index: int) -> None:
        self._local = self.local(self.shard_name(self.STEM, index, ".json"))
        self._tasks = _JsonArrayWriter(self._local)

    def write(self, image: ExportImage, prepared: list[dict[str, Any]]) -> None:
        self._tasks.add(
            {
                "data": {self.DATA_KEY: image.uri, "segbatch_name": image.name},
                "predictions": [{"model_version": image.model or "segbatch", "result": prepared}],
            }
        )

    def close_shard(self, index: int) -> str:
        self._tasks.close()
        name = posixpath.basename(self._local)
        self.publish(self._local, name)
        return name

    def labeling_config(self) -> str:
        colour = lambda i: "#{:02x}{:02x}{:02x}".format(*class_colour(i))  # noqa: E731
        labels = "\n".join(
            f'    <Label value={quoteattr(name)} background="{colour(i)}"/>' for i, name in enumerate(self.classes)
        )
        image = quoteattr(self.settings["to_name"])
        return (
            f'<View>\n  <Image name={image} value="${self.DATA_KEY}" zoom="true"/>\n'
            f"  <BrushLabels name={quoteattr(self.settings['from_name'])} "
            f"toName={quoteattr(self.settings['to_name'])}>\n{labels}\n  </BrushLabels>\n</View>\n"
        )

    def write_extras(self) -> list[str]:
        config = self.labeling_config()
        _storage.write_atomic(self.fs, _storage.join_path(self.root, self.CONFIG_NAME), config.encode())
        where = _storage.join_url(self.dest, self.CONFIG_NAME)
        return [f"Label Studio labeling config (Settings > Labeling Interface > Code), also in {where}:", config]


# -- the export ---------------------------------------------------------------------------------------


def latest_ok_rows(output_url: str, storage_options: Mapping[str, Any] | None = None) -> pa.Table:
    """The newest ok row of every input, sorted by uri: what an export holds."""
    columns = ["uri", "mask_uri", "width", "height", "model", "written_at", "run_id"]
    table = summary.read(output_url, storage_options, columns=columns, filter=pc.field("status") == "ok")
    return summary.newest_per_uri(table)


def _chunks(table: pa.Table, size: int) -> Iterator[pa.Table]:
    for start in range(0, table.num_rows, size):
        yield table.slice(start, size)


def _read_chunk(chunk: pa.Table, output: tuple[Any, str], storage_options: Mapping[str, Any]) -> list[Any]:
    """Each row's mask bytes, or the exception reading it ended with."""
    fs = output[0]
    out: list[Any] = [None] * chunk.num_rows
    here: list[tuple[int, str]] = []  # rows whose mask lies below OUTPUT: one batched read
    for i, (uri, mask_uri) in enumerate(zip(chunk["uri"].to_pylist(), chunk["mask_uri"].to_pylist(), strict=True)):
        try:
            mask_fs, path = locate_mask(mask_uri or "", uri, output, storage_options)
            if mask_fs is fs:
                here.append((i, path))
            else:
                out[i] = _storage.retry(mask_fs.cat_file, path, what=f"read {mask_uri}")
        except Exception as exc:  # an unreadable mask costs its image, not the export
            out[i] = exc
    for (i, _), data in zip(here, _storage.read_many(fs, [p for _, p in here]), strict=True):
        out[i] = data
    return out


def _input_name(uri: str, mask_uri: str, root: str) -> str:
    """The input's path below INPUT, from its mask's name; a manifest URL's name when that fails."""
    try:
        name = mask_name_below(root, mask_uri, uri)
    except ValueError:
        return manifest_rel(uri)
    try:
        return input_relpath(name)
    except ValueError:
        pass
    # A shortened mask name (a segment over MAX_SEGMENT_BYTES) cannot be inverted, but it has one segment
    # per segment of the input's name, and a listed input's uri ends in that name: take as many segments
    # from the uri, and keep them when they give this very mask name.
    depth = name.count("/")
    candidate = "/".join(uri.split("/")[-depth:])
    try:
        if mask_relpath(candidate) == name:
            return candidate
    except ValueError:
        pass
    return manifest_rel(uri)


def _load(row: dict[str, Any], data: Any, num_classes: int, root: str) -> ExportImage:
    if isinstance(data, BaseException):
        raise _SkipImage(f"cannot read mask {row['mask_uri']}: {type(data).__name__}: {data}")
    try:
        mask = read_label_png(data, f"mask {row['mask_uri']}").astype(np.uint8)
    except Exception as exc:
        raise _SkipImage(f"cannot decode mask {row['mask_uri']}: {exc}") from exc
    if mask.shape != (row["height"], row["width"]):
        raise _SkipImage(f"mask is {mask.shape[1]}x{mask.shape[0]}, its row says {row['width']}x{row['height']}")
    if mask.size and int(mask.max()) >= num_classes:
        raise _SkipImage(f"mask holds class id {int(mask.max())} but there are {num_classes} classes")
    return ExportImage(
        index=-1,
        uri=row["uri"],
        name=_input_name(row["uri"], row["mask_uri"] or "", root),
        width=row["width"],
        height=row["height"],
        model=row.get("model"),
        png=data,
        mask=mask,
    )


def _progress(total: int, desc: str, enabled: bool):
    try:
        from tqdm import tqdm
    except ImportError:  # tqdm is a dependency; a trimmed install still exports, silently
        enabled = False
    if not enabled:

        class _Quiet:
            def update(self, n: int = 1) -> None: ...
            def close(self) -> None: ...

        return _Quiet()
    return tqdm(total=total, desc=desc, unit="img", file=sys.stderr, dynamic_ncols=True)


def export(
    output: str,
    format: str,
    dest: str,
    *,
    storage_options: Mapping[str, Any] | None = None,
    shard_size: int = DEFAULT_SHARD_SIZE,
    progress: bool = True,
    **options: Any,
) -> ExportResult:
    """Export OUTPUT's newest ok mask of every input to DEST in ``format``; see the module docstring.

    ``options`` are the format's own settings (label-studio: ``from_name``, ``to_name``).
    """
    cls = get_exporter(format)
    if shard_size < 1:
        raise ConfigError("shard_size", f"must be 1 or more, got {shard_size}")
    storage_options = dict(storage_options or {})
    classes = summary.classes(output, storage_options)
    if classes is None:
        raise ExportError(
            f"OUTPUT {output} has no summary, so there is nothing to export: run `segbatch run` into it first"
        )
    rows = latest_ok_rows(output, storage_options)
    ds = summary.dataset(output, storage_options)
    error_rows = ds.count_rows(filter=pc.field("status") != "ok") if ds is not None else 0
    if rows.num_rows == 0:
        raise ExportError(f"OUTPUT {output} has no ok rows to export ({error_rows} error rows): nothing written")

    exporter = cls(
        dest,
        classes=classes,
        storage_options=storage_options,
        shard_size=shard_size,
        total=rows.num_rows,
        source=_storage.absolute_url(output),
        **options,
    )
    exporter.check_dest()
    result = ExportResult(format=cls.name, dest=exporter.dest, shard_size=shard_size, error_rows=error_rows)
    out_fs_root = _storage.open_url(output, storage_options)
    bar = _progress(rows.num_rows, f"export {cls.name}", progress)
    index = 0

    def load_and_prepare(item: tuple[dict[str, Any], Any]) -> tuple[ExportImage | None, Any]:
        row, data = item
        try:
            image = _load(row, data, len(classes), out_fs_root[1])
            return image, exporter.prepare(image)
        except _SkipImage as exc:
            return None, str(exc)

    try:
        with ThreadPoolExecutor(1) as reader, ThreadPoolExecutor(ENCODE_THREADS) as workers:
            chunks = list(_chunks(rows, READ_CHUNK))
            # The next chunk's masks are read while this chunk is encoded and written.
            pending = reader.submit(_read_chunk, chunks[0], out_fs_root, storage_options) if chunks else None
            for n, chunk in enumerate(chunks):
                data = pending.result()
                if n + 1 < len(chunks):
                    pending = reader.submit(_read_chunk, chunks[n + 1], out_fs_root, storage_options)
                chunk_rows = chunk.to_pylist()
                loaded = workers.map(load_and_prepare, zip(chunk_rows, data, strict=True))
                for row, (image, prepared) in zip(chunk_rows, loaded, strict=True):
                    if image is None:
                        result.failed.append((row["uri"], prepared))
                    else:
                        try:
                            exporter.add(replace(image, index=index), prepared)
                            index += 1
                        except _SkipImage as exc:
                            result.failed.append((row["uri"], str(exc)))
                    bar.update(1)
        result.notes = exporter.finish()
    finally:
        bar.close()
    result.images = index
    result.shards = exporter.shards
    return result


__all__ = [
    "DEFAULT_SHARD_SIZE",
    "ExportError",
    "ExportImage",
    "ExportResult",
    "Exporter",
    "brush_rle",
    "coco_bbox",
    "coco_rle",
    "export",
    "formats",
    "get_exporter",
    "latest_ok_rows",
    "register",
    "EXPORTERS",
]
