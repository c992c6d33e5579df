"""`segbatch bench`: segbatch side by side with the bare model and the one-image loop, in one run.

(a) bare model: forward passes only, on preprocessed tensors, at batch 1 and each batch size asked for;
(b) the one-image loop a user would write: decode, the weights' transforms, forward, bilinear upsampling
    to full size, argmax, PNG save, class counts;
(c) segbatch end to end through its CLI (embedded Ray start-up included), with the peak RSS of the
    driver and of the inference actors sampled while it runs.
All three use the same images, model, weights and device. ``--plan N --hours H`` turns the measured
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
    """Forward passes only, on one preprocessed image repeated (the cost does not depend on content)."""
    import torch

    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    rows = []
    for bs in batch_sizes:
        x = example.expand(bs, -1, -1, -1).contiguous().to(device)
        if device.type == "cuda":
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.inference_mode(), torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            model(x)  # warm-up: allocator, cudnn autotuning
            _sync(device)
            steps = max(1, math.ceil(BARE_IMAGES / bs))
            start = time.perf_counter()
            for _ in range(steps):
                model(x)
            _sync(device)
        rows.append(Row(f"(a) bare model, batch {bs}", steps * bs, time.perf_counter() - start))
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


def end_to_end(input_url: str, n_images: int, run_args: list[str]) -> Row:
    """`segbatch run` in a fresh process, as a user runs it: start-up, Ray, model load, writes."""
    from segbatch._rss import PeakRSS

    with tempfile.TemporaryDirectory() as out:
        cmd = [sys.executable, "-m", "segbatch", "run", input_url, out, "--no-progress", *run_args]
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
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
        ok = sum(1 for line in output.splitlines() if " ok, " in line and line.startswith("segbatch run"))
        passes = re.search(r"forward passes: (\d+) \(([\d.]+) images per pass\)", output)
        return Row(
            "(c) segbatch end to end",
            n_images,
            seconds,
            {
                "driver_peak_rss_mib": rss.mib("root"),
                "actor_peak_rss_mib": rss.mib("actors"),
                "report_lines": ok,
                "first_mask_s": first_mask[0] if first_mask else None,
                "forward_passes": int(passes.group(1)) if passes else None,
                "images_per_forward_pass": float(passes.group(2)) if passes else None,
            },
        )


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


def stage_rates(paths: list[str], transforms) -> dict[str, float]:
    """Per-stage rates on one core, for the capacity model: decode+resize, postprocess+PNG encode."""
    from PIL import Image

    from segbatch.decode import Limits, ResizeSpec, decode_image
    from segbatch.writers import encode_png

    limits = Limits(10**9, 10**10, 10**9)
    resize = ResizeSpec.from_transforms(transforms)
    start = time.perf_counter()
    for path in paths:
        with open(path, "rb") as f:
            resize.apply(decode_image(f.read(), limits))
    decode = len(paths) / (time.perf_counter() - start)
    with Image.open(paths[0]) as im:
        mask = np.zeros((im.height, im.width), np.uint8)
    start = time.perf_counter()
    for _ in paths:
        encode_png(mask, 1)
    encode = len(paths) / (time.perf_counter() - start)
    return {"decode_per_core": decode, "encode_per_core": encode}


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
) -> str:
    """How many nodes label ``n_images`` in ``hours``, and which stage limits each cluster size."""
    need = n_images / (hours * 3600)
    cpu_rate_per_image = 1 / decode_rate + 1 / encode_rate  # core-seconds per image outside the model
    task_cpus = cpus_per_node - gpus_per_node * cpus_per_actor
    per_node = {
        "inference": gpus_per_node * infer_rate,
        "decode+encode CPUs": task_cpus / cpu_rate_per_image if task_cpus > 0 else 0.0,
    }
    node_rate = min(per_node.values())
    nodes = math.ceil(need / node_rate) if node_rate else math.inf
    lines = [
        f"capacity plan: {n_images:,.0f} images in {hours:g} h = {need:,.1f} images/s",
        f"  per node ({gpus_per_node} GPU, {cpus_per_node} CPUs): inference {per_node['inference']:,.1f}/s, "
        f"decode+encode {per_node['decode+encode CPUs']:,.1f}/s -> {node_rate:,.1f} images/s, "
        f"limited by {min(per_node, key=per_node.get)}",
        f"  nodes needed: {nodes}  (GPUs: {nodes * gpus_per_node})",
        f"  CPUs per GPU that decoding needs at full GPU speed: {infer_rate * cpu_rate_per_image:.1f}",
    ]
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


def measure(args: argparse.Namespace) -> dict[str, Any]:
    """Run the stages asked for and return the numbers (what ``--json`` writes)."""
    from PIL import Image, ImageOps

    from segbatch import listing, model, weights

    skip = set(filter(None, args.skip.split(",")))
    paths = listing.list_inputs(args.input, {}, ("jpg", "jpeg", "png"))["path"].to_pylist()[: args.limit]
    if not paths:
        raise ConfigError("input", f"no images in {args.input}", "make bench-data builds 128 JPEGs")
    batch_sizes = sorted({1, *(args.batch_size or [4])})
    try:
        device = _device(args.device)
    except RuntimeError as exc:
        raise ConfigError("device", f"{args.device!r} is not a torch device ({exc})", "e.g. cpu or cuda:0") from None
    spec = weights.resolve(args.model, args.weights)
    transforms = spec.architecture.transforms()
    net = model.build(spec).to(device)
    first = ImageOps.exif_transpose(Image.open(paths[0])).convert("RGB")
    rows: list[Row] = []
    if "a" not in skip:
        rows += bare_model(net, transforms(first)[None], batch_sizes, device, args.precision)
    if "b" not in skip:
        rows.append(one_image_loop(paths, net, transforms, device, spec.num_classes))
    if "c" not in skip:
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
        rows.append(end_to_end(args.input, len(paths), run_args))
    return {
        "model": args.model,
        "weights": spec.identity,
        "precision": args.precision,
        "device": _device_label(device),
        "images": len(paths),
        "first_size": f"{first.width}x{first.height}",
        "date": time.strftime("%Y-%m-%d"),
        "batch_sizes": batch_sizes,
        "rows": [{**asdict(r), "img_per_s": r.rate} for r in rows],
        "stage_rates": stage_rates(paths[:16], transforms),
    }


def format_result(result: dict[str, Any]) -> str:
    """The side-by-side table and the ratios between (c) and (a), (b)."""
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
    rates = result["stage_rates"]
    lines.append(
        f"one core: decode+resize {rates['decode_per_core']:.1f} img/s, PNG encode {rates['encode_per_core']:.1f} img/s"
    )
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    result = measure(args)
    print(format_result(result))
    if args.plan:
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
        )
        print(result["plan"])
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="segbatch bench", description=__doc__.splitlines()[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
