"""Recurring runs you can trust, end to end: model identity, one writer, odd file names, clean stops."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.compute as pc
import pytest
from PIL import Image

from segbatch import RunConfig, run
from segbatch.cli import main
from segbatch.commands._status import collect as collect_status
from segbatch.errors import EXIT_STATUS, ConfigError, IdentityMismatchError, InputError
from segbatch.store import _lease, identity, summary
from segbatch.store.contract import MAX_SEGMENT_BYTES

from _helpers import TEST_ARCH, photo_like, wait_for_masks

EXIT_CONFIG, EXIT_INPUT = EXIT_STATUS[ConfigError], EXIT_STATUS[InputError]

ROOT = Path(__file__).resolve().parents[1]


def save(path: Path, seed: int, size=(64, 48)) -> None:
    Image.fromarray(photo_like(*size, seed)).save(path, quality=90)


def ok_rows(out: str) -> dict[str, list[dict]]:
    rows: dict[str, list[dict]] = {}
    for r in summary.read(out).to_pylist():
        if r["status"] == "ok":
            rows.setdefault(r["uri"], []).append(r)
    return rows


# -- 1: OUTPUT is bound to the model that labelled it ---------------------------------------------------
@pytest.fixture(scope="module")
def model_change(tmp_path_factory, ray_local, checkpoint):
    root = tmp_path_factory.mktemp("identity")
    src, out = root / "in", str(root / "out")
    src.mkdir()
    for i in range(3):
        save(src / f"img{i}.jpg", seed=i)
    a = RunConfig(input=str(src), output=out, model=TEST_ARCH, weights=str(checkpoint), progress=False)
    b = a.replace(weights="random")
    first = run(a.replace(run_id="a1"))
    save(src / "new.jpg", seed=9)
    before = summary.read(out).num_rows
    with pytest.raises(IdentityMismatchError) as refused:
        run(b.replace(run_id="b-plain"))
    refused_rows = summary.read(out).num_rows
    with pytest.raises(IdentityMismatchError):
        run(b.replace(run_id="b-changed", redo_changed=True))
    redo = run(b.replace(run_id="b-redo", redo_all=True))
    return root, out, first, before, refused, refused_rows, redo


def test_a_model_change_is_refused_before_any_image(model_change):
    _root, out, first, before, refused, refused_rows, _redo = model_change
    assert first.ok == 3 and refused_rows == before  # nothing written by the refused runs
    text = str(refused.value)
    assert "weights=random:seed=0" in text and "--redo-all" in text and "another OUTPUT" in text
    bound = identity.read(out)
    assert bound["previous"]["weights"] != "random:seed=0"  # the redo run rebound it, see below


def test_redo_all_relabels_everything_with_the_new_model(model_change):
    _root, out, _first, _before, _refused, _rows, redo = model_change
    assert redo.ok == 4
    rows = ok_rows(out)
    assert len(rows) == 4 and all(len(v) == 1 for v in rows.values())
    assert {v[0]["weights"] for v in rows.values()} == {"random:seed=0"}
    bound = identity.read(out)
    assert bound["identity"]["weights"] == "random:seed=0" and bound["bound_by_run"] == "b-redo"
    assert bound["relabel_since"] is not None
    assert "labelled by: model=deeplabv3_mobilenet_v3_large, weights=random:seed=0" in str(collect_status(out))


def test_the_cli_exits_2_on_a_model_change(model_change, checkpoint, capsys):
    root, out, *_ = model_change
    rc = main(["run", str(root / "in"), out, "--model", TEST_ARCH, "--weights", str(checkpoint), "--no-progress"])
    assert rc == EXIT_CONFIG and "OUTPUT was labelled by" in capsys.readouterr().err


def test_rows_of_an_earlier_model_do_not_count_as_done(tmp_path):
    """A --redo-all that stopped halfway: the next plain run redoes what still has only old-model rows."""
    from segbatch.pipeline import plan_inputs

    out = tmp_path / "out"
    (out / "summary").mkdir(parents=True)
    src = tmp_path / "in"
    src.mkdir()
    for name in ("a.jpg", "b.jpg"):
        (src / name).write_bytes(b"x")
    import pyarrow as pa
    import pyarrow.parquet as pq

    from segbatch.store.contract import SUMMARY_SCHEMA

    since = time.time()
    rows = {name: [None] * 2 for name in SUMMARY_SCHEMA.names}
    rows.update(
        uri=[str(src / "a.jpg"), str(src / "b.jpg")],
        status=["ok", "ok"],
        written_at=[int((since - 60) * 1000), int((since + 1) * 1000)],
    )
    pq.write_table(pa.table(rows, schema=SUMMARY_SCHEMA), out / "summary" / "part-x.parquet")
    config = RunConfig(input=str(src), output=str(out))
    assert plan_inputs(config).todo().num_rows == 0
    assert plan_inputs(config, since).todo()["uri"].to_pylist() == [str(src / "a.jpg")]


# -- 2: one writer at a time -----------------------------------------------------------------------------
def test_a_run_stops_when_another_holds_the_lease(tmp_path, ray_local, capsys):
    src, out = tmp_path / "in", tmp_path / "out"
    src.mkdir()
    save(src / "a.jpg", seed=1)
    holder = _lease.Lease(str(out), {}, "the-other-run").acquire()
    try:
        rc = main(["run", str(src), str(out), "--model", TEST_ARCH, "--weights", "random", "--no-progress"])
        err = capsys.readouterr().err
        assert rc == EXIT_CONFIG and "the-other-run" in err and "last renewed" in err
        assert not (out / "summary").exists() and not (out / "masks").exists()
    finally:
        holder.release()


def test_s3_run_stops_when_another_holds_the_lease(s3_bucket, s3_server, tmp_path, capsys):
    src = tmp_path / "in"
    src.mkdir()
    save(src / "a.jpg", seed=1)
    out = f"s3://{s3_bucket}/labels"
    holder = _lease.Lease(out, {}, "s3-holder").acquire()
    try:
        rc = main(["run", str(src), out, "--model", TEST_ARCH, "--weights", "random", "--no-progress"])
        assert rc == EXIT_CONFIG and "s3-holder" in capsys.readouterr().err
        assert s3_server.keys(s3_bucket) == [f"labels/{_lease.LEASE_NAME}"]
    finally:
        holder.release()


# -- 3, 5, 6: odd trees: OUTPUT inside INPUT, non-UTF-8, long names, links, folders named like masks ------
@pytest.fixture(scope="module")
def odd_tree(tmp_path_factory, ray_local, checkpoint):
    root = tmp_path_factory.mktemp("odd")
    src = root / "photos"
    (src / "x.jpg.png").mkdir(parents=True)
    save(src / "x.jpg", seed=1)
    save(src / "x.jpg.png" / "y.jpg", seed=2)
    long_name = "l" * 236 + ".jpg"  # 240 bytes: legal, but its mask name used to be too long
    save(src / long_name, seed=3)
    save(root / "elsewhere.jpg", seed=4)
    (src / "link.jpg").symlink_to(root / "elsewhere.jpg")
    (src / "caf\udce9.jpg").write_bytes((src / "x.jpg").read_bytes())  # not valid UTF-8 on disk
    out = src / "labels"  # OUTPUT inside INPUT
    config = RunConfig(
        input=str(src), output=str(out), model=TEST_ARCH, weights=str(checkpoint), overlays=True, progress=False
    )
    first = run(config.replace(run_id="odd-1"))
    second = run(config.replace(run_id="odd-2"))
    return root, src, out, long_name, first, second


def test_output_inside_input_is_not_relabelled(odd_tree):
    _root, _src, _out, _long, first, second = odd_tree
    assert first.listed == 5
    assert (second.listed, second.ok, second.skipped) == (5, 0, 4)  # only the error row is retried


def test_non_utf8_name_is_one_error_row_and_the_run_goes_on(odd_tree):
    _root, src, out, _long, first, _second = odd_tree
    assert (first.ok, first.errors) == (4, 1)
    errors = [r for r in summary.read(str(out)).to_pylist() if r["status"] == "error"]
    assert {r["uri"] for r in errors} == {str(src / "caf\\xe9.jpg")}
    assert "not valid UTF-8" in errors[0]["error"]


def test_odd_names_get_unique_masks_that_fit(odd_tree):
    _root, src, out, long_name, _first, _second = odd_tree
    rows = {r["uri"]: r for r in summary.read(str(out), filter=pc.field("status") == "ok").to_pylist()}
    assert set(rows) == {str(src / n) for n in ("x.jpg", "x.jpg.png/y.jpg", long_name, "link.jpg")}
    masks = {r["mask_uri"] for r in rows.values()}
    assert len(masks) == 4 and all(Path(m).is_file() for m in masks)
    for m in masks:
        assert all(len(seg.encode()) <= MAX_SEGMENT_BYTES for seg in Path(m).relative_to(out).parts)
    assert (out / "overlays").is_dir()


# -- 14: SIGTERM and Ctrl-C stop cleanly ------------------------------------------------------------------
@pytest.mark.parametrize("signum,code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_a_signal_stops_the_run_cleanly_with_a_true_record(tmp_path, signum, code):
    src, out = tmp_path / "in", tmp_path / "out"
    src.mkdir()
    save(src / "img000.jpg", seed=0, size=(320, 240))
    for i in range(1, 120):
        os.link(src / "img000.jpg", src / f"img{i:03d}.jpg")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "segbatch",
            "run",
            str(src),
            str(out),
            "--model",
            TEST_ARCH,
            "--weights",
            "random",
            "--batch-size",
            "2",
            "--no-progress",
            "--run-id",
            "sig",
        ],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        wait_for_masks(proc, out, 4, timeout=240)
        proc.send_signal(signum)
        try:
            _stdout, stderr = proc.communicate(timeout=240)
        except subprocess.TimeoutExpired:
            proc.kill()
            _stdout, stderr = proc.communicate()
            pytest.fail(f"the run did not stop within 240 s of {signal.Signals(signum).name}: {stderr[-3000:]}")
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == code, stderr[-3000:]
    assert "Traceback" not in stderr, stderr[-3000:]
    assert f"stopped by {signal.Signals(signum).name}" in stderr
    record = json.loads((out / "runs" / "sig.json").read_text())
    assert record["completed"] is False and signal.Signals(signum).name in record["stopped_early"]
    rows = summary.read(str(out)).to_pylist()
    assert record["ok"] == sum(r["status"] == "ok" for r in rows) and record["error"] == 0
    assert record["ok"] < 120
    assert not (out / _lease.LEASE_NAME).exists()
    assert not list(out.rglob("*.tmp"))


# -- issue 22 item 7: a refused run leaves OUTPUT unbound ------------------------------------------------
def test_a_run_with_nothing_to_list_does_not_bind_output(tmp_path, ray_local, checkpoint):
    empty, src, out = tmp_path / "empty", tmp_path / "in", tmp_path / "out"
    empty.mkdir()
    src.mkdir()
    save(src / "a.jpg", seed=1)
    base = ["--model", TEST_ARCH, "--no-progress"]
    assert main(["run", str(empty), str(out), "--weights", str(checkpoint), *base]) == EXIT_INPUT
    assert not (out / identity.IDENTITY_NAME).exists()
    # Nothing was ever labelled: other weights may have OUTPUT.
    assert main(["run", str(src), str(out), "--weights", "random", *base]) == 0
    assert identity.read(str(out))["identity"]["weights"].startswith("random")


@pytest.mark.timeout(120)  # today's code waits forever for a GPU the cluster does not have
@pytest.mark.parametrize("flags", [["--actors", "100"], ["--gpus-per-actor", "1"], ["--decode-cpus", "64"]])
def test_a_pool_the_cluster_cannot_hold_is_refused_without_binding_output(tmp_path, ray_local, capsys, flags):
    """Issue 22 items 7 and 9: refused at once with exit 2 (the session's Ray has 2 CPUs and no GPU), and
    OUTPUT stays free for any model."""
    src, out = tmp_path / "in", tmp_path / "out"
    src.mkdir()
    save(src / "a.jpg", seed=1)
    rc = main(["run", str(src), str(out), "--model", TEST_ARCH, "--weights", "random", "--no-progress", *flags])
    err = capsys.readouterr().err
    assert rc == EXIT_CONFIG and ("the cluster has" in err or "of the cluster's 2 CPUs" in err), err
    assert not (out / identity.IDENTITY_NAME).exists()
    assert not (out / "masks").exists()


# -- issue 22 items 9 and 10: a hand-edited identity file is refused, never a new binding ----------------
@pytest.mark.parametrize(
    "data",
    [
        {"identity": {}},
        {"identity": {"model": TEST_ARCH}},
        {"identity": {"model": TEST_ARCH, "weights": "random:seed=0"}},
        "complete-but-bad-relabel_since",
    ],
)
def test_an_incomplete_identity_file_is_refused(tmp_path, ray_local, capsys, data):
    src, out = tmp_path / "in", tmp_path / "out"
    src.mkdir()
    save(src / "a.jpg", seed=1)
    args = ["run", str(src), str(out), "--model", TEST_ARCH, "--weights", "random", "--no-progress"]
    if data == "complete-but-bad-relabel_since":
        assert main(args) == 0
        data = json.loads((out / identity.IDENTITY_NAME).read_text())
        data["relabel_since"] = "yesterday"
    else:
        out.mkdir()
    (out / identity.IDENTITY_NAME).write_text(json.dumps(data))
    before = (out / identity.IDENTITY_NAME).read_text()
    assert main(args) == EXIT_CONFIG
    assert identity.IDENTITY_NAME in capsys.readouterr().err
    assert (out / identity.IDENTITY_NAME).read_text() == before  # not rebound


# -- issue 22 item 6: every signal timing ends with a run record and a released lease ---------------------
def test_signals_outside_a_stoppable_window_wait_for_it_and_later_ones_are_ignored():
    """A signal while the run writes its record, merges its summary or stops Ray must not cut that short:
    it waits for the next window of work (or the end), and a second signal is ignored."""
    from segbatch import pipeline

    previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        pipeline.install_stop_handlers()
        with pipeline._protected():
            os.kill(os.getpid(), signal.SIGTERM)  # e.g. right after "execution finished"
            time.sleep(0.1)  # handled here, and nothing was raised
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.1)
        with pytest.raises(pipeline.RunInterrupted) as stopped:
            with pipeline._stoppable():
                pass
        assert stopped.value.name == "SIGTERM"
        os.kill(os.getpid(), signal.SIGTERM)  # a second signal while stopping: ignored, never the default
        time.sleep(0.1)
        assert signal.getsignal(signal.SIGTERM) is pipeline._stop_handler
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        pipeline._stop_handler = None
        pipeline._stop_requested = None


def test_a_second_sigterm_while_stopping_still_ends_with_a_record_and_no_lease(tmp_path):
    src, out = tmp_path / "in", tmp_path / "out"
    src.mkdir()
    save(src / "img000.jpg", seed=0, size=(320, 240))
    for i in range(1, 120):
        os.link(src / "img000.jpg", src / f"img{i:03d}.jpg")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    args = ["run", str(src), str(out), "--model", TEST_ARCH, "--weights", "random", "--batch-size", "2"]
    proc = subprocess.Popen(
        [sys.executable, "-m", "segbatch", *args, "--no-progress", "--run-id", "twice"],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        wait_for_masks(proc, out, 4, timeout=240)
        proc.send_signal(signal.SIGTERM)
        for _ in range(3):  # more signals while it stops: each must be ignored
            time.sleep(0.5)
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        try:
            _stdout, stderr = proc.communicate(timeout=240)
        except subprocess.TimeoutExpired:
            proc.kill()
            _stdout, stderr = proc.communicate()
            pytest.fail(f"the run did not stop within 240 s: {stderr[-3000:]}")
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 143 and "stopped by SIGTERM" in stderr, stderr[-3000:]
    assert "Traceback" not in stderr, stderr[-3000:]
    record = json.loads((out / "runs" / "twice.json").read_text())
    rows = summary.read(str(out)).to_pylist()
    assert record["completed"] is False and record["ok"] == sum(r["status"] == "ok" for r in rows)
    assert not (out / _lease.LEASE_NAME).exists()
    left = [p.name for p in (out / "summary").iterdir() if not p.name.startswith(("part-", "merged-"))]
    assert not left and len(list((out / "summary").iterdir())) <= 2  # merged at the end
