"""`segbatch report OUTPUT`: one self-contained HTML page of what the runs into OUTPUT produced.

The page holds per-run counts and throughput, a class chart (matplotlib, inlined as SVG), a gallery of
sample overlays (inlined as JPEG data URIs) and the error rows grouped by message; when OUTPUT holds an
``eval.json`` from `segbatch eval`, also its mIoU, per-class IoU and support, the worst images and the
confusion matrix. It fetches nothing:
no scripts, fonts or images from anywhere, so it opens offline and from an object store's console.

The summary is read one record batch at a time, only the columns the page needs; memory stays bounded
by the number of runs, classes, error messages and samples, not by the number of images.
"""

from __future__ import annotations

import base64
import hashlib
import heapq
import io
import logging
import time
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from PIL import Image

from segbatch._internal import _storage
from segbatch.commands import _evaluate as evaluate
from segbatch.errors import ConfigError, InputError
from segbatch.stages import overlay
from segbatch.store import runs, summary
from segbatch.store.contract import EVAL_NAME, REPORT_NAME
from segbatch.store.masks import locate_mask, read_label_png

log = logging.getLogger(__name__)

DEFAULT_SAMPLES = 12
THUMB_SIZE = 320  # px, the longest side of a gallery overlay: sharp in a 4-column grid, ~15 KB each
THUMB_JPEG_QUALITY = 80  # thumbnails are small; 80 keeps them clean at half the bytes of 95
MAX_CHART_CLASSES = 30  # the chart shows the classes with most pixels; more bars stop being readable
MAX_ERROR_GROUPS = 1000  # distinct error messages tracked; the rest are counted under one "other" line
SHOWN_ERROR_GROUPS = 25  # groups shown on the page, most frequent first
ERROR_EXAMPLES = 3  # example URIs per error message
MAX_RESOLVE_URIS = 100_000  # error URIs checked for a later ok row; beyond it the check is skipped
SAMPLE_THREADS = 8  # samples read and drawn at once; they are object-store reads, mostly waiting
MAX_CONFUSION_CLASSES = 21  # confusion matrix rows/columns shown (classes with most GT + predicted pixels)

COLUMNS = [
    "uri",
    "status",
    "error",
    "mask_uri",
    "pixel_counts",
    "run_id",
    "model",
    "weights",
    "device",
    "written_at",
    "mean_confidence",
]


@dataclass
class RunStats:
    run_id: str
    ok: int = 0
    error: int = 0
    models: set[str] = field(default_factory=set)
    weights: set[str] = field(default_factory=set)
    devices: set[str] = field(default_factory=set)
    first_write: Any = None
    last_write: Any = None
    record: dict[str, Any] | None = None

    @property
    def rows(self) -> int:
        return self.ok + self.error

    def throughput(self) -> tuple[float | None, str]:
        """(images/s, where the time came from)."""
        seconds = (self.record or {}).get("seconds")
        if seconds:
            return self.rows / seconds, "run record (wall time of the whole run)"
        if self.first_write is not None and self.last_write is not None:
            span = (self.last_write - self.first_write).total_seconds()
            if span > 0:
                # The first write already follows start-up and a batch of work: this overstates the rate.
                return self.rows / span, "summary write times (first to last write; start-up excluded)"
        return None, "unknown (no run record, and one summary write)"


@dataclass
class ErrorGroup:
    message: str
    count: int = 0
    examples: list[str] = field(default_factory=list)
    uris: set[str] = field(default_factory=set)  # for the "still failing" count; emptied if too many
    resolved: int = 0


@dataclass
class Sample:
    uri: str
    data_uri: str
    note: str = ""
    top_classes: list[tuple[int, float]] = field(default_factory=list)  # (class id, share of pixels)
    confidence: float | None = None  # the row's mean_confidence, for the least-confident gallery


