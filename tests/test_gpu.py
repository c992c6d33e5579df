"""The CUDA path (marked `gpu`; CI has no GPU and deselects these, `make test-gpu` runs them on one)."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from segbatch.models import weights
from segbatch.models.architectures import get_architecture
from segbatch.stages import model

from _helpers import TEST_ARCH, agreement, load_model, photo_like, reference_mask

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


def _images(n: int) -> list[bytes]:
    out = []
    for i in range(n):
        buf = io.BytesIO()
        Image.fromarray(photo_like(96 + 8 * (i % 3), 72, i)).save(buf, format="PNG")
        out.append(buf.getvalue())
    return out


def _predict(predictor: model.Predictor, data: bytes) -> np.ndarray:
    from segbatch.stages.decode import Limits, ResizeSpec, decode_image

    image = decode_image(data, Limits(10**8, 10**9, 10**8))
    resized = ResizeSpec.from_transforms(get_architecture(TEST_ARCH).transforms()).apply(image)
    staged = predictor.stage(resized[None])
    assert staged.ready is not None and staged.tensor.device.type == "cuda"  # pinned, async copy
    return predictor.masks(staged, [(image.height, image.width)])[0][0]


@pytest.fixture(scope="module")
def spec(checkpoint):
    return weights.resolve(TEST_ARCH, str(checkpoint))


def test_fp32_on_cuda_matches_the_reference(spec, checkpoint):
    predictor = model.Predictor(spec, precision="fp32", device=torch.device("cuda", 0))
    reference_model = load_model(checkpoint)
    for data in _images(6):
        got = _predict(predictor, data)
        assert agreement(got, reference_mask(data, reference_model)) >= 0.995


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_reduced_precision_agreement_is_measured(spec, precision, capsys):
    fp32 = model.Predictor(spec, precision="fp32", device=torch.device("cuda", 0))
    low = model.Predictor(spec, precision=precision, device=torch.device("cuda", 0))
    scores = [agreement(_predict(low, d), _predict(fp32, d)) for d in _images(6)]
    with capsys.disabled():
        print(f"\n{precision} vs fp32 agreement: min {min(scores):.4f}, mean {np.mean(scores):.4f}")
    assert min(scores) >= 0.9


def test_a_batch_of_equal_shapes_matches_one_at_a_time(spec):
    predictor = model.Predictor(spec, device=torch.device("cuda", 0))
    rng = np.random.default_rng(0)
    batch = rng.integers(0, 255, (4, 520, 693, 3), dtype=np.uint8)
    together = predictor.masks(predictor.stage(batch), [(480, 640)] * 4)
    for i in range(4):
        alone = predictor.masks(predictor.stage(batch[i : i + 1]), [(480, 640)])[0]
        assert agreement(together[i][0], alone[0]) >= 0.999
