"""Stage 3, the model: built, placed on a device and run on a forward pass (:class:`Predictor`); the
registry is segbatch.models.architectures, the weights segbatch.models.weights.

Weights are resolved once in the driver (:func:`segbatch.models.weights.resolve`), which also pins their
identity (name or sha256) and class names, so a bad checkpoint fails the run before any image is touched.
Each inference actor (:class:`segbatch.stages.inference.Segmenter`) then builds its Predictor once. This
module imports torch: only actors and tools import it, never a run's driver.
"""

from __future__ import annotations

import hashlib
import logging
import math
import warnings
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np
import torch

from segbatch.errors import WeightsError
from segbatch.models.weights import RANDOM_SEED, ModelSpec, fetch_weights, load_checkpoint
from segbatch.stages import postprocess

log = logging.getLogger(__name__)


def build(spec: ModelSpec) -> torch.nn.Module:
    """The model of ``spec`` on the CPU, in eval mode, without the auxiliary head (unused at inference)."""
    architecture = spec.architecture
    if spec.weights == "default":
        model = architecture.build(pretrained=True)
    elif spec.weights == "random":
        torch.manual_seed(RANDOM_SEED)
        model = architecture.build(spec.num_classes)
    else:
        data = fetch_weights(spec.weights, spec.storage_options)
        if hashlib.sha256(data).hexdigest() != spec.identity:
            raise WeightsError(f"weights: {spec.weights} changed since the run started; refusing it")
        model = architecture.build(spec.num_classes)
        model.load_state_dict(load_checkpoint(data, spec.weights, architecture), strict=True)
    return model.eval()


# ----------------------------------------------------------------------------------------------------
# On the device
# ----------------------------------------------------------------------------------------------------

_AUTOCAST = {"bf16": torch.bfloat16, "fp16": torch.float16}


def pick_device() -> torch.device:
    """CUDA when this process may use a GPU and torch sees one; otherwise the CPU, said out loud."""
    gpu_ids: list = []
    try:
        import ray

        if ray.is_initialized():
            gpu_ids = ray.get_gpu_ids()
    except Exception:
        gpu_ids = []
    if torch.cuda.is_available():
        return torch.device("cuda", 0)
    if gpu_ids:
        log.warning("Ray assigned GPU %s to this actor, but torch sees no CUDA device: running on the CPU", gpu_ids)
    else:
        log.warning("no GPU for this actor: running inference on the CPU")
    return torch.device("cpu")


def assigned_cpus() -> int | None:
    try:
        import ray

        if ray.is_initialized():
            cpus = ray.get_runtime_context().get_assigned_resources().get("CPU")
            # A fractional holding (1.5 CPUs beside 0.5-CPU decode tasks) rounds up: the tasks are short.
            return max(1, math.ceil(cpus - 1e-6)) if cpus else None
    except Exception:
        return None
    return None


