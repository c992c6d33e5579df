"""End to end on a real local Ray: fidelity to the reference mask, the summary contract, resume
(docs/output-contract.md)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from segbatch import RunConfig, run
from segbatch.store.contract import SUMMARY_SCHEMA

from _helpers import TEST_ARCH, agreement, exif_jpeg, load_model, photo_like, reference_mask, summary_table

CONTRACT = {
    "uri": pa.string(),
    "status": pa.string(),
    "error": pa.string(),
    "width": pa.int32(),
    "height": pa.int32(),
    "mask_uri": pa.string(),
    "pixel_counts": pa.list_(pa.int64()),
    "run_id": pa.string(),
    "model": pa.string(),
    "weights": pa.string(),
    "node_id": pa.string(),
    "device": pa.string(),
}


def write_mixed_images(root: Path) -> dict[str, tuple[int, int]]:
    """Images of several sizes, orientations and modes; returns rel path -> displayed (width, height)."""
    (root / "sub" / "deep").mkdir(parents=True)
    sizes = {}

    def save(rel: str, image: Image.Image, **kw) -> None:
        image.save(root / rel, **kw)
        sizes[rel] = image.size

    save("a.jpg", Image.fromarray(photo_like(64, 48, 1)), quality=92)
    save("b.jpg", Image.fromarray(photo_like(64, 48, 2)), quality=92)  # same shape as a.jpg: batched together
    save("a.png", Image.fromarray(photo_like(64, 48, 3)))  # same stem as a.jpg: its own mask
    save("c.png", Image.fromarray(photo_like(97, 131, 4)))
    save("gray.png", Image.fromarray(photo_like(70, 50, 5)).convert("L"))
    save("rgba.png", Image.fromarray(photo_like(50, 70, 6)).convert("RGBA"))
    save("sub/deep/d.JPEG", Image.fromarray(photo_like(120, 90, 7)), quality=90)
    (root / "rot.jpg").write_bytes(exif_jpeg(photo_like(80, 60, 8), orientation=6))
    sizes["rot.jpg"] = (60, 80)  # orientation 6 rotates 90 degrees: displayed portrait
    (root / "notes.txt").write_text("not an image, and not listed")
    return sizes


@pytest.fixture(scope="module")
def labelled(tmp_path_factory, ray_local, checkpoint):
    root = tmp_path_factory.mktemp("run")
    sizes = write_mixed_images(root / "in")
    config = RunConfig(
        input=str(root / "in"),
        output=str(root / "out"),
        model=TEST_ARCH,
        weights=str(checkpoint),
        batch_size=4,
        progress=False,
    )
    report = run(config)
    return root, sizes, config, report


def test_every_image_gets_one_ok_row_and_a_report(labelled):
    root, sizes, _config, report = labelled
    assert (report.ok, report.errors, report.listed) == (len(sizes), 0, len(sizes))
    table = summary_table(root / "out")
    uris = sorted(table["uri"].to_pylist())
    assert uris == sorted(str(root / "in" / rel) for rel in sizes)
    assert set(table["status"].to_pylist()) == {"ok"}
    assert "images/s" in str(report) and str(root / "out") in str(report)


def test_summary_satisfies_the_contract(labelled, checkpoint):
    root, sizes, _config, report = labelled
    table = summary_table(root / "out")
    for name, typ in CONTRACT.items():
        assert table.schema.field(name).type == typ, name
    assert table.schema.names == SUMMARY_SCHEMA.names
    classes = json.loads(table.schema.metadata[b"segbatch.classes"])
    assert len(classes) == 21 and classes[0] == "__background__"  # the weights' meta categories
    import hashlib

    digest = hashlib.sha256(checkpoint.read_bytes()).hexdigest()
    for row in table.to_pylist():
        rel = row["uri"][len(str(root / "in")) + 1 :]
        assert (row["width"], row["height"]) == sizes[rel]
        assert row["error"] is None and row["run_id"] == report.run_id
        assert row["model"] == TEST_ARCH and row["weights"] == digest
        assert row["device"] == "cpu" and len(row["node_id"]) == 56
        assert row["mask_uri"] == str(root / "out" / "masks" / (rel + ".png"))
        mask = Image.open(row["mask_uri"])
        assert mask.mode in ("P", "L") and mask.size == sizes[rel]
        hist = np.bincount(np.asarray(mask).ravel(), minlength=21)
        assert row["pixel_counts"] == hist.tolist()
        assert sum(row["pixel_counts"]) == row["width"] * row["height"]


def test_masks_match_the_reference(labelled, checkpoint):
    """Every mask against the reference's per-image computation, over mixed sizes in one job."""
    root, sizes, _config, _report = labelled
    model = load_model(checkpoint)
    scores = {}
    for rel in sizes:
        expected = reference_mask((root / "in" / rel).read_bytes(), model)
        got = np.asarray(Image.open(root / "out" / "masks" / (rel + ".png")))
        scores[rel] = agreement(got, expected)
    assert min(scores.values()) >= 0.995, scores
    assert sum(scores.values()) / len(scores) >= 0.9999, scores


