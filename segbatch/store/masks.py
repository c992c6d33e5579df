"""Reading OUTPUT's masks: where a summary row's mask lies, and its class ids.

`segbatch eval`, `report` and `export` read the masks a run wrote; this is the one place that finds a
row's mask below OUTPUT (even when OUTPUT was moved since the run) and decodes a label PNG.
"""

from __future__ import annotations

import io
from collections.abc import Mapping
from typing import Any

import numpy as np
from PIL import Image

from segbatch._internal import _storage
from segbatch.store.contract import MASKS_DIR, mask_name


def mask_name_below(root: str, mask_uri: str, uri: str) -> str:
    """The row's mask name below OUTPUT (``masks/...png``), OUTPUT being ``root`` in its filesystem's
    terms; ValueError when ``mask_uri`` is not a mask of this OUTPUT (see ``contract.mask_name``)."""
    return mask_name(mask_uri, uri, root + "/" + MASKS_DIR + "/")


def locate_mask(
    mask_uri: str, uri: str, output: tuple[Any, str], storage_options: Mapping[str, Any] | None = None
) -> tuple[Any, str]:
    """(filesystem, path) of a summary row's mask: below OUTPUT (``output`` is its opened ``(fs, root)``),
    even when OUTPUT was moved since the run, else wherever its ``mask_uri`` points."""
    fs, root = output
    try:
        return fs, _storage.join_path(root, mask_name_below(root, mask_uri, uri))
    except ValueError:
        return _storage.open_url(mask_uri, storage_options)


def read_label_png(data: bytes, what: str) -> np.ndarray:
    """Class ids of a single-channel PNG; palette images give their indices, not their colours."""
    image = Image.open(io.BytesIO(data))
    if image.mode not in ("P", "L", "I", "I;16", "I;16B", "I;16L", "1"):
        raise ValueError(
            f"{what} is mode {image.mode}: expected single-channel class ids (mode L or P, "
            f"like VOC SegmentationClass PNGs)"
        )
    return np.asarray(image).astype(np.int64)


__all__ = ["locate_mask", "mask_name_below", "read_label_png"]
