"""Results people look at: mask colours, `run --overlays`, `segbatch eval` and `segbatch report`.

One real run (local Ray, seeded checkpoint, six tiny images and one broken file) feeds every test here.
"""

from __future__ import annotations

import base64
import io
import json
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pyarrow.dataset as pads
import pytest
from PIL import Image, ImageOps

from segbatch import RunConfig, cli, run
from segbatch.commands._evaluate import confusion_matrix, metrics
from segbatch.errors import EXIT_STATUS, InputError
from segbatch.stages.overlay import background_ids, blend, class_colour, encode_jpeg
from segbatch.store.contract import input_relpath, mask_name, mask_relpath, overlay_relpath

from _helpers import BROKEN, TEST_ARCH, photo_like, write_inputs

# PASCAL VOC's colours as the devkit's VOClabelcolormap lists them (class id -> RGB), written out here
# rather than computed, so the palette code is checked against the published values.
VOC_COLOURS = {
    0: (0, 0, 0),
    1: (128, 0, 0),
    2: (0, 128, 0),
    3: (128, 128, 0),
    4: (0, 0, 128),
    5: (128, 0, 128),
    6: (0, 128, 128),
    7: (128, 128, 128),
    8: (64, 0, 0),
    9: (192, 0, 0),
    12: (64, 0, 128),
    14: (64, 128, 128),
    15: (192, 128, 128),
    20: (0, 64, 128),
    255: (224, 224, 192),
}


@pytest.fixture(scope="module")
def labelled(tmp_path_factory, ray_local, checkpoint):
    root = tmp_path_factory.mktemp("results")
    rels = write_inputs(root / "in")
    config = RunConfig(
        input=str(root / "in"),
        output=str(root / "out"),
        model=TEST_ARCH,
        weights=str(checkpoint),
        batch_size=4,
        progress=False,
        overlays=True,
    )
    report = run(config)
    assert (report.ok, report.errors) == (len(rels) - 1, 1)
    rows = pads.dataset(root / "out" / "summary", format="parquet").to_table().to_pylist()
    return root, rels, {r["uri"]: r for r in rows}


def mask_of(root: Path, rel: str) -> np.ndarray:
    return np.asarray(Image.open(root / "out" / mask_relpath(rel)))


# -- masks and overlays --------------------------------------------------------------------------------


def test_mask_png_shows_voc_colours_while_its_values_stay_class_ids(labelled):
    root, rels, rows = labelled
    seen: set[int] = set()
    for rel in rels:
        if rel == BROKEN:
            continue
        image = Image.open(root / "out" / mask_relpath(rel))
        assert image.mode == "P"
        ids = np.asarray(image)
        row = rows[str(root / "in" / rel)]
        assert np.bincount(ids.ravel(), minlength=len(row["pixel_counts"])).tolist() == row["pixel_counts"]
        shown = np.asarray(image.convert("RGB"))  # what an image viewer draws
        for cid in np.unique(ids):
            seen.add(int(cid))
            expected = VOC_COLOURS.get(int(cid))
            colours = np.unique(shown[ids == cid], axis=0)
            assert len(colours) == 1, (rel, cid, colours)
            if expected is not None:
                assert tuple(colours[0]) == expected, (rel, cid)
    assert len(seen) >= 2, "the seeded model should label more than one class"
    palette = Image.open(root / "out" / mask_relpath(rels[0])).getpalette()
    for cid, rgb in VOC_COLOURS.items():
        assert tuple(palette[3 * cid : 3 * cid + 3]) == rgb, cid


