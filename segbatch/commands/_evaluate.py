"""`segbatch eval OUTPUT --ground-truth GT`: how good the masks are, against ground-truth label PNGs.

GT mirrors the input tree: the ground truth of ``INPUT/<dir>/<name>.<ext>`` is ``GT/<dir>/<name>.png``,
single-channel class ids (VOC ``SegmentationClass`` palette PNGs read as their indices), 255 = ignore.
One confusion matrix (rows: ground truth, columns: prediction) is summed over all images by Ray tasks,
with torchvision's definition (references/segmentation/utils.py, ``ConfusionMatrix``): pixels whose
ground truth is outside ``[0, num_classes)`` are not counted, which is how 255 is ignored.

Besides mIoU and pixel accuracy the result holds each class's IoU with its support (ground-truth
pixels), the confusion matrix itself, and the K images with the lowest IoU (each image's own mIoU over
the classes in its ground truth or prediction): each task keeps its K worst, the driver the K worst of
those, so memory does not grow with the number of images. The JSON goes to ``OUTPUT/eval.json`` unless
``--json`` names another place; ``segbatch report`` shows the one in OUTPUT.
"""

from __future__ import annotations

import heapq
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from segbatch._internal import _ray, _storage
from segbatch._internal.progress import RunProgress
from segbatch.errors import ConfigError, InputError
from segbatch.store import summary
from segbatch.store.contract import EVAL_NAME, ground_truth_relpath, input_relpath
from segbatch.store.masks import mask_name_below, read_label_png

EVAL_BATCH_ROWS = 64  # images per Ray task: enough reads in flight to hide object-store latency
MAX_LISTED = 1000  # missing or failed images named in the result; the counts stay exact beyond it
MAX_BLOCKS = 10_000  # blocks the image table is cut into; more only adds scheduling overhead
DEFAULT_WORST = 10  # images listed by `--worst`: a page of the most wrong masks to look at first

_BATCH_SCHEMA = pa.schema(
    [
        ("kind", pa.string()),  # "matrix" (one per task), "missing" or "error" (one per image), "worst"
        ("uri", pa.string()),
        ("error", pa.string()),
        ("matrix", pa.binary()),  # int64 (n, n) confusion matrix of the task's images, row-major
        ("images", pa.int64()),
        ("miou", pa.float64()),  # "worst" rows: the image's own mIoU, pixel accuracy and labelled pixels
        ("accuracy", pa.float64()),
        ("pixels", pa.int64()),
    ]
)


def confusion_matrix(gt: np.ndarray, pred: np.ndarray, num_classes: int) -> np.ndarray:
    """(n, n) int64 counts, rows = ground truth, columns = prediction; gt outside [0, n) is ignored."""
    gt = gt.astype(np.int64, copy=False).ravel()
    pred = pred.astype(np.int64, copy=False).ravel()
    keep = (gt >= 0) & (gt < num_classes)
    counts = np.bincount(num_classes * gt[keep] + pred[keep], minlength=num_classes * num_classes)
    return counts.reshape(num_classes, num_classes)


def metrics(matrix: np.ndarray) -> tuple[float | None, list[float | None], float | None]:
    """(pixel accuracy, per-class IoU, mIoU): IoU is None for a class absent from both GT and prediction."""
    matrix = matrix.astype(np.float64)
    total = matrix.sum()
    diag = np.diag(matrix)
    union = matrix.sum(0) + matrix.sum(1) - diag
    with np.errstate(invalid="ignore", divide="ignore"):
        iou = np.where(union > 0, diag / union, np.nan)
    acc = float(diag.sum() / total) if total > 0 else None
    miou = float(np.nanmean(iou)) if np.any(~np.isnan(iou)) else None
    return acc, [None if math.isnan(v) else float(v) for v in iou], miou


