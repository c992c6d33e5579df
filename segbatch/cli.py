"""The command line: parse, build the config, call one library function."""

from __future__ import annotations

import argparse
import signal
import sys
from collections.abc import Sequence
from typing import Any

from segbatch import __version__
from segbatch.config import RunConfig, load_config_file, parse_storage_value
from segbatch.errors import EXIT_STATUS, InputError, SegbatchError, StorageError, exit_status, is_unreachable
from segbatch.models.architectures import available_models
from segbatch.stages.writers import WRITERS

EXIT_SIGINT = 130  # stopped by Ctrl-C: rows written so far stay valid
EXIT_SIGTERM = 143  # stopped by SIGTERM: rows written so far stay valid


def _storage_option(text: str) -> tuple[str, Any]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        # Never echo the text: it may be a secret given without its key.
        raise argparse.ArgumentTypeError("expected KEY=VALUE (the value is not shown: it may be a secret)")
    # Values are JSON scalars (true, false, null, numbers), else strings (docs/recurring-runs.md).
    return key, parse_storage_value(value)


def _add_storage_option(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--storage-option",
        dest="storage_options",
        action="append",
        type=_storage_option,
        metavar="KEY=VALUE",
        help="fsspec storage option, repeatable",
    )


# Cluster shapes (CPUs, GPUs) whose automatic sizing `run --help` prints as examples of each rule.
HELP_EXAMPLE_CLUSTERS = ((2, 0), (16, 0), (16, 2))


def _auto_help(name: str) -> str:
    """``default auto: <the rule in words>; e.g. <what resources.size_for_cluster picks on a few clusters>``."""
    from segbatch._internal import resources

    examples = []
    for cpus, gpus in HELP_EXAMPLE_CLUSTERS:
        size = resources.size_for_cluster(RunConfig(), cpus, gpus)
        value = {
            "actors": size.max_actors,
            "cpus_per_actor": size.cpus_per_actor,
            "decode_cpus": size.decode_cpus,
            "batch_size": size.batch_size,
        }[name]
        where = f"{cpus} CPUs" + (f" + {gpus} GPUs" if gpus else "")
        examples.append(f"{where}: {value:g}")
    note = f" (for {RunConfig.model})" if name == "batch_size" else ""
    text = f"default auto: {resources.auto_rules()[name]}; e.g. {', '.join(examples)}{note}"
    return text.replace("%", "%%")  # argparse %-formats help strings