def test_run_with_overlays_writes_one_blended_jpeg_per_ok_image(labelled):
    root, rels, rows = labelled
    classes = json.loads(pads.dataset(root / "out" / "summary", format="parquet").schema.metadata[b"segbatch.classes"])
    untinted = background_ids(classes)
    assert untinted == {0}  # torchvision's VOC names call class 0 "__background__"
    written = sorted(
        p.relative_to(root / "out").as_posix() for p in (root / "out" / "overlays").rglob("*") if p.is_file()
    )
    assert written == sorted(overlay_relpath(r) for r in rels if r != BROKEN)
    for rel in rels:
        if rel == BROKEN:
            continue
        mask = mask_of(root, rel)
        got = Image.open(root / "out" / overlay_relpath(rel))
        assert got.format == "JPEG" and got.mode == "RGB"
        assert got.size == (mask.shape[1], mask.shape[0])  # displayed orientation, like the mask
        original = ImageOps.exif_transpose(Image.open(root / "in" / rel)).convert("RGB")
        blended = blend(original, mask, untinted=untinted)
        want = np.asarray(blended, dtype=np.float32)
        # As close as JPEG allows: no further than the expected blend from its own JPEG round trip.
        jpeg_noise = np.abs(np.asarray(Image.open(io.BytesIO(encode_jpeg(blended))), dtype=np.float32) - want)
        diff = np.abs(np.asarray(got, dtype=np.float32) - want)
        assert diff.mean() <= jpeg_noise.mean() + 0.5, (rel, diff.mean(), jpeg_noise.mean())
        unblended = np.abs(np.asarray(got, dtype=np.float32) - np.asarray(original, dtype=np.float32))
        assert diff.mean() < unblended.mean() / 2
        # Background pixels keep the photo's colours, other classes are pulled towards theirs.
        plain = np.asarray(original, dtype=np.float32)
        if (mask != 0).any():
            assert np.abs(want[mask != 0] - plain[mask != 0]).mean() > 5
        assert np.array_equal(want[mask == 0], plain[mask == 0])
    assert overlay_relpath("odd name/x#1%.png") == "overlays/odd name/x%231%25.png.jpg"


def test_mask_names_invert_to_input_names():
    for rel in ["a.jpg", "sub/dir/b.PNG", "odd name/x#1%.png", 'q?:*"<>|.tif', "masks/m.jpg"]:
        assert input_relpath(mask_relpath(rel)) == rel
    with pytest.raises(ValueError):
        input_relpath("summary/part.parquet")


# -- evaluation ----------------------------------------------------------------------------------------


def test_masks_are_found_below_the_output_given_even_after_a_move():

    assert mask_name("/runs/out/masks/sub/a.jpg.png", "/in/sub/a.jpg", "/runs/out/masks/") == "masks/sub/a.jpg.png"
    assert (
        mask_name("s3://b/out/masks/x%231%25.png.png", "s3://b/in/x#1%.png", "b/out/masks/") == "masks/x%231%25.png.png"
    )
    # OUTPUT copied from /old/masks/run to /new: the rows still name the old place.
    assert (
        mask_name("/old/masks/run/masks/masks/m.jpg.png", "/in/masks/m.jpg", "/new/masks/") == "masks/masks/m.jpg.png"
    )
    with pytest.raises(ValueError, match="does not match"):
        mask_name("/elsewhere/masks/b.jpg.png", "/in/a.jpg", "/new/masks/")


def torchvision_reference_confusion(gt: np.ndarray, pred: np.ndarray, n: int) -> np.ndarray:
    """torchvision references/segmentation/utils.py, ConfusionMatrix.update(a=target, b=prediction):

        k = (a >= 0) & (a < n)
        inds = n * a[k].to(torch.int64) + b[k]
        self.mat += torch.bincount(inds, minlength=n**2).reshape(n, n)

    and compute(): acc_global = diag.sum() / h.sum(); iu = diag / (h.sum(1) + h.sum(0) - diag).
    """
    import torch

    a, b = torch.from_numpy(gt.astype(np.int64)).flatten(), torch.from_numpy(pred.astype(np.int64)).flatten()
    k = (a >= 0) & (a < n)
    inds = n * a[k].to(torch.int64) + b[k]
    return torch.bincount(inds, minlength=n**2).reshape(n, n).numpy()


