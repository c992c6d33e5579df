"""Bad input and faults: nothing lost, nothing duplicated, no aborted job (real Ray, files, S3)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from PIL import Image

from segbatch import RunConfig, run
from segbatch.store import summary

from _faultproxy import FaultProxy
from _helpers import TEST_ARCH, photo_like, wait_for_masks

pytestmark = [pytest.mark.integration, pytest.mark.timeout(420)]  # runs segbatch in subprocesses


def tiny_images(root: Path, n: int, prefix: str = "img") -> list[Path]:
    root.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        path = root / f"{prefix}{i:03d}.png"
        Image.fromarray(photo_like(32, 24, i)).save(path)
        paths.append(path)
    return paths


def rows(out: str | Path) -> list[dict]:
    return summary.read(str(out)).to_pylist()


def assert_exactly_one_ok_row_each(table_rows: list[dict], expected_uris: set[str]) -> None:
    ok = [r["uri"] for r in table_rows if r["status"] == "ok"]
    assert sorted(ok) == sorted(expected_uris), (len(ok), len(expected_uris))
    assert len(ok) == len(set(ok)), "an input got two ok rows"


def test_bad_files_and_odd_names_become_rows_and_the_job_finishes(tmp_path, ray_local):
    src = tmp_path / "in"
    deep = src / "a" / "b" / "c" / "d"
    deep.mkdir(parents=True)
    good = {
        "with space.jpg": photo_like(40, 30, 1),
        "ünï cødé.png": photo_like(30, 40, 2),
        "hash#tag.png": photo_like(33, 21, 3),
        "per%cent.png": photo_like(21, 33, 4),
        "what?.png": photo_like(25, 25, 5),
        "a/b/c/d/deep.png": photo_like(20, 30, 6),
        "same.jpg": photo_like(30, 20, 7),
        "same.png": photo_like(30, 20, 8),
    }
    for rel, pixels in good.items():
        Image.fromarray(pixels).save(src / rel)
    bad = {
        "empty.jpg": b"",
        "random.png": os.urandom(3000),
        "page.jpg": b"<html>Not Found</html>",
        "trunc.jpg": (src / "same.jpg").read_bytes()[:200],
    }
    for rel, data in bad.items():
        (src / rel).write_bytes(data)
    report = run(
        RunConfig(input=str(src), output=str(tmp_path / "out"), model=TEST_ARCH, weights="random", progress=False)
    )
    assert (report.ok, report.errors) == (len(good), len(bad))
    table = {Path(r["uri"]).relative_to(src).as_posix(): r for r in rows(tmp_path / "out")}
    assert set(table) == set(good) | set(bad)
    for rel in bad:
        assert table[rel]["status"] == "error" and table[rel]["error"], rel
        assert table[rel]["mask_uri"] is None and table[rel]["pixel_counts"] is None
    masks = {table[rel]["mask_uri"] for rel in good}
    assert len(masks) == len(good)  # same.jpg and same.png get distinct masks
    for rel in good:
        mask = Image.open(table[rel]["mask_uri"])
        assert mask.size == Image.open(src / rel).size
        assert Path(table[rel]["mask_uri"]).resolve().is_relative_to((tmp_path / "out" / "masks").resolve())


def _segbatch_cmd(*args: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "segbatch",
        "run",
        *args,
        "--model",
        TEST_ARCH,
        "--weights",
        "random",
        "--no-progress",
    ]


def test_a_killed_run_resumes_to_exactly_one_ok_row_each(tmp_path):
    """SIGKILL the whole process group of a run mid-way, run the same command again, check everything."""
    images = tiny_images(tmp_path / "in", 40)
    out = tmp_path / "out"
    cmd = _segbatch_cmd(str(tmp_path / "in"), str(out), "--batch-size", "2")
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        wait_for_masks(proc, out, 4, timeout=240)
        os.killpg(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(timeout=30)
    first = rows(out) if (out / "summary").exists() else []
    assert len(first) < len(images)

    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    table = rows(out)  # every summary file reads: none is torn
    assert_exactly_one_ok_row_each(table, {str(p) for p in images})
    assert all(r["status"] == "ok" for r in table)
    for mask in (out / "masks").rglob("*"):
        if mask.is_file():
            assert mask.suffix == ".png", f"leftover temporary {mask}"
            Image.open(mask).load()  # no torn PNG


def _raylet_pid() -> int:
    import ray._private.worker as worker

    return worker._global_node.all_processes["raylet"][0].process.pid


def _busy(pid: int) -> bool:
    try:
        return b".submit" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False


def _segmenter_pids(raylet: int) -> list[int]:
    """Inference actor processes of this test session's Ray (other Rays on the machine are left alone)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes()
            environ = (entry / "environ").read_bytes()
        except OSError:
            continue
        if b"MapBatches(Segmenter)" in cmdline and f"RAY_RAYLET_PID={raylet}\0".encode() in environ:
            pids.append(int(entry.name))
    return pids