def _add_run_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("input", nargs="?", help="folder or URL prefix of images (listed recursively)")
    p.add_argument("output", nargs="?", help="folder or URL prefix for masks/ and summary/")
    p.add_argument("--config", help="YAML, TOML or JSON file of the same settings as these flags (flags win)")
    p.add_argument("--manifest", help="text, CSV or Parquet file of image URLs, instead of INPUT")
    p.add_argument("--model", help=f"torchvision model: {', '.join(available_models())} (default {RunConfig.model})")
    p.add_argument(
        "--weights",
        help="default: torchvision's pretrained weights (also spelt DEFAULT, the enum member such as "
        "COCO_WITH_VOC_LABELS_V1, or its full name); random: untrained, for smoke tests; or PATH_OR_URL of a "
        "state_dict (default default)",
    )
    p.add_argument("--weights-sha256", help="refuse a weights file whose sha256 differs")
    p.add_argument("--classes", help="file of class names (one per line, or a JSON list)")
    p.add_argument("--batch-size", type=int, help="images per forward pass (" + _auto_help("batch_size") + ")")
    p.add_argument("--precision", choices=["fp32", "bf16", "fp16"], help="autocast precision (default fp32)")
    p.add_argument(
        "--upsample",
        choices=["exact", "bilinear", "nearest"],
        help="logit upsampling: exact (default, reference labels), bilinear (literal), nearest (approx.)",
    )
    p.add_argument("--extensions", help="comma-separated extensions to pick from INPUT")
    _add_storage_option(p)
    p.add_argument("--address", help="Ray cluster to attach to (default: RAY_ADDRESS, else an embedded Ray)")
    p.add_argument("--actors", help="inference actors: N, or MIN:MAX to autoscale (" + _auto_help("actors") + ")")
    p.add_argument(
        "--gpus-per-actor",
        type=float,
        help="GPUs per inference actor; fractions pack models (default 1 when the cluster has GPUs, else 0)",
    )
    p.add_argument(
        "--cpus-per-actor", type=float, help="CPUs per inference actor (" + _auto_help("cpus_per_actor") + ")"
    )
    p.add_argument(
        "--decode-cpus", type=float, help="CPUs per decode and write task (" + _auto_help("decode_cpus") + ")"
    )
    p.add_argument(
        "--max-image-pixels",
        type=int,
        help=f"refuse larger images before decoding (default {RunConfig.max_image_pixels})",
    )
    p.add_argument("--max-file-bytes", type=int, help=f"refuse larger input files (default {RunConfig.max_file_bytes})")
    p.add_argument(
        "--max-model-pixels",
        type=int,
        help=f"refuse images whose resized model input is larger (default {RunConfig.max_model_pixels})",
    )
    p.add_argument("--max-error-rate", type=float, help="exit non-zero once the share of error rows passes this")
    p.add_argument("--redo-changed", action="store_const", const=True, help="redo inputs whose size/ETag/mtime changed")
    p.add_argument("--redo-all", action="store_const", const=True, help="redo every input")
    p.add_argument(
        "--writers",
        metavar="NAME[,NAME]",
        help=f"per-image outputs, comma-separated: {', '.join(WRITERS.names())} (default {','.join(RunConfig.writers)}; "
        "the mask is always written)",
    )
    p.add_argument(
        "--overlays",
        action="store_const",
        const=True,
        help="also write a JPEG overlay per image (same as adding overlay to --writers)",
    )
    p.add_argument(
        "--confidence",
        action="store_const",
        const=True,
        help="also write confidence/<name>.png (the confidence writer) and the summary's mean_confidence, "
        "low_confidence_share",
    )
    p.add_argument(
        "--min-confidence",
        type=float,
        help=f"low_confidence_share counts pixels below this (default {RunConfig.min_confidence:g})",
    )
    p.add_argument(
        "--png-compress-level",
        type=int,
        help=f"zlib level of mask PNGs, 0-9 (default {RunConfig.png_compress_level})",
    )
    p.add_argument("--run-id", help="name this run (default: UTC time plus a random suffix)")
    p.add_argument(
        "--no-progress",
        dest="progress",
        action="store_const",
        const=False,
        help="no progress bar (on a terminal) or progress lines (in a log)",
    )


def build_config(args: argparse.Namespace) -> RunConfig:
    """Config file settings, overridden by the flags that were given."""
    ignored = ("command", "config", "func", "verbose")
    flags = {k: v for k, v in vars(args).items() if v is not None and k not in ignored}
    if flags.get("manifest") and "input" in flags and "output" not in flags:
        flags["output"] = flags.pop("input")  # `run --manifest M OUTPUT`: the one positional is OUTPUT
    if "storage_options" in flags:
        flags["storage_options"] = dict(flags["storage_options"])
    values: dict[str, Any] = {}
    if args.config:
        values = load_config_file(args.config, flags.get("storage_options"))
        if "storage_options" in flags:
            flags["storage_options"] = {**(values.get("storage_options") or {}), **flags["storage_options"]}
    values.update(flags)
    return RunConfig.from_dict(values)


def _unreachable_message(exc: BaseException) -> str:
    return (
        f"cannot reach storage: {type(exc).__name__}: {exc} (check the endpoint, network and credentials); "
        "nothing was done"
    )


def _use_system_allocator() -> None:
    """Arrow allocates from the C library's malloc in this process, which a long command owns.

    Arrow's default pool (mimalloc) keeps freed pages for reuse by the thread that freed them: a merge of
    277,024 summary rows left a driver 37 MiB larger than the same merge on the system pool, which hands
    them back. The CLI's processes hold little Arrow data at a time, in large buffers, so nothing is lost;
    Ray's workers keep Arrow's default. A library caller keeps the pool it chose.
    """
    import pyarrow as pa

    pa.set_memory_pool(pa.system_memory_pool())