def test_metrics_match_a_hand_computation():
    gt = np.array([[0, 0, 1, 1], [0, 2, 2, 255]])
    pred = np.array([[0, 1, 1, 1], [0, 2, 0, 1]])
    m = confusion_matrix(gt, pred, 4)
    # Counted by hand: gt 0 -> pred 0,1,0 ; gt 1 -> 1,1 ; gt 2 -> 2,0 ; the 255 pixel is ignored.
    expected = np.zeros((4, 4), dtype=np.int64)
    expected[0, 0], expected[0, 1], expected[1, 1], expected[2, 2], expected[2, 0] = 2, 1, 2, 1, 1
    assert np.array_equal(m, expected)
    acc, iou, miou = metrics(m)
    assert acc == pytest.approx(5 / 7)
    # IoU = diag / (row + col - diag): class 0: 2/(3+3-2), class 1: 2/(2+3-2), class 2: 1/(2+1-1).
    assert iou[:3] == pytest.approx([2 / 4, 2 / 3, 1 / 2])
    assert iou[3] is None  # in neither GT nor prediction: left out of the mean
    assert miou == pytest.approx((1 / 2 + 2 / 3 + 1 / 2) / 3)


def test_confusion_matrix_matches_torchvision_reference():
    rng = np.random.default_rng(7)
    for n in (2, 5, 21):
        gt = rng.integers(0, n, size=(37, 53))
        gt[rng.random(gt.shape) < 0.1] = 255
        pred = rng.integers(0, n, size=gt.shape)
        ours = confusion_matrix(gt, pred, n)
        ref = torchvision_reference_confusion(gt, pred, n)
        assert np.array_equal(ours, ref)
        h = ref.astype(np.float64)
        acc, iou, _ = metrics(ours)
        assert acc == pytest.approx(np.diag(h).sum() / h.sum())
        assert iou == pytest.approx(list(np.diag(h) / (h.sum(1) + h.sum(0) - np.diag(h))))


@pytest.fixture(scope="module")
def ground_truth(labelled):
    """GT for all but one ok image: the mask with some pixels relabelled and some set to 255 (ignore),
    saved as VOC-style palette PNGs and as plain L PNGs; one GT has the wrong size."""
    root, rels, _rows = labelled
    gt_root = root / "gt"
    rng = np.random.default_rng(3)
    expected = {}
    ok_rels = [r for r in rels if r != BROKEN]
    missing, wrong_size = "sub/gray.png", "c.png"
    for i, rel in enumerate(ok_rels):
        if rel == missing:
            continue
        mask = mask_of(root, rel).astype(np.uint8)
        gt = mask.copy()
        flip = rng.random(gt.shape) < 0.2
        gt[flip] = rng.integers(0, 21, size=int(flip.sum()))
        gt[rng.random(gt.shape) < 0.1] = 255
        if rel == wrong_size:
            gt = gt[:-1]
        path = gt_root / (rel.rsplit(".", 1)[0] + ".png")
        path.parent.mkdir(parents=True, exist_ok=True)
        image = Image.fromarray(gt, mode="L")
        if i % 2 == 0:  # half as VOC SegmentationClass palette PNGs
            image = image.convert("P")
            image.putpalette(Image.open(root / "out" / mask_relpath(rel)).getpalette())
        image.save(path)
        if rel != wrong_size:
            expected[rel] = torchvision_reference_confusion(gt, mask, 21)
    return gt_root, expected, missing, wrong_size


def test_eval_sums_the_reference_confusion_matrix_on_ray(labelled, ground_truth, tmp_path, capsys):
    root, _rels, _rows = labelled
    gt_root, expected, missing, wrong_size = ground_truth
    out_json = tmp_path / "metrics" / "eval.json"
    assert cli.main(["eval", str(root / "out"), "--ground-truth", str(gt_root), "--json", str(out_json)]) == 0
    printed = capsys.readouterr().out
    result = json.loads(out_json.read_text())
    total = sum(expected.values())
    acc, iou, miou = metrics(total)
    assert result["images"] == len(expected)
    assert result["pixel_accuracy"] == pytest.approx(acc)
    assert result["miou"] == pytest.approx(miou)
    assert 0.3 < result["pixel_accuracy"] < 1.0  # a fifth of the GT pixels were relabelled at random
    classes = list(result["per_class_iou"])
    assert len(classes) == 21 and classes[0] == "__background__"
    assert list(result["per_class_iou"].values()) == pytest.approx(iou)
    assert result["pixels"] == int(total.sum())
    assert result["missing_ground_truth"] == 1
    assert result["missing_ground_truth_examples"] == [str(root / "in" / missing)]
    assert result["errors"] == 1
    [err] = result["error_examples"]
    assert err["uri"] == str(root / "in" / wrong_size) and "but the mask is" in err["error"]
    assert "mIoU" in printed and "no ground truth: " + str(root / "in" / missing) in printed
    assert f"{miou:.4f}" in printed


