"""The run: list (read tasks) -> read and decode (CPU tasks) -> infer (actor pool) -> encode and write (CPU tasks).

This is the one place where the stages are put together; read :func:`build_dataset` top to bottom. Every
stage is a pure function of the block it is given, so Ray's retries of a dead worker redo exactly that
block; the driver holds counts only, and a run records success only when every listed input came back as
a row (:func:`_check_complete`).
"""

from __future__ import annotations

import contextlib
import logging
import signal
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa

from segbatch._internal import _ray, _storage, _tally, progress, resources
from segbatch.config import RunConfig
from segbatch.errors import (
    BudgetError,
    IncompleteRunError,
    InputError,
    LeaseLostError,
    describe_write_error,
    fatal_write_error,
)
from segbatch.models import weights
from segbatch.stages import inference, listing
from segbatch.stages.decode import DecodeImages, Limits
from segbatch.stages.inputs import Inputs, inputs_for
from segbatch.stages.sinks import WriteOutputs
from segbatch.stages.writers import WriterContext
from segbatch.store import _lease, compact, identity, preflight, runs, summary, superseded
from segbatch.store.contract import FORWARD_PASS_COLUMN, MASKS_DIR, SUMMARY_DIR, WRITTEN_SCHEMA, check_schema

log = logging.getLogger(__name__)

DECODE_TASK_MEMORY = 320 * 1024**2  # bytes; decode workers resize with PIL and never import torch
MIN_ROWS_FOR_ERROR_RATE = 20  # rows seen before --max-error-rate may stop a run: one early error is no rate
STREAM_BLOCK_BYTES = 16 * 1024  # see _data_settings: ~100 listed names per block
COUNTS_EVERY = 1.0  # seconds between the driver's reads of the listing's counts (Ray's key-value store)
MISSING_EXAMPLES = 5  # inputs an incomplete run names


class RunInterrupted(BaseException):
    """SIGINT (Ctrl-C) or SIGTERM reached the driver; raised by the CLI's signal handler. A BaseException,
    like KeyboardInterrupt, so no ``except Exception`` on the way swallows it."""

    def __init__(self, signum: int):
        import signal

        self.signum = signum
        self.name = signal.Signals(signum).name
        super().__init__(self.name)


@dataclass
class RunReport:
    run_id: str
    output: str
    listed: int = 0
    skipped: int = 0
    ok: int = 0
    errors: int = 0
    seconds: float = 0.0
    error_examples: list[tuple[str, str]] = field(default_factory=list)
    stopped_early: str | None = None
    devices: set[str] = field(default_factory=set)  # where inference ran ("cpu", "cuda:0"), from the rows
    pass_shares: float = 0.0  # each inferred image adds 1/(images in its pass): the sum counts forward passes
    inferred: int = 0  # images that went through a forward pass

    @property
    def forward_passes(self) -> int:
        return round(self.pass_shares)

    @property
    def images_per_forward_pass(self) -> float:
        return self.inferred / self.forward_passes if self.forward_passes else 0.0

    @property
    def processed(self) -> int:
        return self.ok + self.errors

    @property
    def images_per_second(self) -> float:
        return self.processed / self.seconds if self.seconds > 0 else 0.0

    def __str__(self) -> str:
        lines = [
            f"segbatch run {self.run_id}: {self.ok} ok, {self.errors} error, {self.skipped} skipped "
            f"(already labelled) of {self.listed} listed, in {self.seconds:.1f}s "
            f"({self.images_per_second:.2f} images/s)",
            f"  forward passes: {self.forward_passes} ({self.images_per_forward_pass:.1f} images per pass)",
            f"  masks:   {_storage.join_url(self.output, MASKS_DIR)}/",
            f"  summary: {_storage.join_url(self.output, SUMMARY_DIR)}/",
        ]
        for uri, err in self.error_examples:
            lines.append(f"  error: {uri}: {err}")
        if self.errors > len(self.error_examples):
            lines.append(f"  ... {self.errors - len(self.error_examples)} more error rows in the summary")
        if self.stopped_early:
            lines.append(f"  STOPPED: {self.stopped_early}")
        return "\n".join(lines)


