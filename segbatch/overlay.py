"""Overlays: an image blended with its colourised mask, for `run --overlays` and the report's gallery.

Colours are the PASCAL VOC palette of the masks themselves (:func:`segbatch.sinks.voc_palette`), so an
overlay, a mask opened in an image viewer, and the report's legend all agree. Background pixels stay
untinted: tinting them with the palette's black would only darken the photo.
"""

from __future__ import annotations

import io
import posixpath
from typing import Any, Mapping, Sequence

import numpy as np
from PIL import Image

from segbatch import _storage
from segbatch.sinks import MASKS_DIR, mask_relpath, voc_palette

OVERLAYS_DIR = "overlays"
OVERLAY_ALPHA = 0.5  # share of the class colour in a tinted pixel; 0.5 keeps the photo readable under it
OVERLAY_JPEG_QUALITY = 85  # overlays are for looking at; 85 is visually clean at a third of q95's size
BACKGROUND_NAMES = frozenset({"__background__", "background", "_background_"})

PALETTE = np.asarray(voc_palette(), dtype=np.uint8).reshape(256, 3)


def class_colour(class_id: int) -> tuple[int, int, int]:
    r, g, b = PALETTE[class_id % 256]
    return int(r), int(g), int(b)


def background_ids(classes: Sequence[str] | None) -> frozenset[int]:
    """Class ids left untinted: those named background (torchvision's VOC weights call it __background__)."""
    return frozenset(i for i, name in enumerate(classes or ()) if name.lower() in BACKGROUND_NAMES)


def blend(image: Image.Image, mask: np.ndarray, *, untinted: frozenset[int] = frozenset(),
          alpha: float = OVERLAY_ALPHA) -> Image.Image:
    """``image`` with each pixel tinted by its class's palette colour; ``mask`` must match its size."""
    rgb = np.asarray(image.convert("RGB"), dtype=np.float32)
    if rgb.shape[:2] != mask.shape:
        raise ValueError(f"image is {rgb.shape[1]}x{rgb.shape[0]} but its mask is {mask.shape[1]}x{mask.shape[0]}")
    colours = PALETTE[mask].astype(np.float32)
    out = rgb * (1.0 - alpha) + colours * alpha
    if untinted:
        keep = np.isin(mask, np.fromiter(untinted, dtype=np.int64))
        out[keep] = rgb[keep]
    return Image.fromarray(np.clip(out + 0.5, 0, 255).astype(np.uint8), mode="RGB")


def encode_jpeg(image: Image.Image, quality: int = OVERLAY_JPEG_QUALITY) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def overlay_relpath(rel: str) -> str:
    """``overlays/<rel>.jpg``: the mask's name (same escaping, same uniqueness) under overlays/."""
    mask_rel = mask_relpath(rel)
    return posixpath.join(OVERLAYS_DIR, mask_rel[len(MASKS_DIR) + 1:-len(".png")] + ".jpg")


class OverlayWriter:
    """An ``extra_writers`` hook of :class:`segbatch.sinks.WriteOutputs`: one JPEG overlay per ok image.

    The overlay needs the original pixels, which the pipeline no longer holds at the write step (only
    the model-sized copy travelled through the object store), so the input is read again from its
    ``path``. That costs one more read per image, only when overlays are asked for.
    """

    def __init__(self, input_url: str, output_url: str, storage_options: Mapping[str, Any], limits: Any,
                 classes: Sequence[str]):
        self._input = _storage.Location(input_url, storage_options) if input_url else None
        self._output = _storage.Location(output_url, storage_options)
        self._storage_options = dict(storage_options)
        self._limits = limits
        self._untinted = background_ids(classes)

    def __call__(self, writer: Any, row: Mapping[str, Any], mask: np.ndarray) -> None:
        from segbatch.decode import decode_image

        if self._input is not None:
            fs, path = self._input.open()[0], row["path"]
        else:  # inputs named by a manifest may each live anywhere
            fs, path = _storage.open_url(row["uri"], self._storage_options)
        data = _storage.retry(fs.cat_file, path, what=f"read {path} for its overlay")
        image = decode_image(data, self._limits)  # the same EXIF orientation as the mask
        jpeg = encode_jpeg(blend(image, mask, untinted=self._untinted))
        out_fs, out_root = self._output.open()
        _storage.write_atomic(out_fs, _storage.join_path(out_root, overlay_relpath(row["rel"])), jpeg)


def writers(config: Any, classes: Sequence[str], limits: Any) -> tuple[OverlayWriter, ...]:
    """The ``extra_writers`` a run's config asks for."""
    if not config.overlays:
        return ()
    return (OverlayWriter(config.input, config.output, config.storage_options, limits, classes),)