# Three images with a known confusion, counted by hand below (classes: 0 bg, 1 cat, 2 dog, 3 tree).
HAND_CLASSES = ["__background__", "cat", "dog", "tree"]
HAND_IMAGES = {  # rel: (prediction, ground truth); 255 = ignore
    "a.jpg": ([[0, 0, 1, 1], [0, 0, 1, 1]], [[0, 0, 1, 1], [0, 0, 1, 1]]),  # perfect: IoU 1
    "b.jpg": ([[2, 2, 2], [0, 0, 0]], [[2, 2, 0], [0, 0, 255]]),  # bg 2/3, dog 2/3: IoU 2/3
    "c.jpg": ([[3, 3], [3, 3]], [[1, 1], [3, 3]]),  # cat 0/2, tree 2/4: IoU 1/4
}


@pytest.fixture
def hand_output(tmp_path):
    from _helpers import write_output

    write_output(
        tmp_path / "out", [{"rel": rel, "mask": pred} for rel, (pred, _gt) in HAND_IMAGES.items()], HAND_CLASSES
    )
    (tmp_path / "gt").mkdir()
    for rel, (_pred, gt) in HAND_IMAGES.items():
        Image.fromarray(np.asarray(gt, dtype=np.uint8), mode="L").save(tmp_path / "gt" / rel.replace(".jpg", ".png"))
    return tmp_path


def test_eval_per_class_iou_confusion_and_worst_images_match_a_hand_computation(ray_local, hand_output, capsys):
    out, gt = hand_output / "out", hand_output / "gt"
    assert cli.main(["eval", str(out), "--ground-truth", str(gt), "--worst", "2"]) == 0
    printed = capsys.readouterr().out
    result = json.loads((out / "eval.json").read_text())  # written into OUTPUT when --json is not given
    # Rows ground truth, columns prediction, summed by hand over a, b and c.
    matrix = [
        [6, 0, 1, 0],  # bg: 4 (a) + 2 (b) right, 1 (b) predicted dog
        [0, 4, 0, 2],  # cat: 4 (a) right, 2 (c) predicted tree
        [0, 0, 2, 0],  # dog: 2 (b)
        [0, 0, 0, 2],
    ]  # tree: 2 (c)
    assert result["confusion_matrix"] == {
        "rows": "ground truth",
        "columns": "prediction",
        "classes": HAND_CLASSES,
        "counts": matrix,
    }
    iou = [6 / 7, 4 / 6, 2 / 3, 2 / 4]  # diag / (GT pixels + predicted pixels - diag)
    assert [c["iou"] for c in result["per_class"]] == pytest.approx(iou)
    assert [c["support"] for c in result["per_class"]] == [7, 6, 2, 2]
    assert [c["predicted"] for c in result["per_class"]] == [6, 4, 3, 4]
    assert [c["class"] for c in result["per_class"]] == HAND_CLASSES
    assert result["miou"] == pytest.approx(sum(iou) / 4)  # the mIoU definition is unchanged
    assert result["pixel_accuracy"] == pytest.approx(14 / 17)
    assert [(w["uri"], w["miou"], w["pixel_accuracy"], w["pixels"]) for w in result["worst_images"]] == [
        ("/in/c.jpg", pytest.approx(1 / 4), pytest.approx(2 / 4), 4),
        ("/in/b.jpg", pytest.approx(2 / 3), pytest.approx(4 / 5), 5),
    ]
    assert "worst 2 images by IoU" in printed and "0.2500  0.5000  /in/c.jpg" in printed

    # The report shows them, from OUTPUT/eval.json.
    assert cli.main(["report", str(out), "--samples", "0"]) == 0
    html = (out / "report.html").read_text()
    section = html[html.index('id="evaluation"') : html.index('id="gallery"')]
    assert f"{sum(iou) / 4:.4f}" in section and f"{14 / 17:.4f}" in section
    worst = section[section.index('id="worst"') : section.index('id="confusion"')]
    assert worst.index("/in/c.jpg") < worst.index("/in/b.jpg") and "/in/a.jpg" not in worst
    per_class = section[section.index('id="per-class"') : section.index('id="worst"')]
    for name, value, support in zip(HAND_CLASSES, iou, [7, 6, 2, 2], strict=True):
        assert re.search(rf"{name}</td>\s*<td class=\"n\">{value:.4f}</td><td class=\"n\">{support}</td>", per_class)
    confusion = section[section.index('id="confusion"') :]
    cells = [int(v) for v in re.findall(r'<td class="n(?: diag)?">(\d+)</td>', confusion)]
    assert cells == [v for row in matrix for v in row]