class Predictor:
    """A model on a device that turns uint8 images into class-id masks. Used by the actor and by bench."""

    def __init__(
        self,
        spec: ModelSpec,
        *,
        precision: str = "fp32",
        upsample: str = "exact",
        device: torch.device | None = None,
        threads: int | None = None,
        min_confidence: float | None = None,
    ):
        self.spec = spec
        self.min_confidence = min_confidence  # None: no confidence maps (and no cost for them)
        self.precision = precision
        self.upsample = upsample
        self.device = device or pick_device()
        if threads:
            torch.set_num_threads(threads)
        transforms = spec.architecture.transforms()
        model = build(spec).to(self.device)
        if self.device.type == "cuda":
            torch.backends.cudnn.benchmark = True  # one shape per group: autotuned kernels pay off
        # NHWC convolutions: faster on CPUs with oneDNN and the tensor-core layout on GPUs
        # (docs/benchmarks.md has the measured gain).
        model = model.to(memory_format=torch.channels_last)
        self.model = model
        self._mean = torch.tensor(transforms.mean, device=self.device).view(1, 3, 1, 1)
        self._std = torch.tensor(transforms.std, device=self.device).view(1, 3, 1, 1)
        # Host-to-device copies run on their own stream so the next batch uploads while this one computes.
        self._copy_stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None

    def stage(self, images: np.ndarray) -> Staged:
        """Start moving uint8 NHWC images to the device: pinned memory and a non-blocking copy on the
        copy stream, so it overlaps whatever the compute stream is doing. A no-op on the CPU."""
        with warnings.catch_warnings():
            # A view of the Arrow buffer, read-only; nothing writes to it (normalising makes a new tensor).
            warnings.simplefilter("ignore", UserWarning)
            tensor = torch.from_numpy(images)
        if self._copy_stream is None:
            return Staged(tensor, None)
        tensor = tensor.pin_memory()
        with torch.cuda.stream(self._copy_stream):
            on_device = tensor.to(self.device, non_blocking=True)
            ready = torch.cuda.Event()
            ready.record(self._copy_stream)
        return Staged(on_device, ready)

    def _normalise(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 NHWC -> the weights' normalised float NCHW (convert_image_dtype, then normalize)."""
        x = images.to(self.device, non_blocking=True).permute(0, 3, 1, 2).to(torch.float32).div_(255.0)
        x = (x - self._mean) / self._std
        return x.contiguous(memory_format=torch.channels_last)

    @torch.inference_mode()
    def logits(self, images: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int] | None]:
        """Forward a batch of equal-shaped uint8 NHWC images.

        Returns the head's low-resolution logits and the input size they are to be upsampled to, or, in
        ``bilinear`` mode, the model's own ``out`` and ``None``.
        """
        x = self._normalise(images)
        dtype = _AUTOCAST.get(self.precision)
        with torch.autocast(self.device.type, dtype=dtype, enabled=dtype is not None):
            if self.upsample == "bilinear":
                return self.model(x)["out"].float(), None
            logits = self.spec.architecture.low_res_logits(self.model, x)
            return logits.float(), (x.shape[-2], x.shape[-1])

    @torch.inference_mode()
    def masks(self, images: torch.Tensor | Staged, sizes: list[tuple[int, int]]) -> list[Labelled]:
        """One :class:`Labelled` per image; ``sizes`` are the displayed (H, W).

        Upsampling, argmax and counts run on the model's device: only uint8 maps cross back. With
        ``min_confidence`` set, mask and confidence both come from the literal full-resolution logits
        (:func:`segbatch.stages.postprocess.confidence`, in row tiles)."""
        if isinstance(images, Staged):
            if images.ready is not None:
                current = torch.cuda.current_stream(self.device)
                current.wait_event(images.ready)
                images.tensor.record_stream(current)  # the allocator must not reuse it before compute ends
            images = images.tensor
        logits, model_size = self.logits(images)
        if self.min_confidence is None:
            labels = [
                postprocess.labels(logits[i], size, self.upsample, model_size).to(torch.uint8)
                for i, size in enumerate(sizes)
            ]
            counts = [postprocess.pixel_counts(lab, self.spec.num_classes) for lab in labels]
            return [Labelled(lab.cpu().numpy(), cnt.cpu().numpy()) for lab, cnt in zip(labels, counts)]
        out = []
        for i, size in enumerate(sizes):
            res = postprocess.confidence(logits[i], size, model_size, self.min_confidence)
            out.append(
                Labelled(
                    res.labels.to(torch.uint8).cpu().numpy(),
                    res.counts.cpu().numpy(),
                    confidence=res.confidence.cpu().numpy(),
                    mean_confidence=res.mean,
                    low_confidence_share=res.low_share,
                )
            )
        return out


class Labelled(NamedTuple):
    """One image's result: class ids, pixels per class, and, with --confidence, its confidence."""

    mask: np.ndarray  # uint8 (H, W) class ids
    counts: np.ndarray  # int64 (num_classes,)
    confidence: np.ndarray | None = None  # uint8 (H, W): largest softmax probability x 255, rounded
    mean_confidence: float | None = None  # mean of the largest softmax probability over pixels
    low_confidence_share: float | None = None  # share of pixels below min_confidence


@dataclass
class Staged:
    """Images on their way to the device, and the event that marks their arrival (None on the CPU)."""

    tensor: torch.Tensor
    ready: Any


__all__ = ["Labelled", "Predictor", "Staged", "build", "pick_device"]
