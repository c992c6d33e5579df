"""Stage 4, postprocess: logits -> full-size class ids and per-class pixel counts (on the model's device).

The reference (docs/output-contract.md) resizes the model's ``out`` logits bilinearly to the displayed size and takes
the argmax. Done literally that interpolates every class channel at every output pixel, which on a CPU
costs as much as a third of the model. :func:`labels` gets the same labels for a fraction of the work:

Bilinear interpolation mixes the four source pixels around an output pixel with non-negative weights
summing to one. If all four have the same argmax class ``c``, then for every class ``k``
``sum(w_i * l_i[c]) >= sum(w_i * l_i[k])``, so the interpolated argmax is ``c`` as well. Only output
pixels whose four sources disagree (class boundaries, a few percent of an image) need their logits
interpolated. DeepLabV3 itself upsamples its stride-8 logits bilinearly to the input size before
``out``; that step is evaluated lazily in the same way, so ``out`` is never materialised either.

Bounded memory: every full-resolution result is computed in tiles of :data:`TILE_ROWS` output rows, so a
12 MP photo never holds a C x H x W float tensor (1 GB for 21 classes) nor an int64 H x W label map; labels are
uint8 from the start (the contract allows at most 256 classes).

Where logits are interpolated, they are rounded as PyTorch's own bilinear kernel rounds them, so labels are
those of ``F.interpolate`` (a contiguous NCHW tensor, ``align_corners=False``) followed by ``argmax``, not merely
close to them. The kernel computes ``t0 * w0 + t1 * w1`` per axis, width first, with the first product fused
(an FMA; :func:`_lerp` does the same with ``torch.addcmul``), and source positions ``scale * (dst + 0.5) - 0.5``
without fusing on the CPU (fused on CUDA). For outputs with ``H + W <= 128`` the CPU kernel switches to its
channels-last code, which rounds differently; such tiny outputs are computed by ``F.interpolate`` itself.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import NamedTuple

import torch
import torch.nn.functional as F

LogitsAt = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (ys, xs) -> (C, K) logits

# Output rows per tile. A tile of the literal path holds a few C x TILE_ROWS x W float32 blocks (source
# rows after the horizontal pass, the two row gathers, the mixed result): 43 MB each for 21 classes and a
# 4000-px-wide photo, where the whole image would be 21 x 3000 x 4000 x 4 B = 1 GB. 128 rows keep the
# per-tile overhead (a few dozen small ops, kernel launches on a GPU) negligible: 24 tiles for 3000 rows.
TILE_ROWS = 128
# PyTorch's CPU bilinear kernel uses its channels-last implementation (other rounding) when the output's
# H + W is at most this; such outputs (at most 64 x 64) are resized by F.interpolate, whole.
_SMALL_OUTPUT = 128
# Boundary pixels whose logits are interpolated at once in the exact mode: caps its (C, K) temporaries
# (21 x 65536 x 4 B = 5.5 MB each) even for a tile that is all boundaries (noise).
_MIXED_CHUNK = 1 << 16


def _label_dtype(num_classes: int) -> torch.dtype:
    return torch.uint8 if num_classes <= 256 else torch.long


def _axis(in_size: int, out_size: int, *, fused: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Source indices ``i0``, ``i1`` and weight ``w1`` (of ``i1``) of PyTorch's bilinear resize along one axis,
    ``align_corners=False``, on the CPU; computed as its kernel computes them (float32 throughout)."""
    scale = torch.tensor(in_size, dtype=torch.float32) / out_size
    dst = torch.arange(out_size, dtype=torch.float32) + 0.5
    if fused:  # CUDA contracts scale * (dst + 0.5) - 0.5 into an FMA: one rounding, exact in float64
        src = (scale.double() * dst.double() - 0.5).float()
    else:
        src = dst * scale - 0.5
    src = src.clamp_min(0.0)
    i0 = src.floor().to(torch.long).clamp_max(in_size - 1)
    i1 = (i0 + 1).clamp_max(in_size - 1)
    return i0, i1, (src - i0.to(torch.float32)).clamp(0.0, 1.0)