def test_eval_json_goes_where_json_says_and_report_skips_evaluation_without_it(ray_local, hand_output, tmp_path):
    out = hand_output / "out"
    target = tmp_path / "elsewhere" / "m.json"
    assert (
        cli.main(["eval", str(out), "--ground-truth", str(hand_output / "gt"), "--worst", "0", "--json", str(target)])
        == 0
    )
    assert json.loads(target.read_text())["worst_images"] == []
    assert not (out / "eval.json").exists()
    assert cli.main(["report", str(out), "--samples", "0"]) == 0
    assert 'id="evaluation"' not in (out / "report.html").read_text()


def test_eval_refuses_an_output_without_summary(tmp_path, capsys):
    (tmp_path / "gt").mkdir()
    code = cli.main(["eval", str(tmp_path / "nothing"), "--ground-truth", str(tmp_path / "gt")])
    assert code == EXIT_STATUS[InputError]
    assert "no summary" in capsys.readouterr().err


# -- report --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def report_html(labelled):
    root, _rels, _rows = labelled
    assert cli.main(["report", str(root / "out"), "--samples", "4"]) == 0
    return root / "out" / "report.html"


def test_report_is_self_contained_and_holds_every_part(labelled, report_html):
    root, rels, rows = labelled
    html = report_html.read_text()
    # No fetches: no external src/href, no CSS imports or url() outside data: URIs, no scripts.
    assert not re.search(r"""(src|href)\s*=\s*(?!["']?(data:|#))""", html)
    assert "@import" not in html and "<script" not in html.lower()
    assert not re.search(r"url\((?![\"']?(data:|#))", html)
    # Runs: counts, model and throughput.
    run_id = next(iter(rows.values()))["run_id"]
    runs_section = html[html.index('id="runs"') : html.index('id="classes"')]
    assert run_id in runs_section and TEST_ARCH in runs_section
    assert re.search(r'<td class="n">6</td>\s*<td class="n bad">1</td>', runs_section)
    assert re.search(r'title="from run record[^"]*">\d+\.\d\d<', runs_section)
    # Chart: an inline SVG with one bar per class seen, in that class's VOC colour.
    chart = html[html.index('id="class-chart"') : html.index("</figure>", html.index('id="class-chart"'))]
    assert "<svg" in chart and "share of all pixels" in chart
    counts = np.sum([r["pixel_counts"] for r in rows.values() if r["status"] == "ok"], axis=0)
    for cid in np.flatnonzero(counts):
        assert "fill: #%02x%02x%02x" % class_colour(int(cid)) in chart, cid
    # Gallery: 4 JPEG overlays with a legend.
    gallery = html[html.index('id="gallery"') : html.index('id="errors"')]
    assert len(re.findall(r'<img src="data:image/jpeg;base64,', gallery)) == 4
    assert "__background__" in gallery and 'class="legend"' in gallery
    # Errors: the broken file, grouped under its message.
    errors = html[html.index('id="errors"') :]
    assert str(root / "in" / BROKEN) in errors and rows[str(root / "in" / BROKEN)]["error"] in errors


