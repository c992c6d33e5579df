"""Workers of every stage SIGKILLed mid-run: every input still ends with exactly one row, none with two.

A real local Ray; the victims are found by the process titles Ray gives its workers while they run a
stage's task (``ray::MapBatches(DecodeImages)``...) among the processes of this session's raylet.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections import Counter
from pathlib import Path

import pytest
from PIL import Image

from segbatch import IncompleteRunError, RunConfig, run
from segbatch.store import summary

from _helpers import TEST_ARCH, photo_like

pytestmark = pytest.mark.timeout(420)

#: The process title of a worker busy in each stage (an actor's title gains ".submit" while it runs a task).
STAGE_TITLES = {
    "listing": b"ray::ReadListImages",
    "decode": b"ray::MapBatches(DecodeImages)",
    "inference": b"ray::MapWorker(MapBatches(Segmenter)).submit",
    "write": b"ray::MapBatches(WriteOutputs)",
}
IMAGES = 24  # real images: each goes through the model
EMPTY_FILES = 1500  # zero-byte inputs: error rows that keep listing, decoding and writing busy
SECOND_KILL_AFTER = 1.0  # seconds after the first kill: a later moment of the same run


def _raylet_pid() -> int:
    import ray._private.worker as worker

    return worker._global_node.all_processes["raylet"][0].process.pid


def _busy_pids(title: bytes, raylet: int) -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().split(b"\0")[0].rstrip()
            environ = (entry / "environ").read_bytes()
        except OSError:
            continue
        if cmdline == title and f"RAY_RAYLET_PID={raylet}\0".encode() in environ:
            pids.append(int(entry.name))
    return pids


class Killer(threading.Thread):
    """Kills a busy worker of one stage at first sight, and another one a moment later."""

    def __init__(self, title: bytes):
        super().__init__(daemon=True)
        self.title = title
        self.raylet = _raylet_pid()
        self.killed: list[tuple[int, float]] = []
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set() and len(self.killed) < 2:
            if self.killed and time.monotonic() - self.killed[0][1] < SECOND_KILL_AFTER:
                time.sleep(0.02)
                continue
            for pid in _busy_pids(self.title, self.raylet)[:1]:
                try:
                    os.kill(pid, signal.SIGKILL)
                    self.killed.append((pid, time.monotonic()))
                except ProcessLookupError:
                    pass
            time.sleep(0.02)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> tuple[Path, set[str], set[str]]:
    root = tmp_path_factory.mktemp("kill") / "in"
    root.mkdir()
    images, empty = set(), set()
    for i in range(IMAGES):
        path = root / f"img{i:03d}.png"
        Image.fromarray(photo_like(40, 30, i)).save(path)
        images.add(str(path))
    for i in range(EMPTY_FILES):
        path = root / f"z{i:05d}.jpg"
        path.touch()
        empty.add(str(path))
    return root, images, empty


@pytest.mark.parametrize("stage", list(STAGE_TITLES))
def test_a_killed_worker_of_any_stage_loses_and_doubles_nothing(stage, inputs, tmp_path, ray_local, checkpoint):
    root, images, empty = inputs
    out = tmp_path / "out"
    killer = Killer(STAGE_TITLES[stage])
    killer.start()
    config = RunConfig(
        input=str(root),
        output=str(out),
        model=TEST_ARCH,
        weights=str(checkpoint),
        batch_size=2,
        progress=False,
    )
    try:
        report = run(config)
    except IncompleteRunError:
        report = None  # allowed: a run that cannot account for every input says so; a rerun completes it
    finally:
        killer.stop.set()
        killer.join()
    assert killer.killed, f"no busy {stage} worker was ever seen: the test proved nothing"
    rows = summary.read(str(out), columns=["uri", "status", "run_id"]).to_pylist()
    if report is not None:  # recorded as complete: then every input has exactly one row of this run
        this_run = Counter(r["uri"] for r in rows if r["run_id"] == report.run_id)
        assert set(this_run) == images | empty, "an input has no row"
        assert max(this_run.values()) == 1, [u for u, n in this_run.items() if n > 1]
        assert (report.ok, report.errors, report.listed) == (IMAGES, EMPTY_FILES, IMAGES + EMPTY_FILES)
    else:
        run(config)  # the rerun completes what the interrupted one could not account for
        rows = summary.read(str(out), columns=["uri", "status", "run_id"]).to_pylist()
    ok = Counter(r["uri"] for r in rows if r["status"] == "ok")
    assert set(ok) == images, "an image has no ok row"
    assert max(ok.values()) == 1, [u for u, n in ok.items() if n > 1]
    assert {r["uri"] for r in rows if r["status"] == "error"} == empty
