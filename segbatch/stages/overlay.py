"""Overlays: an image blended with its colourised mask, for `run --overlays` (segbatch.stages.writers) and the
report's gallery.

Colours are the PASCAL VOC palette of the masks themselves (:data:`segbatch.store.contract.PALETTE`), so an
overlay, a mask opened in an image viewer, and the report's legend all agree. Background pixels stay
untinted: tinting them with the palette's black would only darken the photo.
"""

from __future__ import annotations

import io
from collections.abc import Sequence

import numpy as np
from PIL import Image

from segbatch.store import contract

OVERLAY_ALPHA = 0.5  # share of the class colour in a tinted pixel; 0.5 keeps the photo readable under it
OVERLAY_JPEG_QUALITY = 85  # overlays are for looking at; 85 is visually clean at a third of q95's size
BACKGROUND_NAMES = frozenset({"__background__", "background", "_background_"})

PALETTE = np.asarray(contract.PALETTE, dtype=np.uint8).reshape(256, 3)


def class_colour(class_id: int) -> tuple[int, int, int]:
    r, g, b = PALETTE[class_id % 256]
    return int(r), int(g), int(b)


def background_ids(classes: Sequence[str] | None) -> frozenset[int]:
    """Class ids left untinted: those named background (torchvision's VOC weights call it __background__)."""
    return frozenset(i for i, name in enumerate(classes or ()) if name.lower() in BACKGROUND_NAMES)


def blend(
    image: Image.Image, mask: np.ndarray, *, untinted: frozenset[int] = frozenset(), alpha: float = OVERLAY_ALPHA
) -> Image.Image:
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