def test_report_out_writes_a_local_copy(labelled, tmp_path, capsys):
    root, _rels, _rows = labelled
    target = tmp_path / "copy" / "r.html"
    assert cli.main(["report", str(root / "out"), "--samples", "0", "--out", str(target)]) == 0
    assert str(target) in capsys.readouterr().out
    html = target.read_text()
    assert "<svg" in html and "data:image/jpeg" not in html


def test_report_refuses_an_output_without_summary(tmp_path, capsys):
    assert cli.main(["report", str(tmp_path / "nothing")]) == EXIT_STATUS[InputError]
    assert "no summary" in capsys.readouterr().err


# -- the report in a real browser ----------------------------------------------------------------------

CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
    "--disable-sync",
    "--hide-scrollbars",
    "--force-device-scale-factor=1",
]
WINDOW = (1200, 2000)  # CSS px; with scale factor 1 a screenshot pixel is a CSS pixel
BROWSER_TIMEOUT = 90  # seconds per chromium call; a cold start on a loaded 2-core machine takes ~5

# Injected into a copy of the page only: the report itself carries no script. It records where the
# chart, the gallery images and the legend landed, and whether each image decoded.
PROBE = """<script>
window.addEventListener('load', () => {
  const box = el => { const r = el.getBoundingClientRect(); return [r.left, r.top, r.width, r.height]; };
  const out = {
    chart: box(document.querySelector('#class-chart svg')),
    legend: box(document.querySelector('#gallery .legend')),
    images: [...document.querySelectorAll('#gallery img')].map(img => ({
      box: box(img), decoded: img.complete && img.naturalWidth > 0, src: img.getAttribute('src')})),
  };
  const pre = document.createElement('pre'); pre.id = 'probe'; pre.textContent = JSON.stringify(out);
  document.body.appendChild(pre);
});
</script>"""


