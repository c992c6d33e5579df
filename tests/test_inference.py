"""The inference actor's threads: every torch operation of a Segmenter runs on one thread of its own."""

from __future__ import annotations

import concurrent.futures
import shutil
import threading
from pathlib import Path
from types import SimpleNamespace

import segbatch
from segbatch.models import weights
from segbatch.stages import model
from segbatch.stages.decode import DecodeImages, Limits, ResizeSpec
from segbatch.stages.listing import list_inputs
from segbatch.store.contract import IMAGE_ROW_SCHEMA

from _helpers import TEST_ARCH

SAMPLES = Path(segbatch.__file__).parent / "samples"


def _sample_passes(tmp_path, monkeypatch):
    """The samples' listing and their forward passes at a small size; the actor's Ray context stubbed."""
    import ray

    monkeypatch.setattr(ray, "get_runtime_context", lambda: SimpleNamespace(get_node_id=lambda: "node-under-test"))
    inputs = tmp_path / "in"
    shutil.copytree(SAMPLES, inputs, ignore=shutil.ignore_patterns("*.md"))
    listing = list_inputs(str(inputs), {}, ("jpg", "png"))
    passes = DecodeImages(str(inputs), {}, ResizeSpec((64,), 2), Limits(10**8, 2**29, 16 * 10**6), max_batch=2)(listing)
    return listing, passes


def test_all_torch_work_of_an_actor_runs_on_one_thread_whichever_thread_calls_it(tmp_path, checkpoint, monkeypatch):
    """Ray builds the actor on its main thread and calls it from Ray Data's worker threads. Were torch run
    from both, OpenMP would keep two teams of threads on the cores (docs/benchmarks.md: a forward pass
    137-140 ms instead of 105-112 ms on 2 cores). The model is built, staged and run on the Segmenter's
    own thread: neither the thread that built it nor any caller's."""

    from segbatch.stages import inference

    used: list[tuple[str, int]] = []

    class Recording(model.Predictor):
        def __init__(self, *args, **kwargs):
            used.append(("build", threading.get_ident()))
            super().__init__(*args, **kwargs)

        def stage(self, images):
            used.append(("stage", threading.get_ident()))
            return super().stage(images)

        def masks(self, images, sizes):
            used.append(("masks", threading.get_ident()))
            return super().masks(images, sizes)

    monkeypatch.setattr(model, "Predictor", Recording)
    listing, passes = _sample_passes(tmp_path, monkeypatch)

    segmenter = inference.Segmenter(weights.resolve(TEST_ARCH, str(checkpoint)), threads=1)
    callers = []
    for _ in range(2):  # two calls from two different threads, as Ray Data's pool of workers makes them
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            callers.append(pool.submit(threading.get_ident).result())
            out = pool.submit(segmenter, passes).result()
        assert out.schema.equals(IMAGE_ROW_SCHEMA) and out.num_rows == listing.num_rows

    kinds = {kind for kind, _ in used}
    assert kinds == {"build", "stage", "masks"}, used
    (torch_thread,) = {ident for _, ident in used}
    assert torch_thread not in (threading.get_ident(), *callers)


def test_a_failing_pass_still_runs_on_the_actors_thread_and_costs_only_its_rows(tmp_path, checkpoint, monkeypatch):
    """An exception inside the actor's own thread reaches the caller's result as rows, never as a hang."""

    from segbatch.stages import inference

    listing, passes = _sample_passes(tmp_path, monkeypatch)
    segmenter = inference.Segmenter(weights.resolve(TEST_ARCH, str(checkpoint)), threads=1)

    def broken(staged, sizes):
        raise RuntimeError("device lost")

    monkeypatch.setattr(segmenter.predictor, "masks", broken)
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        out = pool.submit(segmenter, passes).result(timeout=120)
    errors = [e for e in out.column("error").to_pylist() if e]
    assert len(errors) == listing.num_rows and all("device lost" in e for e in errors)
