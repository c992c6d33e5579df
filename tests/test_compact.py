"""Summary compaction: merged files, readers that never count a row twice, kills at every step, S3, and
the commands that read the summary on compacted and uncompacted outputs alike."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
from PIL import Image

from segbatch import RunConfig
from segbatch.cli import main
from segbatch.commands import _status as status
from segbatch.store import compact, summary, superseded
from segbatch.store.contract import SUMMARY_SCHEMA, summary_metadata

from _helpers import TEST_ARCH, photo_like

ROOT = Path(__file__).resolve().parents[1]
CLASSES = ("bg", "fg")


def write_part(
    folder: Path,
    name: str,
    run_id: str,
    uris: list[str],
    *,
    status_of=lambda u: "ok",
    classes=CLASSES,
    written_at: int = 1_700_000_000_000,
    drop_extensions: bool = False,
) -> None:
    n = len(uris)
    cols = {f.name: pa.nulls(n, f.type) for f in SUMMARY_SCHEMA}
    cols["uri"] = pa.array(uris, pa.string())
    cols["status"] = pa.array([status_of(u) for u in uris], pa.string())
    cols["run_id"] = pa.array([run_id] * n, pa.string())
    cols["pixel_counts"] = pa.array([[1, 2]] * n, pa.list_(pa.int64()))
    cols["size"] = pa.array(range(n), pa.int64())
    cols["written_at"] = pa.array([written_at] * n, pa.timestamp("ms", tz="UTC"))
    table = pa.table(cols, schema=SUMMARY_SCHEMA.with_metadata(summary_metadata(classes)))
    if drop_extensions:  # as an older segbatch wrote it
        table = table.drop_columns(["size", "etag", "mtime", "written_at"])
    folder.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, folder / name, compression="zstd")


def synthetic(out: Path, files: int, rows_per_file: int = 64, run_id: str = "r1") -> list[tuple[str, str]]:
    """A summary of ``files`` part files; returns its (uri, run_id) rows, sorted."""
    rows = []
    for i in range(files):
        uris = [f"/in/{i:05d}/{j:03d}.jpg" for j in range(rows_per_file)]
        write_part(
            out / "summary",
            f"part-{run_id}-{i:016x}.parquet",
            run_id,
            uris,
            status_of=lambda u: "error" if u.endswith("007.jpg") else "ok",
        )
        rows += [(u, run_id) for u in uris]
    return sorted(rows)


def seen_rows(out) -> list[tuple[str, str]]:
    table = summary.read(str(out), columns=["uri", "run_id"])
    return sorted(zip(table["uri"].to_pylist(), table["run_id"].to_pylist()))


def summary_files(out: Path) -> list[str]:
    return sorted(p.name for p in (out / "summary").iterdir())


def test_compact_merges_small_files_into_one_and_readers_see_every_row_once(tmp_path, capsys):
    out = tmp_path / "out"
    rows = synthetic(out, files=40)
    write_part(out / "summary", "part-old-0000000000000001.parquet", "old", ["/in/legacy.jpg"], drop_extensions=True)
    rows = sorted(rows + [("/in/legacy.jpg", "old")])
    before = status.collect(str(out))
    assert main(["compact", str(out)]) == 0
    assert "merged 41 summary files (2561 rows) into 1" in capsys.readouterr().out
    files = summary_files(out)
    assert len(files) == 1 and files[0].startswith("merged-")
    assert seen_rows(out) == rows
    merged = pq.ParquetFile(out / "summary" / files[0])
    assert merged.schema_arrow.remove_metadata() == SUMMARY_SCHEMA
    assert json.loads(merged.schema_arrow.metadata[b"segbatch.classes"]) == list(CLASSES)
    legacy = summary.read(str(out), filter=pc.field("uri") == "/in/legacy.jpg").to_pylist()[0]
    assert legacy["size"] is None and legacy["pixel_counts"] == [1, 2]  # missing extensions: null
    after = status.collect(str(out))
    assert (after.inputs_ok, after.inputs_failing, after.extra_ok_rows) == (before.inputs_ok, before.inputs_failing, 0)
    assert sum(t.num_rows for t in summary.done_key_chunks(str(out))) == before.inputs_ok
    # Nothing left to merge: a second compaction changes nothing.
    assert compact.compact(str(out)).merged_written == 0
    assert summary_files(out) == files


def test_batches_streams_every_row_once_in_scans_of_a_few_files(tmp_path, monkeypatch):
    out = tmp_path / "out"
    rows = sorted(synthetic(out, files=7, rows_per_file=5) + synthetic(out, files=3, rows_per_file=5, run_id="r2"))
    compact.compact(str(out), run_id="r2")  # r2's three files merged into one; r1's seven stay
    monkeypatch.setattr(summary, "FILES_PER_SCAN", 3)
    streamed = list(summary.batches(str(out), columns=["uri", "run_id"]))
    assert sorted((u, r) for b in streamed for u, r in zip(b["uri"].to_pylist(), b["run_id"].to_pylist())) == rows
    ok_of_r1 = summary.batches(str(out), columns=["status"], filter=pc.field("run_id") == "r1")
    assert sum(b.num_rows for b in ok_of_r1) == 35
    assert list(summary.batches(str(tmp_path / "empty"), columns=["uri"])) == []


_SCAN_RSS = """
import os, sys
import pyarrow.compute as pc
from segbatch.store import summary

