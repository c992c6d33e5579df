"""Postprocessing gives exactly the labels of the literal reference computation (F.interpolate, then
argmax), in row tiles of any size, in every mode; a 12 MP photo stays within a bounded memory."""

import json
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F

from segbatch.stages import postprocess


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
    assert got.shape == (H, W) and got.dtype == torch.uint8
    assert torch.equal(got.long(), reference)


def test_exact_two_stage_matches_model_then_resize():
    """Model-internal upsampling (stride 8 -> input) then the resize to the displayed size."""
    low = smooth_logits(21, 65, 87, seed=3)
    out = F.interpolate(low[None], size=(520, 693), mode="bilinear", align_corners=False)
    reference = F.interpolate(out, size=(480, 640), mode="bilinear", align_corners=False)[0].argmax(0)
    got = postprocess.labels(low, (480, 640), "exact", model_size=(520, 693))
    bilinear = postprocess.labels(low, (480, 640), "bilinear", model_size=(520, 693))
    assert torch.equal(bilinear.long(), reference)
    assert torch.equal(got.long(), reference)


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
    assert torch.allclose(confidence, probs.max(0).values, atol=1e-6)
    assert torch.equal(labels.long(), full.argmax(0))
    assert ((confidence > 0) & (confidence <= 1)).all()


def reference(logits, size, model_size=None):
    """docs/output-contract.md, literally: the whole image at once."""
    full = logits[None]
    if model_size is not None:
        full = F.interpolate(full, size=model_size, mode="bilinear", align_corners=False)
    return F.interpolate(full, size=size, mode="bilinear", align_corners=False)[0]


TILE = 8  # the tile size of the edge cases below
EDGE_CASES = [
    # (h, w, H, W, model_size): heights a multiple of the tile, one more, one less, one row, a single tile,
    # outputs smaller than the logits, odd sizes, with and without the model's own upsampling
    (13, 17, 4 * TILE, 150, None),
    (13, 17, 4 * TILE + 1, 150, None),
    (13, 17, 4 * TILE - 1, 150, None),
    (13, 17, 1, 150, None),
    (13, 17, TILE, 151, None),
    (65, 87, 40, 130, None),  # smaller than the logits
    (65, 87, 3, 200, (520, 693)),
    (9, 11, 97, 131, (72, 88)),
    (9, 11, 2 * TILE + 1, 301, (72, 88)),
    (40, 40, 20, 20, None),  # tiny: PyTorch's channels-last kernel, H + W <= 128
    (1, 1, 5, 5, None),
    (7, 9, 1, 1, None),
]


@pytest.mark.parametrize("h,w,H,W,model_size", EDGE_CASES)
# One-row tiles cost a Python loop per output row (about half of this test's time): `make test` runs them,
# the fast tier covers tiles that do not divide the height with TILE - 1.
@pytest.mark.parametrize("tile_rows", [pytest.param(1, marks=pytest.mark.slow), TILE - 1, TILE, 128, 10**6])
def test_tiles_give_the_reference_labels_in_every_mode(h, w, H, W, model_size, tile_rows):
    logits = smooth_logits(21, h, w, seed=h * 1000 + W)
    full = reference(logits, (H, W), model_size)
    expected = full.argmax(0)
    for mode in ("exact", "bilinear"):
        got = postprocess.labels(logits, (H, W), mode, model_size, tile_rows=tile_rows)
        assert got.dtype == torch.uint8 and torch.equal(got.long(), expected), mode
    labels, confidence = postprocess.labels_and_confidence(logits, (H, W), model_size, tile_rows=tile_rows)
    probs = torch.softmax(full, dim=0).max(0).values
    assert torch.equal(labels.long(), expected)
    assert torch.allclose(confidence, probs, atol=1e-6)
    stats = postprocess.confidence(logits, (H, W), model_size, 0.5, tile_rows=tile_rows)
    assert torch.equal(stats.labels, labels)
    assert torch.equal(stats.confidence, probs.mul(255).round().to(torch.uint8))
    assert stats.mean == pytest.approx(float(probs.double().mean()), abs=1e-6)
    assert stats.low_share == pytest.approx(float((probs < 0.5).double().mean()))
    assert torch.equal(stats.counts, torch.bincount(expected.reshape(-1), minlength=21))


def test_noise_logits_many_boundaries_still_exact():
    """Every source cell a boundary: the exact mode interpolates nearly every pixel, in chunks."""
    logits = torch.randn(21, 30, 40, generator=torch.Generator().manual_seed(7))
    for tile_rows in (5, 128):
        got = postprocess.labels(logits, (241, 322), "exact", tile_rows=tile_rows)
        assert torch.equal(got.long(), reference(logits, (241, 322)).argmax(0))


# The deeplabv3_mobilenet_v3_large head on a 4000x3000 photo: model input 693x520, stride-8 logits 87x65.
PHOTO, MODEL, HEAD = (3000, 4000), (520, 693), (65, 87)


@pytest.mark.slow  # the untiled reference alone holds ~1 GB and takes a minute on 2 cores
def test_12mp_photo_gives_the_reference_labels():
    logits = smooth_logits(21, *HEAD, seed=12)
    expected = reference(logits, PHOTO, MODEL).argmax(0)
    for mode in ("exact", "bilinear"):
        got = postprocess.labels(logits, PHOTO, mode, MODEL)
        assert torch.equal(got.long(), expected), mode
    assert torch.equal(postprocess.confidence(logits, PHOTO, MODEL, 0.5).labels.long(), expected)


_RSS_SCRIPT = textwrap.dedent(
    """
    import json, resource, sys
    import torch, torch.nn.functional as F
    from segbatch.stages import postprocess
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    low = F.interpolate(torch.randn(1, 21, 11, 15, generator=g) * 4, size=(65, 87), mode="bilinear")[0]
    out = F.interpolate(low[None], size=(520, 693), mode="bilinear")[0]  # the model's `out`, for bilinear
    postprocess.labels(low, (40, 50), "exact", (520, 693))  # warm up torch's own allocations
    peak = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    base = peak()
    step = {}
    with torch.inference_mode():
        for name, call in [
            ("exact", lambda: postprocess.labels(low, (3000, 4000), "exact", (520, 693))),
            ("bilinear", lambda: postprocess.labels(out, (3000, 4000), "bilinear")),
            ("confidence", lambda: postprocess.confidence(low, (3000, 4000), (520, 693), 0.5)),
        ]:
            call()
            step[name] = peak() - base
    print(json.dumps(step))
    """
)


@pytest.mark.slow
def test_12mp_photo_postprocess_stays_within_bounded_memory():
    """Peak RSS growth of a fresh process over its warm-up, per path, for one 12 MP photo. Untiled, the
    bilinear path alone holds 21 x 3000 x 4000 float32 = 961 MiB (twice that with its argmax input
    copy); tiled, every path keeps to its outputs (uint8 maps: 11 MiB each) and a few C x 128 x 4000 blocks
    (41 MiB each)."""
    proc = subprocess.run([sys.executable, "-c", _RSS_SCRIPT], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    growth = json.loads(proc.stdout.strip().splitlines()[-1])
    assert set(growth) == {"exact", "bilinear", "confidence"}
    assert max(growth.values()) < 400, growth
