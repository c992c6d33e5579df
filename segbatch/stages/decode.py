"""Stage 2, read and decode (Ray CPU tasks): bytes -> oriented RGB -> the weights' resize.

Each input row becomes either an image resized exactly as ``weights.transforms()`` resizes it (kept as
uint8 to move 4x fewer bytes than float; normalisation happens next to the model), or an error row.
Nothing here raises for one bad file.
"""

from __future__ import annotations

import io
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
from PIL import Image, ImageFile, ImageOps

from segbatch._internal import _storage
from segbatch.errors import Fault, classify
from segbatch.store import contract

# Multi-frame formats (GIF, TIFF, WebP) open on their first frame; that is the frame we label.
# Truncated files must fail, not decode as grey: never let PIL pad them.
ImageFile.LOAD_TRUNCATED_IMAGES = False
# PIL's decompression-bomb guard is one process-wide number; segbatch's own per-run limit
# (max_image_pixels, checked from the header before any pixel is decoded) replaces it, set once here.
Image.MAX_IMAGE_PIXELS = None


@dataclass(frozen=True)
class ResizeSpec:
    """The resize half of a torchvision ``SemanticSegmentation`` transform, read off the weights.

    It is applied with PIL alone, as torchvision's ``F.resize`` does for PIL images (PIL's resampling
    filter for the weights' interpolation; PIL always antialiases), so decode workers never import torch.
    """

    size: tuple[int, ...]  # [shorter side] as torchvision's resize takes it
    resample: int  # PIL's filter constant for the weights' interpolation (torchvision's pil_modes_mapping)

    @classmethod
    def from_transforms(cls, transforms: Any) -> ResizeSpec:
        from torchvision.transforms.functional import pil_modes_mapping

        size = transforms.resize_size
        return cls(tuple(size) if size is not None else (), int(pil_modes_mapping[transforms.interpolation]))

    def output_size(self, width: int, height: int) -> tuple[int, int]:
        """(height, width) the resize produces, computed as torchvision's ``_compute_resized_output_size``
        computes it for a shorter-side size."""
        if not self.size:
            return height, width
        if len(self.size) == 2:
            return self.size[0], self.size[1]
        short, long = (width, height) if width <= height else (height, width)
        new_short, new_long = self.size[0], int(self.size[0] * long / short)
        new_w, new_h = (new_short, new_long) if width <= height else (new_long, new_short)
        return new_h, new_w

    def apply(self, image: Image.Image) -> np.ndarray:
        if self.size:
            h, w = self.output_size(image.width, image.height)
            if (h, w) != (image.height, image.width):
                image = image.resize((w, h), self.resample)
        return np.asarray(image, dtype=np.uint8)


# The rows decoding reads (LISTING_SCHEMA) and hands to the model (PASS_SCHEMA, of IMAGE_FIELDS per image)
# are declared with the other hand-offs in segbatch.store.contract.
IMAGE_FIELDS = contract.IMAGE_FIELDS
PASS_SCHEMA = contract.PASS_SCHEMA


class ImageError(ValueError):
    """One input cannot be labelled; the message is for a person and ends up in the ``error`` column."""


def to_rgb(image: Image.Image) -> Image.Image:
    """Displayed orientation, 8-bit RGB (step 1 of the reference, docs/output-contract.md)."""
    image = ImageOps.exif_transpose(image)
    mode = image.mode
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        arr = np.asarray(image)
        # 16-bit samples scale to 8 bits by their top byte; 32-bit "I" images are clipped to 16 bits first.
        arr = np.clip(arr.astype(np.int64), 0, 65535) >> 8
        image = Image.fromarray(arr.astype(np.uint8), mode="L")
    elif mode == "F":
        image = Image.fromarray(np.clip(np.asarray(image), 0, 255).astype(np.uint8), mode="L")
    if image.mode != "RGB":
        image = image.convert("RGB")
    return image


def decode_image(data: bytes, limits: Limits) -> Image.Image:
    """Bytes to an oriented RGB image, refusing oversized ones before any pixel is decoded."""
    if not data:
        raise ImageError("empty file (0 bytes)")
    if len(data) > limits.max_file_bytes:
        raise ImageError(f"file is {len(data)} bytes, over max_file_bytes={limits.max_file_bytes}")
    try:
        image = Image.open(io.BytesIO(data))
        width, height = image.size
        if width * height > limits.max_image_pixels:
            raise ImageError(
                f"image is {width}x{height} = {width * height} pixels, over max_image_pixels="
                f"{limits.max_image_pixels}; refused before decoding"
            )
        image.load()
        return to_rgb(image)
    except ImageError:
        raise
    except Image.UnidentifiedImageError:
        raise ImageError("not an image PIL can identify (unknown format or corrupt header)") from None
    except (OSError, SyntaxError, ValueError, EOFError, IndexError, TypeError, MemoryError) as exc:
        raise ImageError(f"cannot decode image: {type(exc).__name__}: {exc}") from None