class ConfusionBatch:
    """Ray Data map step (CPU tasks): one summed confusion matrix per batch, plus a row per missing GT or
    failed image."""

    def __init__(
        self,
        output_url: str,
        ground_truth_url: str,
        storage_options: Mapping[str, Any],
        num_classes: int,
        worst: int = DEFAULT_WORST,
    ):
        self._output = _storage.Location(output_url, storage_options)
        self._gt = _storage.Location(ground_truth_url, storage_options)
        self._n = num_classes
        self._worst = worst

    def __call__(self, batch: pa.Table) -> pa.Table:
        self._fs, self._root = self._output.open()
        self._gt_fs, self._gt_root = self._gt.open()
        rows: dict[str, list] = {name: [] for name in _BATCH_SCHEMA.names}

        def add_row(**values: Any) -> None:
            for name in _BATCH_SCHEMA.names:
                rows[name].append(values.get(name))

        def problem(kind: str, uri: str, error: str | None) -> None:
            add_row(kind=kind, uri=uri, error=error)

        jobs = []  # (uri, mask path, gt path)
        for uri, mask_uri in zip(batch["uri"].to_pylist(), batch["mask_uri"].to_pylist()):
            try:
                mask_rel = mask_name_below(self._root, mask_uri or "", uri)
                rel = input_relpath(mask_rel)
            except ValueError as exc:
                problem("error", uri, str(exc))
                continue
            jobs.append(
                (
                    uri,
                    _storage.join_path(self._root, mask_rel),
                    _storage.join_path(self._gt_root, ground_truth_relpath(rel)),
                )
            )
        gts = _storage.read_many(self._gt_fs, [j[2] for j in jobs])
        have = [(job, gt) for job, gt in zip(jobs, gts) if not isinstance(gt, FileNotFoundError)]
        for job, gt in zip(jobs, gts):
            if isinstance(gt, FileNotFoundError):
                problem("missing", job[0], f"no ground truth at {job[2]}")
        masks = _storage.read_many(self._fs, [job[1] for job, _ in have])
        total = np.zeros((self._n, self._n), dtype=np.int64)
        images = 0
        scored: list[tuple[float, str, float, int]] = []  # (image mIoU, uri, pixel accuracy, labelled pixels)
        for ((uri, mask_path, gt_path), gt_data), mask_data in zip(have, masks):
            try:
                if isinstance(gt_data, BaseException):
                    raise ValueError(f"cannot read ground truth {gt_path}: {type(gt_data).__name__}: {gt_data}")
                if isinstance(mask_data, BaseException):
                    raise ValueError(f"cannot read mask {mask_path}: {type(mask_data).__name__}: {mask_data}")
                gt = read_label_png(gt_data, f"ground truth {gt_path}")
                pred = read_label_png(mask_data, f"mask {mask_path}")
                if gt.shape != pred.shape:
                    raise ValueError(
                        f"ground truth {gt_path} is {gt.shape[1]}x{gt.shape[0]} but the mask is "
                        f"{pred.shape[1]}x{pred.shape[0]}"
                    )
                if pred.size and int(pred.max()) >= self._n:
                    raise ValueError(
                        f"mask {mask_path} holds class id {int(pred.max())}, but there are {self._n} classes"
                    )
            except Exception as exc:  # one bad file costs its image, never the evaluation
                problem("error", uri, str(exc) if isinstance(exc, ValueError) else f"{type(exc).__name__}: {exc}")
                continue
            matrix = confusion_matrix(gt, pred, self._n)
            total += matrix
            images += 1
            acc, _iou, miou = metrics(matrix)
            if miou is not None:  # an image with every pixel ignored has no IoU to rank
                scored.append((miou, uri, acc, int(matrix.sum())))
        add_row(kind="matrix", matrix=total.tobytes(), images=images)
        for miou, uri, acc, pixels in heapq.nsmallest(self._worst, scored):
            add_row(kind="worst", uri=uri, miou=miou, accuracy=acc, pixels=pixels)
        return pa.table(rows, schema=_BATCH_SCHEMA)


