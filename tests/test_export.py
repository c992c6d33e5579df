"""`segbatch export`: every format read back with that format's own reference reader, pixel for pixel.

COCO through pycocotools (``COCO`` and ``mask.decode``), Label Studio through its converter's brush
decoder (``label_studio_converter.brush.decode_rle``), CVAT by reading its PNGs and labelmap.txt back and
mapping colours to class ids. The round trips run on a real OUTPUT (the pipeline on a few small images
with the seeded checkpoint, locally and on the moto S3 endpoint); sharding, newest-row selection and
failures use hand-made OUTPUTs whose masks are known exactly.
"""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import numpy as np

# The formats' own reference readers (the `test` extra installs them).
import pycocotools.mask as pycocotools_mask
import pytest
from label_studio_converter.brush import decode_rle
from PIL import Image
from pycocotools.coco import COCO

from segbatch import RunConfig, cli, run
from segbatch.commands.export import ExportError, brush_rle, coco_bbox, coco_rle, export, formats, get_exporter
from segbatch.errors import EXIT_STATUS, ConfigError, ExportIncomplete, InputError
from segbatch.store.contract import CLASSES_METADATA_KEY

from _helpers import BROKEN, TEST_ARCH, photo_like, summary_table, write_inputs, write_output

CLASSES = ["__background__", "cat", "dog", "tree"]  # the hand-made OUTPUTs' classes


# -- reading each format back -------------------------------------------------------------------------


def read_coco(dest: Path) -> dict[str, np.ndarray]:
    """uri -> class-id mask, from every COCO shard, checking that each pixel is covered exactly once."""
    masks: dict[str, np.ndarray] = {}
    image_ids: set[int] = set()
    annotation_ids: set[int] = set()
    for path in sorted(dest.glob("coco-*.json")):
        coco = COCO(str(path))
        for image in coco.dataset["images"]:
            assert image["id"] not in image_ids
            image_ids.add(image["id"])
            label = np.full((image["height"], image["width"]), -1, dtype=np.int64)
            for ann in coco.loadAnns(coco.getAnnIds(imgIds=[image["id"]])):
                assert ann["id"] not in annotation_ids and ann["iscrowd"] == 0
                annotation_ids.add(ann["id"])
                binary = pycocotools_mask.decode(ann["segmentation"]).astype(bool)
                assert binary.shape == label.shape
                assert (label[binary] == -1).all(), "a pixel is covered twice"
                label[binary] = ann["category_id"]
                assert ann["area"] == int(pycocotools_mask.area(ann["segmentation"])) == int(binary.sum())
                assert ann["bbox"] == pycocotools_mask.toBbox(ann["segmentation"]).tolist()
            assert (label >= 0).all(), "a pixel is covered by no annotation"
            assert image["segbatch_uri"] == image["coco_url"]
            masks[image["segbatch_uri"]] = label
    return masks


def read_cvat(dest: Path) -> dict[str, np.ndarray]:
    """CVAT name -> class-id mask: SegmentationClass PNGs as colours, mapped through labelmap.txt."""
    lines = [ln for ln in (dest / "labelmap.txt").read_text().splitlines() if ln and not ln.startswith("#")]
    colours = {}
    for class_id, line in enumerate(lines):
        name, rgb, parts, actions = line.split(":")
        colours[tuple(int(v) for v in rgb.split(","))] = class_id
    assert len(colours) == len(lines), "two classes share a colour"
    names = (dest / "ImageSets" / "Segmentation" / "default.txt").read_text().split("\n")
    assert names[-1] == ""
    masks = {}
    for name in names[:-1]:
        rgb = np.asarray(Image.open(dest / "SegmentationClass" / f"{name}.png").convert("RGB"))
        label = np.full(rgb.shape[:2], -1, dtype=np.int64)
        for colour, class_id in colours.items():
            label[(rgb == np.array(colour, dtype=np.uint8)).all(axis=-1)] = class_id
        assert (label >= 0).all(), f"{name}: a colour that labelmap.txt does not list"
        masks[name] = label
    return masks


def read_label_studio(
    dest: Path, classes: list[str], from_name: str = "tag", to_name: str = "image"
) -> dict[str, np.ndarray]:
    """uri -> class-id mask, decoding each brushlabels result with Label Studio's own decoder."""
    masks = {}
    for path in sorted(dest.glob("tasks-*.json")):
        for task in json.loads(path.read_text()):
            [prediction] = task["predictions"]
            label = None
            for result in prediction["result"]:
                assert (result["type"], result["from_name"], result["to_name"]) == ("brushlabels", from_name, to_name)
                h, w = result["original_height"], result["original_width"]
                label = np.full((h, w), -1, dtype=np.int64) if label is None else label
                value = result["value"]
                assert value["format"] == "rle"
                rgba = decode_rle(value["rle"]).reshape(h, w, 4)
                binary = rgba[:, :, 3] > 0
                assert (label[binary] == -1).all(), "a pixel is painted twice"
                [name] = value["brushlabels"]
                label[binary] = classes.index(name)
            assert label is not None and (label >= 0).all()
            masks[task["data"]["image"]] = label
    return masks


