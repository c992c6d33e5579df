"""The one registry kind behind --model, --writers, --format and the input kinds."""

import pytest

from segbatch._internal.registry import Registry
from segbatch.errors import ConfigError


def test_register_get_and_names_keep_registration_order():
    reg: Registry[int] = Registry("colour", "colours")
    reg.register("red", 1)
    reg.register("green")(2)
    assert reg.get("red") == 1 and reg.get("green") == 2
    assert reg.names() == ["red", "green"] and "red" in reg and len(reg) == 2


def test_a_class_registers_under_its_name_as_a_decorator():
    reg: Registry[type] = Registry("writer", "writers")

    @reg.register
    class Thing:
        name = "thing"

    assert reg.get("thing") is Thing


def test_a_name_registered_twice_is_refused():
    reg: Registry[int] = Registry("model", "model")
    reg.register("a", 1)
    with pytest.raises(ValueError, match="model 'a' is already registered"):
        reg.register("a", 2)
    assert reg.get("a") == 1


def test_an_unknown_name_is_a_config_error_listing_the_valid_ones():
    reg: Registry[int] = Registry("export format", "format")
    reg.register("coco", 1)
    reg.register("cvat", 2)
    with pytest.raises(ConfigError) as err:
        reg.get("yolo")
    assert err.value.field == "format"
    assert str(err.value) == "format: unknown export format 'yolo' (valid export formats: coco, cvat)"
    models: Registry[int] = Registry("model", "model")
    with pytest.raises(ConfigError, match=r"^model: unknown 'foo' \(valid models: \)$"):
        models.get("foo")


@pytest.mark.parametrize(
    ("module", "registry", "names"),
    [
        ("segbatch.models.architectures", "MODELS", {"deeplabv3_resnet101", "lraspp_mobilenet_v3_large"}),
        ("segbatch.stages.writers", "WRITERS", {"mask", "overlay", "confidence"}),
        ("segbatch.commands.export", "EXPORTERS", {"coco", "cvat", "label-studio"}),
        ("segbatch.stages.inputs", "INPUT_KINDS", {"listed", "manifest"}),
    ],
)
def test_every_choice_by_name_is_a_registry(module, registry, names):
    import importlib

    from segbatch.stages import inputs

    for kind_module in inputs.KIND_MODULES:
        importlib.import_module(kind_module)
    reg = getattr(importlib.import_module(module), registry)
    assert isinstance(reg, Registry) and names <= set(reg.names())
    with pytest.raises(ConfigError, match="valid"):
        reg.get("no-such-name")