def _cmd_run(args: argparse.Namespace) -> int:
    from segbatch.pipeline import RunInterrupted, install_stop_handlers, run

    config = build_config(args)
    install_stop_handlers()
    _use_system_allocator()
    try:
        report = run(config)
    except RunInterrupted as exc:
        # The run has stopped and recorded itself: later signals are ignored while Python exits (its
        # shutdown would otherwise put the default action back, and a late SIGTERM end us with -15).
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        print(
            f"segbatch: stopped by {exc.name}; rows written so far stay valid, the run record says how many; "
            "rerun to resume",
            file=sys.stderr,
        )
        return EXIT_SIGTERM if exc.name == "SIGTERM" else EXIT_SIGINT
    except SegbatchError:
        raise
    except Exception as exc:
        # An endpoint that cannot be reached (after retries) or credentials that cannot work: a message
        # and exit 4, not a traceback.
        if not is_unreachable(exc):
            raise
        raise StorageError(_unreachable_message(exc)) from None
    print(report)
    return 0


def _cmd_status(args: argparse.Namespace) -> int:
    from segbatch.commands import _status as status

    result = status.collect(args.output, dict(args.storage_options or []))
    print(result)
    return 0 if result.runs else EXIT_STATUS[InputError]


def _cmd_report(args: argparse.Namespace) -> int:
    from segbatch.commands._report import write_report

    where = write_report(args.output, dict(args.storage_options or []), samples=args.samples, out=args.out)
    print(f"segbatch report: wrote {where}")
    return 0


def _cmd_eval(args: argparse.Namespace) -> int:
    from segbatch.commands._evaluate import default_json_url, evaluate, write_json

    storage_options = dict(args.storage_options or [])
    result = evaluate(
        args.output,
        args.ground_truth,
        storage_options,
        address=args.address,
        worst=args.worst,
        progress=args.progress,
    )
    print(result)
    target = args.json or default_json_url(args.output)
    try:
        write_json(result, target, storage_options)
    except Exception as exc:
        if args.json:
            raise
        # The metrics are printed already; an OUTPUT one may read but not write must not fail the eval.
        print(f"segbatch: could not write {target} ({type(exc).__name__}: {exc}); use --json PATH", file=sys.stderr)
    return 0


def _cmd_compact(args: argparse.Namespace) -> int:
    import time

    from segbatch.store import _lease
    from segbatch.store.compact import compact

    storage_options = dict(args.storage_options or [])
    _require_output_folder(args.output, storage_options)
    _use_system_allocator()
    # Compaction rewrites summary files: it holds OUTPUT's lease, as a run does, so no run writes meanwhile.
    with _lease.Lease(args.output, storage_options, "compact-" + time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())):
        print(compact(args.output, storage_options))
    return 0


def _require_output_folder(url: str, storage_options: dict[str, Any]) -> None:
    """An OUTPUT to read or compact must exist and be a folder (exit 4, as status and report): taking
    the lease there would create a missing folder, or fail below a file."""
    from segbatch._internal import _storage

    fs, path = _storage.open_url(url, storage_options)
    if not _storage.retry(fs.exists, path, what=f"check {url}"):
        raise InputError(f"OUTPUT {url} does not exist (check the path, bucket name and credentials)")
    if _storage.retry(fs.isfile, path, what=f"check {url}"):
        raise InputError(f"OUTPUT {url} is a file, not the folder of a run's outputs")


def _cmd_export(args: argparse.Namespace) -> int:
    from segbatch.commands.export import export
    from segbatch.errors import ExportIncomplete

    # Format-specific flags go through only when given, so a format that has no use for one can say so.
    options = {k: v for k, v in (("from_name", args.from_name), ("to_name", args.to_name)) if v is not None}
    result = export(
        args.output,
        args.format,
        args.dest,
        storage_options=dict(args.storage_options or []),
        shard_size=args.shard_size,
        progress=args.progress,
        **options,
    )
    print(result)
    if result.failed:
        raise ExportIncomplete(
            f"{len(result.failed)} ok rows could not be exported (listed above); the other {result.images} images were"
        )
    return 0


def _add_export_parser(sub: Any) -> None:
    from segbatch.commands.export import DEFAULT_SHARD_SIZE, formats, get_exporter

    p = sub.add_parser("export", help="OUTPUT's masks as COCO JSON, CVAT Segmentation mask 1.1 or Label Studio tasks")
    p.add_argument("output", help="the OUTPUT folder or URL prefix of earlier runs")
    p.add_argument("dest", help="folder or URL prefix to write to (cvat: also NAME.zip)")
    p.add_argument(
        "--format", required=True, help="; ".join(f"{name}: {get_exporter(name).description}" for name in formats())
    )
    p.add_argument(
        "--shard-size",
        type=int,
        default=DEFAULT_SHARD_SIZE,
        metavar="N",
        help=f"images per output file (default {DEFAULT_SHARD_SIZE})",
    )
    p.add_argument("--from-name", help="label-studio: the BrushLabels tag's name (default tag)")
    p.add_argument("--to-name", help="label-studio: the Image tag's name (default image)")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="hide the progress bar")
    _add_storage_option(p)
    p.set_defaults(func=_cmd_export)