def new_run_id() -> str:
    return time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()) + "-" + uuid.uuid4().hex[:6]


def plan_inputs(config: RunConfig, relabel_since: float | None = None, run_id: str = "plan") -> Inputs:
    """The inputs this run must process: the registered input kind its settings name
    (segbatch.stages.inputs.INPUT_KINDS: a listed INPUT or a manifest), read by Ray during the run. Ok
    rows written before ``relabel_since`` (an earlier model's, see identity.py) do not count as done."""
    return inputs_for(config, relabel_since, run_id=run_id)


def sizing(config: RunConfig) -> resources.Sizing:
    """Pool and batch settings for the cluster this process is attached to (segbatch._internal.resources);
    a pool the cluster cannot hold is refused here (ConfigError, exit 2), not left waiting for resources."""
    import ray

    cluster = ray.cluster_resources()
    cpus, gpus, node_cpus = float(cluster.get("CPU", 1.0)), float(cluster.get("GPU", 0.0)), _ray.largest_node_cpus()
    size = resources.size_for_cluster(config, cpus, gpus, resources.gpu_bytes_of(cluster), node_cpus=node_cpus)
    resources.check_fits(size, cpus, gpus, node_cpus)
    return size


def build_dataset(
    config: RunConfig,
    spec: weights.ModelSpec,
    inputs: Inputs,
    run_id: str,
    predictor: Any = None,
    size: resources.Sizing | None = None,
):
    """The lazy Ray Dataset of a run; iterating it does the work and yields (uri, status, error) rows.
    ``predictor`` replaces the model in every actor (benchmarks/data_path.py's stand-in); ``size`` is the
    run's :func:`sizing`, computed here when not given."""
    from ray.data import ActorPoolStrategy

    size = size or sizing(config)
    limits = Limits(config.max_image_pixels, config.max_file_bytes, config.max_model_pixels)
    resize = spec.architecture.resize()

    # 1. Listing: read tasks spread over the cluster, streaming blocks of single-shape runs of batch_size
    #    rows (full forward passes, cut from image headers before any pixel is decoded).
    inputs.plan(
        run_id=run_id,
        batch_size=size.batch_size,
        block_rows=size.block_rows,
        spread=size.max_actors,
        max_shards=max(listing.MIN_MAX_SHARDS, int(_ray.cluster_cpus() * listing.MAX_SHARDS_PER_CPU)),
        resize=resize,
    )
    ds = inputs.dataset()
    # 2. Decoding: listing blocks -> one row per forward pass (pixels of one shape packed together), so
    #    that however Ray cuts the stream into blocks, a pass reaches the model whole. Its reservation
    #    differs from the read tasks' and the actors', so Ray Data fuses it with neither (it fuses only
    #    ops with equal resource requests).
    ds = ds.map_batches(
        DecodeImages(config.input, config.storage_options, resize, limits, max_batch=size.batch_size),
        batch_size=inputs.block_rows,
        batch_format="pyarrow",
        num_cpus=size.decode_cpus,
        memory=DECODE_TASK_MEMORY,
    )
    # 3. Inference: one actor takes whole forward passes (Ray Data wants a batch size with GPUs: one
    #    row, which is one pass) and hands on one row per image.
    ds = ds.map_batches(
        inference.Segmenter,
        fn_constructor_kwargs={
            "spec": spec,
            "precision": config.precision,
            "upsample": config.upsample,
            "min_confidence": config.min_confidence if config.computes_confidence else None,
            "max_batch": size.batch_size,
            "threads": size.threads,
            **({"predictor": predictor} if predictor is not None else {}),
        },
        compute=ActorPoolStrategy(min_size=size.min_actors, max_size=size.max_actors),
        batch_size=1 if size.gpus_per_actor else None,
        batch_format="pyarrow",
        num_gpus=size.gpus_per_actor or None,
        num_cpus=size.cpus_per_actor,
        # Ray Data gives pool actors max_restarts=-1 and max_task_retries=-1: a dead actor is replaced
        # and its blocks retried, so a lost worker costs time, not images (tests/test_faults.py).
    )
    # 4. Writing: masks first, then the block's summary file (segbatch/stages/sinks.py).
    context = WriterContext(
        config.output,
        config.storage_options,
        input_url=config.input or "",
        classes=spec.classes,
        limits=limits,
        png_compress_level=config.png_compress_level,
    )
    return ds.map_batches(
        WriteOutputs(context, config.output_writers, run_id=run_id, model=spec.arch, weights=spec.identity),
        batch_size=inputs.block_rows,
        batch_format="pyarrow",
        num_cpus=size.decode_cpus,
    )