@dataclass(frozen=True)
class Limits:
    max_image_pixels: int
    max_file_bytes: int
    max_model_pixels: int


def _describe_read_error(exc: BaseException) -> str:
    fault = classify(exc)
    if fault is Fault.NOT_FOUND:
        return "object not found (deleted after listing, or never there)"
    if fault is Fault.PERMISSION:
        return "access denied reading the object"
    return f"cannot read: {type(exc).__name__}: {exc}"


class DecodeImages:
    """Ray Data map step (CPU tasks): read a batch of inputs and decode them.

    The instance is built in the driver and shipped to tasks, so ``__init__`` stays cheap: it holds
    settings only, and the filesystem is opened on first use in each worker.
    """

    def __init__(
        self,
        input_url: str,
        storage_options: Mapping[str, Any],
        resize: ResizeSpec,
        limits: Limits,
        max_batch: int | None = None,
    ):
        self._max_batch = max_batch  # most images per forward pass
        # A manifest run has no INPUT root: every URL then names its own filesystem.
        self._input = _storage.Location(input_url, storage_options) if input_url else None
        self._storage_options = dict(storage_options)
        self._resize = resize
        self._limits = limits

    def decode_one(self, data: bytes | BaseException) -> tuple[np.ndarray | None, int, int, str | None]:
        """(resized image, width, height, error) for one input's bytes."""
        if isinstance(data, BaseException):
            return None, 0, 0, _describe_read_error(data)
        try:
            image = decode_image(data, self._limits)
            width, height = image.size
            out_h, out_w = self._resize.output_size(width, height)
            if out_h * out_w > self._limits.max_model_pixels:
                raise ImageError(
                    f"image is {width}x{height}; the model input would be {out_w}x{out_h} = {out_w * out_h}"
                    f" pixels, over max_model_pixels={self._limits.max_model_pixels}"
                )
            return self._resize.apply(image), width, height, None
        except ImageError as exc:
            return None, 0, 0, str(exc)
        except Exception as exc:  # a decoder bug must cost one row, not the job
            return None, 0, 0, f"cannot decode image: {type(exc).__name__}: {exc}"

    def __call__(self, batch: pa.Table) -> pa.Table:
        """Listing rows -> one row per forward pass (:data:`PASS_SCHEMA`): the images of one model-input
        shape, at most ``max_batch`` of them, packed into one ``pixels`` value, so that however Ray cuts
        the stream into blocks downstream, a forward pass stays whole. Inputs that failed share one row
        without pixels."""
        from segbatch.store.contract import UnsafePathError, mask_relpath

        errors: list[str | None] = []
        for rel in batch["rel"].to_pylist():
            try:
                mask_relpath(rel)
                errors.append(None)
            except UnsafePathError as exc:
                errors.append(str(exc))
        if self._input is not None:
            paths = batch["path"].to_pylist()
            contents = iter(_storage.read_many(self._input.open()[0], [p for p, e in zip(paths, errors) if e is None]))
        else:
            uris = batch["uri"].to_pylist()
            contents = iter(_storage.read_urls([u for u, e in zip(uris, errors) if e is None], self._storage_options))
        rows = batch.select(list(IMAGE_FIELDS[:6])).to_pylist()
        groups: dict[tuple[int, int], list[tuple[dict, np.ndarray]]] = {}
        failed: list[dict] = []
        for i, err in enumerate(errors):
            row = rows[i]
            image = None
            if err is None:
                image, row["width"], row["height"], err = self.decode_one(next(contents))
            if image is None:
                row.update(width=None, height=None, error=err)
                failed.append(row)
            else:
                row["error"] = None
                groups.setdefault(image.shape[:2], []).append((row, image))
        passes: list[tuple[bytes, int, int, list[dict]]] = []
        step = self._max_batch or max(1, batch.num_rows)
        for (h, w), members in groups.items():
            for start in range(0, len(members), step):
                part = members[start : start + step]
                pixels = b"".join(img.tobytes() for _, img in part)
                passes.append((pixels, h, w, [r for r, _ in part]))
        if failed:
            passes.append((b"", 0, 0, failed))
        return pa.table(
            {
                "pixels": pa.array([p[0] for p in passes], pa.binary()),
                "in_h": pa.array([p[1] for p in passes], pa.int32()),
                "in_w": pa.array([p[2] for p in passes], pa.int32()),
                "images": pa.array([p[3] for p in passes], PASS_SCHEMA.field("images").type),
            },
            schema=PASS_SCHEMA,
        )