def _add_results_parsers(sub: Any) -> None:
    from segbatch.commands._evaluate import DEFAULT_WORST

    report_p = sub.add_parser("report", help="write OUTPUT/report.html: runs, class chart, sample overlays, errors")
    report_p.add_argument("output", help="the OUTPUT folder or URL prefix of earlier runs")
    report_p.add_argument("--samples", type=int, default=12, help="overlays in the gallery (default 12)")
    report_p.add_argument("--out", help="write the report to this file instead of OUTPUT/report.html")
    report_p.set_defaults(func=_cmd_report)
    eval_p = sub.add_parser("eval", help="mIoU and pixel accuracy of OUTPUT's masks against ground-truth PNGs")
    eval_p.add_argument("output", help="the OUTPUT folder or URL prefix of earlier runs")
    eval_p.add_argument(
        "--ground-truth",
        required=True,
        metavar="GT",
        help="folder or URL prefix mirroring INPUT: <relative path with .png>, 255 = ignore",
    )
    eval_p.add_argument("--json", help="write the metrics JSON here instead of OUTPUT/eval.json (any fsspec URL)")
    eval_p.add_argument(
        "--worst",
        type=int,
        default=DEFAULT_WORST,
        metavar="K",
        help=f"list the K images with the lowest IoU (default {DEFAULT_WORST})",
    )
    eval_p.add_argument("--address", help="Ray cluster to attach to (default: RAY_ADDRESS, else an embedded Ray)")
    eval_p.add_argument(
        "--no-progress", dest="progress", action="store_false", help="no progress bar (terminal) or lines (log)"
    )
    eval_p.set_defaults(func=_cmd_eval)
    compact_p = sub.add_parser("compact", help="merge OUTPUT's small summary files into few large ones")
    compact_p.add_argument("output", help="the OUTPUT folder or URL prefix of earlier runs")
    compact_p.set_defaults(func=_cmd_compact)
    for p in (report_p, eval_p, compact_p):
        _add_storage_option(p)


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="segbatch", description="Batch semantic segmentation on Ray Data.")
    parser.add_argument("--version", action="version", version=f"segbatch {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    run_p = sub.add_parser("run", help="label INPUT into OUTPUT (resumes: inputs with an ok row are skipped)")
    _add_run_options(run_p)
    run_p.set_defaults(func=_cmd_run)
    _add_results_parsers(sub)
    _add_export_parser(sub)
    status_p = sub.add_parser("status", help="per-run counts (ok, error, skipped), the last run and totals")
    status_p.add_argument("output", help="the OUTPUT folder or URL prefix of earlier runs")
    _add_storage_option(status_p)
    status_p.set_defaults(func=_cmd_status)
    from segbatch.commands import bench

    bench_p = sub.add_parser("bench", help="throughput side by side: bare model, one-image loop, segbatch")
    bench.add_arguments(bench_p)
    bench_p.set_defaults(func=bench.run)
    for p in (parser, *sub.choices.values()):
        # Before or after the subcommand; SUPPRESS lets the subcommand's count stand beside the top level's.
        p.add_argument(
            "-v",
            "--verbose",
            action="count",
            default=argparse.SUPPRESS,
            help="also show Ray's own log lines (start-up, Ray Data's plan, worker output); -vv adds debug lines",
        )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    from segbatch._internal import _logs

    parser = make_parser()
    args = parser.parse_args(argv)
    _logs.configure(getattr(args, "verbose", 0))
    try:
        return args.func(args)
    except SegbatchError as exc:
        print(f"segbatch: {exc}", file=sys.stderr)
        return exit_status(exc)
    except Exception as exc:
        # status, report, eval, compact and export meet storage as run does: an endpoint that cannot be
        # reached (after retries) or credentials that cannot work are one line and exit 4, as for run.
        if not is_unreachable(exc):
            raise
        print(f"segbatch: {_unreachable_message(exc)}", file=sys.stderr)
        return EXIT_STATUS[StorageError]


if __name__ == "__main__":
    sys.exit(main())
