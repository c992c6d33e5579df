"""Full forward passes on interleaved sizes, end to end on the local Ray: counts, fidelity, the run record."""

from __future__ import annotations

import collections
import json

import numpy as np
import pytest
from PIL import Image

from segbatch import RunConfig, run

from _helpers import TEST_ARCH, agreement, load_model, photo_like, reference_mask

# Six sizes interleaved in listing order; the weights' 520-px resize maps them to four model shapes.
SIZES = [(64, 48), (48, 64), (80, 60), (60, 80), (50, 50), (96, 54)]
SHAPE_OF = {
    (64, 48): "693x520",
    (48, 64): "520x693",
    (80, 60): "693x520",
    (60, 80): "520x693",
    (50, 50): "520x520",
    (96, 54): "924x520",
}
COUNT = 30
BATCH = 4


@pytest.fixture(scope="module")
def interleaved(tmp_path_factory, ray_local, checkpoint):
    root = tmp_path_factory.mktemp("interleaved")
    (root / "in").mkdir()
    sizes = {}
    for i in range(COUNT):
        size = SIZES[i % len(SIZES)]
        rel = f"img{i:03d}.png"
        Image.fromarray(photo_like(*size, seed=100 + i)).save(root / "in" / rel)
        sizes[rel] = size
    (root / "in" / "broken.jpg").write_bytes(b"not a jpeg")  # an error row passes through the batcher
    config = RunConfig(
        input=str(root / "in"),
        output=str(root / "out"),
        model=TEST_ARCH,
        weights=str(checkpoint),
        batch_size=BATCH,
        progress=False,
    )
    return root, sizes, run(config)


def test_passes_are_full_and_every_image_is_labelled_once(interleaved):
    root, sizes, report = interleaved
    assert (report.ok, report.errors) == (COUNT, 1)
    per_shape = collections.Counter(SHAPE_OF[s] for s in sizes.values())
    fewest = sum(-(-n // BATCH) for n in per_shape.values())  # one partial pass per shape at most
    assert report.forward_passes == fewest
    assert report.images_per_forward_pass == pytest.approx(COUNT / fewest)
    assert f"forward passes: {fewest} ({COUNT / fewest:.1f} images per pass)" in str(report)
    masks = sorted(p.name for p in (root / "out" / "masks").iterdir())
    assert masks == sorted(rel + ".png" for rel in sizes)


def test_masks_of_full_passes_match_the_reference(interleaved, checkpoint):
    root, sizes, _report = interleaved
    model = load_model(checkpoint)
    for rel in list(sizes)[: len(SIZES) * 2]:
        expected = reference_mask((root / "in" / rel).read_bytes(), model)
        got = np.asarray(Image.open(root / "out" / "masks" / (rel + ".png")))
        assert agreement(got, expected) >= 0.995, rel


def test_the_run_record_counts_forward_passes(interleaved):
    root, _sizes, report = interleaved
    record = json.loads((root / "out" / "runs" / f"{report.run_id}.json").read_text())
    assert record["forward_passes"] == report.forward_passes
    assert record["images_per_forward_pass"] == round(report.images_per_forward_pass, 2)
