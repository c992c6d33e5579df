"""Weights resolution: registry, state_dict files, pins, class names."""

import hashlib

import pytest
import torch

from segbatch.errors import ConfigError, WeightsError
from segbatch.models import weights
from segbatch.models.architectures import available_models
from segbatch.stages import model

from _helpers import TEST_ARCH, make_checkpoint


@pytest.fixture(scope="module")
def three_class_checkpoints(tmp_path_factory):
    """Seeded 3-class checkpoints by architecture, each built once for the module (a build costs seconds)."""
    folder = tmp_path_factory.mktemp("three-class")
    built: dict[str, str] = {}

    def get(arch: str) -> str:
        if arch not in built:
            built[arch] = str(make_checkpoint(folder / f"{arch}.pt", arch=arch, num_classes=3))
        return built[arch]

    return get


def test_unknown_model_lists_the_valid_ones():
    with pytest.raises(ConfigError) as err:
        weights.resolve("foo", "random")
    assert err.value.field == "model"
    assert all(name in str(err.value) for name in available_models())


def test_random_weights_warn_and_use_the_weights_categories(caplog):
    spec = weights.resolve(TEST_ARCH, "random")
    assert spec.identity == "random:seed=0" and spec.num_classes == 21
    assert "UNTRAINED" in caplog.text


def test_checkpoint_identity_is_its_sha256_and_aux_keys_are_accepted(tmp_path):
    path = make_checkpoint(tmp_path / "aux.pt", with_aux=True, num_classes=5)
    spec = weights.resolve(TEST_ARCH, str(path))
    assert spec.identity == hashlib.sha256(path.read_bytes()).hexdigest()
    assert spec.classes == tuple(f"class_{i}" for i in range(5))
    net = model.build(spec)
    assert net.aux_classifier is None
    with torch.inference_mode():
        assert net(torch.zeros(1, 3, 64, 64))["out"].shape == (1, 5, 64, 64)


def test_classes_file_names_the_classes(tmp_path, checkpoint):
    path = checkpoint  # 21 classes
    names = tmp_path / "names.txt"
    wanted = tuple(f"name{i}" for i in range(21))
    names.write_text("\n".join(wanted) + "\n")
    assert weights.resolve(TEST_ARCH, str(path), classes_url=str(names)).classes == wanted
    names.write_text("sky\nroad\n")
    with pytest.raises(WeightsError, match="2 classes"):
        weights.resolve(TEST_ARCH, str(path), classes_url=str(names))


def test_sha256_pin_mismatch_is_refused(checkpoint):
    path = checkpoint
    with pytest.raises(WeightsError, match="not the pinned"):
        weights.resolve(TEST_ARCH, str(path), sha256="0" * 64)
    good = hashlib.sha256(path.read_bytes()).hexdigest()
    assert weights.resolve(TEST_ARCH, str(path), sha256=good).identity == good


def test_wrong_file_and_missing_file_are_clear(tmp_path):
    bad = tmp_path / "notweights.pt"
    torch.save({"foo": torch.zeros(1)}, bad)
    with pytest.raises(WeightsError, match=f"not a {TEST_ARCH} state_dict"):
        weights.resolve(TEST_ARCH, str(bad))
    with pytest.raises(WeightsError, match="does not exist"):
        weights.resolve(TEST_ARCH, str(tmp_path / "missing.pt"))


def test_pickled_objects_are_refused(tmp_path):
    """weights_only=True: a checkpoint that needs arbitrary unpickling is not loaded."""
    evil = tmp_path / "evil.pt"
    torch.save({"classifier.4.weight": torch.zeros(2, 256, 1, 1), "x": object()}, evil)
    with pytest.raises(WeightsError, match="not a loadable state_dict"):
        weights.resolve(TEST_ARCH, str(evil))


def test_default_weights_say_how_to_proceed_offline(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))  # an empty hub cache

    def offline(url, dst, progress=False):
        raise OSError(f"network is unreachable: {url}")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)  # as on this machine, on any machine
    with pytest.raises(WeightsError, match="--weights random"):
        weights.resolve(TEST_ARCH, "default")


# ---------------------------------------------------------------------------------------------------
# Every registered architecture meets the fidelity contract; a new model is tested by being registered.
# ---------------------------------------------------------------------------------------------------
REFERENCE_SIZES = [(64, 48), (64, 48), (48, 70)]  # two of one shape share a forward pass; one odd shape


@pytest.fixture(scope="module")
def reference_images():
    import io

    from PIL import Image

    from _helpers import photo_like

    out = []
    for i, (w, h) in enumerate(REFERENCE_SIZES):
        buf = io.BytesIO()
        Image.fromarray(photo_like(w, h, 40 + i)).save(buf, format="PNG")
        out.append(buf.getvalue())
    return out


