"""Stage 3, the model: the inference actor (the registry: segbatch.models.architectures; weights: segbatch.models.weights).

Weights are resolved once in the driver (:func:`segbatch.models.weights.resolve`), which also pins their identity (name or
sha256) and class names, so a bad checkpoint fails the run before any image is touched. Each actor of
the pool then builds its model once in ``__init__`` (:class:`Segmenter`).
"""

from __future__ import annotations

import hashlib
import logging
import math
import warnings
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np
import pyarrow as pa
import torch

from segbatch.errors import WeightsError
from segbatch.models.weights import RANDOM_SEED, ModelSpec, _fetch, _load_checkpoint
from segbatch.stages import postprocess
from segbatch.store.contract import FORWARD_PASS_COLUMN

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
        data = _fetch(spec.weights, spec.storage_options)
        if hashlib.sha256(data).hexdigest() != spec.identity:
            raise WeightsError(f"weights: {spec.weights} changed since the run started; refusing it")
        model = architecture.build(spec.num_classes)
        model.load_state_dict(_load_checkpoint(data, spec.weights, architecture), strict=True)
    return model.eval()


# ----------------------------------------------------------------------------------------------------
# The inference actor
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


def _assigned_cpus() -> int | None:
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


class Segmenter:
    """Ray Data map step on an actor pool: one model per actor, loaded once in ``__init__``."""

    def __init__(
        self,
        spec: ModelSpec,
        precision: str = "fp32",
        upsample: str = "exact",
        min_confidence: float | None = None,
        max_batch: int | None = None,
        threads: int | None = None,
        predictor: Any = None,
    ):
        import ray

        self.max_batch = max_batch  # most images per forward pass; None: a batch's whole shape group
        # `predictor`: a stand-in with Predictor's stage/masks/device/min_confidence (benchmarks/data_path.py
        # measures the data path's own ceiling with one that costs nothing, or a fixed time per pass).
        self.predictor = predictor or Predictor(
            spec,
            precision=precision,
            upsample=upsample,
            threads=threads or _assigned_cpus(),
            min_confidence=min_confidence,
        )
        self.node_id = ray.get_runtime_context().get_node_id()
        device = self.predictor.device
        self.device_name = f"{device.type}:{device.index or 0}" if device.type == "cuda" else device.type
        log.info(
            "segbatch actor ready: %s on %s, node %s, %d torch threads",
            spec.arch,
            self.device_name,
            self.node_id[:12],
            torch.get_num_threads(),
        )

    @staticmethod
    def _host_images(row: dict[str, Any]) -> np.ndarray:
        """A pass's images as one N x H x W x 3 array, without a copy (a view of the Arrow buffer)."""
        n = len(row["images"])
        return np.frombuffer(row["pixels"], dtype=np.uint8).reshape(n, row["in_h"], row["in_w"], 3)

    def _infer(self, row: dict[str, Any], staged: Staged | None) -> list[Any]:
        """Labelled (or an error string) per image of one pass; if the pass fails, each image is tried
        alone, so one bad image costs one row."""
        images = row["images"]
        sizes = [(img["height"], img["width"]) for img in images]
        try:
            if staged is None:
                staged = self.predictor.stage(self._host_images(row))
            return list(self.predictor.masks(staged, sizes))
        except Exception as exc:
            if self.predictor.device.type == "cuda":
                torch.cuda.empty_cache()
            if len(images) > 1:
                host = self._host_images(row)
                out = []
                for i, img in enumerate(images):
                    one = {**row, "images": [img], "pixels": host[i].tobytes()}
                    out += self._infer(one, None)
                return out
            log.warning("inference failed for %s: %s", images[0]["uri"], exc)
            return [f"inference failed: {type(exc).__name__}: {exc}"]

    def _stage(self, row: dict[str, Any]) -> Staged | None:
        try:
            return self.predictor.stage(self._host_images(row))
        except Exception:
            return None  # _infer retries it and turns a persistent failure into error rows

    def __call__(self, passes: pa.Table) -> pa.Table:
        """Rows of :data:`segbatch.store.contract.PASS_SCHEMA` (one forward pass each) -> one row per image
        (:data:`segbatch.store.contract.IMAGE_ROW_SCHEMA`): the image's fields, its mask and pixel counts,
        and how many images shared its pass."""
        rows = passes.to_pylist()
        work = [r for r in rows if r["pixels"]]
        out: list[dict[str, Any]] = []
        # Pass i+1 is staged (its copy to the GPU started) before pass i computes.
        staged = self._stage(work[0]) if work else None
        for i, row in enumerate(work):
            following = self._stage(work[i + 1]) if i + 1 < len(work) else None
            results = self._infer(row, staged)
            staged = following
            n = len(row["images"])
            for img, res in zip(row["images"], results):
                if isinstance(res, Labelled):
                    out.append({**img, "result": res, FORWARD_PASS_COLUMN: n})
                else:
                    out.append({**img, "error": res, "result": None, FORWARD_PASS_COLUMN: 0})
        for row in rows:
            if not row["pixels"]:
                out += [{**img, "result": None, FORWARD_PASS_COLUMN: 0} for img in row["images"]]
        return self._table(out)

    def _table(self, out: list[dict[str, Any]]) -> pa.Table:
        """One row per image, of :data:`segbatch.store.contract.IMAGE_ROW_SCHEMA`."""
        from segbatch.store.contract import IMAGE_FIELDS, IMAGE_ROW_SCHEMA

        results = [r["result"] for r in out]
        confident = self.predictor.min_confidence is not None
        columns: dict[str, list[Any]] = {name: [r[name] for r in out] for name in IMAGE_FIELDS}
        columns["mask"] = [r.mask.tobytes() if r else b"" for r in results]
        columns["pixel_counts"] = [r.counts.tolist() if r else None for r in results]
        columns["confidence"] = [r.confidence.tobytes() if r and confident else None for r in results]
        for name in ("mean_confidence", "low_confidence_share"):
            columns[name] = [getattr(r, name) if r and confident else None for r in results]
        columns["node_id"] = [self.node_id] * len(out)
        columns["device"] = [self.device_name] * len(out)
        columns[FORWARD_PASS_COLUMN] = [r[FORWARD_PASS_COLUMN] for r in out]
        return pa.table(columns, schema=IMAGE_ROW_SCHEMA)


__all__ = ["Labelled", "Predictor", "Segmenter", "build"]