def run(config: RunConfig) -> RunReport:
    """Label every input of ``config`` that has no ok row in its OUTPUT yet.

    Before any work: settings, OUTPUT's existence and writability, and the weights are checked; then the
    OUTPUT's lease is taken (one writer at a time) and the run's model identity is checked against the
    one OUTPUT is bound to (docs/recurring-runs.md)."""
    config.check_runnable()
    started = time.monotonic()
    run_id = config.run_id or new_run_id()  # the start time, as the run record's started_at
    # Ray starts in the background (seconds) while the checks below run; a run they refuse stops it again.
    ray_start = _ray.Starter(config.address, background=True)
    try:
        preflight.check_inputs_exist(config)
        listing.check_output(config.output, config.storage_options)
        preflight.probe_output(config.output, config.storage_options)
        spec = weights.resolve(
            config.model,
            config.weights,
            classes_url=config.classes,
            sha256=config.weights_sha256,
            storage_options=config.storage_options,
        )
        # From the lease on, a stop must end in a run record and a released lease: signals raise only inside
        # the windows _stoppable() opens, and wait for the next one otherwise.
        with _protected(), _lease.Lease(config.output, config.storage_options, run_id) as lease:
            return _run_holding_lease(config, spec, run_id, lease, started, ray_start)
    finally:
        ray_start.close()


def _run_holding_lease(
    config: RunConfig,
    spec: weights.ModelSpec,
    run_id: str,
    lease: _lease.Lease,
    started: float,
    ray_start: _ray.Starter,
) -> RunReport:
    binding = identity.bind(config, spec, run_id)
    report = RunReport(run_id=run_id, output=_storage.absolute_url(config.output))
    cleanup = binding.relabel_since is not None  # rows of an earlier model may need dropping afterwards
    try:
        with _stoppable():
            inputs = plan_inputs(config, binding.relabel_since, run_id=run_id)
    except RunInterrupted as exc:
        report.stopped_early = f"interrupted by {exc.name} while listing INPUT; nothing was labelled"
        report.seconds = time.monotonic() - started
        _finish(config, report, completed=False, cleanup=False)
        raise

    failure: BaseException | None = None
    bar = None
    with contextlib.ExitStack() as ray_session:
        try:
            ray_session.enter_context(_ray_session(ray_start))
            ray_session.enter_context(_data_settings())
            bar = progress.RunProgress(config.progress)
            bar.set_total(None)  # known once every listing task has finished
            # A pool the cluster cannot hold is refused here (exit 2), not left waiting for resources.
            size = sizing(config)
            ds = build_dataset(config, spec, inputs, run_id, size=size)
            # Only now does OUTPUT belong to this run's model: a run refused before this point (a pool that
            # does not fit) leaves OUTPUT free for any model. No task writes before the loop below starts.
            binding.commit()
            with _stoppable():
                counted = time.monotonic()
                _tally.put_written(run_id, 0)  # the listing paces itself by this count (listing.Pace)
                for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
                    ok, errors = report.ok, report.errors
                    _count_rows(report, batch)
                    bar.update(report.ok - ok, report.errors - errors)
                    if time.monotonic() - counted >= COUNTS_EVERY:
                        _read_counts(report, run_id, inputs, bar)
                        _tally.put_written(run_id, report.processed)
                        counted = time.monotonic()
                    lease.check()
                    _check_error_budget(config, report)
                _check_complete(config, spec, inputs, report, _read_counts(report, run_id, inputs, bar))
            if size.gpus_per_actor and "cpu" in report.devices:
                # The actors say so in their own logs; a default run shows none of those, so the driver does.
                log.warning(
                    "Ray assigned GPUs to the inference actors, but torch sees no CUDA device: running on the CPU"
                )
        except (RunInterrupted, KeyboardInterrupt) as exc:
            exc = exc if isinstance(exc, RunInterrupted) else RunInterrupted(signal.SIGINT)
            report.stopped_early = f"interrupted by {exc.name}; rows written so far stay valid, rerun to resume"
            failure = exc
        except (BudgetError, LeaseLostError, IncompleteRunError) as exc:
            report.stopped_early = report.stopped_early or str(exc)
            failure = exc
        except InputError as exc:  # INPUT turned out to hold no image at all
            report.stopped_early = str(exc)
            failure = exc
        except Exception as exc:
            fatal = fatal_write_error(exc)
            if fatal is None:
                failure = exc
                report.stopped_early = f"failed: {type(exc).__name__}"
            else:
                report.stopped_early = (
                    f"writing OUTPUT failed: {describe_write_error(fatal)}; rows "
                    "written so far stay valid, fix OUTPUT and rerun to resume"
                )
                failure = preflight.OutputNotWritableError(f"OUTPUT {config.output}: {report.stopped_early}")
        finally:
            if bar is not None:
                bar.close()
            try:
                _read_counts(report, run_id)
                _tally.clear(run_id)
            except Exception:
                pass
    # Ray is stopped (or detached) here: no task writes any more, so the summary's rows of this run are
    # final and the record's counts can be taken from them.
    report.seconds = time.monotonic() - started
    if failure is not None:
        _recount(config, report)
    _finish(config, report, completed=failure is None, cleanup=cleanup)
    if failure is not None:
        raise failure
    if _stop_requested is not None:
        log.warning(
            "%s arrived after the last image was labelled: the run finished and recorded itself",
            signal.Signals(_stop_requested).name,
        )
    return report