def _lerp(t0: torch.Tensor, t1: torch.Tensor, w1: torch.Tensor) -> torch.Tensor:
    """``t0 * (1 - w1) + t1 * w1`` rounded as PyTorch's bilinear kernels round it: ``t1 * w1`` rounded, then
    ``t0 * (1 - w1)`` added to it in one fused multiply-add. Computed in ``t1``'s memory, which it returns."""
    return t1.mul_(w1).addcmul_(t0, 1 - w1)


class _Grid:
    """A (C, height, width) float32 logit grid whose rows are computed on demand."""

    channels: int
    height: int
    width: int
    device: torch.device

    def rows(self, start: int, stop: int) -> torch.Tensor:
        raise NotImplementedError


class _Given(_Grid):
    def __init__(self, logits: torch.Tensor):
        self.logits = logits
        self.channels, self.height, self.width = logits.shape
        self.device = logits.device

    def rows(self, start: int, stop: int) -> torch.Tensor:
        return self.logits[:, start:stop]


class _Resized(_Grid):
    """``source`` resized bilinearly (``align_corners=False``) to (height, width), a band of rows at a time:
    the source rows a band needs are resized horizontally, then mixed vertically."""

    def __init__(self, source: _Grid, height: int, width: int):
        self.source, self.channels, self.height, self.width = source, source.channels, height, width
        self.device = device = source.device
        fused = device.type == "cuda"
        self._y0, self._y1, wy = _axis(source.height, height, fused=fused)  # CPU copies: band bounds
        x0, x1, wx = _axis(source.width, width, fused=fused)
        self._dy0, self._dy1, self._wy = self._y0.to(device), self._y1.to(device), wy.to(device)
        self._x0, self._x1, self._wx = x0.to(device), x1.to(device), wx.to(device).view(1, 1, -1)
        self._buffers: dict[int, torch.Tensor] = {}
        self._whole = None
        if device.type == "cpu" and height + width <= _SMALL_OUTPUT:
            src = source.rows(0, source.height)[None].contiguous()
            self._whole = F.interpolate(src, size=(height, width), mode="bilinear", align_corners=False)[0]

    def _buffer(self, slot: int, shape: tuple[int, ...]) -> torch.Tensor:
        """A reused scratch tensor of ``shape``: fresh 40 MB allocations per tile cost page faults."""
        numel = shape[0] * shape[1] * shape[2]
        buf = self._buffers.get(slot)
        if buf is None or buf.numel() < numel:
            buf = self._buffers[slot] = torch.empty(numel, dtype=torch.float32, device=self.device)
        return buf[:numel].view(shape)

    def rows(self, start: int, stop: int) -> torch.Tensor:
        """Rows [start, stop): valid until the next call (they live in a reused buffer); callers may overwrite them."""
        if self._whole is not None:
            return self._whole[:, start:stop].clone()
        lo, hi = int(self._y0[start]), int(self._y1[stop - 1]) + 1
        band = self.source.rows(lo, hi)
        if band.shape[2] != self.width:  # equal widths: the horizontal pass would copy its input
            c, n = band.shape[:2]
            left = torch.index_select(band, 2, self._x0, out=self._buffer(0, (c, n, self.width)))
            right = torch.index_select(band, 2, self._x1, out=self._buffer(1, (c, n, self.width)))
            band = _lerp(left, right, self._wx)
        shape = (self.channels, stop - start, self.width)
        top = torch.index_select(band, 1, self._dy0[start:stop] - lo, out=self._buffer(2, shape))
        bottom = torch.index_select(band, 1, self._dy1[start:stop] - lo, out=self._buffer(3, shape))
        return _lerp(top, bottom, self._wy[start:stop].view(1, -1, 1))


def _grid(logits: torch.Tensor, size: tuple[int, int], model_size: tuple[int, int] | None) -> _Grid:
    grid: _Grid = _Given(logits.float().contiguous())
    if model_size is not None:
        grid = _Resized(grid, *model_size)
    return _Resized(grid, *size)


def _tiles(height: int, tile_rows: int) -> Iterator[tuple[int, int]]:
    if tile_rows < 1:
        raise ValueError(f"tile_rows must be positive, got {tile_rows}")
    for start in range(0, height, tile_rows):
        yield start, min(height, start + tile_rows)


