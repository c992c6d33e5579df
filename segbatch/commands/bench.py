"""`segbatch bench`: segbatch side by side with the bare model and the one-image loop, in one run.

(a) bare model: forward passes only, on preprocessed tensors, at batch 1 and each batch size asked for;
(b) the one-image loop a user would write: decode, the weights' transforms, forward, bilinear upsampling
    to full size, argmax, PNG save, class counts;
(c) segbatch end to end through its CLI (embedded Ray start-up included), with the peak RSS of the
    driver and of the inference actors sampled while it runs;
(d) a per-stage breakdown, in this process, one image at a time: list, read, decode+resize, forward,
    upsample+argmax, PNG encode, write, and the rest of (c)'s time per image as waiting/overhead.
All use the same images (the first ``--limit`` of them), model, weights and device. When a stage fails,
the numbers of the stages that finished are still printed (and written to ``--json``), then the failure,
and bench exits with status 1. ``--plan N --hours H`` turns the measured
per-stage rates into a cluster size (the capacity model in docs/benchmarks.md).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from segbatch.errors import ConfigError

BARE_IMAGES = 32  # forward passes timed per batch size: enough for a stable rate, short on a CPU
S3_PUTS_PER_PREFIX = 3500  # per second; AWS's documented per-prefix PUT rate, a shared ceiling


@dataclass
class Row:
    stage: str
    images: int
    seconds: float
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def rate(self) -> float:
        return self.images / self.seconds if self.seconds else 0.0


def _device(name: str | None):
    import torch

    if name:
        return torch.device(name)
    return torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")


def _device_label(device) -> str:
    import torch

    if device.type == "cuda":
        return f"cuda:{device.index or 0} ({torch.cuda.get_device_name(device)})"
    return f"cpu ({torch.get_num_threads()} torch threads, {os.cpu_count()} cores)"


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bare_model(model, example, batch_sizes: list[int], device, precision: str) -> list[Row]:
    """Forward passes only, on one preprocessed image repeated (the cost does not depend on content).

    On a CPU each batch size runs twice: contiguous (NCHW), as a plain loop runs the model, and channels_last
    (NHWC), the layout oneDNN's convolutions are fastest in and segbatch uses: the model's own limit."""
    import torch

    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    layouts = ["channels_last"] if device.type == "cuda" else ["contiguous", "channels_last"]
    rows = []
    for layout in layouts:
        fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
        net = model.to(memory_format=fmt)
        for bs in batch_sizes:
            x = example.expand(bs, -1, -1, -1).contiguous().to(device).contiguous(memory_format=fmt)
            with torch.inference_mode(), torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
                net(x)  # warm-up: allocator, cudnn autotuning
                _sync(device)
                steps = max(1, math.ceil(BARE_IMAGES / bs))
                start = time.perf_counter()
                for _ in range(steps):
                    net(x)
                _sync(device)
            suffix = ", channels_last" if layout == "channels_last" and device.type != "cuda" else ""
            rows.append(Row(f"(a) bare model, batch {bs}{suffix}", steps * bs, time.perf_counter() - start))
    model.to(memory_format=torch.contiguous_format)  # (b) runs the model as a plain loop does
    return rows


def one_image_loop(paths: list[str], model, transforms, device, num_classes: int) -> Row:
    """The straightforward loop, made complete: every step segbatch does, one image at a time."""
    import torch
    import torch.nn.functional as F
    from PIL import Image, ImageOps

    with tempfile.TemporaryDirectory() as out, torch.inference_mode():
        start = time.perf_counter()
        for i, path in enumerate(paths):
            image = ImageOps.exif_transpose(Image.open(path)).convert("RGB")
            x = transforms(image)[None].to(device)
            logits = model(x)["out"]
            up = F.interpolate(logits, size=(image.height, image.width), mode="bilinear", align_corners=False)
            mask = up.argmax(1)[0].to(torch.uint8).cpu().numpy()
            Image.fromarray(mask).save(os.path.join(out, f"{i}.png"))
            np.bincount(mask.ravel(), minlength=num_classes)
        return Row("(b) one-image loop", len(paths), time.perf_counter() - start)


def limited_input(paths: list[str], rels: list[str], folder: str) -> str:
    """``folder`` holding exactly ``paths`` under their names relative to INPUT (hard links, else copies), so
    (c) runs on the same images as (a), (b) and (d) when ``--limit`` keeps only some of INPUT."""
    import shutil

    for path, rel in zip(paths, rels):
        target = os.path.join(folder, *rel.split("/"))
        os.makedirs(os.path.dirname(target), exist_ok=True)
        try:
            os.link(path, target)
        except OSError:
            shutil.copyfile(path, target)
    return folder


def _subprocess_env() -> dict[str, str]:
    """The environment of (c): this process's, with the folder that holds the ``segbatch`` being measured first
    on PYTHONPATH, so the child (and its Ray workers) import this package whatever their cwd holds."""
    import segbatch

    env = dict(os.environ)
    root = os.path.dirname(os.path.dirname(os.path.abspath(segbatch.__file__)))
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    return env


def _absolute_paths(args: list[str]) -> list[str]:
    """Arguments that name existing files, as absolute paths: (c) runs in a temporary cwd."""
    out = []
    for arg in args:
        flag, value = arg.split("=", 1) if arg.startswith("--") and "=" in arg else (None, arg)
        if value and not value.startswith("-") and os.path.exists(value):
            value = os.path.abspath(value)
        out.append(value if flag is None else f"{flag}={value}")
    return out


_REPORT = re.compile(r"segbatch run \S+: (\d+) ok, (\d+) error, (\d+) skipped .* of (\d+) listed")


def end_to_end(input_url: str, n_images: int, run_args: list[str]) -> Row:
    """`segbatch run` in a fresh process, as a user runs it: start-up, Ray, model load, writes.

    It starts in an empty temporary folder, so a folder named ``segbatch`` in bench's own cwd (a clone)
    cannot shadow the package, with the measured package first on PYTHONPATH. Its rate counts the images
    the run reports as processed (ok + error), which must be ``n_images``."""
    from segbatch._internal._rss import PeakRSS

    with tempfile.TemporaryDirectory() as out, tempfile.TemporaryDirectory() as cwd:
        cmd = [
            sys.executable,
            "-m",
            "segbatch",
            "run",
            os.path.abspath(input_url),
            out,
            "--no-progress",
            *_absolute_paths(run_args),
        ]
        start = time.perf_counter()
        proc = subprocess.Popen(
            cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=cwd, env=_subprocess_env()
        )
        first_mask: list[float] = []
        watcher = threading.Thread(
            target=_watch_first_file, args=(os.path.join(out, "masks"), start, proc, first_mask), daemon=True
        )
        watcher.start()
        with PeakRSS(proc.pid, children={"actors": "Segmenter"}) as rss:
            output, _ = proc.communicate()
        seconds = time.perf_counter() - start
        watcher.join()
        if proc.returncode != 0:
            raise RuntimeError(f"segbatch run failed ({proc.returncode}):\n{output[-3000:]}")
        report = _REPORT.search(output)
        if report is None:
            raise RuntimeError(f"segbatch run printed no report line:\n{output[-3000:]}")
        ok, errors, _skipped, listed = (int(g) for g in report.groups())
        if listed != n_images or ok + errors != n_images:
            raise RuntimeError(
                f"segbatch run listed {listed} and processed {ok + errors} images, expected {n_images}:\n{output[-3000:]}"
            )
        passes = re.search(r"forward passes: (\d+) \(([\d.]+) images per pass\)", output)
        written = sorted(
            os.stat(os.path.join(folder, name)).st_mtime
            for folder, _dirs, names in os.walk(os.path.join(out, "masks"))
            for name in names
        )
        return Row(
            "(c) segbatch end to end",
            ok + errors,
            seconds,
            {
                "driver_peak_rss_mib": rss.mib("root"),
                "actor_peak_rss_mib": rss.mib("actors"),
                "ok": ok,
                "errors": errors,
                "first_mask_s": first_mask[0] if first_mask else None,
                # from the first mask to the last: the run's rate once it is going (start-up excluded)
                "steady_img_per_s": steady_rate(written),
                "forward_passes": int(passes.group(1)) if passes else None,
                "images_per_forward_pass": float(passes.group(2)) if passes else None,
            },
        )


# Masks are written by tasks of several images each (8 at the CPU default), within milliseconds of each
# other: a rate from the first mask to the last means something only over several tasks and seconds.
MIN_STEADY_MASKS = 32
MIN_STEADY_SECONDS = 2.0


def steady_rate(mtimes: list[float]) -> float | None:
    """Images/s from the first mask written to the last (start-up excluded), or None when too few masks or
    too short a span to tell a rate from the write tasks' grouping (8 photos of 12 MP once showed 96 img/s)."""
    if len(mtimes) < MIN_STEADY_MASKS:
        return None
    first, last = min(mtimes), max(mtimes)
    if last - first < MIN_STEADY_SECONDS:
        return None
    return (len(mtimes) - 1) / (last - first)