@dataclass
class ReportData:
    output: str
    classes: list[str]
    generated_at: str
    runs: list[RunStats]
    pixel_totals: np.ndarray
    images_with: np.ndarray
    ok_images: int
    error_rows: int
    error_groups: list[ErrorGroup]
    other_errors: int
    resolved_checked: bool
    samples: list[Sample]
    least_confident: list[Sample] = field(default_factory=list)
    evaluation: dict[str, Any] | None = None  # OUTPUT/eval.json, as `segbatch eval` wrote it

    def class_name(self, class_id: int) -> str:
        return self.classes[class_id] if class_id < len(self.classes) else f"class {class_id}"


class _Collector:
    """Folds summary record batches into per-run, per-class and per-error totals, and picks samples."""

    def __init__(self, samples: int):
        self.runs: dict[str, RunStats] = {}
        self.pixel_totals = np.zeros(0, dtype=np.int64)
        self.images_with = np.zeros(0, dtype=np.int64)
        self.ok_images = 0
        self.error_rows = 0
        self.errors: dict[str, ErrorGroup] = {}
        self.other_errors = 0
        self.error_uri_count = 0
        self.samples = samples
        # The samples are the ok rows with the smallest hash of their uri: a spread over the whole
        # OUTPUT, the same on every rerun, chosen in one pass with N rows held.
        self._heap: list[tuple[int, str, str]] = []
        # The least confident ok rows (runs with --confidence), as a max-heap of -mean_confidence.
        self._unsure: list[tuple[float, str, str]] = []

    def add(self, batch: pa.RecordBatch) -> None:
        if batch.num_rows == 0:
            return
        table = pa.Table.from_batches([batch])
        self._add_runs(table)
        ok = table.filter(pc.equal(table["status"], "ok"))
        self._add_classes(ok["pixel_counts"].combine_chunks())
        self._add_samples(ok)
        self._add_least_confident(ok)
        bad = table.filter(pc.not_equal(table["status"], "ok"))
        self._add_errors(bad)

    def _add_runs(self, table: pa.Table) -> None:
        grouped = table.group_by(["run_id", "status", "model", "weights", "device"], use_threads=False).aggregate(
            [("uri", "count"), ("written_at", "min"), ("written_at", "max")]
        )
        for run_id, status, model, weights, device, count, first, last in zip(
            *(
                grouped[c].to_pylist()
                for c in (
                    "run_id",
                    "status",
                    "model",
                    "weights",
                    "device",
                    "uri_count",
                    "written_at_min",
                    "written_at_max",
                )
            )
        ):
            stats = self.runs.setdefault(run_id, RunStats(run_id))
            if status == "ok":
                stats.ok += count
            else:
                stats.error += count
            for bag, value in ((stats.models, model), (stats.weights, weights), (stats.devices, device)):
                if value:
                    bag.add(value)
            if first is not None and (stats.first_write is None or first < stats.first_write):
                stats.first_write = first
            if last is not None and (stats.last_write is None or last > stats.last_write):
                stats.last_write = last

    def _add_classes(self, counts: pa.ListArray) -> None:
        counts = counts.filter(pc.is_valid(counts))
        if len(counts) == 0:
            return
        self.ok_images += len(counts)
        values = counts.flatten().to_numpy(zero_copy_only=False).astype(np.int64)
        offsets = counts.offsets.to_numpy()
        parents = pc.list_parent_indices(counts).to_numpy()
        position = np.arange(len(values)) - (offsets[parents] - offsets[0])  # class id of each value
        size = int(position.max()) + 1 if len(position) else 0
        if size > len(self.pixel_totals):
            self.pixel_totals = np.pad(self.pixel_totals, (0, size - len(self.pixel_totals)))
            self.images_with = np.pad(self.images_with, (0, size - len(self.images_with)))
        np.add.at(self.pixel_totals, position, values)
        np.add.at(self.images_with, position[values > 0], 1)

    def _add_samples(self, ok: pa.Table) -> None:
        if not self.samples:
            return
        for uri, mask_uri in zip(ok["uri"].to_pylist(), ok["mask_uri"].to_pylist()):
            key = int.from_bytes(hashlib.sha1(uri.encode()).digest()[:8], "big")
            item = (-key, uri, mask_uri)
            if len(self._heap) < self.samples:
                heapq.heappush(self._heap, item)
            elif item > self._heap[0]:
                heapq.heapreplace(self._heap, item)

    def _add_least_confident(self, ok: pa.Table) -> None:
        if not self.samples:
            return
        rated = ok.filter(pc.is_valid(ok["mean_confidence"]))
        for uri, mask_uri, conf in zip(*(rated[c].to_pylist() for c in ("uri", "mask_uri", "mean_confidence"))):
            item = (-conf, uri, mask_uri)
            if len(self._unsure) < self.samples:
                heapq.heappush(self._unsure, item)
            elif item > self._unsure[0]:
                heapq.heapreplace(self._unsure, item)

    def least_confident_rows(self) -> list[tuple[str, str, float]]:
        return [(uri, mask_uri, -neg) for neg, uri, mask_uri in sorted(self._unsure, reverse=True)]

    def _add_errors(self, bad: pa.Table) -> None:
        self.error_rows += bad.num_rows
        for uri, message in zip(bad["uri"].to_pylist(), bad["error"].to_pylist()):
            message = message or "(no message)"
            group = self.errors.get(message)
            if group is None:
                if len(self.errors) >= MAX_ERROR_GROUPS:
                    self.other_errors += 1
                    continue
                group = self.errors[message] = ErrorGroup(message)
            group.count += 1
            if len(group.examples) < ERROR_EXAMPLES and uri not in group.examples:
                group.examples.append(uri)
            if self.error_uri_count < MAX_RESOLVE_URIS:
                group.uris.add(uri)
                self.error_uri_count += 1

    def sample_rows(self) -> list[tuple[str, str]]:
        return sorted((uri, mask_uri) for _key, uri, mask_uri in self._heap)


