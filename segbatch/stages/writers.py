"""Per-image output writers, chosen by name: the mask PNG, and the extras a run asks for.

Each writer is one class with a ``name`` (the key in :data:`WRITERS`) that turns one labelled image into
one file under OUTPUT. The sink (:class:`segbatch.stages.sinks.WriteOutputs`) runs the writers a run's config
names, in order, mask first; adding an output format is a new class here and a name in the config, and
the pipeline does not change.
"""

from __future__ import annotations

import io
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
from PIL import Image

from segbatch._internal import _storage
from segbatch.errors import ConfigError
from segbatch.store.contract import PALETTE, confidence_relpath, mask_relpath, overlay_relpath

__all__ = [
    "ConfidenceWriter",
    "MaskWriter",
    "OutputWriter",
    "OverlayWriter",
    "WriterContext",
    "WRITERS",
    "encode_png",
    "get_writer",
]


@dataclass(frozen=True)
class WriterContext:
    """What every writer of a run may need; picklable, so writers travel to Ray tasks."""

    output_url: str
    storage_options: Mapping[str, Any] = field(default_factory=dict)
    input_url: str = ""  # "" for manifest runs: each input then carries its own URL
    classes: tuple[str, ...] = ()
    limits: Any = None  # segbatch.stages.decode.Limits, for writers that read the input again
    png_compress_level: int = 1

    def __repr__(self) -> str:  # storage options may hold secrets
        return f"WriterContext(output_url={self.output_url!r}, input_url={self.input_url!r})"


class OutputWriter:
    """One per-image output. ``write`` returns the URL it wrote, or None."""

    name: ClassVar[str]

    def __init__(self, context: WriterContext):
        self.context = context
        self._output_url = _storage.absolute_url(context.output_url)
        self._output = _storage.Location(context.output_url, context.storage_options)

    def write(self, row: Mapping[str, Any], mask: np.ndarray) -> str | None:
        raise NotImplementedError

    def _put(self, relpath: str, data: bytes) -> str:
        """Write ``data`` whole at ``OUTPUT/relpath`` (never a torn file) and return its URL."""
        fs, root = self._output.open()
        _storage.write_atomic(fs, _storage.join_path(root, relpath), data)
        return _storage.join_url(self._output_url, relpath)


def encode_png(mask: np.ndarray, compress_level: int) -> bytes:
    """A single-channel palette PNG whose pixel values are the class ids."""
    height, width = mask.shape
    image = Image.frombytes("P", (width, height), np.ascontiguousarray(mask, dtype=np.uint8).tobytes())
    image.putpalette(PALETTE)
    buf = io.BytesIO()
    image.save(buf, format="PNG", compress_level=compress_level)
    return buf.getvalue()


class MaskWriter(OutputWriter):
    """``masks/<rel>.png``: the contract's mask; its URL becomes the row's ``mask_uri``."""

    name = "mask"

    def write(self, row: Mapping[str, Any], mask: np.ndarray) -> str:
        return self._put(mask_relpath(row["rel"]), encode_png(mask, self.context.png_compress_level))


class OverlayWriter(OutputWriter):
    """``overlays/<rel>.jpg``: the image blended with its colourised mask (`run --overlays`).

    The overlay needs the original pixels, which the pipeline no longer holds at the write step (only
    the model-sized copy travelled through the object store), so the input is read again from its
    ``path``. That costs one more read per image, only when overlays are asked for.
    """

    name = "overlay"

    def __init__(self, context: WriterContext):
        from segbatch.stages.overlay import background_ids

        super().__init__(context)
        self._input = _storage.Location(context.input_url, context.storage_options) if context.input_url else None
        self._untinted = background_ids(context.classes)

    def write(self, row: Mapping[str, Any], mask: np.ndarray) -> str:
        from segbatch.stages.decode import decode_image
        from segbatch.stages.overlay import blend, encode_jpeg

        if self._input is not None:
            fs, path = self._input.open()[0], row["path"]
        else:  # inputs named by a manifest may each live anywhere
            fs, path = _storage.open_url(row["uri"], self.context.storage_options)
        data = _storage.retry(fs.cat_file, path, what=f"read {path} for its overlay")
        image = decode_image(data, self.context.limits)  # the same EXIF orientation as the mask
        return self._put(overlay_relpath(row["rel"]), encode_jpeg(blend(image, mask, untinted=self._untinted)))


class ConfidenceWriter(OutputWriter):
    """``confidence/<rel>.png`` (`run --confidence`): 8-bit greyscale, the largest softmax probability of
    each pixel x 255, from the same logits as the mask."""

    name = "confidence"

    def write(self, row: Mapping[str, Any], mask: np.ndarray) -> str:
        pixels = np.frombuffer(row["confidence"], dtype=np.uint8).reshape(mask.shape)
        buf = io.BytesIO()
        Image.fromarray(pixels, mode="L").save(buf, format="PNG", compress_level=self.context.png_compress_level)
        return self._put(confidence_relpath(row["rel"]), buf.getvalue())


#: Writers by name. The mask writer always runs first; the others run when the config names them.
WRITERS: dict[str, type[OutputWriter]] = {w.name: w for w in (MaskWriter, OverlayWriter, ConfidenceWriter)}


def get_writer(name: str) -> type[OutputWriter]:
    try:
        return WRITERS[name]
    except KeyError:
        raise ConfigError("writers", f"unknown writer {name!r}", f"valid writers: {', '.join(WRITERS)}") from None
