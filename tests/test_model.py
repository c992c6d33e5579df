"""Weights resolution: registry, state_dict files, pins, class names."""

import hashlib

import pytest
import torch

from _helpers import TEST_ARCH, make_checkpoint
from segbatch import model


def test_unknown_model_lists_the_valid_ones():
    from segbatch.config import ConfigError

    with pytest.raises(ConfigError) as err:  # a bad setting (exit 2), not unusable weights
        model.resolve("fcn_resnet50", "random")
    assert all(name in str(err.value) for name in model.MODELS)


def test_random_weights_warn_and_use_the_weights_categories(caplog):
    spec = model.resolve(TEST_ARCH, "random")
    assert spec.identity == "random:seed=0" and spec.num_classes == 21
    assert "UNTRAINED" in caplog.text


def test_checkpoint_identity_is_its_sha256_and_aux_keys_are_accepted(tmp_path):
    path = make_checkpoint(tmp_path / "aux.pt", with_aux=True, num_classes=5)
    spec = model.resolve(TEST_ARCH, str(path))
    assert spec.identity == hashlib.sha256(path.read_bytes()).hexdigest()
    assert spec.classes == tuple(f"class_{i}" for i in range(5))
    net = model.build(spec)
    assert net.aux_classifier is None
    with torch.inference_mode():
        assert net(torch.zeros(1, 3, 64, 64))["out"].shape == (1, 5, 64, 64)


def test_classes_file_names_the_classes(tmp_path):
    path = make_checkpoint(tmp_path / "three.pt", num_classes=3)
    names = tmp_path / "names.txt"
    names.write_text("sky\nroad\ncar\n")
    assert model.resolve(TEST_ARCH, str(path), classes_url=str(names)).classes == ("sky", "road", "car")
    names.write_text("sky\nroad\n")
    with pytest.raises(model.WeightsError, match="2 classes"):
        model.resolve(TEST_ARCH, str(path), classes_url=str(names))


def test_sha256_pin_mismatch_is_refused(tmp_path):
    path = make_checkpoint(tmp_path / "w.pt", num_classes=2)
    with pytest.raises(model.WeightsError, match="not the pinned"):
        model.resolve(TEST_ARCH, str(path), sha256="0" * 64)
    good = hashlib.sha256(path.read_bytes()).hexdigest()
    assert model.resolve(TEST_ARCH, str(path), sha256=good).identity == good


def test_wrong_file_and_missing_file_are_clear(tmp_path):
    bad = tmp_path / "notweights.pt"
    torch.save({"foo": torch.zeros(1)}, bad)
    with pytest.raises(model.WeightsError, match="not a DeepLabV3 state_dict"):
        model.resolve(TEST_ARCH, str(bad))
    with pytest.raises(model.WeightsError, match="does not exist"):
        model.resolve(TEST_ARCH, str(tmp_path / "missing.pt"))


def test_pickled_objects_are_refused(tmp_path):
    """weights_only=True: a checkpoint that needs arbitrary unpickling is not loaded."""
    evil = tmp_path / "evil.pt"
    torch.save({"classifier.4.weight": torch.zeros(2, 256, 1, 1), "x": object()}, evil)
    with pytest.raises(model.WeightsError, match="not a loadable state_dict"):
        model.resolve(TEST_ARCH, str(evil))


def test_default_weights_say_how_to_proceed_offline(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))  # an empty hub cache

    def offline(url, dst, progress=False):
        raise OSError(f"network is unreachable: {url}")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)  # as on this machine, on any machine
    with pytest.raises(model.WeightsError, match="--weights random"):
        model.resolve(TEST_ARCH, "default")
