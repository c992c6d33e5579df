"""The listing stage without Ray: shards, streaming walk order, the resume index, header probes, shape cutting."""

from __future__ import annotations

import io
import itertools
import random
import time
from collections import Counter

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from segbatch.stages import listing
from segbatch.stages.decode import ResizeSpec
from segbatch.store.contract import SUMMARY_SCHEMA

from _helpers import exif_jpeg, photo_like


def rows(shapes: list[tuple[int, int]], start: int = 0) -> pa.Table:
    n = len(shapes)
    return pa.table(
        {
            "uri": [f"/in/{i:05d}.jpg" for i in range(start, start + n)],
            "path": [f"/in/{i:05d}.jpg" for i in range(start, start + n)],
            "rel": [f"{i:05d}.jpg" for i in range(start, start + n)],
            "size": [1] * n,
            "etag": [None] * n,
            "mtime": [0.0] * n,
            "model_h": [h for h, _ in shapes],
            "model_w": [w for _, w in shapes],
        },
        schema=listing.LISTING_SCHEMA,
    )


def runs_of(block: pa.Table) -> list[tuple[tuple[int, int], int]]:
    """(shape, length) of each maximal single-shape run in a block, in order."""
    keys = list(zip(block["model_h"].to_pylist(), block["model_w"].to_pylist()))
    return [(k, len(list(g))) for k, g in itertools.groupby(keys)]


SHAPES = [(520, 693), (693, 520), (520, 520), (520, 924)]


