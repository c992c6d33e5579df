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
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

LogitsAt = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (ys, xs) -> (C, K) logits
CONFIDENCE_ROWS = 128  # output rows per step of the literal path: holds C x 128 x W float32 logits at once


def _axis(in_size: int, out_size: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Source indices and weight of PyTorch's bilinear resize, ``align_corners=False``, along one axis."""
    scale = torch.tensor(in_size / out_size, dtype=torch.float32)
    dst = torch.arange(out_size, device=device, dtype=torch.float32)
    src = ((dst + 0.5) * scale.to(device) - 0.5).clamp_min(0.0)
    i0 = src.floor().to(torch.long).clamp_max(in_size - 1)
    i1 = (i0 + 1).clamp_max(in_size - 1)
    return i0, i1, (src - i0.to(torch.float32))


class _Level:
    """A label grid together with a way to get its logits at any set of points."""

    def __init__(self, labels: torch.Tensor, logits_at: LogitsAt):
        self.labels = labels
        self.logits_at = logits_at

    @classmethod
    def from_logits(cls, logits: torch.Tensor) -> _Level:
        return cls(logits.argmax(0), lambda ys, xs: logits[:, ys, xs])

    def upsample(self, height: int, width: int) -> _Level:
        h, w = self.labels.shape
        device = self.labels.device
        y0, y1, ly = _axis(h, height, device)
        x0, x1, lx = _axis(w, width, device)
        lab = self.labels
        # A source cell (i, j) is uniform when it and its +1 neighbours (clamped at the edge) agree.
        down = lab[torch.clamp(torch.arange(h, device=device) + 1, max=h - 1)]
        right = lab[:, torch.clamp(torch.arange(w, device=device) + 1, max=w - 1)]
        diag = down[:, torch.clamp(torch.arange(w, device=device) + 1, max=w - 1)]
        uniform = (lab == down) & (lab == right) & (lab == diag)
        # y1 == min(y0 + 1, h - 1), so each output pixel's four sources are exactly its cell (y0, x0).
        out = lab.index_select(0, y0).index_select(1, x0)
        mixed = ~uniform.index_select(0, y0).index_select(1, x0)
        ys, xs = mixed.nonzero(as_tuple=True)

        def logits_at(qy: torch.Tensor, qx: torch.Tensor) -> torch.Tensor:
            a0, a1, wy = y0[qy], y1[qy], ly[qy]
            b0, b1, wx = x0[qx], x1[qx], lx[qx]
            top = self.logits_at(a0, b0) * (1 - wx) + self.logits_at(a0, b1) * wx
            bottom = self.logits_at(a1, b0) * (1 - wx) + self.logits_at(a1, b1) * wx
            return top * (1 - wy) + bottom * wy

        if ys.numel():
            out[ys, xs] = logits_at(ys, xs).argmax(0)
        return _Level(out, logits_at)


def labels(
    logits: torch.Tensor,
    size: tuple[int, int],
    mode: str = "exact",
    model_size: tuple[int, int] | None = None,
) -> torch.Tensor:
    """Class ids (H, W) for one image from its logits (C, h, w).

    ``model_size`` is the model input's (height, width) when ``logits`` are the classifier's stride-8
    output (the model's own final upsampling is then applied here); ``None`` when ``logits`` are ``out``.
    Modes: ``exact`` (the reference, evaluated lazily), ``bilinear`` (the reference, literally) and
    ``nearest`` (an approximation: low-resolution argmax, nearest-neighbour upsampling).
    """
    logits = logits.float()
    if mode == "nearest":
        lab = logits.argmax(0)[None, None].to(torch.float32)
        return F.interpolate(lab, size=size, mode="nearest")[0, 0].to(torch.long)
    if mode == "bilinear":
        if model_size is not None:
            logits = F.interpolate(logits[None], size=model_size, mode="bilinear", align_corners=False)[0]
        up = F.interpolate(logits[None], size=size, mode="bilinear", align_corners=False)[0]
        return up.argmax(0)
    if mode != "exact":
        raise ValueError(f"unknown upsample mode {mode!r}")
    level = _Level.from_logits(logits)
    if model_size is not None:
        level = level.upsample(*model_size)
    return level.upsample(*size).labels


def labels_and_confidence(
    logits: torch.Tensor, size: tuple[int, int], model_size: tuple[int, int] | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Class ids (H, W) and confidence (H, W): the argmax and the largest softmax probability of the
    reference's full-resolution logits, computed literally.

    The logits are resized exactly as the reference resizes them (bilinear, ``align_corners=False``, to
    ``model_size`` first when given, then to ``size``), so mask and confidence come from the same
    numbers. Only :data:`CONFIDENCE_ROWS` output rows exist at a time: the horizontal pass is
    ``F.interpolate`` on the source rows a block needs, the vertical pass mixes them with the weights
    ``F.interpolate`` uses.
    """
    logits = logits.float()
    if model_size is not None:
        logits = F.interpolate(logits[None], size=model_size, mode="bilinear", align_corners=False)[0]
    channels, in_h, _in_w = logits.shape
    height, width = size
    y0, y1, ly = _axis(in_h, height, logits.device)
    labels_out = torch.empty((height, width), dtype=torch.long, device=logits.device)
    confidence = torch.empty((height, width), dtype=torch.float32, device=logits.device)
    for start in range(0, height, CONFIDENCE_ROWS):
        rows = slice(start, min(height, start + CONFIDENCE_ROWS))
        lo, hi = int(y0[rows].min()), int(y1[rows].max()) + 1
        # Horizontal pass only: equal heights make F.interpolate copy rows unchanged.
        band = F.interpolate(logits[None, :, lo:hi], size=(hi - lo, width), mode="bilinear", align_corners=False)[0]
        top, bottom, weight = band[:, y0[rows] - lo], band[:, y1[rows] - lo], ly[rows].view(1, -1, 1)
        block = top * (1 - weight) + bottom * weight
        best, labels_out[rows] = torch.softmax(block, dim=0).max(0)
        confidence[rows] = best
    return labels_out, confidence


def pixel_counts(label_map: torch.Tensor, num_classes: int) -> torch.Tensor:
    return torch.bincount(label_map.reshape(-1), minlength=num_classes)
