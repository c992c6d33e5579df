"""Stage 3, inference: the actor class Ray Data runs on its pool, one model per actor.

The driver names :class:`Segmenter` to ``map_batches`` without importing torch: this module imports it,
and the model (segbatch.stages.model), only in the actor's ``__init__``, so a run's driver never pays
torch's import. (Ray Data names the actors after the class: ``MapBatches(Segmenter)``.)
"""

from __future__ import annotations

import concurrent.futures
import logging
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa

from segbatch.store.contract import FORWARD_PASS_COLUMN

if TYPE_CHECKING:
    from segbatch.models.weights import ModelSpec
    from segbatch.stages.model import Staged

log = logging.getLogger(__name__)


class Segmenter:
    """Ray Data map step on an actor pool: one model per actor, loaded once in ``__init__``.

    Every torch operation of the actor runs on one thread of its own (:attr:`_torch`). Ray calls
    ``__init__`` on the actor's main thread and ``__call__`` on a Ray Data worker thread, and OpenMP gives
    each thread that starts parallel work a team of its own: with two teams of torch's threads on a
    machine they outnumber, libgomp stops its threads spinning between operators, and each operator waits
    for a woken thread. A forward pass then took 137-140 ms instead of 105-112 ms on 2 cores
    (docs/benchmarks.md, "Single machine: one thread for torch").
    """

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
        import torch

        from segbatch.stages.model import Predictor, assigned_cpus

        self.max_batch = max_batch  # most images per forward pass; None: a batch's whole shape group
        self._torch = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="segbatch-torch")
        # `predictor`: a stand-in with Predictor's stage/masks/device/min_confidence (benchmarks/data_path.py
        # measures the data path's own ceiling with one that costs nothing, or a fixed time per pass).
        self.predictor = (
            predictor
            or self._torch.submit(
                Predictor,
                spec,
                precision=precision,
                upsample=upsample,
                threads=threads or assigned_cpus(),
                min_confidence=min_confidence,
            ).result()
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
                import torch

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
        return self._torch.submit(self._label, passes).result()

    def _label(self, passes: pa.Table) -> pa.Table:
        from segbatch.stages.model import Labelled

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


__all__ = ["Segmenter"]