def _resolve_errors(output_url: str, storage_options: Mapping[str, Any], groups: list[ErrorGroup]) -> None:
    """Count, per group, the error rows whose input has an ok row since (a rerun fixed them)."""
    uris = set().union(*(g.uris for g in groups)) if groups else set()
    if not uris:
        return
    ok = summary.read(
        output_url,
        storage_options,
        columns=["uri"],
        filter=(pc.field("status") == "ok") & pc.field("uri").isin(sorted(uris)),
    )
    fixed = set(ok["uri"].to_pylist())
    for group in groups:
        group.resolved = len(group.uris & fixed)


def _thumbnail(
    uri: str, mask_uri: str, output: tuple[Any, str], storage_options: Mapping[str, Any], untinted: frozenset[int]
) -> Sample:
    from segbatch.config import RunConfig
    from segbatch.stages.decode import Limits, decode_image

    fs, path = locate_mask(mask_uri, uri, output, storage_options)
    mask = read_label_png(_storage.retry(fs.cat_file, path, what=f"read {path}"), f"mask {path}")
    ids, counts = np.unique(mask, return_counts=True)
    order = np.argsort(-counts)
    top = [(int(ids[i]), float(counts[i] / mask.size)) for i in order[:4]]
    height, width = mask.shape
    scale = min(1.0, THUMB_SIZE / max(width, height))
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    small_mask = np.asarray(Image.fromarray(mask.astype(np.uint8)).resize(size, Image.NEAREST))
    note = ""
    try:
        fs, path = _storage.open_url(uri, storage_options)
        defaults = RunConfig()
        limits = Limits(defaults.max_image_pixels, defaults.max_file_bytes, defaults.max_model_pixels)
        image = decode_image(_storage.retry(fs.cat_file, path, what=f"read {uri}"), limits)
        if image.size != (width, height):
            raise ValueError(f"the image is now {image.size[0]}x{image.size[1]}, its mask {width}x{height}")
        image = image.resize(size, Image.BILINEAR)
        picture = overlay.blend(image, small_mask, untinted=untinted)
    except Exception as exc:  # the input moved or changed since: show the mask on its own
        note = f"mask only: input unreadable ({type(exc).__name__}: {exc})"
        picture = Image.fromarray(overlay.PALETTE[small_mask], mode="RGB")
    jpeg = overlay.encode_jpeg(picture, THUMB_JPEG_QUALITY)
    return Sample(uri, "data:image/jpeg;base64," + base64.b64encode(jpeg).decode(), note, top)


