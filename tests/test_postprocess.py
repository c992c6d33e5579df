"""The lazy exact upsampling gives the labels of the literal reference computation."""

import pytest
import torch
import torch.nn.functional as F

from segbatch import postprocess


def smooth_logits(c: int, h: int, w: int, seed: int) -> torch.Tensor:
    """Spatially smooth random logits, like a segmentation head's: regions with boundaries."""
    g = torch.Generator().manual_seed(seed)
    low = torch.randn(1, c, max(2, h // 6), max(2, w // 6), generator=g) * 4
    return F.interpolate(low, size=(h, w), mode="bilinear", align_corners=False)[0]


@pytest.mark.parametrize(
    "h,w,H,W", [(65, 87, 480, 640), (33, 25, 97, 131), (7, 9, 1, 1), (10, 10, 3, 300), (40, 40, 20, 20), (1, 1, 5, 5)]
)
def test_exact_matches_literal_bilinear(h, w, H, W):
    logits = smooth_logits(21, h, w, seed=h * w)
    reference = F.interpolate(logits[None], size=(H, W), mode="bilinear", align_corners=False)[0].argmax(0)
    got = postprocess.labels(logits, (H, W), "exact")
    assert got.shape == (H, W)
    assert (got == reference).float().mean().item() >= 0.9999


def test_exact_two_stage_matches_model_then_resize():
    """Model-internal upsampling (stride 8 -> input) then the resize to the displayed size."""
    low = smooth_logits(21, 65, 87, seed=3)
    out = F.interpolate(low[None], size=(520, 693), mode="bilinear", align_corners=False)
    reference = F.interpolate(out, size=(480, 640), mode="bilinear", align_corners=False)[0].argmax(0)
    got = postprocess.labels(low, (480, 640), "exact", model_size=(520, 693))
    bilinear = postprocess.labels(low, (480, 640), "bilinear", model_size=(520, 693))
    assert (bilinear == reference).all()
    assert (got == reference).float().mean().item() >= 0.9999


def test_nearest_is_an_approximation_that_mostly_agrees():
    low = smooth_logits(21, 65, 87, seed=5)
    reference = postprocess.labels(low, (480, 640), "bilinear", model_size=(520, 693))
    approx = postprocess.labels(low, (480, 640), "nearest", model_size=(520, 693))
    agree = (approx == reference).float().mean().item()
    assert 0.8 < agree < 1.0


def test_pixel_counts_sum_to_the_area():
    lab = postprocess.labels(smooth_logits(5, 20, 30, 1), (41, 59))
    counts = postprocess.pixel_counts(lab, 5)
    assert counts.shape == (5,) and int(counts.sum()) == 41 * 59


@pytest.mark.parametrize(
    "h,w,H,W,model_size",
    [(65, 87, 300, 400, (520, 693)), (33, 25, 97, 131, None), (7, 9, 1, 1, None), (10, 10, 3, 300, (80, 80))],
)
def test_confidence_is_the_literal_softmax_of_the_reference_logits(h, w, H, W, model_size):
    """Labels and confidence from the same literally upsampled logits, in row blocks (several here)."""
    logits = smooth_logits(21, h, w, seed=h + w)
    full = logits[None]
    if model_size is not None:
        full = F.interpolate(full, size=model_size, mode="bilinear", align_corners=False)
    full = F.interpolate(full, size=(H, W), mode="bilinear", align_corners=False)[0]
    probs = torch.softmax(full, dim=0)
    labels, confidence = postprocess.labels_and_confidence(logits, (H, W), model_size)
    assert torch.allclose(confidence, probs.max(0).values, atol=1e-5)
    assert (labels == full.argmax(0)).float().mean().item() >= 0.9999
    assert ((confidence > 0) & (confidence <= 1)).all()