class _Level:
    """A label grid together with a way to get its logits at any set of points."""

    def __init__(self, labels: torch.Tensor, logits_at: LogitsAt):
        self.labels = labels
        self.logits_at = logits_at

    @classmethod
    def from_logits(cls, logits: torch.Tensor) -> _Level:
        return cls(logits.argmax(0).to(_label_dtype(logits.shape[0])), lambda ys, xs: logits[:, ys, xs])

    def upsample(self, height: int, width: int, out: torch.Tensor | None = None, tile_rows: int = TILE_ROWS) -> _Level:
        """The labels of the logits resized to (height, width), in tiles of ``tile_rows`` rows, into ``out``."""
        h, w = self.labels.shape
        lab = self.labels
        device = lab.device
        fused = device.type == "cuda"
        y0, y1, ly = (t.to(device) for t in _axis(h, height, fused=fused))
        x0, x1, lx = (t.to(device) for t in _axis(w, width, fused=fused))
        # A source cell (i, j) is uniform when it and its +1 neighbours (clamped at the edge) agree.
        down = lab[torch.clamp(torch.arange(h, device=device) + 1, max=h - 1)]
        right = lab[:, torch.clamp(torch.arange(w, device=device) + 1, max=w - 1)]
        diag = down[:, torch.clamp(torch.arange(w, device=device) + 1, max=w - 1)]
        uniform = (lab == down) & (lab == right) & (lab == diag)

        def logits_at(qy: torch.Tensor, qx: torch.Tensor) -> torch.Tensor:
            a0, a1, wy = y0[qy], y1[qy], ly[qy]
            b0, b1, wx = x0[qx], x1[qx], lx[qx]
            top = _lerp(self.logits_at(a0, b0), self.logits_at(a0, b1), wx)
            bottom = _lerp(self.logits_at(a1, b0), self.logits_at(a1, b1), wx)
            return _lerp(top, bottom, wy)

        if out is None:
            out = torch.empty((height, width), dtype=lab.dtype, device=device)
        for start, stop in _tiles(height, tile_rows):
            rows = y0[start:stop]
            # y1 == min(y0 + 1, h - 1), so each output pixel's four sources are exactly its cell (y0, x0).
            block = lab.index_select(0, rows).index_select(1, x0)
            mixed = ~uniform.index_select(0, rows).index_select(1, x0)
            ys, xs = mixed.nonzero(as_tuple=True)
            for i in range(0, ys.numel(), _MIXED_CHUNK):
                cy, cx = ys[i : i + _MIXED_CHUNK], xs[i : i + _MIXED_CHUNK]
                block[cy, cx] = logits_at(cy + start, cx).argmax(0).to(block.dtype)
            out[start:stop] = block
        return _Level(out, logits_at)


def labels(
    logits: torch.Tensor,
    size: tuple[int, int],
    mode: str = "exact",
    model_size: tuple[int, int] | None = None,
    *,
    tile_rows: int = TILE_ROWS,
) -> torch.Tensor:
    """Class ids (H, W), uint8 (int64 past 256 classes), for one image from its logits (C, h, w).

    ``model_size`` is the model input's (height, width) when ``logits`` are the classifier's stride-8
    output (the model's own final upsampling is then applied here); ``None`` when ``logits`` are ``out``.
    Modes: ``exact`` (the reference, evaluated lazily), ``bilinear`` (the reference, literally) and
    ``nearest`` (an approximation: low-resolution argmax, nearest-neighbour upsampling). Full-resolution
    work is done ``tile_rows`` output rows at a time; the result does not depend on it.
    """
    height, width = size
    dtype = _label_dtype(logits.shape[0])
    if mode == "nearest":
        lab = logits.float().argmax(0).to(dtype)[None, None]
        if dtype == torch.long:
            lab = lab.to(torch.float32)
        return F.interpolate(lab, size=size, mode="nearest")[0, 0].to(dtype)
    if mode not in ("exact", "bilinear"):
        raise ValueError(f"unknown upsample mode {mode!r}")
    tiny = height + width <= _SMALL_OUTPUT or (model_size is not None and sum(model_size) <= _SMALL_OUTPUT)
    out = torch.empty((height, width), dtype=dtype, device=logits.device)
    if mode == "bilinear" or tiny:
        grid = _grid(logits, size, model_size)
        for start, stop in _tiles(height, tile_rows):
            out[start:stop] = grid.rows(start, stop).argmax(0)
        return out
    level = _Level.from_logits(logits.float().contiguous())
    if model_size is not None:
        level = level.upsample(*model_size)
    return level.upsample(height, width, out, tile_rows).labels