def collect(
    output_url: str, storage_options: Mapping[str, Any] | None = None, *, samples: int = DEFAULT_SAMPLES
) -> ReportData:
    storage_options = dict(storage_options or {})
    ds = summary.dataset(output_url, storage_options)
    if ds is None:
        raise InputError(f"OUTPUT {output_url} has no summary: run `segbatch run` into it first")
    classes = summary.classes(output_url, storage_options) or []
    collector = _Collector(samples)
    for batch in ds.to_batches(columns=COLUMNS):
        collector.add(batch)

    records = {r.get("run_id"): r for r in runs.read_records(output_url, storage_options)}
    for run_id, stats in collector.runs.items():
        stats.record = records.get(run_id)
    run_list = sorted(
        collector.runs.values(),
        key=lambda r: ((r.record or {}).get("started_at") or str(r.first_write or ""), r.run_id),
    )

    groups = sorted(collector.errors.values(), key=lambda g: (-g.count, g.message))
    resolved_checked = collector.error_uri_count < MAX_RESOLVE_URIS
    if resolved_checked:
        _resolve_errors(output_url, storage_options, groups)

    untinted = overlay.background_ids(classes)
    rows = collector.sample_rows()
    output = _storage.open_url(output_url, storage_options)
    unsure = collector.least_confident_rows()
    with ThreadPoolExecutor(SAMPLE_THREADS) as pool:
        picked = list(pool.map(lambda r: _try_thumbnail(r, output, storage_options, untinted), rows))
        least_confident = list(pool.map(lambda r: _try_thumbnail(r[:2], output, storage_options, untinted), unsure))
    for sample, (_uri, _mask_uri, conf) in zip(least_confident, unsure):
        if sample is not None:
            sample.confidence = conf

    n = max(len(classes), len(collector.pixel_totals))
    pad = lambda a: np.pad(a, (0, n - len(a)))  # noqa: E731
    return ReportData(
        output=_storage.absolute_url(output_url),
        classes=list(classes),
        generated_at=time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
        runs=run_list,
        pixel_totals=pad(collector.pixel_totals),
        images_with=pad(collector.images_with),
        ok_images=collector.ok_images,
        error_rows=collector.error_rows,
        error_groups=groups[:SHOWN_ERROR_GROUPS],
        other_errors=collector.other_errors + sum(g.count for g in groups[SHOWN_ERROR_GROUPS:]),
        resolved_checked=resolved_checked,
        samples=[s for s in picked if s is not None],
        least_confident=[s for s in least_confident if s is not None],
        evaluation=_read_evaluation(output_url, storage_options),
    )


def _read_evaluation(output_url: str, storage_options: Mapping[str, Any]) -> dict[str, Any] | None:
    try:
        return evaluate.read_json(output_url, storage_options)
    except Exception as exc:  # a damaged eval.json costs its section, not the report
        log.warning("report: cannot read %s: %s", EVAL_NAME, exc)
        return None


def evaluation_view(ev: dict[str, Any]) -> dict[str, Any]:
    """What the page shows of an eval JSON: classes seen in GT or prediction, the worst images, and the
    confusion matrix cut to the classes with most pixels."""
    per_class = ev.get("per_class")
    if per_class is None:  # written before per_class existed: rebuild it from the older keys
        iou, gt, pred = ev.get("per_class_iou", {}), ev.get("ground_truth_pixels", {}), ev.get("predicted_pixels", {})
        per_class = [
            {"id": i, "class": name, "iou": iou[name], "support": gt.get(name, 0), "predicted": pred.get(name, 0)}
            for i, name in enumerate(iou)
        ]
    seen = [c for c in per_class if c["support"] or c["predicted"]]
    matrix = (ev.get("confusion_matrix") or {}).get("counts")
    shown = sorted(seen, key=lambda c: -(c["support"] + c["predicted"]))[:MAX_CONFUSION_CLASSES]
    shown = sorted(shown, key=lambda c: c["id"])
    rows = [[matrix[a["id"]][b["id"]] for b in shown] for a in shown] if matrix else []
    return {
        "classes": seen,
        "worst": ev.get("worst_images", []),
        "matrix_classes": shown,
        "matrix": rows,
        "matrix_cut": len(seen) - len(shown),
    }