@pytest.mark.slow
@pytest.mark.parametrize("arch", available_models())
def test_registered_architecture_meets_the_reference(arch, tmp_path, reference_images):
    """The inference path segbatch's actors run (Predictor: the weights' resize, batched forward of
    equal shapes, low-resolution logits, fused upsampling and argmax) agrees with the literal reference
    on every image, for each model in the registry, with a seeded content-sensitive checkpoint."""
    import numpy as np

    from segbatch.stages.decode import Limits, ResizeSpec, decode_image

    from _helpers import agreement, load_model, reference_mask

    path = make_checkpoint(tmp_path / f"{arch}.pt", arch=arch, num_classes=6, with_aux=True)
    spec = weights.resolve(arch, str(path))
    assert spec.num_classes == 6
    predictor = model.Predictor(spec, device=torch.device("cpu"))
    resize = ResizeSpec.from_transforms(spec.architecture.transforms())
    images = [decode_image(data, Limits(10**8, 10**9, 10**8)) for data in reference_images]
    resized = [resize.apply(image) for image in images]
    got = predictor.masks(torch.from_numpy(np.stack(resized[:2])), [(im.height, im.width) for im in images[:2]])
    got += predictor.masks(torch.from_numpy(resized[2][None]), [(images[2].height, images[2].width)])
    reference_model = load_model(path, arch)
    scores = [
        agreement(mask, reference_mask(data, reference_model, arch)) for (mask, *_), data in zip(got, reference_images)
    ]
    assert min(scores) >= 0.995, scores
    for (mask, counts, *_), image in zip(got, images):
        assert mask.shape == (image.height, image.width)
        assert counts.sum() == image.width * image.height
        assert len(np.unique(mask)) > 1, "a one-class mask would make agreement meaningless"


@pytest.mark.parametrize("arch", available_models())
def test_checkpoint_for_another_architecture_is_refused(arch, three_class_checkpoints, checkpoint):
    """A state_dict is loaded strictly into the architecture (on the meta device) before any actor."""
    path = three_class_checkpoints("lraspp_mobilenet_v3_large") if arch != "lraspp_mobilenet_v3_large" else checkpoint
    with pytest.raises(WeightsError):
        weights.resolve(arch, str(path))


def test_wrong_shaped_or_head_only_checkpoint_is_refused(tmp_path, checkpoint):
    state = torch.load(checkpoint, weights_only=True)
    name = next(k for k, v in state.items() if v.ndim == 4 and not k.startswith("classifier"))
    bad = dict(state, **{name: torch.zeros(1, 1, 1, 1)})
    torch.save(bad, tmp_path / "shape.pt")
    with pytest.raises(WeightsError, match="does not fit"):
        weights.resolve(TEST_ARCH, str(tmp_path / "shape.pt"))
    torch.save({k: v for k, v in state.items() if k.startswith("classifier.")}, tmp_path / "head.pt")
    with pytest.raises(WeightsError, match="Missing key"):
        weights.resolve(TEST_ARCH, str(tmp_path / "head.pt"))


def test_classes_file_must_match_the_default_weights(tmp_path):
    names = tmp_path / "names.txt"
    names.write_text("a\nb\nc\nd\ne\n")
    with pytest.raises(WeightsError, match="5 classes; the model has 21"):
        weights.resolve(TEST_ARCH, "random", classes_url=str(names))


@pytest.mark.parametrize("arch", available_models())
def test_the_registry_knows_what_the_driver_needs_without_torch(arch):
    """Class names, resize and DEFAULT weights' name and URL, kept by segbatch so the driver skips torch."""
    from torchvision.models import get_model_weights
    from torchvision.transforms.functional import pil_modes_mapping

    from segbatch.models.architectures import get_architecture

    architecture = get_architecture(arch)
    default = get_model_weights(arch).DEFAULT
    transforms = default.transforms()
    assert architecture.categories() == tuple(default.meta["categories"])
    assert architecture.default_weights == str(default) and architecture.default_url == default.url
    resize = architecture.resize()
    assert list(resize.size) == list(transforms.resize_size)
    assert resize.resample == pil_modes_mapping[transforms.interpolation]


def test_a_random_weights_driver_does_not_import_torch():
    import subprocess
    import sys

    code = (
        "import sys; from segbatch import pipeline; from segbatch.models import weights; "
        "weights.resolve('deeplabv3_mobilenet_v3_large', 'random').architecture.resize(); "
        "print(sorted(m for m in ('torch', 'torchvision') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip().splitlines()[-1] == "[]"


_DEFERRED_DYNAMO = """
import sys
import torch
from segbatch.models.architectures import get_architecture, import_torchvision
from segbatch.models import weights
from segbatch.stages.model import Predictor
import numpy as np

import_torchvision()
assert "torch._dynamo" not in sys.modules, "torchvision's import brought torch's compiler with it"
assert "torch._dynamo.utils" not in sys.modules, "the stand-in outlived the import"
predictor = Predictor(weights.resolve("lraspp_mobilenet_v3_large", "random"), threads=1)
(labelled,) = predictor.masks(predictor.stage(np.zeros((1, 64, 80, 3), np.uint8)), [(48, 60)])
assert labelled.mask.shape == (48, 60)
assert "torch._dynamo" not in sys.modules, "a forward pass brought torch's compiler"

import torchvision.ops
boxes = torch.tensor([[0, 0.0, 0.0, 4.0, 4.0]])
assert torchvision.ops.roi_align(torch.ones(1, 2, 8, 8), boxes, (2, 2)).shape == (1, 2, 2, 2)
module = sys.modules["torchvision.ops.roi_align"]
assert module.is_compile_supported("cpu") in (True, False)  # the deferred name reaches the real helper
import torch._dynamo.utils as real
assert type(real).__name__ == "module" and hasattr(real, "is_compile_supported")
assert torch.compile(lambda a: a * 2, backend="eager")(torch.ones(2)).tolist() == [2.0, 2.0]
print("ok")
"""


def test_torchvision_is_imported_without_torchs_compiler_which_still_works_afterwards():
    """import_torchvision leaves torch._dynamo unimported (0.9 s of each actor's start on 2 cores), models
    build and run without it, and whatever asks for it later (roi_align's helper, torch.compile) gets the
    real module."""
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", _DEFERRED_DYNAMO], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().splitlines()[-1] == "ok"