def _watch_first_file(folder: str, start: float, proc: subprocess.Popen, found: list[float]) -> None:
    """Note when the first file appears in ``folder`` (the run's first mask), polling while ``proc`` runs."""
    while proc.poll() is None:
        try:
            with os.scandir(folder) as entries:
                if any(e.is_file() for e in entries):
                    found.append(time.perf_counter() - start)
                    return
        except OSError:
            pass
        time.sleep(0.05)


def stage_rates(paths: list[str], transforms, input_url: str | None = None) -> dict[str, float]:
    """Per-stage rates, for the capacity model: decode+resize and postprocess+PNG encode on one core; names
    one listing read task hands on per second (walk, resume filter and header probe, as a run at batch
    :data:`PLAN_BATCH` lists); and the bytes one image carries from decode to inference."""
    from PIL import Image

    from segbatch.stages.decode import Limits, ResizeSpec, decode_image
    from segbatch.stages.writers import encode_png

    limits = Limits(10**9, 10**10, 10**9)
    resize = ResizeSpec.from_transforms(transforms)
    start = time.perf_counter()
    for path in paths:
        with open(path, "rb") as f:
            resize.apply(decode_image(f.read(), limits))
    decode = len(paths) / (time.perf_counter() - start)
    with Image.open(paths[0]) as im:
        mask = np.zeros((im.height, im.width), np.uint8)
        model_h, model_w = resize.output_size(im.width, im.height)
    start = time.perf_counter()
    for _ in paths:
        encode_png(mask, 1)
    encode = len(paths) / (time.perf_counter() - start)
    rates = {
        "decode_per_core": decode,
        "encode_per_core": encode,
        # decode hands inference each image as uint8 RGB at the model's input size (decode.PASS_SCHEMA)
        "handoff_bytes_per_image": 3 * model_h * model_w,
    }
    if input_url is not None:
        rates["list_per_task"] = listing_rate(input_url, resize)
    return rates


