"""`segbatch bench`: stage (c) runs on exactly the limited inputs, cannot be shadowed by the cwd, a failed
stage keeps the numbers measured before it, and the per-stage breakdown adds up."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from segbatch import cli
from segbatch.commands import bench

from _helpers import TEST_ARCH, photo_like


def _images(folder: Path, count: int) -> Path:
    folder.mkdir()
    for i in range(count):
        Image.fromarray(photo_like(48, 36, seed=i)).save(folder / f"img{i}.jpg", quality=90)
    Image.fromarray(photo_like(40, 30, seed=99)).save(folder / "other.webp")  # segbatch run picks it, bench not
    return folder


def _bench(folder: Path, json_path: Path, *extra: str) -> int:
    return cli.main(
        ["bench", str(folder), "--model", TEST_ARCH, "--weights", "random", "--json", str(json_path), *extra]
    )


def _check_breakdown(parts: dict, images: int) -> None:
    stages = [p["stage"] for p in parts["stages"]]
    assert stages == [*bench.BREAKDOWN_STAGES, bench.OVERHEAD]
    assert parts["images"] == images
    assert all(p["ms"] >= 0 and p["share"] >= 0 for p in parts["stages"])
    assert sum(p["ms"] for p in parts["stages"]) <= parts["total_ms"] * (1 + 1e-9)
    assert sum(p["share"] for p in parts["stages"]) == pytest.approx(1.0)


@pytest.mark.integration  # stage (c) runs `segbatch run` in a subprocess
def test_limit_runs_stage_c_on_exactly_the_limited_inputs(tmp_path, capsys):
    folder = _images(tmp_path / "in", 4)
    rc = _bench(folder, tmp_path / "r.json", "--limit", "2", "--skip", "a,b")
    out, err = capsys.readouterr()
    assert rc == 0, out + err
    result = json.loads((tmp_path / "r.json").read_text())
    (e2e,) = [r for r in result["rows"] if r["stage"] == "(c) segbatch end to end"]
    assert result["images"] == 2 and e2e["images"] == 2
    assert e2e["extra"]["ok"] + e2e["extra"]["errors"] == 2
    assert e2e["img_per_s"] == pytest.approx(2 / e2e["seconds"])
    _check_breakdown(result["breakdown"], 2)
    assert result["breakdown"]["basis"] == "(c) end to end"
    assert "(d) per-stage breakdown" in out and "waiting/overhead" in out


@pytest.mark.integration  # stage (c) runs `segbatch run` in a subprocess
def test_a_clone_named_segbatch_in_the_cwd_does_not_shadow_stage_c(tmp_path, monkeypatch, capsys):
    _images(tmp_path / "in", 1)
    clone = tmp_path / "work" / "segbatch"
    clone.mkdir(parents=True)
    (clone / "__init__.py").write_text("raise ImportError('the clone in the cwd was imported')\n")
    (clone / "__main__.py").write_text("raise SystemExit('the clone in the cwd was run')\n")
    monkeypatch.chdir(tmp_path / "work")
    rc = _bench(Path("../in"), Path("r.json"), "--skip", "a,b")  # relative INPUT, resolved before (c) moves
    assert rc == 0, capsys.readouterr()
    result = json.loads((tmp_path / "work" / "r.json").read_text())
    assert result["failed"] is None
    assert [r["images"] for r in result["rows"] if r["stage"] == "(c) segbatch end to end"] == [1]


@pytest.mark.slow  # runs the model at its full 520 px input, image by image
def test_a_failed_stage_keeps_what_was_measured_and_exits_non_zero(tmp_path, monkeypatch, capsys):
    folder = _images(tmp_path / "in", 2)

    def broken(*args, **kwargs):
        raise RuntimeError("segbatch run failed (1): boom")

    monkeypatch.setattr(bench, "end_to_end", broken)
    rc = _bench(folder, tmp_path / "r.json", "--skip", "a")
    captured = capsys.readouterr()
    assert rc == 1
    assert "(b) one-image loop" in captured.out  # measured before (c) failed, still printed
    assert "stage (c) segbatch end to end failed: RuntimeError: segbatch run failed (1): boom" in captured.err
    result = json.loads((tmp_path / "r.json").read_text())
    assert [r["stage"] for r in result["rows"]] == ["(b) one-image loop"]
    assert result["rows"][0]["images"] == 2
    assert result["failed"]["stage"] == "(c) segbatch end to end"


@pytest.mark.slow  # runs the model at its full 520 px input, image by image
def test_breakdown_alone_has_every_stage_and_adds_up(tmp_path, capsys):
    folder = _images(tmp_path / "in", 3)
    rc = _bench(folder, tmp_path / "r.json", "--skip", "a,b,c", "--limit", "2")
    assert rc == 0, capsys.readouterr()
    result = json.loads((tmp_path / "r.json").read_text())
    assert result["rows"] == []
    _check_breakdown(result["breakdown"], 2)
    assert result["breakdown"]["basis"] == "this process, serially"