def _read_counts(
    report: RunReport, run_id: str, inputs: Inputs | None = None, bar: progress.RunProgress | None = None
) -> _tally.Totals:
    """The listing's counts so far (its read tasks report them to Ray's key-value store); the progress
    display gets the skipped inputs, and its total once every listing task has finished."""
    totals = _tally.totals(run_id)
    skipped_before = report.skipped
    report.listed, report.skipped = totals.listed, totals.skipped
    if bar is not None:
        bar.update(skipped=report.skipped - skipped_before)
        if inputs is not None and inputs.parts is not None and totals.finished >= inputs.parts and bar.total is None:
            bar.set_total(totals.listed - totals.skipped)
    return totals


def _check_complete(
    config: RunConfig, spec: weights.ModelSpec, inputs: Inputs, report: RunReport, totals: _tally.Totals
) -> None:
    """A run succeeds only when every listed input that was not skipped came back as exactly one row."""
    parts = inputs.parts
    listing_done = parts is None or totals.finished >= parts
    expected = totals.listed - totals.skipped
    if listing_done and totals.listed == 0 and hasattr(inputs, "no_images_error"):
        raise inputs.no_images_error()
    if listing_done and report.processed == expected:
        return
    missing = [] if report.processed > expected else _missing_examples(config, spec, inputs, report.run_id)
    if not listing_done:
        what = f"only {totals.finished} of {parts} listing tasks reported their counts"
    elif report.processed > expected:
        what = f"{report.processed} rows came back for {expected} inputs (a task ran twice)"
    else:
        what = f"{expected - report.processed} of {expected} inputs to label came back without a row"
    named = "".join(f"\n  missing: {uri}" for uri in missing)
    raise IncompleteRunError(
        f"run incomplete: {what}; it is not recorded as complete: rerun the same command to finish it{named}"
    )