PLAN_BATCH = 16  # the batch size whose listing (with header probes) --plan assumes: a GPU run's


def listing_rate(input_url: str, resize) -> float:
    """Names per second one listing read task hands on over ``input_url``, in this process, as a run's read
    task does at batch :data:`PLAN_BATCH`: walk, and one header probe per image."""
    from segbatch.stages import listing

    start = time.perf_counter()
    names = listing.list_inputs(input_url, {}, EXTENSIONS, batch_size=PLAN_BATCH, resize=resize).num_rows
    return names / (time.perf_counter() - start)


def plan(
    n_images: float,
    hours: float,
    *,
    infer_rate: float,
    decode_rate: float,
    encode_rate: float,
    gpus_per_node: int,
    cpus_per_node: int,
    cpus_per_actor: float = 1.0,
    list_rate: float | None = None,
    list_tasks: int | None = None,
    handoff_bytes: float | None = None,
) -> str:
    """How many nodes label ``n_images`` in ``hours``, and which stage limits each cluster size.

    Every stage counts: listing (``list_rate`` names/s per listing read task, ``list_tasks`` of them: the
    top-level folders of INPUT, capped at 2 per CPU), decode and encode on the CPUs the actors leave,
    inference, the bytes each image carries from decode to inference (``handoff_bytes``: at most one
    network hop, decode and inference may sit on different nodes) and the store's write rate."""
    need = n_images / (hours * 3600)
    cpu_rate_per_image = 1 / decode_rate + 1 / encode_rate  # core-seconds per image outside the model
    task_cpus = cpus_per_node - gpus_per_node * cpus_per_actor
    per_node = {
        "inference": gpus_per_node * infer_rate,
        "decode+encode CPUs": task_cpus / cpu_rate_per_image if task_cpus > 0 else 0.0,
    }
    node_rate = min(per_node.values())
    nodes = math.ceil(need / node_rate) if node_rate else math.inf
    cluster_cpus = nodes * cpus_per_node if nodes != math.inf else cpus_per_node
    lines = [
        f"capacity plan: {n_images:,.0f} images in {hours:g} h = {need:,.1f} images/s",
        f"  per node ({gpus_per_node} GPU, {cpus_per_node} CPUs): inference {per_node['inference']:,.1f}/s, "
        f"decode+encode {per_node['decode+encode CPUs']:,.1f}/s -> {node_rate:,.1f} images/s, "
        f"limited by {min(per_node, key=per_node.get)}",
        f"  nodes needed: {nodes}  (GPUs: {nodes * gpus_per_node})",
        f"  CPUs per GPU that decoding needs at full GPU speed: {infer_rate * cpu_rate_per_image:.1f}",
    ]
    if list_rate:
        # Listing streams beside inference: it limits the run only when all listing tasks together hand on
        # fewer names per second than the cluster labels.
        tasks = max(1, min(list_tasks or 1, 2 * cluster_cpus))
        listed = tasks * list_rate
        lines.append(
            f"  listing: {list_rate:,.0f} names/s per read task x {tasks} task(s) = {listed:,.0f}/s "
            f"(all {n_images:,.0f} listed in {n_images / listed / 3600:,.2f} h)"
            + (
                f"  <- the bottleneck: {math.ceil(need / list_rate)} top-level folders would keep up"
                if listed < need
                else ""
            )
        )
    if handoff_bytes:
        lines.append(
            f"  decode -> inference: {handoff_bytes / 2**20:.2f} MiB per image, "
            f"{node_rate * handoff_bytes / 2**30:,.2f} GiB/s into each node at most "
            f"({node_rate * handoff_bytes * 8 / 1e9:,.1f} Gbit/s of its network when decode runs elsewhere)"
        )
    # Masks and summary files are PUTs; past one prefix's rate the store itself becomes the limit.
    puts = need * (1 + 1 / 64)
    lines.append(
        f"  object-store writes: {puts:,.0f} PUT/s of the ~{S3_PUTS_PER_PREFIX:,}/s one S3 prefix takes"
        + ("  <- the bottleneck: spread OUTPUT over prefixes" if puts > S3_PUTS_PER_PREFIX else "")
    )
    return "\n".join(lines)