@dataclass
class EvalResult:
    classes: list[str]
    matrix: np.ndarray
    images: int = 0  # images whose ground truth was found and compared
    missing: int = 0
    failed: int = 0
    missing_examples: list[str] = field(default_factory=list)
    failed_examples: list[tuple[str, str]] = field(default_factory=list)
    worst_k: int = DEFAULT_WORST
    worst: list[tuple[float, str, float, int]] = field(default_factory=list)  # (mIoU, uri, accuracy, pixels)

    def add_scored(self, scored: list[tuple[float, str, float, int]]) -> None:
        """Keep the ``worst_k`` lowest-IoU images of those seen so far (ties: by uri)."""
        self.worst = heapq.nsmallest(self.worst_k, self.worst + scored)

    def per_class(self) -> list[dict[str, Any]]:
        """Each class's IoU, its support (ground-truth pixels) and its predicted pixels."""
        _acc, iou, _miou = metrics(self.matrix)
        support, predicted = self.matrix.sum(1).tolist(), self.matrix.sum(0).tolist()
        return [
            {"id": i, "class": name, "iou": iou[i], "support": support[i], "predicted": predicted[i]}
            for i, name in enumerate(self.classes)
        ]

    def worst_images(self) -> list[dict[str, Any]]:
        return [
            {"uri": uri, "miou": miou, "pixel_accuracy": acc, "pixels": pixels} for miou, uri, acc, pixels in self.worst
        ]

    def as_dict(self) -> dict[str, Any]:
        acc, iou, miou = metrics(self.matrix)
        return {
            "miou": miou,
            "pixel_accuracy": acc,
            "per_class_iou": dict(zip(self.classes, iou)),
            "images": self.images,
            # Extensions: what could not be compared, and the per-class pixel counts behind the IoUs.
            "missing_ground_truth": self.missing,
            "missing_ground_truth_examples": self.missing_examples,
            "errors": self.failed,
            "error_examples": [{"uri": u, "error": e} for u, e in self.failed_examples],
            "pixels": int(self.matrix.sum()),
            "ground_truth_pixels": dict(zip(self.classes, self.matrix.sum(1).tolist())),
            "predicted_pixels": dict(zip(self.classes, self.matrix.sum(0).tolist())),
            "per_class": self.per_class(),
            "confusion_matrix": {
                "rows": "ground truth",
                "columns": "prediction",
                "classes": self.classes,
                "counts": self.matrix.tolist(),
            },
            "worst_images": self.worst_images(),
        }

    def __str__(self) -> str:
        acc, iou, miou = metrics(self.matrix)
        gt_px, pred_px = self.matrix.sum(1), self.matrix.sum(0)
        width = max(len("class"), *(len(c) for c in self.classes)) if self.classes else 5
        lines = [f"{'class':<{width}}  {'IoU':>7}  {'support':>12}  {'predicted':>12}"]
        for name, value, g, p in zip(self.classes, iou, gt_px, pred_px):
            shown = "-" if value is None else f"{value:.4f}"
            lines.append(f"{name:<{width}}  {shown:>7}  {int(g):>12}  {int(p):>12}")
        fmt = lambda v: "-" if v is None else f"{v:.4f}"  # noqa: E731
        lines += [
            f"mIoU: {fmt(miou)} (over the {sum(v is not None for v in iou)} classes in GT or prediction)",
            f"pixel accuracy: {fmt(acc)} over {int(self.matrix.sum())} labelled pixels",
            f"images: {self.images} compared, {self.missing} without ground truth, {self.failed} failed",
        ]
        for uri in self.missing_examples[:10]:
            lines.append(f"  no ground truth: {uri}")
        if self.missing > 10:
            lines.append(f"  ... {self.missing - 10} more without ground truth (--json lists up to {MAX_LISTED})")
        for uri, err in self.failed_examples[:10]:
            lines.append(f"  error: {uri}: {err}")
        if self.worst:
            lines.append(f"worst {len(self.worst)} images by IoU (the image's own mIoU, pixel accuracy):")
            lines += [f"  {v:.4f}  {a:.4f}  {uri}" for v, uri, a, _pixels in self.worst]
        lines.append("support: ground-truth pixels of the class")
        return "\n".join(lines)