class Confidence(NamedTuple):
    """One image's labels and confidence, computed together from the literal full-resolution logits."""

    labels: torch.Tensor  # uint8 (H, W) class ids
    confidence: torch.Tensor  # uint8 (H, W): the largest softmax probability x 255, rounded
    mean: float  # mean of the largest softmax probability over the pixels
    low_share: float  # share of pixels whose largest probability is below min_confidence
    counts: torch.Tensor  # int64 (C,): pixels per class id


def _confident_tiles(
    logits: torch.Tensor, size: tuple[int, int], model_size: tuple[int, int] | None, tile_rows: int
) -> Iterator[tuple[int, int, torch.Tensor, torch.Tensor]]:
    """(start, stop, labels, largest softmax probability) per tile of the literally resized logits."""
    grid = _grid(logits, size, model_size)
    for start, stop in _tiles(size[0], tile_rows):
        block = grid.rows(start, stop)
        best, lab = block.max(0)
        # max softmax = exp(0) / sum(exp(l - max)) = 1 / sum(exp(l - max)); in place: no second block
        yield start, stop, lab, block.sub_(best).exp_().sum(0).reciprocal_()


def labels_and_confidence(
    logits: torch.Tensor,
    size: tuple[int, int],
    model_size: tuple[int, int] | None = None,
    *,
    tile_rows: int = TILE_ROWS,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Class ids (H, W; uint8) and confidence (H, W; float32): the argmax and the largest softmax
    probability of the reference's full-resolution logits, computed literally.

    The logits are resized exactly as the reference resizes them (bilinear, ``align_corners=False``, to
    ``model_size`` first when given, then to ``size``), so mask and confidence come from the same
    numbers. Only ``tile_rows`` output rows exist at a time. :func:`confidence` also reduces the float
    map per tile, for callers that need only its uint8 image and statistics.
    """
    height, width = size
    labels_out = torch.empty((height, width), dtype=_label_dtype(logits.shape[0]), device=logits.device)
    conf = torch.empty((height, width), dtype=torch.float32, device=logits.device)
    for start, stop, lab, best in _confident_tiles(logits, size, model_size, tile_rows):
        labels_out[start:stop] = lab
        conf[start:stop] = best
    return labels_out, conf


def confidence(
    logits: torch.Tensor,
    size: tuple[int, int],
    model_size: tuple[int, int] | None,
    min_confidence: float,
    *,
    tile_rows: int = TILE_ROWS,
) -> Confidence:
    """:func:`labels_and_confidence` reduced tile by tile: the uint8 confidence image, its mean, the share
    below ``min_confidence``, and the pixel counts, without a full-resolution float map."""
    height, width = size
    num_classes = logits.shape[0]
    device = logits.device
    labels_out = torch.empty((height, width), dtype=_label_dtype(num_classes), device=device)
    conf8 = torch.empty((height, width), dtype=torch.uint8, device=device)
    total = torch.zeros((), dtype=torch.float64, device=device)
    low = torch.zeros((), dtype=torch.int64, device=device)
    counts = torch.zeros(num_classes, dtype=torch.int64, device=device)
    for start, stop, lab, best in _confident_tiles(logits, size, model_size, tile_rows):
        labels_out[start:stop] = lab
        total += best.sum(dtype=torch.float64)
        low += (best < min_confidence).sum()
        counts += torch.bincount(lab.reshape(-1), minlength=num_classes)
        conf8[start:stop] = best.mul_(255).round_()
    area = max(1, height * width)
    return Confidence(labels_out, conf8, float(total) / area, float(low) / area, counts)


def pixel_counts(label_map: torch.Tensor, num_classes: int) -> torch.Tensor:
    return torch.bincount(label_map.reshape(-1), minlength=num_classes)
