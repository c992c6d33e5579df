"""Seeded, BatchNorm-calibrated weights: an untrained model whose masks still follow image content.

Freshly initialised BatchNorm statistics (mean 0, var 1) flatten the features, and such a model labels
most images with one class (``--weights random`` paints every pixel "sofa"). Calibrating the running
statistics on a few structured images makes the logits depend on content, so the masks show edges and
regions. The labels still mean nothing. ``make demo`` falls back to these weights where torchvision's
pretrained ones cannot be downloaded; the tests use them as a content-sensitive model.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from segbatch.models.architectures import get_architecture, import_torchvision

SEED = 1234  # the seed of make_checkpoint's model and calibration images


def make_checkpoint(
    path: Path | str,
    arch: str = "deeplabv3_mobilenet_v3_large",
    num_classes: int = 21,
    seed: int = SEED,
    with_aux: bool = False,
) -> Path:
    """Write the state_dict of a seeded, BatchNorm-calibrated, untrained ``arch`` to ``path``."""
    import torch

    torch.manual_seed(seed)
    aux = {"aux_loss": with_aux} if get_architecture(arch).has_aux else {}
    model = import_torchvision().models.get_model_builder(arch)(
        weights=None, weights_backbone=None, num_classes=num_classes, **aux
    )
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.momentum = None  # cumulative average over the calibration batches
    model.train()
    rng = np.random.default_rng(seed)
    with torch.no_grad():
        for _ in range(3):
            x = torch.from_numpy(structured_images(rng, 2, 96, 128)).float()
            model(x)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    torch.save(model.state_dict(), tmp)
    os.replace(tmp, path)  # whole or not at all: a second demo may read it
    return path


def structured_images(rng: np.random.Generator, n: int, h: int, w: int) -> np.ndarray:
    """Normalised images with blobs and edges rather than white noise."""
    yy, xx = np.mgrid[0:h, 0:w]
    out = np.empty((n, 3, h, w), dtype=np.float32)
    for i in range(n):
        for c in range(3):
            cx, cy, r = rng.uniform(0, w), rng.uniform(0, h), rng.uniform(10, 40)
            out[i, c] = ((xx - cx) ** 2 + (yy - cy) ** 2 < r * r) * 2.0 - 1.0 + rng.normal(0, 0.3, (h, w))
    return out


def cached_checkpoint(arch: str) -> Path:
    """The seeded checkpoint of ``arch`` in segbatch's cache ($XDG_CACHE_HOME/segbatch, else
    ~/.cache/segbatch), built on first use."""
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "segbatch"
    path = cache / f"{arch}-seeded-bn-calibrated-seed{SEED}.pt"
    if not path.exists():
        make_checkpoint(path, arch)
    return path


__all__ = ["SEED", "cached_checkpoint", "make_checkpoint", "structured_images"]