def _try_thumbnail(
    row: tuple[str, str], output: tuple[Any, str], storage_options: Mapping[str, Any], untinted: frozenset[int]
):
    try:
        return _thumbnail(row[0], row[1], output, storage_options, untinted)
    except Exception as exc:  # a sample that cannot be drawn leaves the gallery one short, nothing more
        log.warning("report: no overlay for %s: %s", row[0], exc)
        return None


def class_chart_svg(data: ReportData) -> str:
    """Horizontal bars, one per class in its palette colour: share of pixels, share of images."""
    from matplotlib import rc_context
    from matplotlib.figure import Figure
    from matplotlib.ticker import PercentFormatter

    total = data.pixel_totals.sum()
    shown = [int(i) for i in np.argsort(-data.pixel_totals, kind="stable") if data.pixel_totals[i] > 0]
    shown = shown[:MAX_CHART_CLASSES]
    if not shown or total == 0:
        return ""
    names = [data.class_name(i) for i in shown]
    colours = [tuple(c / 255 for c in overlay.class_colour(i)) for i in shown]
    pixel_share = [100.0 * data.pixel_totals[i] / total for i in shown]
    image_share = [100.0 * data.images_with[i] / max(1, data.ok_images) for i in shown]
    # Text stays text (not paths) and "$" in a class name is not maths: smaller, searchable SVG.
    with rc_context({"svg.fonttype": "none", "text.parse_math": False, "font.size": 9, "svg.hashsalt": "segbatch"}):
        fig = Figure(figsize=(9, 0.9 + 0.26 * len(shown)), layout="constrained")
        axes = fig.subplots(1, 2, sharey=True)
        for ax, values, title in (
            (axes[0], pixel_share, "share of all pixels"),
            (axes[1], image_share, "share of images containing the class"),
        ):
            bars = ax.barh(range(len(shown)), values, color=colours, edgecolor="#444444", linewidth=0.5)
            ax.bar_label(bars, fmt="%.1f%%", padding=2, fontsize=8)
            ax.set_title(title)
            ax.xaxis.set_major_formatter(PercentFormatter(decimals=0))
            ax.set_xlim(0, max(values) * 1.2 or 1)  # room for the bar labels
            ax.set_xticks([t for t in ax.get_xticks() if 0 <= t <= 100])  # no ticks past 100%
            ax.spines[["top", "right"]].set_visible(False)
        axes[0].set_yticks(range(len(shown)), names)
        axes[0].invert_yaxis()
        buf = io.StringIO()
        fig.savefig(buf, format="svg", metadata={"Date": None})
    svg = buf.getvalue()
    return svg[svg.index("<svg") :]  # drop the XML prolog and DOCTYPE: the SVG sits inside HTML


_TEMPLATE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>segbatch report: {{ d.output }}</title>
<style>
body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", sans-serif; margin: 24px auto; max-width: 1150px;
       padding: 0 16px; color: #1d1d1f; background: #fff; }