def evaluate(
    output_url: str,
    ground_truth_url: str,
    storage_options: Mapping[str, Any] | None = None,
    *,
    address: str | None = None,
    worst: int = DEFAULT_WORST,
    progress: bool = True,
) -> EvalResult:
    """Compare every ok mask of OUTPUT with its ground truth under ``ground_truth_url``."""
    storage_options = dict(storage_options or {})
    classes = summary.classes(output_url, storage_options)
    if classes is None:
        raise InputError(f"OUTPUT {output_url} has no summary with class names: run `segbatch run` into it first")
    gt_fs, gt_root = _storage.open_url(ground_truth_url, storage_options)
    if not _storage.retry(gt_fs.exists, gt_root, what=f"check {ground_truth_url}"):
        raise InputError(f"ground truth {ground_truth_url} does not exist")
    table = summary.read(output_url, storage_options, columns=["uri", "mask_uri"], filter=pc.field("status") == "ok")
    if worst < 0:
        raise ConfigError("worst", f"must be 0 or more, got {worst}")
    result = EvalResult(classes=list(classes), matrix=np.zeros((len(classes),) * 2, dtype=np.int64), worst_k=worst)
    if table.num_rows == 0:
        return result

    with _ray.session(address):
        import ray

        rows_per_block = max(EVAL_BATCH_ROWS, math.ceil(table.num_rows / MAX_BLOCKS))
        blocks = [table.slice(i, rows_per_block) for i in range(0, table.num_rows, rows_per_block)]
        ds = ray.data.from_arrow(blocks).map_batches(
            ConfusionBatch(output_url, ground_truth_url, storage_options, len(classes), worst),
            batch_size=EVAL_BATCH_ROWS,
            batch_format="pyarrow",
            num_cpus=1,
        )
        with RunProgress(progress, action="evaluating") as bar:
            bar.set_total(table.num_rows)
            for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
                before = (result.images, result.missing, result.failed)
                _accumulate(result, batch)
                bar.update(result.images - before[0], result.missing + result.failed - before[1] - before[2])
    result.missing_examples.sort()
    result.failed_examples.sort()
    return result


def _accumulate(result: EvalResult, batch: pa.Table) -> None:
    n = len(result.classes)
    scored = []
    columns = [batch[c].to_pylist() for c in _BATCH_SCHEMA.names]
    for kind, uri, error, matrix, images, miou, acc, pixels in zip(*columns, strict=True):
        if kind == "worst":
            scored.append((miou, uri, acc, pixels))
        elif kind == "matrix":
            result.matrix += np.frombuffer(matrix, dtype=np.int64).reshape(n, n)
            result.images += images
        elif kind == "missing":
            result.missing += 1
            if len(result.missing_examples) < MAX_LISTED:
                result.missing_examples.append(uri)
        else:
            result.failed += 1
            if len(result.failed_examples) < MAX_LISTED:
                result.failed_examples.append((uri, error))
    result.add_scored(scored)


def write_json(result: EvalResult, url: str, storage_options: Mapping[str, Any] | None = None) -> None:
    fs, path = _storage.open_url(url, storage_options)
    _storage.write_atomic(fs, path, (json.dumps(result.as_dict(), indent=1) + "\n").encode())


def default_json_url(output_url: str) -> str:
    """Where `segbatch eval` writes its JSON unless told otherwise, and where `segbatch report` looks."""
    return _storage.join_url(output_url, EVAL_NAME)


def read_json(output_url: str, storage_options: Mapping[str, Any] | None = None) -> dict[str, Any] | None:
    """OUTPUT/eval.json, or None when OUTPUT has none."""
    fs, root = _storage.open_url(output_url, storage_options)
    path = _storage.join_path(root, EVAL_NAME)
    try:
        return json.loads(_storage.retry(fs.cat_file, path, what=f"read {path}"))
    except FileNotFoundError:
        return None


__all__ = [
    "DEFAULT_WORST",
    "EvalResult",
    "confusion_matrix",
    "default_json_url",
    "evaluate",
    "metrics",
    "read_json",
    "write_json",
]
