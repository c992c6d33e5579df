"""Recurring runs into one OUTPUT: retried errors, --redo-changed, --redo-all, run records, `segbatch status`."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
from PIL import Image

from segbatch import RunConfig, run
from segbatch.cli import main
from segbatch.commands._status import collect as collect_status
from segbatch.errors import EXIT_STATUS, InputError
from segbatch.pipeline import plan_inputs
from segbatch.store import runs, superseded

from _helpers import TEST_ARCH, photo_like, summary_table

pytestmark = pytest.mark.integration  # run() and main() start an embedded Ray


def ok_rows_per_input(table: pa.Table) -> dict[str, int]:
    ok = table.filter(pc.equal(table["status"], "ok"))
    counts = ok.group_by("uri").aggregate([("uri", "count")])
    return dict(zip(counts["uri"].to_pylist(), counts["uri_count"].to_pylist()))


def save(path: Path, seed: int, size=(64, 48)) -> None:
    Image.fromarray(photo_like(*size, seed)).save(path, quality=90)


@pytest.fixture(scope="module")
def history(tmp_path_factory, ray_local, checkpoint):
    """Five runs into one OUTPUT, each changing INPUT the way a growing dataset does."""
    root = tmp_path_factory.mktemp("incremental")
    src, out = root / "in", root / "out"
    src.mkdir()
    for i in range(3):
        save(src / f"img{i}.jpg", seed=i)
    (src / "bad.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    base = RunConfig(
        input=str(src), output=str(out), model=TEST_ARCH, weights=str(checkpoint), batch_size=4, progress=False
    )
    reports, statuses, plans = {}, {}, {}

    def step(name: str, **changes):
        reports[name] = run(base.replace(run_id=name, **changes))
        statuses[name] = collect_status(str(out))

    step("r1-first")
    save(src / "bad.jpg", seed=7)  # repaired
    time.sleep(0.05)  # mtime resolution
    save(src / "img0.jpg", seed=100, size=(80, 60))  # changed in place
    plans["plain"] = plan_inputs(base).todo()["uri"].to_pylist()
    plans["changed"] = plan_inputs(base.replace(redo_changed=True)).todo()["uri"].to_pylist()
    step("r2-changed", redo_changed=True)
    step("r3-all", redo_all=True)
    step("r4-noop")  # everything has an ok row: no Ray at all, but still a run with a record
    return root, reports, statuses, plans


def test_error_rows_are_retried_and_changed_inputs_wait_for_redo_changed(history):
    root, reports, _statuses, plans = history
    r1 = reports["r1-first"]
    assert (r1.ok, r1.errors, r1.skipped) == (3, 1, 0)
    bad, changed = str(root / "in" / "bad.jpg"), str(root / "in" / "img0.jpg")
    assert plans["plain"] == [bad]  # the error row is retried; the changed img0.jpg keeps its ok row
    assert plans["changed"] == [bad, changed]


def test_redo_changed_redoes_only_changed_inputs_and_keeps_one_ok_row(history):
    root, reports, statuses, _plans = history
    r2 = reports["r2-changed"]
    assert (r2.ok, r2.errors, r2.skipped) == (2, 0, 2)
    after = statuses["r2-changed"]
    assert after.extra_ok_rows == 0  # the older ok row of img0.jpg was dropped
    runs_of = {r.run_id: r for r in after.runs}
    assert (runs_of["r1-first"].ok, runs_of["r1-first"].error) == (2, 1)  # r1's other rows stay
    assert runs_of["r2-changed"].ok == 2
    assert (after.inputs_ok, after.inputs_failing) == (4, 0)


def test_redo_all_redoes_everything_and_supersedes_every_older_ok_row(history):
    root, reports, _statuses, _plans = history
    r3 = reports["r3-all"]
    assert (r3.ok, r3.errors, r3.skipped) == (4, 0, 0)
    table = summary_table(root / "out")
    counts = ok_rows_per_input(table)
    assert sorted(counts) == sorted(str(p) for p in (root / "in").iterdir())
    assert set(counts.values()) == {1}
    ok = table.filter(pc.equal(table["status"], "ok"))
    assert set(ok["run_id"].to_pylist()) == {"r3-all"}
    # Error rows of earlier runs may stay (docs/output-contract.md); they are never rewritten away.
    errors = table.filter(pc.equal(table["status"], "error"))
    assert errors["run_id"].to_pylist() == ["r1-first"]
    # The changed image's row and mask are the new ones: its displayed size is now 80x60.
    row = ok.filter(pc.equal(ok["uri"], str(root / "in" / "img0.jpg"))).to_pylist()[0]
    assert (row["width"], row["height"]) == (80, 60)
    assert Image.open(row["mask_uri"]).size == (80, 60)
    # Emptied summary files are deleted, not left as zero-row files; rewritten ones keep the class names.
    for path in (root / "out" / "summary").glob("*.parquet"):
        assert pq.read_metadata(path).num_rows > 0
        assert b"segbatch.classes" in pq.read_schema(path).metadata


def test_every_run_leaves_a_record(history):
    root, reports, _statuses, _plans = history
    records = {r["run_id"]: r for r in runs.read_records(str(root / "out"))}
    assert list(records) == ["r1-first", "r2-changed", "r3-all", "r4-noop"]
    r2 = records["r2-changed"]
    assert (r2["listed"], r2["skipped"], r2["ok"], r2["error"], r2["redo"]) == (4, 2, 2, 0, "changed")
    assert r2["completed"] is True and r2["started_at"] <= r2["finished_at"]
    noop = json.loads((root / "out" / "runs" / "r4-noop.json").read_text())
    assert (noop["listed"], noop["skipped"], noop["ok"], noop["redo"]) == (4, 4, 0, None)
    assert noop["input"] == str(root / "in")


def test_status_counts_runs_and_totals(history, capsys):
    root, _reports, statuses, _plans = history
    first = statuses["r1-first"]
    assert [(r.run_id, r.ok, r.error, r.skipped) for r in first.runs] == [("r1-first", 3, 1, 0)]
    assert (first.inputs_ok, first.inputs_failing) == (3, 1)

    assert main(["status", str(root / "out")]) == 0
    text = capsys.readouterr().out
    lines = {line.split()[0]: line.split()[1:] for line in text.splitlines() if line.startswith("  r")}
    # columns: started, ok, error, skipped
    assert lines["r1-first"][1:] == ["0", "1", "0"]  # its ok rows were all superseded by later redos
    assert lines["r2-changed"][1:] == ["0", "0", "2"]
    assert lines["r3-all"][1:] == ["4", "0", "0"]
    assert lines["r4-noop"][1:] == ["0", "0", "4"]
    assert "last run: r4-noop, finished 20" in text
    assert "inputs with an ok row: 4" in text
    assert "inputs whose latest row is an error: 0" in text


def test_status_of_an_empty_output_says_so(tmp_path, capsys):
    (tmp_path / "nothing").mkdir()  # exists, holds no runs (a missing OUTPUT: tests/test_terminal.py)
    assert main(["status", str(tmp_path / "nothing")]) == EXIT_STATUS[InputError]
    assert "no runs yet" in capsys.readouterr().out


def test_drop_superseded_finishes_an_interrupted_cleanup(tmp_path):
    """A crash between writing a redo's rows and dropping the older ones leaves two ok rows; the next
    cleanup keeps the newest and rewrites only the file holding the older one."""
    from segbatch.store.contract import SUMMARY_SCHEMA, summary_metadata

    out = tmp_path / "out"
    (out / "summary").mkdir(parents=True)

    def write(name: str, run_id: str, rows: list[tuple[str, str, int]]) -> None:
        cols = {n: [None] * len(rows) for n in SUMMARY_SCHEMA.names}
        cols["uri"] = [u for u, _, _ in rows]
        cols["status"] = [s for _, s, _ in rows]
        cols["written_at"] = [t for _, _, t in rows]
        cols["run_id"] = [run_id] * len(rows)
        table = pa.table(cols, schema=SUMMARY_SCHEMA.with_metadata(summary_metadata(("bg", "fg"))))
        pq.write_table(table, out / "summary" / name)

    write("part-old.parquet", "old", [("a", "ok", 1000), ("b", "ok", 1000), ("c", "error", 1000)])
    write("part-new.parquet", "new", [("a", "ok", 2000)])
    write("part-untouched.parquet", "other", [("d", "ok", 500)])
    untouched_mtime = (out / "summary" / "part-untouched.parquet").stat().st_mtime_ns
    assert collect_status(str(out)).extra_ok_rows == 1

    assert superseded.drop_superseded(str(out)) == 1
    old = pq.read_table(out / "summary" / "part-old.parquet")
    assert sorted(zip(old["uri"].to_pylist(), old["status"].to_pylist())) == [("b", "ok"), ("c", "error")]
    assert json.loads(old.schema.metadata[b"segbatch.classes"]) == ["bg", "fg"]
    assert (out / "summary" / "part-untouched.parquet").stat().st_mtime_ns == untouched_mtime
    assert collect_status(str(out)).extra_ok_rows == 0
    assert superseded.drop_superseded(str(out)) == 0  # idempotent
    assert not list((out / "summary").glob(".*"))  # no temporaries left behind
    assert np.all(pq.read_table(out / "summary" / "part-new.parquet")["run_id"].to_numpy(zero_copy_only=False) == "new")


def test_drop_done_compares_identity_where_both_sides_have_it():
    from segbatch.stages.listing import LISTING_SCHEMA, drop_done

    listed = pa.table(
        {
            "uri": ["same", "resized", "new", "etag-changed", "touched"],
            "path": ["p"] * 5,
            "rel": ["r"] * 5,
            "size": [1, 2, 3, 4, 5],
            "etag": [None, None, None, "e2", None],
            "mtime": [1.0, 2.0, 3.0, None, 9.0],
            "model_h": [0] * 5,
            "model_w": [0] * 5,
        },
        schema=LISTING_SCHEMA,
    )
    done = pa.table(
        {
            "uri": ["same", "resized", "etag-changed", "touched"],
            "size": [1, 20, 4, 5],
            "etag": pa.array([None, None, "e1", None], pa.string()),
            "mtime": [1.0, 2.0, 4.0, 5.0],
        }
    )
    assert drop_done(listed, done, redo_changed=False)["uri"].to_pylist() == ["new"]
    # The listing's order is kept (a real listing is sorted by uri).
    assert drop_done(listed, done, redo_changed=True)["uri"].to_pylist() == [
        "resized",
        "new",
        "etag-changed",
        "touched",
    ]
    # The same in chunks, as a resumed run reads them from a large summary.
    chunks = [done.slice(0, 1), done.slice(1, 2), done.slice(3)]
    assert drop_done(listed, iter(chunks), redo_changed=True)["uri"].to_pylist() == [
        "resized",
        "new",
        "etag-changed",
        "touched",
    ]
    assert drop_done(listed, iter(chunks), redo_changed=False)["uri"].to_pylist() == ["new"]