def output_masks(out: Path) -> dict[str, np.ndarray]:
    """uri -> the mask OUTPUT holds, for its ok rows."""
    rows = summary_table(out).to_pylist()
    return {r["uri"]: np.asarray(Image.open(r["mask_uri"])).astype(np.int64) for r in rows if r["status"] == "ok"}


def assert_same(got: dict[str, np.ndarray], want: dict[str, np.ndarray]) -> None:
    assert sorted(got) == sorted(want)
    for key, mask in want.items():
        assert got[key].shape == mask.shape, key
        assert np.array_equal(got[key], mask), key


def cvat_name(uri: str, input_root: str) -> str:
    return uri[len(input_root) + 1 :].rsplit(".", 1)[0]


# -- the encodings against the reference libraries ------------------------------------------------------


def test_coco_rle_is_byte_identical_to_pycocotools():
    rng = np.random.default_rng(5)
    for trial in range(150):
        h, w = (int(v) for v in rng.integers(1, 50, 2))
        binary = [
            rng.random((h, w)) < 0.5,
            np.zeros((h, w), bool),
            np.ones((h, w), bool),
            np.pad(np.ones((max(1, h // 2), max(1, w // 3)), bool), ((h - max(1, h // 2), 0), (0, w - max(1, w // 3)))),
        ][trial % 4]
        want = pycocotools_mask.encode(np.asfortranarray(binary.astype(np.uint8)))
        got = coco_rle(binary)
        assert got == {"size": [int(v) for v in want["size"]], "counts": want["counts"].decode()}
        if binary.any():
            assert coco_bbox(binary) == pycocotools_mask.toBbox(want).astype(int).tolist()


def test_brush_rle_decodes_with_label_studios_decoder():
    rng = np.random.default_rng(6)
    cases = [rng.random((23, 31)) < 0.3, np.zeros((5, 7), bool), np.ones((300, 400), bool)]
    stripes = np.zeros((700, 500), bool)
    stripes[100:400] = True  # runs of 150,000 bytes: longer than one 16-bit run field
    cases.append(stripes)
    for binary in cases:
        rgba = decode_rle(brush_rle(binary)).reshape(*binary.shape, 4)
        assert (rgba == (binary[..., None] * 255)).all()


# -- round trips on a real OUTPUT ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def labelled(tmp_path_factory, ray_local, checkpoint):
    """One real run: six small images and one broken file (an error row)."""
    root = tmp_path_factory.mktemp("export")
    rels = write_inputs(root / "in")
    report = run(
        RunConfig(
            input=str(root / "in"),
            output=str(root / "out"),
            model=TEST_ARCH,
            weights=str(checkpoint),
            batch_size=4,
            progress=False,
        )
    )
    assert (report.ok, report.errors) == (len(rels) - 1, 1)
    classes = json.loads(summary_table(root / "out").schema.metadata[CLASSES_METADATA_KEY])
    return root, classes, output_masks(root / "out")


def test_coco_round_trip_on_a_local_output(labelled, tmp_path, capsys):
    root, classes, want = labelled
    dest = tmp_path / "coco"
    assert cli.main(["export", str(root / "out"), str(dest), "--format", "coco", "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "6 images as coco" in printed and "1 error rows" in printed
    assert_same(read_coco(dest), want)
    assert str(root / "in" / BROKEN) not in json.dumps(json.loads((dest / "coco-00000.json").read_text()))
    data = json.loads((dest / "coco-00000.json").read_text())
    assert [(c["id"], c["name"]) for c in data["categories"]] == list(enumerate(classes))
    files = {i["segbatch_uri"]: i["file_name"] for i in data["images"]}
    assert files[str(root / "in" / "odd name" / "x#1%.png")] == "odd name/x#1%.png"
    assert all(i["width"] == want[i["segbatch_uri"]].shape[1] for i in data["images"])
    index = json.loads((dest / "export.json").read_text())
    assert index["shards"] == [{"path": "coco-00000.json", "images": 6}] and index["classes"] == classes


def test_cvat_round_trip_as_folder_and_zip(labelled, tmp_path):
    root, classes, want = labelled
    by_name = {cvat_name(uri, str(root / "in")): mask for uri, mask in want.items()}
    folder = tmp_path / "cvat"
    assert cli.main(["export", str(root / "out"), str(folder), "--format", "cvat", "--no-progress"]) == 0
    assert_same(read_cvat(folder), by_name)
    labelmap = (folder / "labelmap.txt").read_text().splitlines()
    assert labelmap[1] == "background:0,0,0::" and labelmap[2] == f"{classes[1]}:128,0,0::"
    archive = tmp_path / "cvat-task.zip"
    assert cli.main(["export", str(root / "out"), str(archive), "--format", "cvat", "--no-progress"]) == 0
    with zipfile.ZipFile(archive) as z:
        assert {"labelmap.txt", "ImageSets/Segmentation/default.txt"} <= set(z.namelist())
        z.extractall(tmp_path / "unzipped")
    assert_same(read_cvat(tmp_path / "unzipped"), by_name)


def test_label_studio_round_trip_with_config(labelled, tmp_path, capsys):
    root, classes, want = labelled
    dest = tmp_path / "ls"
    assert (
        cli.main(
            [
                "export",
                str(root / "out"),
                str(dest),
                "--format",
                "label-studio",
                "--no-progress",
                "--from-name",
                "brush",
                "--to-name",
                "photo",
            ]
        )
        == 0
    )
    printed = capsys.readouterr().out
    assert_same(read_label_studio(dest, classes, "brush", "photo"), want)
    config = (dest / "labeling-config.xml").read_text()
    assert config in printed
    assert '<Image name="photo" value="$image"' in config and '<BrushLabels name="brush" toName="photo">' in config
    assert f'<Label value="{classes[1]}" background="#800000"/>' in config
    tasks = json.loads((dest / "tasks-00000.json").read_text())
    assert all(t["predictions"][0]["model_version"] == TEST_ARCH for t in tasks)


def test_round_trip_on_s3(s3_bucket, s3_server, ray_local, checkpoint, tmp_path, capsys):
    import fsspec

    from _s3 import clear_s3fs_cache

    local = tmp_path / "in"
    local.mkdir()
    for i, size in enumerate([(64, 48), (48, 40), (40, 56)]):
        Image.fromarray(photo_like(*size, 40 + i)).save(local / f"img{i}.jpg", quality=90)
    s3_server.upload_dir(local, f"s3://{s3_bucket}/in")
    out = f"s3://{s3_bucket}/out"
    assert (
        cli.main(
            ["run", f"s3://{s3_bucket}/in", out, "--model", TEST_ARCH, "--weights", str(checkpoint), "--no-progress"]
        )
        == 0
    )
    for fmt, dest in (("coco", "coco"), ("label-studio", "ls"), ("cvat", "cvat.zip")):
        assert cli.main(["export", out, f"s3://{s3_bucket}/export/{dest}", "--format", fmt, "--no-progress"]) == 0
    clear_s3fs_cache()
    fs = fsspec.filesystem("s3")
    fs.get(f"{s3_bucket}/out", str(tmp_path / "out"), recursive=True)
    fs.get(f"{s3_bucket}/export", str(tmp_path / "export"), recursive=True)
    table = summary_table(tmp_path / "out")
    rows = table.to_pylist()
    want = {
        r["uri"]: np.asarray(Image.open(tmp_path / "out" / r["mask_uri"].split("/out/", 1)[1])).astype(np.int64)
        for r in rows
    }
    assert sorted(want) == [f"s3://{s3_bucket}/in/img{i}.jpg" for i in range(3)]
    classes = json.loads(table.schema.metadata[CLASSES_METADATA_KEY])
    assert_same(read_coco(tmp_path / "export" / "coco"), want)
    assert_same(read_label_studio(tmp_path / "export" / "ls", classes), want)
    with zipfile.ZipFile(tmp_path / "export" / "cvat.zip") as z:
        z.extractall(tmp_path / "cvat")
    assert_same(read_cvat(tmp_path / "cvat"), {f"img{i}": want[f"s3://{s3_bucket}/in/img{i}.jpg"] for i in range(3)})


# -- hand-made OUTPUTs: sharding, newest rows, failures -------------------------------------------------


def known_masks(n: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    out = {}
    for i in range(n):
        h, w = (int(v) for v in rng.integers(3, 12, 2))
        mask = rng.integers(0, len(CLASSES), size=(h, w))
        mask[: h // 2] = 0  # some background, some blobs
        out[f"d{i % 2}/img{i:02d}.jpg"] = mask
    return out


def test_sharding_puts_every_image_in_exactly_one_shard(tmp_path):
    masks = known_masks(7)
    write_output(tmp_path / "out", [{"rel": rel, "mask": m} for rel, m in masks.items()], CLASSES)
    want = {f"/in/{rel}": m for rel, m in masks.items()}
    results = {}
    for fmt in formats():
        dest = tmp_path / fmt
        results[fmt] = export(str(tmp_path / "out"), fmt, str(dest), shard_size=3, progress=False)
        assert [s["images"] for s in results[fmt].shards] == [3, 3, 1]
        assert results[fmt].images == 7
    coco_files = sorted(p.name for p in (tmp_path / "coco").glob("coco-*.json"))
    assert coco_files == ["coco-00000.json", "coco-00001.json", "coco-00002.json"]
    assert_same(read_coco(tmp_path / "coco"), want)  # also: image and annotation ids unique across shards
    assert_same(read_label_studio(tmp_path / "label-studio", CLASSES), want)
    cvat = {}
    for part in sorted((tmp_path / "cvat").glob("part-*")):
        got = read_cvat(part)
        assert not set(got) & set(cvat)
        cvat.update(got)
    assert_same(cvat, {rel.rsplit(".", 1)[0]: m for rel, m in masks.items()})
    index = json.loads((tmp_path / "coco" / "export.json").read_text())
    assert index["shard_size"] == 3 and index["images"] == 7 and len(index["shards"]) == 3
    # Zipped CVAT shards sit beside each other: NAME-00000.zip, ...
    export(str(tmp_path / "out"), "cvat", str(tmp_path / "z" / "task.zip"), shard_size=5, progress=False)
    assert sorted(p.name for p in (tmp_path / "z").iterdir()) == ["task-00000.zip", "task-00001.zip"]


def test_error_rows_are_skipped_and_the_newest_ok_row_wins(tmp_path, capsys):
    old, new, late = np.zeros((4, 5), int), np.full((6, 7), 2), np.full((3, 3), 1)
    rows = [
        {"rel": "x.jpg", "mask": old, "written_at": 1_000},
        {"rel": "x.jpg", "mask": new, "written_at": 3_000},
        {"rel": "y.jpg", "error": "cannot decode"},
        {"rel": "z.jpg", "error": "cannot decode", "written_at": 1_000},
        {"rel": "z.jpg", "mask": late, "written_at": 2_000},
    ]
    # The older x row's mask file is overwritten by the newer one (same name), like a real rerun: picking
    # the older row would find a 7x6 mask where its row says 5x4, and fail the image.
    write_output(tmp_path / "out", rows, CLASSES)
    result = export(str(tmp_path / "out"), "coco", str(tmp_path / "coco"), progress=False)
    assert (result.images, result.error_rows, result.failed) == (2, 2, [])
    got = read_coco(tmp_path / "coco")
    assert sorted(got) == ["/in/x.jpg", "/in/z.jpg"]
    assert (got["/in/x.jpg"] == 2).all() and (got["/in/z.jpg"] == 1).all()


def test_a_missing_mask_costs_its_image_and_the_exit_code(tmp_path, capsys):
    masks = known_masks(3)
    write_output(tmp_path / "out", [{"rel": rel, "mask": m} for rel, m in masks.items()], CLASSES)
    gone = sorted(masks)[1]
    (tmp_path / "out" / "masks" / f"{gone}.png").unlink()
    code = cli.main(
        ["export", str(tmp_path / "out"), str(tmp_path / "ls"), "--format", "label-studio", "--no-progress"]
    )
    assert code == EXIT_STATUS[ExportIncomplete]
    captured = capsys.readouterr()
    printed = captured.out
    assert "2 images were" in captured.err
    assert f"failed: /in/{gone}: cannot read mask" in printed
    got = read_label_studio(tmp_path / "ls", CLASSES)
    assert sorted(got) == sorted(f"/in/{r}" for r in masks if r != gone)


def test_unknown_format_lists_the_valid_ones(tmp_path, capsys):
    assert cli.main(["export", str(tmp_path), str(tmp_path / "d"), "--format", "yolo"]) == EXIT_STATUS[ConfigError]
    err = capsys.readouterr().err
    assert "unknown export format 'yolo'" in err and "coco, cvat, label-studio" in err
    with pytest.raises(ConfigError, match="coco, cvat, label-studio"):
        get_exporter("voc")


def test_an_empty_output_says_so(tmp_path, capsys):
    code = cli.main(["export", str(tmp_path / "nothing"), str(tmp_path / "d"), "--format", "coco"])
    assert code == EXIT_STATUS[InputError]
    assert "has no summary, so there is nothing to export" in capsys.readouterr().err
    write_output(
        tmp_path / "errors-only", [{"rel": "a.jpg", "error": "boom"}, {"rel": "b.jpg", "error": "boom"}], CLASSES
    )
    code = cli.main(["export", str(tmp_path / "errors-only"), str(tmp_path / "d"), "--format", "coco"])
    assert code == EXIT_STATUS[InputError]
    assert "has no ok rows to export (2 error rows)" in capsys.readouterr().err
    assert not (tmp_path / "d").exists()


def test_options_and_dest_are_checked(tmp_path):
    write_output(tmp_path / "out", [{"rel": "a.jpg", "mask": np.zeros((2, 2), int)}], CLASSES)
    with pytest.raises(ConfigError, match="takes no option from_name"):
        export(str(tmp_path / "out"), "coco", str(tmp_path / "d"), from_name="x")
    (tmp_path / "used").mkdir()
    (tmp_path / "used" / "old.json").write_text("{}")
    with pytest.raises(ExportError, match="not empty"):
        export(str(tmp_path / "out"), "coco", str(tmp_path / "used"), progress=False)


def test_progress_bar_counts_images_on_stderr(tmp_path, capsys):
    write_output(tmp_path / "out", [{"rel": f"i{i}.jpg", "mask": np.eye(3, dtype=int)} for i in range(4)], CLASSES)
    export(str(tmp_path / "out"), "coco", str(tmp_path / "coco"), progress=True)
    err = capsys.readouterr().err
    assert "export coco" in err and "4/4" in err


# -- issue 22 item 8: CVAT with long names, line breaks, and class names its labelmap cannot hold --------
def test_cvat_folder_export_of_long_names_uses_the_input_name_and_never_crashes(tmp_path):
    """A 250-character input name: its temporary name must fit (it crashed with ENAMETOOLONG), and a
    shortened mask name must still give the input's own name, not file/<absolute INPUT path>/..."""
    long_a, long_b = "a" * 246 + ".jpg", "b" * 240 + ".jpg"
    masks = {long_a: np.zeros((3, 4), int), f"sub/{long_b}": np.ones((5, 2), int), "ok.jpg": np.full((2, 2), 3)}
    write_output(tmp_path / "out", [{"rel": rel, "mask": m} for rel, m in masks.items()], CLASSES)
    result = export(str(tmp_path / "out"), "cvat", str(tmp_path / "cvat"), progress=False)
    assert result.failed == [] and result.images == 3
    assert_same(read_cvat(tmp_path / "cvat"), {rel.rsplit(".", 1)[0]: m for rel, m in masks.items()})
    export(str(tmp_path / "out"), "coco", str(tmp_path / "coco"), progress=False)
    coco = json.loads((tmp_path / "coco" / "coco-00000.json").read_text())
    assert sorted(i["file_name"] for i in coco["images"]) == sorted(masks)  # no absolute paths
    assert not list((tmp_path / "cvat").rglob(".*.tmp"))


def test_cvat_names_that_cannot_be_held_are_reported_not_written(tmp_path):
    masks = {
        "line\nbreak.jpg": np.zeros((2, 2), int),
        "c" * 252 + ".jpg": np.zeros((2, 2), int),
        "ok.jpg": np.ones((2, 2), int),
    }
    write_output(tmp_path / "out", [{"rel": rel, "mask": m} for rel, m in masks.items()], CLASSES)
    result = export(str(tmp_path / "out"), "cvat", str(tmp_path / "cvat"), progress=False)
    assert result.images == 1 and len(result.failed) == 2, result.failed
    assert (tmp_path / "cvat" / "ImageSets" / "Segmentation" / "default.txt").read_text() == "ok\n"
    # The same names fit in a zip: no file name limit there, but still no line breaks.
    zipped = export(str(tmp_path / "out"), "cvat", str(tmp_path / "z" / "task.zip"), progress=False)
    assert zipped.images == 2 and len(zipped.failed) == 1


@pytest.mark.parametrize("bad", ["cat:tabby", "dog\nhound"])
def test_cvat_refuses_class_names_its_labelmap_cannot_hold(tmp_path, bad):
    classes = [CLASSES[0], bad, *CLASSES[2:]]
    write_output(tmp_path / "out", [{"rel": "a.jpg", "mask": np.ones((2, 2), int)}], classes)
    with pytest.raises(ExportError, match="labelmap.txt cannot hold"):
        export(str(tmp_path / "out"), "cvat", str(tmp_path / "cvat"), progress=False)
    assert not (tmp_path / "cvat" / "labelmap.txt").exists()