def test_a_killed_actor_is_replaced_and_every_image_is_labelled_once(tmp_path, ray_local):
    images = tiny_images(tmp_path / "in", 60)
    out = tmp_path / "out"
    raylet = _raylet_pid()
    killed: list[int] = []
    seen: set[int] = set()
    stop = threading.Event()

    def killer():
        while not stop.is_set():
            pids = _segmenter_pids(raylet)
            seen.update(pids)
            done = len(list((out / "masks").glob("*.png")))
            # Mid-run: busy on a block (its title says .submit) with work left for a replacement. Masks
            # appear a write batch at a time, so their count alone cannot say "mid-run".
            if not killed and pids and done < len(images) // 2 and _busy(pids[0]):
                os.kill(pids[0], signal.SIGKILL)
                killed.append(pids[0])
            time.sleep(0.1)

    thread = threading.Thread(target=killer, daemon=True)
    thread.start()
    try:
        report = run(
            RunConfig(
                input=str(tmp_path / "in"),
                output=str(out),
                model=TEST_ARCH,
                weights="random",
                batch_size=2,
                progress=False,
            )
        )
    finally:
        stop.set()
        thread.join()
    assert killed, "the actor was never killed: the test proved nothing"
    assert len(seen) >= 2, "no replacement actor was started"
    assert report.ok == len(images) and report.errors == 0
    assert_exactly_one_ok_row_each(rows(out), {str(p) for p in images})


def test_transient_s3_faults_are_retried_and_nothing_is_lost(tmp_path, s3_server, s3_bucket, ray_local):
    images = tiny_images(tmp_path / "in", 12)
    s3_server.upload_dir(tmp_path / "in", f"s3://{s3_bucket}/in")
    with FaultProxy(s3_server.url, period=4, delay=3.0, max_timeouts=2) as proxy:
        storage = {
            "endpoint_url": proxy.url,
            "config_kwargs": {"read_timeout": 1.5, "connect_timeout": 1.5, "retries": {"max_attempts": 2}},
        }
        report = run(
            RunConfig(
                input=f"s3://{s3_bucket}/in",
                output=f"s3://{s3_bucket}/out",
                model=TEST_ARCH,
                weights="random",
                batch_size=4,
                storage_options=storage,
                progress=False,
            )
        )
        injected = dict(proxy.injected)
    assert report.errors == 0 and report.ok == len(images), report
    kinds = {kind for kind, _method in injected}
    methods = {method for _kind, method in injected}
    assert kinds == {"slowdown", "reset", "timeout"}, injected
    assert {"GET", "PUT"} <= methods, injected
    table = rows(f"s3://{s3_bucket}/out")
    assert_exactly_one_ok_row_each(table, {f"s3://{s3_bucket}/in/{p.name}" for p in images})
    masks = s3_server.keys(s3_bucket, "out/masks/")
    assert len(masks) == len(images)


def test_error_budget_stops_the_run_with_a_clear_exit(tmp_path):
    src = tmp_path / "in"
    tiny_images(src, 3)
    for i in range(30):
        (src / f"broken{i:02d}.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    out = tmp_path / "out"
    done = subprocess.run(
        _segbatch_cmd(str(src), str(out), "--max-error-rate", "0.5"), capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 3, (done.returncode, done.stderr[-2000:])
    assert "max-error-rate" in done.stderr and "rows written so far stay valid" in done.stderr
    written = rows(out)
    assert written and all(r["status"] in ("ok", "error") for r in written)
    assert len({r["uri"] for r in written}) == len(written)
