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
    assert e2e["extra"]["steady_img_per_s"] is None  # 2 masks are no steady state
    assert "(c) from the first mask to the last: not measured" in out
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


def test_bare_model_on_a_cpu_runs_both_layouts():
    import torch

    from segbatch.models.weights import resolve
    from segbatch.stages.model import build

    spec = resolve(TEST_ARCH, "random")
    net = build(spec)
    example = torch.rand(1, 3, 40, 48)
    rows = bench.bare_model(net, example, [1], torch.device("cpu"), "fp32")
    assert [r.stage for r in rows] == ["(a) bare model, batch 1", "(a) bare model, batch 1, channels_last"]
    assert all(r.images == bench.BARE_IMAGES and r.seconds > 0 for r in rows)
    assert next(net.parameters()).is_contiguous()  # (b) then runs the model as a plain loop does


def test_plan_counts_listing_and_the_decode_to_inference_bytes():
    from segbatch.commands.bench import plan

    kwargs = dict(infer_rate=400.0, decode_rate=100.0, encode_rate=200.0, gpus_per_node=8, cpus_per_node=96)
    # 10^7 images in 1 h need 2,778 images/s; one flat prefix listed at 1,000 names/s cannot keep up.
    flat = plan(1e7, 1.0, list_rate=1000.0, list_tasks=1, handoff_bytes=3 * 520 * 693, **kwargs)
    assert "listing: 1,000 names/s per read task x 1 task(s)" in flat
    assert "<- the bottleneck: 3 top-level folders would keep up" in flat
    assert "decode -> inference: 1.03 MiB per image" in flat
    spread = plan(1e7, 1.0, list_rate=1000.0, list_tasks=64, **kwargs)
    assert "x 64 task(s) = 64,000/s" in spread and "the bottleneck: 3 top-level" not in spread


def test_listing_rate_walks_and_probes_every_image(tmp_path):
    from segbatch.commands.bench import listing_rate
    from segbatch.models.architectures import get_architecture
    from segbatch.stages.decode import ResizeSpec

    for i in range(6):
        folder = tmp_path / "in" / f"sub{i % 2}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(photo_like(64 + 8 * i, 48, seed=i)).save(folder / f"{i}.jpg")
    resize = ResizeSpec.from_transforms(get_architecture(TEST_ARCH).transforms())
    assert listing_rate(str(tmp_path / "in"), resize) > 0


def test_steady_rate_needs_several_write_tasks_and_seconds_of_masks():
    assert bench.steady_rate([100.0 + i * 0.001 for i in range(8)]) is None  # one write task's masks
    assert bench.steady_rate([100.0 + i * 0.001 for i in range(64)]) is None  # many masks, no time between
    assert bench.steady_rate([100.0 + i / 8 for i in range(128)]) == pytest.approx(8.0)
    assert bench.steady_rate([]) is None