def _batch_sizes(text: str) -> list[int]:
    try:
        sizes = [int(b) for b in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not sizes or min(sizes) < 1:
        raise argparse.ArgumentTypeError(f"batch sizes must be positive, got {text!r}")
    return sizes


def _stages(text: str) -> str:
    if set(filter(None, text.split(","))) - {"a", "b", "c"}:
        raise argparse.ArgumentTypeError(f"expected a comma-separated list of a, b, c; got {text!r}")
    return text


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("input", help="folder of images (make bench-data builds 128 JPEGs of 640x480)")
    parser.add_argument(
        "--model", default="deeplabv3_mobilenet_v3_large", help="model for all three (default %(default)s)"
    )
    parser.add_argument(
        "--weights", default="random", help="as run --weights; throughput does not depend on them (default %(default)s)"
    )
    parser.add_argument(
        "--batch-size",
        type=_batch_sizes,
        help="comma-separated batch sizes for (a); the first is passed to (c) "
        "(default: (a) at 1 and 4, (c) with segbatch's own default)",
    )
    parser.add_argument(
        "--precision", default="fp32", choices=["fp32", "bf16", "fp16"], help="autocast precision (default %(default)s)"
    )
    parser.add_argument("--device", help="torch device for (a) and (b) (default: cuda if available)")
    parser.add_argument("--limit", type=_positive_int, help="use only the first N images")
    parser.add_argument("--skip", default="", type=_stages, help="comma-separated stages to skip: a,b,c (default none)")
    parser.add_argument("--run-arg", action="append", default=[], help="extra argument for (c)'s segbatch run")
    parser.add_argument("--json", help="write the numbers here too")
    parser.add_argument("--plan", type=float, metavar="N_IMAGES", help="print a capacity plan for N images")
    parser.add_argument(
        "--hours", type=float, default=24.0, help="--plan: the time the N images must take (default %(default)g)"
    )
    parser.add_argument("--gpu-rate", type=float, help="images/s per GPU for --plan (default: measured (a))")
    parser.add_argument(
        "--gpus-per-node", type=int, default=8, help="--plan: GPUs of one cluster node (default %(default)s)"
    )
    parser.add_argument(
        "--cpus-per-node", type=int, default=96, help="--plan: CPUs of one cluster node (default %(default)s)"
    )
    parser.add_argument(
        "--list-rate",
        type=float,
        help="--plan: names/s one listing task hands on (default: measured on INPUT; S3 lists ~1,000 keys per request)",
    )
    parser.add_argument(
        "--list-tasks",
        type=int,
        default=1,
        help="--plan: INPUT's top-level folders, each listed by its own task (default %(default)s: one flat prefix)",
    )


BREAKDOWN_STAGES = ("list", "read", "decode+resize", "forward", "upsample+argmax", "encode (PNG)", "write")
OVERHEAD = "waiting/overhead"
EXTENSIONS = ("jpg", "jpeg", "png")


def breakdown(input_url: str, spec, device, precision: str, end_to_end_s_per_image: float | None) -> dict[str, Any]:
    """(d): where one image's time goes, measured in this process by timing each stage's own function on
    every input of ``input_url``, one image at a time (forward passes at batch 1): the listing, the read,
    ``DecodeImages.decode_one`` (decode, orientation, the weights' resize), ``Predictor.logits``,
    ``postprocess.labels`` and the counts (as ``Predictor.masks`` runs them), ``encode_png`` and the atomic
    write. The total per image is (c)'s when it ran, else the in-process loop's; what the stages do not
    account for is waiting/overhead. When (c) took less than the stages' serial sum (its stages overlap
    across processes), the serial sum is the total and the overhead is 0."""
    import torch

    from segbatch._internal import _storage
    from segbatch.stages import listing, model, postprocess
    from segbatch.stages.decode import DecodeImages, Limits
    from segbatch.stages.writers import encode_png

    seconds = dict.fromkeys(BREAKDOWN_STAGES, 0.0)
    loop_start = time.perf_counter()
    table = listing.list_inputs(input_url, {}, EXTENSIONS)
    seconds["list"] = time.perf_counter() - loop_start
    paths = table["path"].to_pylist()
    fs_in, _root = _storage.open_url(input_url)
    decoder = DecodeImages(input_url, {}, spec.architecture.resize(), Limits(10**9, 10**10, 10**9))
    predictor = model.Predictor(spec, precision=precision, upsample="exact", device=device)
    with tempfile.TemporaryDirectory() as out:
        fs_out, root = _storage.open_url(out)
        for i, path in enumerate(paths):
            t0 = time.perf_counter()
            data = fs_in.cat_file(path)
            t1 = time.perf_counter()
            image, width, height, error = decoder.decode_one(data)
            t2 = time.perf_counter()
            if error is not None:
                raise RuntimeError(f"(d) cannot decode {path}: {error}")
            pixels = torch.from_numpy(np.stack([image]))  # as the actor stacks a batch (writable)
            if i == 0:  # warm-up, not timed: allocator, oneDNN/cuDNN kernel choice
                predictor.logits(pixels)
                _sync(device)
                t2 = time.perf_counter()
            logits, model_size = predictor.logits(pixels)
            _sync(device)
            t3 = time.perf_counter()
            with torch.inference_mode():
                lab = postprocess.labels(logits[0], (height, width), "exact", model_size).to(torch.uint8)
                postprocess.pixel_counts(lab, spec.num_classes).cpu().numpy()
                mask = lab.cpu().numpy()
            t4 = time.perf_counter()
            png = encode_png(mask, 1)
            t5 = time.perf_counter()
            _storage.write_atomic(fs_out, _storage.join_path(root, f"{i}.png"), png)
            t6 = time.perf_counter()
            for stage, (a, b) in zip(
                BREAKDOWN_STAGES[1:], [(t0, t1), (t1, t2), (t2, t3), (t3, t4), (t4, t5), (t5, t6)]
            ):
                seconds[stage] += b - a
    n = len(paths)
    per_image = {stage: s / n for stage, s in seconds.items()}
    serial = sum(per_image.values())
    if end_to_end_s_per_image is not None:
        basis, total = "(c) end to end", max(end_to_end_s_per_image, serial)
    else:
        basis, total = "this process, serially", max((time.perf_counter() - loop_start) / n, serial)
    per_image[OVERHEAD] = total - serial
    return {
        "images": n,
        "basis": basis,
        "total_ms": total * 1000,
        "overlapped": end_to_end_s_per_image is not None and end_to_end_s_per_image < serial,
        "stages": [
            {"stage": stage, "ms": s * 1000, "share": s / total if total else 0.0} for stage, s in per_image.items()
        ],
    }


def measure(args: argparse.Namespace) -> dict[str, Any]:
    """Run the stages asked for and return the numbers (what ``--json`` writes).

    A stage that fails ends the measuring: ``failed`` then names it and why, and the numbers of the
    stages that finished are kept."""
    from PIL import Image, ImageOps

    from segbatch.models import weights
    from segbatch.stages import listing, model

    skip = set(filter(None, args.skip.split(",")))
    table = listing.list_inputs(args.input, {}, EXTENSIONS).slice(0, args.limit)
    paths, rels = table["path"].to_pylist(), table["rel"].to_pylist()
    if not paths:
        raise ConfigError("input", f"no images in {args.input}", "make bench-data builds 128 JPEGs")
    batch_sizes = sorted({1, *(args.batch_size or [4])})
    try:
        device = _device(args.device)
    except RuntimeError as exc:
        raise ConfigError("device", f"{args.device!r} is not a torch device ({exc})", "e.g. cpu or cuda:0") from None
    spec = weights.resolve(args.model, args.weights)
    transforms = spec.architecture.transforms()
    with Image.open(paths[0]) as im:
        first = ImageOps.exif_transpose(im).convert("RGB")
    result: dict[str, Any] = {
        "model": args.model,
        "weights": spec.identity,
        "precision": args.precision,
        "device": _device_label(device),
        "images": len(paths),
        "first_size": f"{first.width}x{first.height}",
        "date": time.strftime("%Y-%m-%d"),
        "batch_sizes": batch_sizes,
        "rows": [],
        "failed": None,
    }
    rows: list[Row] = []

    def keep(new: list[Row]) -> None:
        rows.extend(new)
        result["rows"] = [{**asdict(r), "img_per_s": r.rate} for r in rows]

    with tempfile.TemporaryDirectory() as tmp:
        # Exactly the measured inputs, for (c) and (d): --limit keeps only some of INPUT, and segbatch run
        # would also pick extensions bench does not.
        inputs = limited_input(paths, rels, os.path.join(tmp, "input"))
        stage = "setup"
        try:
            net = model.build(spec).to(device) if {"a", "b"} - skip else None
            if "a" not in skip:
                stage = "(a) bare model"
                keep(bare_model(net, transforms(first)[None], batch_sizes, device, args.precision))
            if "b" not in skip:
                stage = "(b) one-image loop"
                keep([one_image_loop(paths, net, transforms, device, spec.num_classes)])
            del net
            e2e = None
            if "c" not in skip:
                stage = "(c) segbatch end to end"
                run_args = [
                    "--model",
                    args.model,
                    "--weights",
                    args.weights,
                    "--precision",
                    args.precision,
                    "--redo-all",
                    *(["--batch-size", str(args.batch_size[0])] if args.batch_size else []),
                    *args.run_arg,
                ]
                e2e = end_to_end(inputs, len(paths), run_args)
                keep([e2e])
            stage = "(d) per-stage breakdown"
            result["breakdown"] = breakdown(
                inputs, spec, device, args.precision, e2e.seconds / e2e.images if e2e and e2e.images else None
            )
            stage = "one-core stage rates"
            result["stage_rates"] = stage_rates(paths[:16], transforms, inputs)
        except Exception as exc:  # keep what was measured; say which stage failed and why
            result["failed"] = {"stage": stage, "error": f"{type(exc).__name__}: {exc}"}
    return result


def format_result(result: dict[str, Any]) -> str:
    """The side-by-side table, the ratios between (c) and (a), (b), and the per-stage breakdown."""
    rows = [Row(r["stage"], r["images"], r["seconds"], r["extra"]) for r in result["rows"]]
    lines = [
        f"\nsegbatch bench: {result['model']}, weights {result['weights']}, {result['images']} images "
        f"({result['first_size']} first), {result['precision']}, device {result['device']}",
        f"{'stage':<44}{'images':>8}{'seconds':>10}{'img/s':>10}",
    ]
    lines += [f"{row.stage:<44}{row.images:>8}{row.seconds:>10.2f}{row.rate:>10.2f}" for row in rows]
    by = {r.stage: r for r in rows}
    e2e, loop = by.get("(c) segbatch end to end"), by.get("(b) one-image loop")
    if e2e:
        for b in result["batch_sizes"]:
            bare = by.get(f"(a) bare model, batch {b}")
            if bare:
                lines.append(f"(c)/(a, batch {b}) = {e2e.rate / bare.rate:.2f}")
        if loop:
            lines.append(f"(c)/(b) = {e2e.rate / loop.rate:.2f}")
        steady = e2e.extra.get("steady_img_per_s")
        limit = max((r for r in rows if r.stage.startswith("(a)")), key=lambda r: r.rate, default=None)
        if steady and limit:
            lines.append(
                f"(c) from the first mask to the last: {steady:.2f} img/s = {steady / limit.rate:.2f} x the model's "
                f"own limit ({limit.stage[4:]}: {limit.rate:.2f} img/s)"
            )
        elif not steady:
            lines.append(
                f"(c) from the first mask to the last: not measured (fewer than {MIN_STEADY_MASKS} masks or "
                f"{MIN_STEADY_SECONDS:.0f} s between the first and the last)"
            )
        lines.append(
            f"peak RSS: driver {e2e.extra['driver_peak_rss_mib']:.0f} MiB, "
            f"inference actor {e2e.extra['actor_peak_rss_mib']:.0f} MiB"
        )
        if e2e.extra.get("forward_passes") is not None:
            first = e2e.extra.get("first_mask_s")
            lines.append(f"(c) first mask after {first:.1f} s; " if first is not None else "(c) ")
            lines[-1] += (
                f"{e2e.extra['forward_passes']} forward passes, {e2e.extra['images_per_forward_pass']} images per pass"
            )
    parts = result.get("breakdown")
    if parts:
        lines.append(
            f"(d) per-stage breakdown, mean per image over {parts['images']} images, one at a time "
            f"(total {parts['total_ms']:.1f} ms: {parts['basis']}"
            + ("; its stages overlap, so the total is the stages' serial sum" if parts["overlapped"] else "")
            + ")"
        )
        lines += [f"  {p['stage']:<20}{p['ms']:>10.1f} ms{100 * p['share']:>7.1f}%" for p in parts["stages"]]
    rates = result.get("stage_rates")
    if rates:
        lines.append(
            f"one core: decode+resize {rates['decode_per_core']:.1f} img/s, "
            f"PNG encode {rates['encode_per_core']:.1f} img/s"
            + (
                f"; one listing task {rates['list_per_task']:,.0f} names/s (header probes included)"
                if "list_per_task" in rates
                else ""
            )
        )
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    result = measure(args)
    print(format_result(result))
    failed = result["failed"]
    if args.plan and not failed:
        infer = args.gpu_rate or max(
            (r["img_per_s"] for r in result["rows"] if r["stage"].startswith("(a)")), default=0.0
        )
        if not infer:
            raise ConfigError("gpu_rate", "--plan needs an inference rate", "pass --gpu-rate or drop --skip a")
        rates = result["stage_rates"]
        result["plan"] = plan(
            args.plan,
            args.hours,
            infer_rate=infer,
            decode_rate=rates["decode_per_core"],
            encode_rate=rates["encode_per_core"],
            gpus_per_node=args.gpus_per_node,
            cpus_per_node=args.cpus_per_node,
            list_rate=args.list_rate or rates.get("list_per_task"),
            list_tasks=args.list_tasks,
            handoff_bytes=rates.get("handoff_bytes_per_image"),
        )
        print(result["plan"])
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    if failed:
        print(
            f"segbatch bench: stage {failed['stage']} failed: {failed['error']}\n"
            "the numbers above are those of the stages that finished",
            file=sys.stderr,
        )
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="segbatch bench", description=__doc__.splitlines()[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