h1 { font-size: 22px; margin: 0 0 4px; } h2 { font-size: 17px; margin: 28px 0 8px; border-bottom: 1px solid #ddd; }
.muted { color: #666; } code { font-size: 12px; word-break: break-all; }
table { border-collapse: collapse; width: 100%; } th, td { text-align: left; padding: 4px 8px;
        border-bottom: 1px solid #eee; vertical-align: top; } td.n, th.n { text-align: right; }
.totals { display: flex; gap: 12px; flex-wrap: wrap; } .totals div { background: #f4f4f6; padding: 8px 14px;
          border-radius: 6px; } .totals b { display: block; font-size: 20px; }
figure.chart { margin: 0; } figure.chart svg { max-width: 100%; height: auto; }
.gallery { display: grid; grid-template-columns: repeat(auto-fill, minmax(250px, 1fr)); gap: 14px; }
.gallery figure { margin: 0; background: #f4f4f6; padding: 8px; border-radius: 6px; }
.gallery img { width: 100%; height: auto; display: block; image-rendering: auto; }
.gallery figcaption { font-size: 12px; margin-top: 4px; }
.legend { display: flex; flex-wrap: wrap; gap: 6px 14px; margin: 8px 0 12px; padding: 0; list-style: none; }
.swatch { display: inline-block; width: 14px; height: 14px; border: 1px solid #444; vertical-align: -2px;
          margin-right: 5px; }
.bad { color: #b00020; }
#evaluation table { width: auto; min-width: 50%; } #evaluation h3 { font-size: 15px; margin: 18px 0 6px; }
#confusion td.diag { font-weight: bold; background: #eef6ee; }
/* 21 classes fit a 1280 px window: column names read bottom-up, counts in a small font; a wider matrix
   scrolls inside its own box instead of cutting the page. */
.scroll-x { max-width: 100%; overflow-x: auto; }
#confusion { width: auto; min-width: 0; font-size: 11px; } #confusion td, #confusion th { padding: 2px 3px; }
#confusion thead th.col { writing-mode: vertical-rl; transform: rotate(180deg); white-space: nowrap;
                          vertical-align: bottom; text-align: left; }
#confusion tbody th { white-space: nowrap; }
</style></head><body>
<h1>segbatch report</h1>
<p class="muted"><code>{{ d.output }}</code> &middot; generated {{ d.generated_at }}</p>
<div class="totals">
<div><b>{{ d.ok_images }}</b>ok images</div>
<div><b class="{{ 'bad' if d.error_rows else '' }}">{{ d.error_rows }}</b>error rows</div>
<div><b>{{ d.runs|length }}</b>runs</div>
</div>

<section id="runs"><h2>Runs</h2>
<table><thead><tr><th>run</th><th class="n">ok</th><th class="n">error</th><th class="n">images/s</th>
<th>model</th><th>weights</th><th>device</th><th>time</th></tr></thead><tbody>
{% for r in d.runs %}{% set rate, source = r.throughput() %}
<tr><td><code>{{ r.run_id }}</code></td><td class="n">{{ r.ok }}</td>
<td class="n {{ 'bad' if r.error else '' }}">{{ r.error }}</td>
<td class="n" title="from {{ source }}">{{ '%.2f'|format(rate) if rate is not none else '-' }}</td>
<td>{{ r.models|sort|join(', ') }}</td>
<td>{% for w in r.weights|sort %}<code title="{{ w }}">{{ w[:16] ~ '…' if w|length > 20 else w }}</code> {% endfor %}</td>
<td>{{ r.devices|sort|join(', ') }}</td>
<td class="muted">{{ (r.record or {}).get('started_at') or r.first_write or '-' }}</td></tr>
{% endfor %}</tbody></table>
<p class="muted">images/s: the run's ok and error rows over its wall time from its run record where there is
one, else over the span between its first and last summary write (hover a number for its source).</p>
</section>

<section id="classes"><h2>Classes</h2>
{% if chart %}<figure class="chart" id="class-chart">{{ chart|safe }}</figure>
<p class="muted">Left: each class's share of all labelled pixels ({{ d.pixel_totals.sum() }} pixels).
Right: the share of the {{ d.ok_images }} ok images in which the class appears at all.</p>
{% else %}<p class="muted">No ok images yet.</p>{% endif %}
</section>

{% if d.evaluation %}{% set ev = d.evaluation %}{% set view = evaluation_view(ev) %}
<section id="evaluation"><h2>Evaluation</h2>
<div class="totals">
<div><b>{{ num(ev.miou) }}</b>mIoU</div>
<div><b>{{ num(ev.pixel_accuracy) }}</b>pixel accuracy</div>
<div><b>{{ ev.images }}</b>images compared</div>
<div><b>{{ ev.missing_ground_truth }}</b>without ground truth</div>
<div><b class="{{ 'bad' if ev.errors else '' }}">{{ ev.errors or 0 }}</b>failed evaluation</div>
</div>
<table id="per-class"><thead><tr><th>class</th><th class="n">IoU</th><th class="n">support (GT pixels)</th>
<th class="n">predicted pixels</th></tr></thead><tbody>
{% for c in view.classes %}<tr>
<td><span class="swatch" style="background: {{ colour(c.id) }}"></span>{{ c['class'] }}</td>
<td class="n">{{ num(c.iou) }}</td><td class="n">{{ c.support }}</td><td class="n">{{ c.predicted }}</td></tr>
{% endfor %}</tbody></table>
{% if view.worst %}<h3>Worst images by IoU</h3>
<table id="worst"><thead><tr><th class="n">IoU</th><th class="n">pixel accuracy</th><th>image</th></tr></thead>
<tbody>{% for w in view.worst %}<tr><td class="n">{{ num(w.miou) }}</td>
<td class="n">{{ num(w.pixel_accuracy) }}</td><td><code>{{ w.uri }}</code></td></tr>
{% endfor %}</tbody></table>{% endif %}
{% if ev.error_examples or ev.missing_ground_truth_examples %}<h3>Images not compared</h3>
<table id="not-compared"><thead><tr><th>image</th><th>why</th></tr></thead><tbody>
{% for e in ev.error_examples or [] %}<tr><td><code>{{ e.uri }}</code></td><td class="bad">{{ e.error }}</td></tr>
{% endfor %}{% for uri in (ev.missing_ground_truth_examples or [])[:20] %}<tr><td><code>{{ uri }}</code></td>
<td>no ground truth</td></tr>{% endfor %}</tbody></table>
{% set listed = (ev.error_examples or [])|length + [(ev.missing_ground_truth_examples or [])|length, 20]|min %}
{% if (ev.errors or 0) + (ev.missing_ground_truth or 0) > listed %}<p class="muted">
{{ (ev.errors or 0) + (ev.missing_ground_truth or 0) - listed }} more; eval.json lists up to its own limit.</p>
{% endif %}{% endif %}
{% if view.matrix %}<h3>Confusion matrix</h3>
<div class="scroll-x"><table id="confusion"><thead><tr><th>ground truth ↓ / predicted →</th>
{% for c in view.matrix_classes %}<th class="n col">{{ c['class'] }}</th>{% endfor %}</tr></thead><tbody>
{% for row in view.matrix %}{% set r = loop.index0 %}<tr><th>{{ view.matrix_classes[r]['class'] }}</th>
{% for v in row %}<td class="n{{ ' diag' if loop.index0 == r }}">{{ v }}</td>{% endfor %}</tr>
{% endfor %}</tbody></table></div>
{% if view.matrix_cut %}<p class="muted">{{ view.matrix_cut }} more classes with pixels are left out of the
matrix; eval.json has all of it.</p>{% endif %}{% endif %}
<p class="muted">From <code>eval.json</code> in OUTPUT (<code>segbatch eval</code>). Support: ground-truth pixels
of the class; an image's IoU is the mean IoU over the classes in its own ground truth or prediction.</p>
</section>
{% endif %}

<section id="gallery"><h2>Sample overlays</h2>
{% if d.samples %}
<ul class="legend">{% for cid in legend %}<li><span class="swatch" style="background: {{ colour(cid) }}"></span>{{ d.class_name(cid) }}</li>{% endfor %}</ul>
<div class="gallery">{% for s in d.samples %}
<figure class="sample"><img src="{{ s.data_uri }}" alt="overlay of {{ s.uri }}">
<figcaption><code>{{ s.uri }}</code><br>{% for cid, share in s.top_classes %}<span class="swatch" style="background: {{ colour(cid) }}"></span>{{ d.class_name(cid) }} {{ '%.0f'|format(100 * share) }}%{{ ', ' if not loop.last }}{% endfor %}
{% if s.note %}<br><span class="bad">{{ s.note }}</span>{% endif %}</figcaption></figure>
{% endfor %}</div>
<p class="muted">{{ d.samples|length }} images picked by a hash of their URI (the same ones on every report), tinted with their mask's class colours{{ untinted_note }}.</p>
{% else %}<p class="muted">No samples (no ok images, or --samples 0).</p>{% endif %}
</section>

{% if d.least_confident %}<section id="least-confident"><h2>Least confident images</h2>
<div class="gallery">{% for s in d.least_confident %}
<figure class="sample"><img src="{{ s.data_uri }}" alt="overlay of {{ s.uri }}">
<figcaption><code>{{ s.uri }}</code><br>mean confidence {{ '%.1f'|format(100 * s.confidence) }}%: {% for cid, share in s.top_classes %}<span class="swatch" style="background: {{ colour(cid) }}"></span>{{ d.class_name(cid) }} {{ '%.0f'|format(100 * share) }}%{{ ', ' if not loop.last }}{% endfor %}
{% if s.note %}<br><span class="bad">{{ s.note }}</span>{% endif %}</figcaption></figure>
{% endfor %}</div>
<p class="muted">The {{ d.least_confident|length }} ok images with the lowest mean confidence (runs with <code>--confidence</code>): review these first.</p>
</section>{% endif %}

<section id="errors"><h2>Errors</h2>
{% if d.error_groups %}
<table><thead><tr><th class="n">rows</th>{% if d.resolved_checked %}<th class="n">fixed since</th>{% endif %}<th>message</th><th>examples</th></tr></thead><tbody>
{% for g in d.error_groups %}<tr><td class="n">{{ g.count }}</td>{% if d.resolved_checked %}<td class="n">{{ g.resolved }}</td>{% endif %}
<td>{{ g.message }}</td><td>{% for u in g.examples %}<code>{{ u }}</code><br>{% endfor %}</td></tr>
{% endfor %}</tbody></table>
{% if d.other_errors %}<p class="muted">... and {{ d.other_errors }} more error rows with other messages.</p>{% endif %}
<p class="muted">Error rows of every run; "fixed since" counts those whose input got an ok row in a later run.</p>
{% else %}<p>No error rows.</p>{% endif %}
</section>
</body></html>
"""


def render(data: ReportData) -> str:
    import jinja2

    env = jinja2.Environment(autoescape=True, undefined=jinja2.StrictUndefined)
    legend = sorted({cid for s in data.samples for cid, _share in s.top_classes})
    untinted = sorted(overlay.background_ids(data.classes))
    untinted_note = ("; " + ", ".join(data.class_name(i) for i in untinted) + " is left untinted") if untinted else ""
    return env.from_string(_TEMPLATE).render(
        d=data,
        chart=class_chart_svg(data),
        legend=legend,
        untinted_note=untinted_note,
        colour=lambda cid: "#%02x%02x%02x" % overlay.class_colour(cid),
        evaluation_view=evaluation_view,
        num=lambda v: "-" if v is None else f"{v:.4f}",
    )


def write_report(
    output_url: str,
    storage_options: Mapping[str, Any] | None = None,
    *,
    samples: int = DEFAULT_SAMPLES,
    out: str | None = None,
) -> str:
    """Write the report to ``OUTPUT/report.html`` (or to ``out``) and return where it went."""
    if samples < 0:
        raise ConfigError("samples", f"must be 0 or more, got {samples}")
    html = render(collect(output_url, storage_options, samples=samples)).encode()
    if out is not None:
        fs, path = _storage.open_url(out, storage_options)
        where = _storage.absolute_url(out)
    else:
        fs, root = _storage.open_url(output_url, storage_options)
        path = _storage.join_path(root, REPORT_NAME)
        where = _storage.join_url(_storage.absolute_url(output_url), REPORT_NAME)
    _storage.write_atomic(fs, path, html)
    return where


__all__ = ["DEFAULT_SAMPLES", "REPORT_NAME", "class_chart_svg", "collect", "render", "write_report"]