def _missing_examples(config: RunConfig, spec: weights.ModelSpec, inputs: Inputs, run_id: str) -> list[str]:
    """A few listed inputs without a row of this run: the listing again, less every row this run wrote."""
    try:
        check = inputs.verification(run_id)
        rows = check.dataset().limit(MISSING_EXAMPLES).take(MISSING_EXAMPLES)
        _tally.clear(check.run_id)
        return [r["uri"] for r in rows]
    except Exception as exc:
        log.warning("could not name the missing inputs: %s", exc)
        return []


_stop_handler = None  # set by install_stop_handlers (the CLI); None for library callers
_stop_requested: int | None = None  # the first SIGINT/SIGTERM of this run, once one arrived
_interruptible = True  # whether the handler may raise RunInterrupted right now (see _stoppable)


def install_stop_handlers() -> None:
    """SIGINT and SIGTERM stop the run cleanly: inside a window of work that may stop at any moment
    (listing, labelling: :func:`_stoppable`) the first one raises RunInterrupted at once; elsewhere once
    the lease is held (starting and stopping Ray, writing the run record, merging summary files,
    releasing the lease) it waits for the next such window or the end of the run, so the run record
    is always written. Every later signal is ignored: the run is already stopping."""
    global _stop_handler, _stop_requested, _interruptible

    def handler(signum, _frame):
        global _stop_requested
        name = signal.Signals(signum).name
        if _stop_requested is not None:
            log.warning("%s: the run is already stopping (writing its record, releasing its lease)", name)
            return
        _stop_requested = signum
        if _interruptible:
            raise RunInterrupted(signum)
        log.warning("%s: the run stops as soon as it can without losing its record", name)

    _stop_handler = handler
    _stop_requested = None
    _interruptible = True
    signal.signal(signal.SIGINT, handler)
    signal.signal(signal.SIGTERM, handler)


@contextlib.contextmanager
def _protected():
    """Signals wait (see install_stop_handlers) until a :func:`_stoppable` window or the end."""
    global _interruptible
    before, _interruptible = _interruptible, False
    try:
        yield
    finally:
        _interruptible = before


@contextlib.contextmanager
def _stoppable():
    """A window where a signal raises RunInterrupted at once; one that arrived before it raises on entry."""
    global _interruptible
    if _stop_requested is not None and _stop_handler is not None:
        raise RunInterrupted(_stop_requested)
    before, _interruptible = _interruptible, True
    try:
        yield
    finally:
        _interruptible = before


def _finish(config, report, *, completed: bool, cleanup: bool = False) -> None:
    """Record the run; after a redo run (or any run while OUTPUT still holds an earlier model's rows,
    ``cleanup``) drop superseded ok rows; then merge the run's summary files (segbatch/store/compact.py). Never
    raises: every row already written is valid, and a failure here must not hide the run's own outcome."""
    try:
        runs.record(config, report, completed=completed)
    except Exception as exc:
        log.error("could not write the run record of %s: %s", report.run_id, exc)
    if config.redo_all or config.redo_changed or cleanup:
        try:
            superseded.drop_superseded(config.output, config.storage_options)
        except Exception as exc:
            log.error(
                "could not drop superseded ok rows (%s); inputs keep an extra older ok row until the next "
                "--redo-changed run finishes this cleanup",
                exc,
            )
    try:
        compact.compact(config.output, config.storage_options, run_id=report.run_id)
    except Exception as exc:
        log.error(
            "could not merge the run's summary files (%s); its rows are all there, in small files: "
            "`segbatch compact OUTPUT` merges them",
            exc,
        )


