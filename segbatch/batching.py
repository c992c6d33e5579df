"""Stage 2b, shape batching (one small actor): decoded images grouped by model-input shape into full batches.

A forward pass takes images of one shape only (padding would change the masks), so a batch cut from the
listing in listing order holds as many passes as it holds shapes. :class:`ShapeBatcher` sits between
decoding and inference and holds decoded images per shape until ``batch_size`` of one shape are there,
then releases them together. What it holds is bounded:

- at most ``batch_size - 1`` images per shape between releases, and
- at most ``max_held_bytes`` of decoded pixels in all: past it, the fullest shape is released as a
  partial batch (a long tail of rare shapes costs small passes, never memory).

The end of the input is known by count: the batcher is told how many rows the run will send it
(``expected_rows``) and releases every partial batch once it has seen them all. It never drops, copies
twice or mixes shapes; rows that failed to decode pass straight through.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator

import pyarrow as pa
import pyarrow.compute as pc

log = logging.getLogger(__name__)

#: Per row, how many images shared the forward pass that labelled it (0: none); the Segmenter writes it,
#: the sink passes it on and the driver tallies it into forward passes.
FORWARD_PASS_COLUMN = "forward_pass"

#: Decoded pixel bytes one batcher holds at most (a 520x693 RGB model input is ~1.1 MB).
DEFAULT_MAX_HELD_BYTES = 512 * 1024**2


class ShapeBatcher:
    """Ray Data map step (one actor, generator output): full single-shape batches out of decoded rows.

    Rows are those of :class:`segbatch.decode.DecodeImages` (``pixels``, ``in_h``, ``in_w``, ``error``).
    Each yielded table is either one shape's batch (``batch_size`` rows, or fewer when released early)
    or rows without pixels (decode errors), which need no forward pass.
    """

    def __init__(self, batch_size: int, expected_rows: int | None, max_held_bytes: int = DEFAULT_MAX_HELD_BYTES):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.batch_size = batch_size
        self.expected_rows = expected_rows
        self.max_held_bytes = max_held_bytes
        self.seen = 0
        self.released = 0
        self.held_bytes = 0
        self._buckets: dict[tuple[int, int], list[pa.Table]] = {}
        self._counts: dict[tuple[int, int], int] = {}
        self._bytes: dict[tuple[int, int], int] = {}

    @property
    def held_rows(self) -> int:
        return sum(self._counts.values())

    def __call__(self, batch: pa.Table) -> Iterator[pa.Table]:
        self.seen += batch.num_rows
        has_pixels = pc.and_(pc.is_null(batch["error"]), pc.greater(batch["in_h"], 0))
        has_pixels = pc.fill_null(has_pixels, False)
        passthrough = batch.filter(pc.invert(has_pixels))
        if passthrough.num_rows:
            yield self._out(passthrough)
        images = batch.filter(has_pixels)
        if images.num_rows:
            keys = list(zip(images["in_h"].to_pylist(), images["in_w"].to_pylist()))
            rows_of: dict[tuple[int, int], list[int]] = {}
            for i, key in enumerate(keys):
                rows_of.setdefault(key, []).append(i)
            for key, rows in rows_of.items():
                part = images.take(pa.array(rows, pa.int64()))
                self._buckets.setdefault(key, []).append(part)
                self._counts[key] = self._counts.get(key, 0) + part.num_rows
                size = part["pixels"].nbytes
                self._bytes[key] = self._bytes.get(key, 0) + size
                self.held_bytes += size
                while self._counts.get(key, 0) >= self.batch_size:
                    yield self._out(self._take(key, self.batch_size))
        while self.held_bytes > self.max_held_bytes and self._counts:
            fullest = max(self._counts, key=self._counts.__getitem__)
            yield self._out(self._take(fullest, self._counts[fullest]))
        if self.expected_rows is not None and self.seen >= self.expected_rows:
            yield from self.flush()

    def flush(self) -> Iterator[pa.Table]:
        """Release every partial batch (the input has ended)."""
        for key in sorted(self._counts, key=self._counts.__getitem__, reverse=True):
            if self._counts.get(key):
                yield self._out(self._take(key, self._counts[key]))

    def _out(self, table: pa.Table) -> pa.Table:
        self.released += table.num_rows
        return table

    def _take(self, key: tuple[int, int], n: int) -> pa.Table:
        """The first ``n`` held rows of shape ``key``; the rest stay held (copied, so the released rows'
        buffers can be freed once Ray has stored them)."""
        held = pa.concat_tables(self._buckets.pop(key))
        self.held_bytes -= self._bytes.pop(key)
        del self._counts[key]
        out = held.slice(0, n)
        if held.num_rows > n:
            rest = held.take(pa.array(range(n, held.num_rows), pa.int64()))
            self._buckets[key] = [rest]
            self._counts[key] = rest.num_rows
            self._bytes[key] = rest["pixels"].nbytes
            self.held_bytes += self._bytes[key]
        return out


__all__ = ["DEFAULT_MAX_HELD_BYTES", "FORWARD_PASS_COLUMN", "ShapeBatcher"]
