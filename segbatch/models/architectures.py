"""The model registry: which torchvision segmentation models segbatch runs, and how to drive each.

An :class:`Architecture` is a small adapter around one torchvision builder. Everything else comes from
torchvision itself (imported on first use: the registry's names cost no torch import): the weights enum carries the preprocessing (``weights.transforms()``) and the class
names (``weights.meta["categories"]``). Each entry also carries what the driver needs without torch: its
resize, its class names and the GPU memory one image takes (segbatch._internal.resources sizes GPU
batches from it). Adding a model is one ``MODELS.register(...)`` call at the end of this module, and the
tests that are parametrised over :func:`available_models` then cover it.
"""

from __future__ import annotations

import importlib
import sys
import types
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from segbatch._internal.registry import Registry
from segbatch.errors import WeightsError

if TYPE_CHECKING:
    import torch

__all__ = ["MODELS", "Architecture", "available_models", "get_architecture", "import_torchvision"]

# torchvision.ops.roi_align imports this module of torch's compiler at its top for one helper that runs
# only when roi_align runs (detection models; no segmentation model calls it).
_DYNAMO_UTILS = "torch._dynamo.utils"


class _DeferredDynamoUtils(types.ModuleType):
    """Stands in for ``torch._dynamo.utils`` while torchvision is imported: any name asked of it imports
    the real module (which replaces it) and comes from there. Module attributes (``__file__``, which
    ``inspect.getmodule`` asks of every module while torch registers torchvision's operators) do not."""

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        if sys.modules.get(_DYNAMO_UTILS) is self:
            del sys.modules[_DYNAMO_UTILS]
        return getattr(importlib.import_module(_DYNAMO_UTILS), name)


def _is_compile_supported(device_type: Any) -> bool:
    from torch._dynamo.utils import is_compile_supported

    return is_compile_supported(device_type)


def import_torchvision() -> types.ModuleType:
    """torchvision, imported without importing torch's compiler (``torch._dynamo``) with it.

    torchvision imports ``torch._dynamo.utils`` at module level (in ``torchvision.ops.roi_align``), and
    that import was 0.9 s of torchvision's 1.0 s on 2 cores: on every inference actor's way to its first
    mask. While torchvision is imported, a stand-in answers for that module; the one name torchvision
    takes from it imports the real module when first called, and the stand-in is gone afterwards, so
    anything that later imports ``torch._dynamo`` (``torch.compile``) gets the real one.
    """
    if "torchvision" in sys.modules or _DYNAMO_UTILS in sys.modules:
        return importlib.import_module("torchvision")
    stand_in = _DeferredDynamoUtils(_DYNAMO_UTILS)
    stand_in.is_compile_supported = _is_compile_supported
    sys.modules[_DYNAMO_UTILS] = stand_in
    try:
        return importlib.import_module("torchvision")
    finally:
        if sys.modules.get(_DYNAMO_UTILS) is stand_in:
            del sys.modules[_DYNAMO_UTILS]


# What the driver needs of the registered models' DEFAULT weights, known without importing torch: all of
# torchvision's segmentation weights resize the shorter side to 520 px (bilinear, PIL filter 2) and name
# the 21 VOC classes. They are each entry's defaults; tests/test_model.py checks every entry against
# torchvision.
RESIZE_SIZE = (520,)
PIL_BILINEAR = 2
VOC_CATEGORIES = (
    "__background__",
    "aeroplane",
    "bicycle",
    "bird",
    "boat",
    "bottle",
    "bus",
    "car",
    "cat",
    "chair",
    "cow",
    "diningtable",
    "dog",
    "horse",
    "motorbike",
    "person",
    "pottedplant",
    "sheep",
    "sofa",
    "train",
    "tvmonitor",
)