def peak_kib():  # VmHWM: getrusage's maxrss would carry the parent's peak across fork and exec
    return next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM:"))

before = peak_kib()
if sys.argv[2] == "batches":
    n = sum(b.num_rows for b in summary.batches(sys.argv[1], columns=["status"], filter=pc.field("run_id") == "r1"))
else:
    n = summary.read(sys.argv[1], columns=["status"], filter=pc.field("run_id") == "r1").num_rows
print(n, (peak_kib() - before) // 1024, flush=True)
os._exit(0)  # pyarrow 26 can abort at interpreter exit after a scan of many files; the numbers are out
"""


@pytest.mark.slow
def test_batches_memory_does_not_grow_with_the_number_of_files(tmp_path):
    """A dataset keeps each file's Parquet footer once read: one scan over 2,000 files holds them all
    (the stopped run's recount in pipeline.py held ~180 MiB at 3,376 files); batches holds a few."""
    out = tmp_path / "out"
    synthetic(out, files=2_000, rows_per_file=2)

    def grown_mib(how: str) -> int:
        done = subprocess.run([sys.executable, "-c", _SCAN_RSS, str(out), how], capture_output=True, text=True)
        assert done.returncode == 0, done.stderr
        rows, mib = map(int, done.stdout.split())
        assert rows == 4_000
        return mib

    whole, streamed = grown_mib("read"), grown_mib("batches")
    assert whole >= 60, whole  # the cost that streaming removes is there to measure
    assert streamed <= whole / 3, (streamed, whole)


def test_merged_file_is_sorted_by_uri_across_many_spilled_runs(tmp_path, monkeypatch):
    """The external merge: files whose rows come in any order, spilled as many small sorted runs, make one
    file in ``uri`` order whose row groups cover disjoint ranges, with every row and column unchanged."""
    out = tmp_path / "out"
    monkeypatch.setattr(compact, "READ_CHUNK_FILES", 3)
    monkeypatch.setattr(compact, "RUN_ROWS", 50)  # 12 runs
    monkeypatch.setattr(compact, "SPILL_BATCH_ROWS", 7)  # runs end inside record batches
    monkeypatch.setattr(compact, "ROW_GROUP_ROWS", 64)
    order = list(range(600))
    random.Random(0).shuffle(order)
    for i in range(20):  # 30 rows per file, drawn from the whole range
        uris = [f"/in/{n:04d}.jpg" for n in order[i * 30 : (i + 1) * 30]]
        write_part(out / "summary", f"part-r1-{i:016x}.parquet", "r1", uris, written_at=1_700_000_000_000 + i)
    write_part(out / "summary", "part-r2-0.parquet", "r2", ["/in/0007.jpg", "/in/0599.jpg"])  # equal uris
    before = summary.read(str(out)).sort_by([("uri", "ascending"), ("run_id", "ascending")])

    report = compact.compact(str(out))

    assert (report.files_merged, report.merged_written, report.rows) == (21, 1, 602)
    (name,) = summary_files(out)
    merged = pq.ParquetFile(out / "summary" / name)
    uris = merged.read(columns=["uri"])["uri"].to_pylist()
    assert uris == sorted(uris)
    ranges = [
        (g.column(0).statistics.min, g.column(0).statistics.max) for g in map(merged.metadata.row_group, range(10))
    ]
    assert [merged.metadata.row_group(i).num_rows for i in range(10)] == [64] * 9 + [26]
    assert all(hi <= lo for (_, hi), (lo, _) in zip(ranges, ranges[1:]))
    after = summary.read(str(out)).sort_by([("uri", "ascending"), ("run_id", "ascending")])
    assert after.equals(before)
    assert not [n for n in os.listdir(out / "summary") if n.startswith(".")]  # the spilled runs are gone


_COMPACT_RSS = """
import os, sys
from segbatch.cli import _use_system_allocator
from segbatch.store import compact

def peak_kib():
    return next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM:"))

_use_system_allocator()  # as `segbatch run` and `segbatch compact` do
before = peak_kib()
report = compact.compact(sys.argv[1])
print(report.rows, (peak_kib() - before) // 1024, flush=True)
os._exit(0)
"""


@pytest.mark.slow
def test_compaction_memory_does_not_grow_with_the_rows_it_merges(tmp_path):
    """A merge sorts by ``uri`` on local disk (runs of RUN_ROWS rows): once past one row group, the rows it
    merges cost little more. Held whole and sorted in memory, 128,000 of these rows grew the process by
    ~76 MiB more than 25,600 did; the external merge, by ~12 MiB (a record batch per run)."""

    def grown_mib(files: int) -> tuple[int, int]:
        out = tmp_path / f"out{files}"
        long = "/" + "x" * 80  # uris as long as real ones
        for i in range(files):
            uris = [f"{long}/{i:05d}/{j:03d}.jpg" for j in range(64)]
            write_part(out / "summary", f"part-r1-{i:016x}.parquet", "r1", uris)
        done = subprocess.run([sys.executable, "-c", _COMPACT_RSS, str(out)], capture_output=True, text=True)
        assert done.returncode == 0, done.stderr
        rows, mib = map(int, done.stdout.split())
        assert rows == files * 64
        return mib

    small, large = grown_mib(400), grown_mib(2_000)
    assert large - small <= 24, (small, large)


def test_run_compaction_takes_only_that_runs_files_and_limits_file_size(tmp_path, monkeypatch):
    out = tmp_path / "out"
    mine = synthetic(out, files=10, run_id="mine")
    theirs = synthetic(out, files=3, run_id="theirs")
    monkeypatch.setattr(compact, "MAX_ROWS", 256)  # 4 files of 64 rows per merged file
    monkeypatch.setattr(compact, "ROW_GROUP_ROWS", 128)
    report = compact.compact(str(out), run_id="mine")
    assert (report.files_merged, report.merged_written, report.rows) == (10, 3, 640)
    names = summary_files(out)
    assert sum(n.startswith("merged-") for n in names) == 3
    assert sorted(n for n in names if n.startswith("part-")) == [f"part-theirs-{i:016x}.parquet" for i in range(3)]
    assert seen_rows(out) == sorted(mine + theirs)
    assert max(pq.ParquetFile(out / "summary" / n).metadata.num_rows for n in names) == 256
    assert pq.ParquetFile(out / "summary" / names[0]).metadata.num_row_groups == 2


def test_files_with_different_class_names_are_not_merged_together(tmp_path):
    out = tmp_path / "out"
    write_part(out / "summary", "part-a-1.parquet", "a", ["/x1"])
    write_part(out / "summary", "part-a-2.parquet", "a", ["/x2"])
    write_part(out / "summary", "part-b-1.parquet", "b", ["/y1"], classes=("sky", "sea", "sand"))
    write_part(out / "summary", "part-b-2.parquet", "b", ["/y2"], classes=("sky", "sea", "sand"))
    assert compact.compact(str(out)).merged_written == 2
    classes = sorted(
        json.loads(pq.read_schema(out / "summary" / n).metadata[b"segbatch.classes"]) for n in summary_files(out)
    )
    assert classes == [list(CLASSES), ["sky", "sea", "sand"]]
    assert [u for u, _ in seen_rows(out)] == ["/x1", "/x2", "/y1", "/y2"]


def _compact_in_subprocess(out, kill_at: str | None = None, extra_env=None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), **(extra_env or {})}
    if kill_at:
        env[compact.KILL_ENV] = kill_at
    return subprocess.run(
        [sys.executable, "-m", "segbatch", "compact", str(out)], env=env, capture_output=True, text=True, timeout=300
    )


@pytest.mark.integration  # SIGKILLs `segbatch compact` subprocesses
@pytest.mark.parametrize("kill_at", ["written", "marked", "published", "deleting"])
def test_a_kill_at_any_step_leaves_every_row_once_and_the_next_compaction_finishes(tmp_path, kill_at):
    out = tmp_path / "out"
    rows = synthetic(out, files=600, rows_per_file=8)
    got = _compact_in_subprocess(out, kill_at)
    assert got.returncode == -signal.SIGKILL, got.stderr
    names = summary_files(out)
    markers = [n for n in names if n.startswith("_compacting-")]
    merged = [n for n in names if n.startswith("merged-")]
    assert len(markers) == (0 if kill_at == "written" else 1)
    assert len(merged) == (1 if kill_at in ("published", "deleting") else 0)
    if kill_at == "deleting":  # some small files are gone, the rest are still there
        assert 0 < sum(n.startswith("part-") for n in names) < 600
    assert seen_rows(out) == rows  # every row exactly once, as readers see it
    assert status.collect(str(out)).extra_ok_rows == 0
    temporaries = [n for n in names if n.startswith(".")]
    assert len(temporaries) == (1 if kill_at in ("written", "marked") else 0)

    got = _compact_in_subprocess(out)
    assert got.returncode == 0, got.stderr
    names = summary_files(out)
    assert len(names) == 1 and names[0].startswith("merged-")  # temporaries of the kill are gone too
    assert seen_rows(out) == rows


def test_a_kill_while_the_marker_is_written_leaves_a_temporary_the_next_compaction_removes(tmp_path):
    """Issue 22 item 12: the window behind the flaky test. The marker (step 2) is written by
    _storage.write_atomic: a hidden temporary, then a rename. A kill between the two leaves
    ``._compacting-<hash>.json.<12 hex>.tmp``, which compaction used to keep for ever."""
    out = tmp_path / "out"
    rows = synthetic(out, files=3)
    left = out / "summary" / "._compacting-0123456789abcdef.json.0123456789ab.tmp"
    left.write_text('{"merged": "merged-0123456789abcdef.parquet", "replaces": []}')
    stray_part = out / "summary" / ".part-r-1.parquet.0123456789ab.tmp"  # a write task's, killed likewise
    stray_part.write_bytes(b"PAR1")
    assert seen_rows(out) == rows  # readers never see hidden files
    compact.compact(str(out))
    assert not left.exists() and not stray_part.exists()
    names = summary_files(out)
    assert len(names) == 1 and names[0].startswith("merged-"), names
    assert seen_rows(out) == rows


@pytest.mark.integration  # SIGKILLs `segbatch compact` subprocesses
def test_sigkill_at_arbitrary_moments_never_loses_or_doubles_a_row(tmp_path):
    out = tmp_path / "out"
    rows = synthetic(out, files=1500, rows_per_file=4)
    pristine = tmp_path / "pristine"
    shutil.copytree(out, pristine)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    for delay in (1.0, 1.8, 2.6):
        shutil.rmtree(out)
        shutil.copytree(pristine, out)
        proc = subprocess.Popen(
            [sys.executable, "-m", "segbatch", "compact", str(out)],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        assert seen_rows(out) == rows, f"killed after {delay}s"
        compact.compact(str(out))
        assert seen_rows(out) == rows, f"killed after {delay}s, then compacted"
        left = [n for n in summary_files(out) if n.startswith(("_", "part-", "."))]
        assert not left, f"killed after {delay}s, then compacted: left behind {left}"


def test_drop_superseded_works_on_merged_files_and_keeps_their_class_names(tmp_path):
    out = tmp_path / "out"
    write_part(out / "summary", "part-old-1.parquet", "old", ["a", "b"], written_at=1000)
    write_part(out / "summary", "part-old-2.parquet", "old", ["c"], written_at=1000)
    compact.compact(str(out))
    # A redo run's rows, in its own (not yet merged) file, then a pending merge of it beside.
    write_part(out / "summary", "part-new-1.parquet", "new", ["a"], written_at=2000)
    assert status.collect(str(out)).extra_ok_rows == 1
    assert superseded.drop_superseded(str(out)) == 1
    assert seen_rows(out) == [("a", "new"), ("b", "old"), ("c", "old")]
    merged = [n for n in summary_files(out) if n.startswith("merged-")]
    assert json.loads(pq.read_schema(out / "summary" / merged[0]).metadata[b"segbatch.classes"]) == list(CLASSES)
    compact.compact(str(out))
    assert len(summary_files(out)) == 1
    assert seen_rows(out) == [("a", "new"), ("b", "old"), ("c", "old")]


def test_drop_superseded_finishes_a_pending_merge_before_it_deletes_an_emptied_merged_file(tmp_path, monkeypatch):
    """A merged file whose rows are all superseded is deleted by the redo cleanup; the small files it
    replaced (left by a killed compaction) must not come back with their old ok rows."""
    out = tmp_path / "out"
    write_part(out / "summary", "part-old-1.parquet", "old", ["a"], written_at=1000)
    write_part(out / "summary", "part-old-2.parquet", "old", ["b"], written_at=1000)
    monkeypatch.setattr(compact, "_finish", lambda *a, **k: None)  # killed before the deletes
    compact.compact(str(out))
    monkeypatch.undo()
    assert len(summary_files(out)) == 4  # 2 small, 1 merged, 1 marker
    write_part(out / "summary", "part-new-1.parquet", "new", ["a", "b"], written_at=2000)
    assert superseded.drop_superseded(str(out)) == 2
    assert seen_rows(out) == [("a", "new"), ("b", "new")]
    assert summary_files(out) == ["part-new-1.parquet"]


def test_compaction_on_s3_with_a_kill_before_the_deletes(s3_bucket, s3_server, tmp_path):
    local = tmp_path / "local"
    rows = synthetic(local, files=30, rows_per_file=5)
    url = f"s3://{s3_bucket}/labels"
    s3_server.upload_dir(local, url)
    got = _compact_in_subprocess(url, "published")
    assert got.returncode == -signal.SIGKILL, got.stderr
    from _s3 import clear_s3fs_cache

    clear_s3fs_cache()
    keys = [k for k in s3_server.keys(s3_bucket) if "/summary/" in k]
    assert sum("/summary/_compacting-" in k for k in keys) == 1 and len(keys) == 32
    assert seen_rows(url) == rows
    got = _compact_in_subprocess(url)
    assert got.returncode == 0, got.stderr
    clear_s3fs_cache()
    keys = [k for k in s3_server.keys(s3_bucket) if "/summary/" in k]
    assert len(keys) == 1 and "/summary/merged-" in keys[0]
    assert seen_rows(url) == rows


@pytest.fixture(scope="module")
def two_outputs(tmp_path_factory, ray_local, checkpoint):
    """One run of 20 images, its OUTPUT left as the run wrote it (small files) and compacted."""
    from segbatch import run

    root = tmp_path_factory.mktemp("compacted")
    src = root / "in"
    src.mkdir()
    for i in range(19):
        Image.fromarray(photo_like(64, 48, seed=i)).save(src / f"img{i:02d}.jpg", quality=90)
    (src / "bad.jpg").write_bytes(b"not an image")
    config = RunConfig(
        input=str(src),
        output=str(root / "small"),
        model=TEST_ARCH,
        weights=str(checkpoint),
        batch_size=2,
        progress=False,
        run_id="r1",
    )
    from segbatch._internal import resources

    original, block_rows = compact.compact, resources.CPU_BLOCK_ROWS
    compact.compact = lambda *a, **k: compact.CompactReport()  # as a killed run or an older version leaves it
    resources.CPU_BLOCK_ROWS = 2  # one summary file per 2 images: many small files, as a large run leaves them
    try:
        report = run(config)
    finally:
        compact.compact, resources.CPU_BLOCK_ROWS = original, block_rows
    assert (report.ok, report.errors) == (19, 1)
    shutil.copytree(root / "small", root / "merged")
    compact.compact(str(root / "merged"))
    gt = root / "gt"  # the masks themselves as ground truth
    for mask in (root / "small" / "masks").rglob("*.png"):
        rel = mask.relative_to(root / "small" / "masks")
        target = gt / str(rel)[: -len(".jpg.png")]
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(mask, str(target) + ".png")
    return root, config


def test_a_run_leaves_one_merged_summary_file(tmp_path, ray_local, checkpoint):
    from segbatch import run

    src = tmp_path / "in"
    src.mkdir()
    for i in range(24):
        Image.fromarray(photo_like(40, 30, seed=i)).save(src / f"i{i:02d}.jpg", quality=90)
    report = run(
        RunConfig(
            input=str(src),
            output=str(tmp_path / "out"),
            model=TEST_ARCH,
            weights=str(checkpoint),
            batch_size=2,
            progress=False,
        )
    )
    assert report.ok == 24
    files = summary_files(tmp_path / "out")
    assert len(files) == 1, files
    assert summary.read(str(tmp_path / "out")).num_rows == 24


def test_a_128_image_run_leaves_at_most_two_summary_files(tmp_path, ray_local, checkpoint):
    """Zero-byte inputs: every stage runs and writes a row (an error row), without the CPU inference."""
    from segbatch import run

    src = tmp_path / "in"
    src.mkdir()
    for i in range(128):
        (src / f"e{i:03d}.jpg").write_bytes(b"")
    report = run(
        RunConfig(
            input=str(src),
            output=str(tmp_path / "out"),
            model=TEST_ARCH,
            weights=str(checkpoint),
            batch_size=4,
            progress=False,
        )
    )
    assert (report.ok, report.errors) == (0, 128)
    files = summary_files(tmp_path / "out")
    assert len(files) <= 2 and all(f.startswith("merged-") for f in files)
    assert summary.read(str(tmp_path / "out")).num_rows == 128


def test_uncompacted_output_has_small_files(two_outputs):
    root, _config = two_outputs
    assert len(summary_files(root / "small")) >= 10
    assert len(summary_files(root / "merged")) == 1


def test_status_report_eval_and_resume_read_both_alike(two_outputs):
    from segbatch.commands._evaluate import evaluate
    from segbatch.commands._report import collect
    from segbatch.pipeline import plan_inputs

    root, config = two_outputs
    results = {}
    for name in ("small", "merged"):
        out = str(root / name)
        st = status.collect(out)
        rep = collect(out, samples=0)
        ev = evaluate(out, str(root / "gt"))
        plan = plan_inputs(config.replace(output=out))
        results[name] = (
            [(r.run_id, r.ok, r.error, r.skipped) for r in st.runs],
            st.inputs_ok,
            st.inputs_failing,
            rep.ok_images,
            rep.error_rows,
            rep.pixel_totals.tolist(),
            rep.classes,
            ev.images,
            ev.matrix.tolist(),
            plan.todo()["uri"].to_pylist(),
            plan.counts(),
        )
    assert results["small"] == results["merged"]
    runs_, inputs_ok, failing, ok_images, *_rest, todo, counts = results["merged"]
    assert (runs_[0][:3], inputs_ok, failing, ok_images) == (("r1", 19, 1), 19, 1, 19)
    assert todo == [str(root / "in" / "bad.jpg")] and counts == (20, 19)


def test_compact_holds_the_lease_and_stops_while_a_run_holds_it(tmp_path, capsys):
    from segbatch.store import _lease

    out = tmp_path / "out"
    rows = synthetic(out, files=5)
    with _lease.Lease(str(out), None, "a-running-run"):
        assert main(["compact", str(out)]) == 2
    assert len(summary_files(out)) == 5 and seen_rows(out) == rows
    assert main(["compact", str(out)]) == 0
    assert len(summary_files(out)) == 1 and seen_rows(out) == rows
    assert not (out / _lease.LEASE_NAME).exists()  # released