def test_without_confidence_the_columns_are_null_and_no_maps_are_written(labelled):
    root, _sizes, _config, _report = labelled
    table = summary_table(root / "out")
    assert table["mean_confidence"].null_count == table.num_rows
    assert table["low_confidence_share"].null_count == table.num_rows
    assert not (root / "out" / "confidence").exists()


def test_confidence_maps_and_columns_follow_the_reference_softmax(ray_local, tmp_path, checkpoint):
    """--confidence: per image, a uint8 map named like the mask and two summary columns, all from the
    reference's own full-resolution logits (the literal softmax here); the masks stay the reference's."""
    sizes = {"a.jpg": (64, 48), "b.png": (97, 131), "c.png": (64, 48)}
    (tmp_path / "in").mkdir()
    for i, (rel, (w, h)) in enumerate(sizes.items()):
        Image.fromarray(photo_like(w, h, 60 + i)).save(tmp_path / "in" / rel)
    config = RunConfig(
        input=str(tmp_path / "in"),
        output=str(tmp_path / "out"),
        model=TEST_ARCH,
        weights=str(checkpoint),
        batch_size=4,
        progress=False,
        confidence=True,
        min_confidence=0.6,
    )
    assert run(config).ok == len(sizes)
    rows = {r["uri"]: r for r in summary_table(tmp_path / "out").to_pylist()}
    model = load_model(checkpoint)
    from torchvision.models import get_model_weights

    for rel, (w, h) in sizes.items():
        image = Image.open(tmp_path / "in" / rel).convert("RGB")
        with torch.inference_mode():
            out = model(get_model_weights(TEST_ARCH).DEFAULT.transforms()(image)[None])["out"]
            probs = torch.softmax(F.interpolate(out, size=(h, w), mode="bilinear", align_corners=False)[0], 0)
        best = probs.max(0).values.numpy()
        conf = Image.open(tmp_path / "out" / "confidence" / (rel + ".png"))
        assert conf.mode == "L" and conf.size == (w, h)
        assert np.abs(np.asarray(conf).astype(int) - np.round(best * 255)).max() <= 1
        row = rows[str(tmp_path / "in" / rel)]
        assert row["mean_confidence"] == pytest.approx(float(best.mean()), abs=1e-4)
        assert row["low_confidence_share"] == pytest.approx(float((best < 0.6).mean()), abs=1e-4)
        mask = np.asarray(Image.open(tmp_path / "out" / "masks" / (rel + ".png")))
        assert agreement(mask, probs.argmax(0).numpy().astype(np.uint8)) >= 0.995

    # The report's "least confident" gallery lists them, least confident first.
    from segbatch.commands._report import collect

    data = collect(str(tmp_path / "out"))
    by_confidence = sorted(rows.values(), key=lambda r: r["mean_confidence"])
    assert [s.uri for s in data.least_confident] == [r["uri"] for r in by_confidence]
    assert [s.confidence for s in data.least_confident] == pytest.approx([r["mean_confidence"] for r in by_confidence])


def test_the_seeded_model_is_content_sensitive(checkpoint):
    """Guards the fidelity test: padding an image into a bigger batch must change its mask."""
    model = load_model(checkpoint)
    image = Image.fromarray(photo_like(64, 48, 1))
    from torchvision.models import get_model_weights

    x = get_model_weights(TEST_ARCH).DEFAULT.transforms()(image)[None]
    with torch.inference_mode():
        plain = model(x)["out"].argmax(1)[0]
        padded = F.pad(x, (0, 200, 0, 120))
        cropped = model(padded)["out"][..., : x.shape[-2], : x.shape[-1]].argmax(1)[0]
    assert len(torch.unique(plain)) >= 2
    assert (plain == cropped).float().mean().item() < 0.99


def test_rerun_skips_done_and_picks_up_new_images(labelled, tmp_path):
    root, sizes, config, _report = labelled
    again = run(config)
    assert (again.ok, again.errors, again.skipped) == (0, 0, len(sizes))
    Image.fromarray(photo_like(64, 48, 99)).save(root / "in" / "new.jpg")
    third = run(config)
    assert (third.ok, third.skipped) == (1, len(sizes))
    table = summary_table(root / "out")
    assert table.num_rows == len(sizes) + 1  # no second ok row for anything
    new_rows = table.filter(pa.compute.equal(table["run_id"], third.run_id))
    assert new_rows["uri"].to_pylist() == [str(root / "in" / "new.jpg")]