def test_cutter_makes_full_single_shape_runs_and_loses_nothing():
    rng = random.Random(0)
    shapes = [rng.choice(SHAPES) for _ in range(500)]
    cutter = listing.ShapeCutter(batch_size=16, block_rows=32)
    blocks = []
    for start in range(0, 500, 37):  # chunks of odd size, as a walk hands them on
        blocks += list(cutter.add(rows(shapes[start : start + 37], start)))
    body = len(blocks)
    blocks += list(cutter.flush())
    out = pa.concat_tables(blocks)
    assert sorted(out["uri"].to_pylist()) == sorted(rows(shapes)["uri"].to_pylist())  # none lost, none twice
    for block in blocks[:body]:  # before the end: whole runs of exactly batch_size rows
        assert block.num_rows == 32
        assert all(n % 16 == 0 for _, n in runs_of(block)), runs_of(block)
    # As few forward passes as a global view of every shape would give: one partial pass per shape at most.
    passes = sum(-(-n // 16) for b in blocks for _, n in runs_of(b))
    assert passes == sum(-(-n // 16) for n in Counter(shapes).values())
    tail = [r for b in blocks[body:] for r in runs_of(b) if r[1] % 16]
    assert len(tail) <= len(SHAPES) and len({s for s, _ in tail}) == len(tail)


def test_cutter_passes_names_through_in_order_at_batch_size_one():
    cutter = listing.ShapeCutter(batch_size=1, block_rows=32)
    table = rows([(0, 0)] * 100)
    out = list(cutter.add(table)) + list(cutter.flush())
    assert [b.num_rows for b in out[:3]] == [32, 32, 32]
    assert pa.concat_tables(out)["uri"].to_pylist() == table["uri"].to_pylist()


def test_cutter_holds_a_bounded_number_of_names():
    # Every name its own shape: no run ever fills, so the bound releases partial runs.
    shapes = [(520, 520 + i) for i in range(300)]
    cutter = listing.ShapeCutter(batch_size=16, block_rows=32, max_held_rows=50)
    out = list(cutter.add(rows(shapes)))
    assert sum(cutter._counts.values()) <= 50
    out += list(cutter.flush())
    assert sum(b.num_rows for b in out) == 300


def test_cutter_spreads_a_small_tail_over_the_actors():
    cutter = listing.ShapeCutter(batch_size=2, block_rows=32, spread=4)
    out = list(cutter.add(rows([(520, 520)] * 16))) + list(cutter.flush())
    assert [b.num_rows for b in out] == [4, 4, 4, 4]


def test_plan_puts_top_level_files_in_one_shard_and_spreads_folders(tmp_path):
    (tmp_path / "top.jpg").write_bytes(b"x")
    for d in range(5):
        (tmp_path / f"d{d}").mkdir()
        (tmp_path / f"d{d}" / "a.jpg").write_bytes(b"x")
    fs, root = listing._storage.open_url(str(tmp_path))
    shards = listing.plan_shards(fs, root, [], max_shards=3)
    assert [len(s.files) for s in shards] == [1, 0, 0]
    assert sorted(d for s in shards for d in s.dirs) == sorted(str(tmp_path / f"d{d}") for d in range(5))
    assert len(shards) == 3


def test_a_large_top_level_is_one_streaming_shard(tmp_path, monkeypatch):
    monkeypatch.setattr(listing, "PLAN_SCAN_ENTRIES", 10)
    for i in range(11):
        (tmp_path / f"{i}.jpg").write_bytes(b"x")
    fs, root = listing._storage.open_url(str(tmp_path))
    assert listing.plan_shards(fs, root, [], max_shards=8) == [listing.Shard(0, dirs=(root,))]


def test_the_walk_is_in_byte_order_of_uris(tmp_path):
    for rel in ("b.jpg", "a/z.jpg", "a.jpg", "a-b/c.jpg", "a/b/y.jpg", "ab.jpg"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(b"x")
    walked = [p for p, _ in listing._walk_local(str(tmp_path), listing._WalkStats(), [])]
    assert walked == sorted(walked, key=lambda p: p.encode())
    assert len(walked) == 6


def test_probe_reads_the_displayed_shape_after_the_weights_resize(tmp_path):
    fs, _ = listing._storage.open_url(str(tmp_path))
    resize = ResizeSpec((520,), Image.Resampling.BILINEAR)
    plain = tmp_path / "wide.png"
    Image.fromarray(photo_like(64, 48, 0)).save(plain)
    assert listing.probe_shape(fs, str(plain), plain.stat().st_size, resize) == (520, 693)
    rotated = tmp_path / "rotated.jpg"  # stored 64x48, displayed 48x64 (EXIF orientation 6)
    rotated.write_bytes(exif_jpeg(photo_like(64, 48, 1), orientation=6))
    assert listing.probe_shape(fs, str(rotated), rotated.stat().st_size, resize) == (693, 520)
    assert listing.probe_shape(fs, str(plain), 0, resize) == (0, 0)  # empty: not opened
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"not an image")
    assert listing.probe_shape(fs, str(broken), 12, resize) == (0, 0)


def _summary(path, uris: list[str], row_group: int) -> None:
    n = len(uris)
    cols = {name: pa.nulls(n, SUMMARY_SCHEMA.field(name).type) for name in SUMMARY_SCHEMA.names}
    cols["uri"] = pa.array(uris, pa.string())
    cols["status"] = pa.array(["ok"] * n, pa.string())
    cols["run_id"] = pa.array(["old"] * n, pa.string())
    pq.write_table(pa.table(cols, schema=SUMMARY_SCHEMA), path, row_group_size=row_group)


def test_done_index_reads_only_the_row_groups_a_chunk_touches(tmp_path, monkeypatch):
    out = tmp_path / "out"
    (out / "summary").mkdir(parents=True)
    done = [f"/in/{i:05d}.jpg" for i in range(0, 4000, 2)]  # every other input is done
    _summary(out / "summary" / "merged-a.parquet", done, row_group=100)
    index = listing.DoneIndex(str(out), {}, identity=False, since=None, run_id="new")
    assert index.row_groups == 20
    loads = []
    original = index._load
    monkeypatch.setattr(index, "_load", lambda i: loads.append(i) or original(i))
    chunk = rows([(0, 0)] * 100, start=1000)  # inputs 1000..1099: row groups 5 and (at its edge) none else
    kept = index.drop(chunk)
    assert kept["uri"].to_pylist() == [f"/in/{i:05d}.jpg" for i in range(1001, 1100, 2)]
    assert set(loads) == {5}
    # The same answer as the whole done set would give.
    whole = listing.drop_done(chunk, pa.table({"uri": done}), redo_changed=False)
    assert kept["uri"].to_pylist() == whole["uri"].to_pylist()


def test_rows_of_the_running_run_never_count_as_done(tmp_path):
    out = tmp_path / "out"
    (out / "summary").mkdir(parents=True)
    _summary(out / "summary" / "part-x.parquet", ["/in/00000.jpg"], row_group=10)
    assert listing.DoneIndex(str(out), {}, False, None, run_id="old").drop(rows([(0, 0)])).num_rows == 1
    assert listing.DoneIndex(str(out), {}, False, None, run_id="new").drop(rows([(0, 0)])).num_rows == 0


def test_a_read_task_lists_drops_done_and_reports_nothing_without_ray(tmp_path):
    src = tmp_path / "in"
    (src / "sub").mkdir(parents=True)
    for name in ("a.jpg", "b.jpg", "sub/c.jpg", "skip.txt", ".hidden.jpg"):
        buf = io.BytesIO()
        Image.fromarray(np.zeros((4, 6, 3), np.uint8)).save(buf, "JPEG")
        (src / name).write_bytes(buf.getvalue())
    out = tmp_path / "out"
    (out / "summary").mkdir(parents=True)
    _summary(out / "summary" / "part-x.parquet", [str(src / "b.jpg")], row_group=10)

    class Config:
        input, output, storage_options, extensions = str(src), str(out), {}, ("jpg",)
        redo_all = redo_changed = False

    inputs = listing.ListedInputs(Config())
    assert inputs.todo()["uri"].to_pylist() == [str(src / "a.jpg"), str(src / "sub/c.jpg")]
    assert inputs.counts() == (3, 1)


@pytest.mark.parametrize("bad", ["", "x"])
def test_an_input_with_no_image_at_its_top_is_refused_before_anything_starts(tmp_path, bad):
    (tmp_path / "notes.txt").write_text(bad)

    class Config:
        input, output, storage_options, extensions = str(tmp_path), str(tmp_path / "out"), {}, ("jpg",)
        redo_all = redo_changed = False

    with pytest.raises(listing.InputError, match="no images found"):
        listing.ListedInputs(Config())


@pytest.mark.parametrize("gpus", [0, 1])
@pytest.mark.parametrize("cpus", [1, 2, 4, 16, 96])
def test_running_read_tasks_leave_a_decode_and_a_write_task_room_beside_the_actors(cpus, gpus):
    """The read tasks a run lets run at once, beside the default inference pool, still leave a decode task
    and a write task their CPUs: with room for one only, Ray Data kept decoding the listing's flood of
    blocks and the model's first outputs waited seconds for a write task."""
    from segbatch import RunConfig
    from segbatch._internal.resources import LIST_TASK_CPUS, list_tasks_running, size_for_cluster

    size = size_for_cluster(RunConfig(input="in", output="out"), cpus, gpus)
    spare = cpus - size.max_actors * size.cpus_per_actor
    assert list_tasks_running(cpus) * LIST_TASK_CPUS + 2 * size.decode_cpus <= spare + 1e-9


def _paced(tmp_path, monkeypatch, run_id: str, max_ahead: int) -> tuple[listing.ListingSettings, listing.Shard]:
    """A read task's settings and shard over 3,000 empty ``.jpg`` files in three folders of ``tmp_path``,
    paced to ``max_ahead`` rows, reporting (and looking at its pace) after every chunk of 1,024 names."""
    for folder in range(3):
        (tmp_path / f"{folder}").mkdir()
        for i in range(1000):
            (tmp_path / f"{folder}" / f"{i:04d}.jpg").touch()
    monkeypatch.setattr(listing, "REPORT_EVERY", 0.0)
    monkeypatch.setattr(listing, "PACE_SLEEP", 0.05)
    settings = listing.ListingSettings(
        run_id=run_id,
        input_url=str(tmp_path),
        storage_options={},
        extensions=frozenset({"jpg"}),
        output_url=None,
        max_ahead=max_ahead,
    )
    return settings, listing.Shard(0, dirs=tuple(str(tmp_path / f"{f}") for f in range(3)))


def test_a_read_task_waits_while_the_listing_is_max_ahead_rows_ahead_of_the_written_rows(
    tmp_path, ray_local, monkeypatch
):
    """Pace: a read task hands on rows until the run's handed-on rows are more than ``max_ahead`` past the
    rows the driver has seen written, then waits for the driver's count to move."""
    import threading

    from segbatch._internal import _tally

    run_id = "pace-test"
    settings, shard = _paced(tmp_path, monkeypatch, run_id, max_ahead=1500)
    handed_on: list[int] = []
    _tally.put_written(run_id, 0)
    reader = threading.Thread(target=lambda: handed_on.extend(b.num_rows for b in listing.read_shard(settings, shard)))
    try:
        reader.start()
        reader.join(timeout=3)
        # Two chunks of 1,024 names went out: after the second, 2,048 rows were past the 0 written.
        assert reader.is_alive() and sum(handed_on) == 2 * listing.LIST_CHUNK_ROWS
        _tally.put_written(run_id, 1000)  # 1,048 ahead: the last chunk goes out, but for the rows a block
        time.sleep(1)  # of 32 still lacks, and then the task waits again (1,976 ahead) before its end
        assert reader.is_alive() and sum(handed_on) == 3000 - 3000 % settings.block_rows
        _tally.put_written(run_id, 3000)
        reader.join(timeout=10)
        assert not reader.is_alive() and sum(handed_on) == 3000
        assert _tally.totals(run_id).emitted == 3000
    finally:
        _tally.put_written(run_id, 10**9)  # never leave the thread waiting
        reader.join(timeout=10)
        _tally.clear(run_id)
    assert _tally.written(run_id) is None


def test_a_read_task_whose_written_count_stalls_still_hands_on_a_chunk_per_patience(tmp_path, ray_local, monkeypatch):
    """A written count that never moves (rows held where the bound did not foresee) slows the listing to
    one chunk per PACE_PATIENCE; it never stops it."""
    from segbatch._internal import _tally

    monkeypatch.setattr(listing, "PACE_PATIENCE", 0.5)
    run_id = "pace-stalled"
    settings, shard = _paced(tmp_path, monkeypatch, run_id, max_ahead=100)
    _tally.put_written(run_id, 0)
    try:
        started = time.monotonic()
        assert sum(b.num_rows for b in listing.read_shard(settings, shard)) == 3000
        # Three chunks of 1,024 names, and the task waited its patience after each.
        assert 3 * 0.5 <= time.monotonic() - started < 10
    finally:
        _tally.clear(run_id)


def test_cutter_packs_the_tail_into_full_blocks_so_decode_batches_never_cut_a_run():
    """Ray Data cuts decode batches at every block_rows rows across blocks: the tail's partial runs are
    packed into blocks of exactly block_rows where they fit, so no cut falls inside a run (the mixed set's
    11, 11, 5 and 5 at batch 16 once became 22 + 10 rows, cut 16 | 16: one pass more than needed)."""
    shapes = [(1, 1)] * 43 + [(2, 2)] * 27 + [(3, 3)] * 5 + [(4, 4)] * 5  # leaves 11, 11, 5, 5 after full runs
    cutter = listing.ShapeCutter(batch_size=16, block_rows=16)
    blocks = list(cutter.add(rows(shapes))) + list(cutter.flush())
    stream = pa.concat_tables(blocks)
    assert sorted(stream["uri"].to_pylist()) == sorted(rows(shapes)["uri"].to_pylist())  # none lost, none twice
    # Decode's batches as Ray Data cuts them: every 16 rows of the stream, whatever the blocks.
    cuts = [stream.slice(i, 16) for i in range(0, stream.num_rows, 16)]
    passes = sum(-(-n // 16) for cut in cuts for _, n in runs_of(cut))
    assert passes == sum(-(-n // 16) for n in Counter(shapes).values()) == 7
    assert [b.num_rows for b in blocks[-2:]] == [16, 16]
