"""Per-image output writers, chosen by name: the mask PNG, and the extras a run asks for.

Each writer is one class with a ``name``, registered in :data:`WRITERS` with ``@WRITERS.register``, that
turns one labelled image into one file under OUTPUT. ``segbatch run --writers NAME[,NAME]`` (RunConfig.writers)
names the ones a run uses; the sink (:class:`segbatch.stages.sinks.WriteOutputs`) runs them in order, mask
first. Adding an output format is one registered class here (and its test): the config, the CLI and the
pipeline take any registered name.
"""

from __future__ import annotations

import io
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
from PIL import Image

from segbatch._internal import _storage
from segbatch._internal.registry import Registry
from segbatch.store.contract import CONFIDENCE_DIR, MASKS_DIR, OVERLAYS_DIR, PALETTE, output_relpath

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
    #: The folder of OUTPUT it writes, and its files' suffix: ``<directory>/<rel><suffix>``. A rerun never
    #: lists a registered writer's folder as input (segbatch.stages.listing.output_owned_dirs).
    directory: ClassVar[str]
    suffix: ClassVar[str]
    #: The writer reads the model's per-pixel ``confidence`` column (segbatch.store.contract.IMAGE_ROW_SCHEMA),
    #: which the model computes only when some writer, or ``--confidence``, asks for it.
    needs_confidence: ClassVar[bool] = False

    def __init__(self, context: WriterContext):
        self.context = context
        self._output_url = _storage.absolute_url(context.output_url)
        self._output = _storage.Location(context.output_url, context.storage_options)

    def write(self, row: Mapping[str, Any], mask: np.ndarray) -> str | None:
        raise NotImplementedError

    @classmethod
    def relpath(cls, rel: str) -> str:
        """Where the output of input ``rel`` goes below OUTPUT (segbatch.store.contract.output_relpath)."""
        return output_relpath(rel, cls.directory, cls.suffix)

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


#: Writers by name, in the order ``--help`` lists them. The mask writer always runs, first.
WRITERS: Registry[type[OutputWriter]] = Registry("writer", "writers")


@WRITERS.register
class MaskWriter(OutputWriter):
    """``masks/<rel>.png``: the contract's mask; its URL becomes the row's ``mask_uri``."""

    name = "mask"
    directory, suffix = MASKS_DIR, ".png"

    def write(self, row: Mapping[str, Any], mask: np.ndarray) -> str:
        return self._put(self.relpath(row["rel"]), encode_png(mask, self.context.png_compress_level))


@WRITERS.register
class OverlayWriter(OutputWriter):
    """``overlays/<rel>.jpg``: the image blended with its colourised mask (`run --overlays`).

    The overlay needs the original pixels, which the pipeline no longer holds at the write step (only
    the model-sized copy travelled through the object store), so the input is read again from its
    ``path``. That costs one more read per image, only when overlays are asked for.
    """

    name = "overlay"
    directory, suffix = OVERLAYS_DIR, ".jpg"

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
        return self._put(self.relpath(row["rel"]), encode_jpeg(blend(image, mask, untinted=self._untinted)))


@WRITERS.register
class ConfidenceWriter(OutputWriter):
    """``confidence/<rel>.png`` (`run --confidence`): 8-bit greyscale, the largest softmax probability of
    each pixel x 255, from the same logits as the mask."""

    name = "confidence"
    directory, suffix = CONFIDENCE_DIR, ".png"
    needs_confidence = True

    def write(self, row: Mapping[str, Any], mask: np.ndarray) -> str:
        pixels = np.frombuffer(row["confidence"], dtype=np.uint8).reshape(mask.shape)
        buf = io.BytesIO()
        Image.fromarray(pixels, mode="L").save(buf, format="PNG", compress_level=self.context.png_compress_level)
        return self._put(self.relpath(row["rel"]), buf.getvalue())


def get_writer(name: str) -> type[OutputWriter]:
    """The writer class registered as ``name``; an unknown name is a ConfigError listing the valid ones."""
    return WRITERS.get(name)