def test_actors_that_leave_no_cpu_for_decoding_are_refused(ray_local, tmp_path):
    from segbatch import ConfigError

    (tmp_path / "in").mkdir()
    Image.fromarray(photo_like(20, 20, 0)).save(tmp_path / "in" / "x.png")
    config = RunConfig(
        input=str(tmp_path / "in"),
        output=str(tmp_path / "out"),
        model=TEST_ARCH,
        weights="random",
        actors="2",
        cpus_per_actor=1.0,
        progress=False,
    )
    with pytest.raises(ConfigError, match="leave 0 of the cluster's 2 CPUs"):
        run(config)


def test_decoding_runs_in_cpu_tasks_beside_the_actor_pool(ray_local, tmp_path, checkpoint):
    """Ray Data must not fuse decoding into the inference actor (it would then run serially with it)."""
    from segbatch import pipeline
    from segbatch.models import weights

    (tmp_path / "in").mkdir()
    for i in range(4):
        Image.fromarray(photo_like(24, 18, i)).save(tmp_path / "in" / f"{i}.png")
    config = RunConfig(
        input=str(tmp_path / "in"),
        output=str(tmp_path / "out"),
        model=TEST_ARCH,
        weights=str(checkpoint),
        batch_size=2,
        progress=False,
    )
    inputs = pipeline.plan_inputs(config)
    spec = weights.resolve(TEST_ARCH, str(checkpoint))
    ds = pipeline.build_dataset(config, spec, inputs, "plan-test")
    assert len(ds.take_all()) == 4
    stats = ds.stats()
    assert "MapBatches(DecodeImages)" in stats and "MapBatches(DecodeImages)->" not in stats, stats


def test_a_run_prints_no_ray_data_memory_warning(ray_local, tmp_path, checkpoint, caplog):
    """Ray Data's high-memory detector warns about every run's listing workers (their ~110 MiB against a
    reservation of 0); a run turns it off and puts the detectors back afterwards."""
    import logging

    from ray.data import DataContext

    context = DataContext.get_current()
    interval = context.issue_detectors_config.high_memory_detector_config.detection_time_interval_s
    before = list(context.issue_detectors_config.detectors)
    assert any(d.__name__ == "HighMemoryIssueDetector" for d in before)
    (tmp_path / "in").mkdir()
    for i in range(6):
        Image.fromarray(photo_like(24, 18, i)).save(tmp_path / "in" / f"{i}.png")
    # Detect at every scheduling step instead of every 30 s, so that a short run would show the warning.
    context.issue_detectors_config.high_memory_detector_config.detection_time_interval_s = 0
    try:
        with caplog.at_level(logging.WARNING):
            report = run(
                RunConfig(
                    input=str(tmp_path / "in"),
                    output=str(tmp_path / "out"),
                    model=TEST_ARCH,
                    weights=str(checkpoint),
                    progress=False,
                )
            )
    finally:
        context.issue_detectors_config.high_memory_detector_config.detection_time_interval_s = interval
    assert report.ok == 6
    assert "memory per worker" not in caplog.text
    assert list(context.issue_detectors_config.detectors) == before


def test_a_listing_paced_to_a_few_rows_ahead_still_labels_every_input(ray_local, tmp_path, checkpoint, monkeypatch):
    """The read tasks wait while the run's handed-on rows are more than max_ahead past the rows the driver
    has seen written (listing.Pace); paced to 1,500 rows, a read task's second 1,024-name chunk waits for
    the run to catch up, and the run ends with every input's row. Zero-byte inputs: error rows, no
    inference needed."""
    from segbatch.stages import listing

    for folder in range(3):
        (tmp_path / "in" / f"{folder}").mkdir(parents=True)
        for i in range(1100):
            (tmp_path / "in" / f"{folder}" / f"{i:04d}.jpg").touch()
    # The bound is computed in the driver and travels to the read tasks in their settings.
    monkeypatch.setattr(listing, "MIN_AHEAD_ROWS", 1500)
    monkeypatch.setattr(listing, "AHEAD_ROWS_PER_CPU", 0)
    report = run(
        RunConfig(
            input=str(tmp_path / "in"),
            output=str(tmp_path / "out"),
            model=TEST_ARCH,
            weights=str(checkpoint),
            progress=False,
        )
    )
    assert (report.listed, report.ok, report.errors) == (3300, 0, 3300)
    rows = summary_table(tmp_path / "out")
    assert rows.num_rows == 3300 and len(set(rows["uri"].to_pylist())) == 3300