def chromium(tmp_path: Path, url: str, *extra: str) -> subprocess.CompletedProcess:
    exe = shutil.which("chromium")
    if exe is None:
        pytest.skip("chromium is not installed (.ci/run installs Debian's chromium: apt-get install -y chromium)")
    args = [
        exe,
        *CHROMIUM_FLAGS,
        f"--user-data-dir={tmp_path / 'chromium-profile'}",
        f"--window-size={WINDOW[0]},{WINDOW[1]}",
        *extra,
        url,
    ]
    done = subprocess.run(args, capture_output=True, text=True, timeout=BROWSER_TIMEOUT, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    return done


def test_report_renders_in_chromium_with_chart_and_gallery_visible(labelled, report_html, tmp_path):
    root, _rels, rows = labelled
    html = report_html.read_text()
    probe_page = tmp_path / "probe.html"
    probe_page.write_text(html.replace("</body>", PROBE + "</body>"))
    dom = chromium(tmp_path, probe_page.as_uri(), "--dump-dom").stdout
    found = json.loads(re.search(r'<pre id="probe">(.*?)</pre>', dom, re.S).group(1).replace("&quot;", '"'))
    shot_path = tmp_path / "report.png"
    chromium(tmp_path, report_html.as_uri(), f"--screenshot={shot_path}")
    shot = np.asarray(Image.open(shot_path).convert("RGB"))
    assert shot.shape[:2] == (WINDOW[1], WINDOW[0])
    assert shot.std() > 20 and len(np.unique(shot.reshape(-1, 3), axis=0)) > 200, "blank screenshot"

    def region(box: list[float], min_size: int = 50) -> np.ndarray:
        left, top, width, height = (int(round(v)) for v in box)
        assert width > min_size and height > min_size, box  # laid out, not collapsed
        assert left >= 0 and top >= 0 and left + width <= WINDOW[0] and top + height <= WINDOW[1], box
        return shot[top : top + height, left : left + width]

    # The chart: the bars of the classes with most pixels are drawn in their VOC colours.
    chart = region(found["chart"])
    counts = np.sum([r["pixel_counts"] for r in rows.values() if r["status"] == "ok"], axis=0)
    for cid in np.argsort(-counts)[:3]:
        colour = np.array(class_colour(int(cid)), dtype=np.uint8)
        assert (chart == colour).all(axis=-1).sum() > 100, f"no bar of class {cid} in the chart"
    # The gallery: every image decoded, and the screenshot shows it where the page put it.
    assert len(found["images"]) == 4
    for image in found["images"]:
        assert image["decoded"], image["box"]
        shown = region(image["box"]).astype(np.float32)
        data = base64.b64decode(image["src"].split(",", 1)[1])
        thumb = Image.open(io.BytesIO(data)).convert("RGB").resize((shown.shape[1], shown.shape[0]), Image.BILINEAR)
        assert np.abs(shown - np.asarray(thumb, dtype=np.float32)).mean() < 12
    # The legend's swatches are the mask colours of the classes in the samples.
    legend = region(found["legend"], min_size=10)
    assert (
        sum(
            (legend == np.array(class_colour(int(c)), np.uint8)).all(axis=-1).sum() > 20
            for c in np.flatnonzero(counts)
            if c != 0
        )
        >= 2
    )


# -- object storage ------------------------------------------------------------------------------------


def test_overlays_report_and_eval_on_s3(s3_bucket, s3_server, ray_local, checkpoint, tmp_path, capsys):
    from _s3 import clear_s3fs_cache

    local = tmp_path / "in"
    local.mkdir()
    for i, size in enumerate([(64, 48), (48, 40), (40, 56)]):
        Image.fromarray(photo_like(*size, 30 + i)).save(local / f"img{i}.jpg", quality=90)
    s3_server.upload_dir(local, f"s3://{s3_bucket}/in")
    out = f"s3://{s3_bucket}/out"
    assert (
        cli.main(
            [
                "run",
                f"s3://{s3_bucket}/in",
                out,
                "--model",
                TEST_ARCH,
                "--weights",
                str(checkpoint),
                "--overlays",
                "--no-progress",
            ]
        )
        == 0
    )
    clear_s3fs_cache()
    client = s3_server.client()
    keys = set(s3_server.keys(s3_bucket))
    for i in range(3):
        assert f"out/overlays/img{i}.jpg.jpg" in keys and f"out/masks/img{i}.jpg.png" in keys
    # Ground truth in the bucket: each mask itself for img0 and img1 (IoU 1 wherever a class shows up).
    for i in range(2):
        body = client.get_object(Bucket=s3_bucket, Key=f"out/masks/img{i}.jpg.png")["Body"].read()
        client.put_object(Bucket=s3_bucket, Key=f"gt/img{i}.png", Body=body)
    assert (
        cli.main(["eval", out, "--ground-truth", f"s3://{s3_bucket}/gt", "--json", f"s3://{s3_bucket}/eval.json"]) == 0
    )
    result = json.loads(client.get_object(Bucket=s3_bucket, Key="eval.json")["Body"].read())
    assert (result["images"], result["missing_ground_truth"], result["errors"]) == (2, 1, 0)
    assert result["pixel_accuracy"] == 1.0 and result["miou"] == 1.0
    assert result["missing_ground_truth_examples"] == [f"s3://{s3_bucket}/in/img2.jpg"]

    assert cli.main(["report", out, "--samples", "3"]) == 0
    assert f"{out}/report.html" in capsys.readouterr().out
    html = client.get_object(Bucket=s3_bucket, Key="out/report.html")["Body"].read().decode()
    assert "<svg" in html and html.count('<img src="data:image/jpeg;base64,') == 3
    assert "input unreadable" not in html  # the thumbnails are overlays of the S3 inputs, not bare masks
    assert f"s3://{s3_bucket}/in/img0.jpg" in html
    assert cli.main(["report", out, "--samples", "1", "--out", str(tmp_path / "r.html")]) == 0
    assert (tmp_path / "r.html").read_text().count("data:image/jpeg") == 1