@dataclass(frozen=True)
class Architecture:
    """How to build one architecture, check a checkpoint for it, and get its low-resolution logits.

    Every torchvision segmentation model computes features, applies a head at a fraction of the input
    resolution, then resizes the head's output bilinearly to the input size. :meth:`low_res_logits`
    stops before that resize, so postprocessing can fuse it with the resize to the displayed size.
    """

    name: str  # torchvision's builder name
    head_key: str  # a state_dict key whose first dimension is the number of classes
    default_weights: str = ""  # str() of the DEFAULT weights enum: the summary's `weights` for --weights default
    default_url: str = ""  # where torchvision downloads the DEFAULT weights from
    has_aux: bool = True  # builds an auxiliary head when asked; segbatch never runs it
    # GPU memory one 520x693 image needs in a forward pass, fp32 (activations, estimated at 2x the largest
    # feature maps, rounded up); segbatch._internal.resources sizes GPU batches from it.
    gpu_bytes_per_image: int = 1536 * 1024**2
    resize_size: tuple[int, ...] = RESIZE_SIZE  # transforms().resize_size, torch-free
    resize_filter: int = PIL_BILINEAR  # the PIL filter of transforms().interpolation
    class_names: tuple[str, ...] = VOC_CATEGORIES  # DEFAULT weights' meta["categories"], torch-free

    def weights_enum(self):
        return import_torchvision().models.get_model_weights(self.name)

    def transforms(self):
        """The weights' own preprocessing (resize, normalise). Checkpoints of an architecture share it."""
        return self.weights_enum().DEFAULT.transforms()

    def categories(self) -> tuple[str, ...]:
        """The DEFAULT weights' class names (``weights.meta["categories"]``), without importing torch."""
        return self.class_names

    def resize(self):
        """The resize of ``transforms()`` as decode tasks apply it (segbatch.stages.decode.ResizeSpec), torch-free."""
        from segbatch.stages.decode import ResizeSpec

        return ResizeSpec(self.resize_size, self.resize_filter)

    def build(self, num_classes: int | None = None, *, pretrained: bool = False) -> torch.nn.Module:
        """The model without its auxiliary head: pretrained DEFAULT weights, or untrained."""
        builder = import_torchvision().models.get_model_builder(self.name)
        if pretrained:
            model = builder(weights=self.weights_enum().DEFAULT, progress=False)
        else:
            kwargs: dict[str, Any] = {"aux_loss": False} if self.has_aux else {}
            model = builder(weights=None, weights_backbone=None, num_classes=num_classes, **kwargs)
        if self.has_aux:
            model.aux_classifier = None
        return model

    def check_state_dict(self, state: Mapping[str, torch.Tensor], source: str) -> dict[str, torch.Tensor]:
        """The state_dict to load, checked against the architecture before any actor sees it.

        It is loaded strictly into a model built on the meta device, so a missing key, an unexpected
        one or a wrong-shaped tensor is refused here, at no memory cost.
        """
        if self.head_key not in state:
            raise WeightsError(
                f"weights: {source} is not a {self.name} state_dict (no {self.head_key!r}); save one with "
                "torch.save(model.state_dict(), path)"
            )
        import torch

        state = {k: v for k, v in state.items() if not k.startswith("aux_classifier.")}
        num_classes = int(state[self.head_key].shape[0])
        with torch.device("meta"):
            model = self.build(num_classes)
        try:
            model.load_state_dict(state, strict=True, assign=True)
        except RuntimeError as exc:
            detail = str(exc).split("\n", 1)[-1].strip()[:600]
            raise WeightsError(f"weights: {source} does not fit {self.name}: {detail}") from None
        return state

    def low_res_logits(self, model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
        """The head's logits before the model's own resize to the input size."""
        return model.classifier(model.backbone(x)["out"])


@dataclass(frozen=True)
class _LRASPP(Architecture):
    """LR-ASPP's head reads two backbone features (``low`` at stride 8, ``high`` at stride 16)."""

    has_aux: bool = False

    def low_res_logits(self, model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
        return model.classifier(model.backbone(x))


_DEEPLAB_HEAD = "classifier.4.weight"  # DeepLabHead's last 1x1 conv: (num_classes, 256, 1, 1)
_FCN_HEAD = "classifier.4.weight"  # FCNHead's last 1x1 conv: (num_classes, channels // 4, 1, 1)

_MIB = 1024**2
_URL = "https://download.pytorch.org/models"

#: The models ``--model`` takes, by torchvision's builder names.
MODELS: Registry[Architecture] = Registry("model", "model")

MODELS.register(
    "deeplabv3_resnet101",
    Architecture(
        "deeplabv3_resnet101",
        _DEEPLAB_HEAD,
        "DeepLabV3_ResNet101_Weights.COCO_WITH_VOC_LABELS_V1",
        f"{_URL}/deeplabv3_resnet101_coco-586e9e4e.pth",
        gpu_bytes_per_image=1536 * _MIB,
    ),
)
MODELS.register(
    "deeplabv3_resnet50",
    Architecture(
        "deeplabv3_resnet50",
        _DEEPLAB_HEAD,
        "DeepLabV3_ResNet50_Weights.COCO_WITH_VOC_LABELS_V1",
        f"{_URL}/deeplabv3_resnet50_coco-cd0a2569.pth",
        gpu_bytes_per_image=1024 * _MIB,
    ),
)
MODELS.register(
    "deeplabv3_mobilenet_v3_large",
    Architecture(
        "deeplabv3_mobilenet_v3_large",
        _DEEPLAB_HEAD,
        "DeepLabV3_MobileNet_V3_Large_Weights.COCO_WITH_VOC_LABELS_V1",
        f"{_URL}/deeplabv3_mobilenet_v3_large-fc3c493d.pth",
        gpu_bytes_per_image=256 * _MIB,
    ),
)
MODELS.register(
    "fcn_resnet101",
    Architecture(
        "fcn_resnet101",
        _FCN_HEAD,
        "FCN_ResNet101_Weights.COCO_WITH_VOC_LABELS_V1",
        f"{_URL}/fcn_resnet101_coco-7ecb50ca.pth",
        gpu_bytes_per_image=1536 * _MIB,
    ),
)
MODELS.register(
    "fcn_resnet50",
    Architecture(
        "fcn_resnet50",
        _FCN_HEAD,
        "FCN_ResNet50_Weights.COCO_WITH_VOC_LABELS_V1",
        f"{_URL}/fcn_resnet50_coco-1167a1af.pth",
        gpu_bytes_per_image=1024 * _MIB,
    ),
)
MODELS.register(
    "lraspp_mobilenet_v3_large",
    _LRASPP(
        "lraspp_mobilenet_v3_large",
        "classifier.high_classifier.weight",
        "LRASPP_MobileNet_V3_Large_Weights.COCO_WITH_VOC_LABELS_V1",
        f"{_URL}/lraspp_mobilenet_v3_large-d234d4ea.pth",
        gpu_bytes_per_image=256 * _MIB,
    ),
)


def available_models() -> list[str]:
    """The names ``--model`` takes, as torchvision's builders name them."""
    return MODELS.names()


def get_architecture(name: str) -> Architecture:
    """The registered model ``name``; an unknown name is a ConfigError listing the valid ones."""
    return MODELS.get(name)