@contextlib.contextmanager
def _data_settings() -> Iterator[None]:
    """Ray Data's settings for a run; block size and detectors are put back afterwards (a library caller's
    later datasets get its own), progress bars stay off (segbatch's own bar, progress.py, replaces them)."""
    from ray.data import DataContext

    context = DataContext.get_current()
    detectors = context.issue_detectors_config.detectors
    saved = context.target_max_block_size, list(detectors)
    context.enable_progress_bars = False
    # Ray Data gathers a task's output into blocks of up to this many bytes before handing any on, and a
    # decode task takes a whole block. At the default (128 MiB) a read task would hold ~500,000 listed
    # names before the first image is decoded; at 256 KiB one decode task still took ~1,500 images (one
    # task for a 1,000-image INPUT, however large the cluster), and held back their error rows until it
    # had read them all: on a loopback S3 server the first row came at 54 s for 10^5 keys against 19 s
    # for 10^3. Forward passes travel as single rows (segbatch/stages/decode.py), which no size splits.
    context.target_max_block_size = STREAM_BLOCK_BYTES
    # Ray Data's high-memory detector prints a multi-line warning on the terminal for every run: it compares
    # a read task's worker (~110 MiB of Python and pyarrow) with its reservation of 0 bytes. Listing rows
    # are names; that memory is the worker's own, so the warning is noise here.
    detectors[:] = [d for d in detectors if d.__name__ != "HighMemoryIssueDetector"]
    try:
        yield
    finally:
        context.target_max_block_size, detectors[:] = saved


@contextlib.contextmanager
def _ray_session(ray_start: _ray.Starter):
    """_ray.session with the CLI's stop handlers in place. ray.init installs its own SIGTERM handler
    (``sys.exit(15)``) while it starts Ray: a SIGTERM then becomes RunInterrupted, so the run still
    records itself; once Ray is up, the CLI's handlers go back."""
    with contextlib.ExitStack() as stack:
        try:
            stack.enter_context(ray_start.session())
        except SystemExit as exc:
            if _stop_handler is None or exc.code != signal.SIGTERM:
                raise
            raise RunInterrupted(signal.SIGTERM) from None
        finally:
            _restore_python_signal_handlers()
        yield


def _restore_python_signal_handlers() -> None:
    """ray.init replaces the SIGTERM handler (with one that exits with status 15, or a native one that
    aborts): put the CLI's clean-stop handlers back."""
    import threading

    if _stop_handler is None or threading.current_thread() is not threading.main_thread():
        return
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, _stop_handler)


def _recount(config: RunConfig, report: RunReport) -> None:
    """ok/error of a stopped run from its summary rows: batches written but not yet seen by the driver
    count too, so the run record matches the summary."""
    import pyarrow.compute as pc

    ok = rows = 0
    try:
        # Streamed: a run stopped after hours has written thousands of files (summary.FILES_PER_SCAN).
        for batch in summary.batches(
            config.output, config.storage_options, columns=["status"], filter=pc.field("run_id") == report.run_id
        ):
            rows += batch.num_rows
            ok += pc.sum(pc.equal(batch["status"], "ok")).as_py() or 0
    except Exception as exc:
        log.warning("could not recount the rows of %s (%s); the record counts what the driver saw", report.run_id, exc)
        return
    report.ok, report.errors = ok, rows - ok


def _count_rows(report: RunReport, batch: pa.Table) -> None:
    """Tally one block of the sinks' rows (:data:`segbatch.store.contract.WRITTEN_SCHEMA`)."""
    if batch.num_rows == 0:
        return
    check_schema(batch, WRITTEN_SCHEMA, "sinks")
    report.devices.update(d for d in batch["device"].unique().to_pylist() if d)
    sizes = [s for s in batch[FORWARD_PASS_COLUMN].to_pylist() if s]
    report.inferred += len(sizes)
    report.pass_shares += sum(1.0 / s for s in sizes)
    for uri, status, error in zip(*(batch[c].to_pylist() for c in ("uri", "status", "error"))):
        if status == "ok":
            report.ok += 1
        else:
            report.errors += 1
            if len(report.error_examples) < 5:
                report.error_examples.append((uri, error))


def _check_error_budget(config: RunConfig, report: RunReport) -> None:
    if config.max_error_rate is None or report.processed < MIN_ROWS_FOR_ERROR_RATE:
        return
    rate = report.errors / report.processed
    if rate > config.max_error_rate:
        report.stopped_early = (
            f"error rate {rate:.1%} ({report.errors} of {report.processed}) passed --max-error-rate "
            f"{config.max_error_rate:.1%}; rows written so far stay valid, rerun to resume"
        )
        print(report, file=sys.stderr)
        raise BudgetError(report.stopped_early)
