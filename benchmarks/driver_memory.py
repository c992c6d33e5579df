"""Driver memory and time to the first row against input count: `segbatch run`'s driver, side by side.

    python benchmarks/driver_memory.py --counts 1000 20000 100000
    python benchmarks/driver_memory.py --counts 1000 1000000 --max-seconds 90 [--flat]
    python benchmarks/driver_memory.py --s3 --counts 1000 100000 --max-seconds 60
    python benchmarks/driver_memory.py --nested --counts 1000 10000000 --max-seconds 45

`--s3`: the inputs are keys in a moto S3 server on 127.0.0.1 (a child process; keys go straight into its
backend, as in benchmarks/s3_list.py) and the run reads `s3://...`; OUTPUT stays on local disk.

Time to the first row is from the command's start to the first summary file in OUTPUT. Inputs sit in
folders of 1,000 (`--flat`: all in one folder, which one listing task streams; `--nested`: folders of 1,000
inside top-level folders of 100,000).

`--max-seconds S` stops each run after S seconds (as Ctrl-C does) and reports its peak RSS until then (the
peak while it stops, recounting its rows from the summary files it wrote, in a column of its own) and
about how many rows it had written, for input counts whose full run takes hours on a small machine.
The inputs are zero-byte `.jpg` files: each becomes an error row ("empty file"), so the run goes through
listing, the input blocks, decode tasks, the inference actor pool (which skips error rows), the summary writes
and the driver's tally exactly as a real run does, without hours of CPU inference. The driver is a fresh
`python -m segbatch run` process; its RSS is sampled with psutil (segbatch/_internal/_rss.py).
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from segbatch._internal._rss import PeakRSS


class FirstFile:
    """Seconds from start until a file matching ``pattern`` appears in ``folder`` (polled every 50 ms)."""

    def __init__(self, folder: str, pattern: str, start: float):
        import threading

        self.folder, self.pattern, self.start = Path(folder), pattern, start
        self.seconds: float | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()

    def _watch(self) -> None:
        while not self._stop.is_set() and self.seconds is None:
            if self.folder.is_dir() and next(self.folder.glob(self.pattern), None) is not None:
                self.seconds = time.perf_counter() - self.start
            time.sleep(0.05)

    def stop(self) -> float | None:
        self._stop.set()
        self._thread.join()
        return self.seconds


def peak_rss(
    cmd: list[str], max_seconds: float | None = None, output: str = ""
) -> tuple[float, float, str, float | None, float | None]:
    """(peak RSS while running, seconds, report, first row, peak RSS while stopping or None). A stopped
    run's peak is split: after the signal the driver recounts its rows from every summary file it wrote
    (pipeline._recount), which is work with the rows written, not with the inputs listed."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    first = FirstFile(os.path.join(output, "summary"), "part-*.parquet", start)
    with PeakRSS(proc.pid) as rss:
        try:
            out, _ = proc.communicate(timeout=max_seconds)
        except subprocess.TimeoutExpired:  # stop a long run: its peak so far, and the rows it wrote
            written = sum(1 for _ in Path(output, "summary").glob("part-*.parquet"))
            running = rss.mib()
            proc.send_signal(signal.SIGINT)  # the run stops as on Ctrl-C and shuts its Ray down
            try:
                proc.communicate(timeout=300)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.communicate()
            out = None
    first_row = first.stop()
    if out is None:
        return (
            running,
            time.perf_counter() - start,
            f"stopped after {max_seconds:.0f}s, {written} summary files",
            first_row,
            rss.mib(),
        )
    if proc.returncode != 0:
        raise RuntimeError(out[-3000:])
    report = next((line for line in out.splitlines() if line.startswith("segbatch run")), "")
    return rss.mib(), time.perf_counter() - start, report, first_row, None


def make_inputs(src: str, n: int, layout: str) -> None:
    """``n`` zero-byte ``.jpg`` files under ``src``: all in ``src`` (flat), in folders of 1,000 (folders), or
    in folders of 1,000 inside top-level folders of 100,000 (nested: 10^7 inputs are then 100 top-level
    folders, which the run lists as up to 100 read tasks, not 10^4 folders that one read task walks)."""
    per_folder = n if layout == "flat" else 1000
    for start in range(0, n, per_folder):
        folder = src
        if layout == "nested":
            folder = os.path.join(src, f"{start // 100_000:03d}", f"{start // 1000:05d}")
        elif layout == "folders":
            folder = os.path.join(src, f"{start // 1000:04d}")
        os.makedirs(folder, exist_ok=True)
        for i in range(start, min(n, start + per_folder)):
            os.close(os.open(os.path.join(folder, f"{i:08d}.jpg"), os.O_CREAT | os.O_WRONLY, 0o644))


def _s3_inputs(counts: list[int], flat: bool) -> tuple[object, dict[int, str]]:
    """One moto server holding every count's keys under its own prefix; returns (server process, urls)."""
    import functools

    from s3_list import BUCKET, insert_keys

    from _moto import start_server

    prefixes = {n: f"in{n}/" for n in counts}
    setup = functools.partial(insert_keys, [(prefixes[n], n) for n in counts], 0 if flat else 1000)
    proc, _endpoint = start_server(setup)
    return proc, {n: f"s3://{BUCKET}/{prefixes[n]}" for n in counts}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--counts", type=int, nargs="+", default=[1000, 20000, 100000])
    parser.add_argument("--max-seconds", type=float, help="stop each run after this long and report its peak so far")
    parser.add_argument("--flat", action="store_true", help="all inputs in one folder")
    parser.add_argument(
        "--nested", action="store_true", help="folders of 1,000 inside top-level folders of 100,000 (for 10^7)"
    )
    parser.add_argument("--s3", action="store_true", help="inputs are keys on a loopback moto S3 server")
    args = parser.parse_args()
    rows = []
    server, urls = _s3_inputs(args.counts, args.flat) if args.s3 else (None, {})
    with tempfile.TemporaryDirectory() as tmp:
        for n in args.counts:
            src = urls.get(n) or os.path.join(tmp, f"in{n}")
            if not args.s3:
                make_inputs(src, n, "flat" if args.flat else "nested" if args.nested else "folders")
            cmd = [
                sys.executable,
                "-m",
                "segbatch",
                "run",
                src,
                os.path.join(tmp, f"out{n}"),
                "--model",
                "deeplabv3_mobilenet_v3_large",
                "--weights",
                "random",
                "--no-progress",
            ]
            load = os.getloadavg()[0]
            rss, seconds, report, first_row, stopping = peak_rss(cmd, args.max_seconds, os.path.join(tmp, f"out{n}"))
            rows.append((n, rss, stopping, seconds, first_row, f"{load:.1f}-{os.getloadavg()[0]:.1f}", report))
            if not args.s3:
                shutil.rmtree(src)
            print(f"{n} inputs done", file=sys.stderr, flush=True)
    if server is not None:
        server.terminate()
    print(
        f"{'inputs':>8} {'driver peak RSS':>16} {'... stopping':>13} {'first row s':>12} {'seconds':>9} "
        f"{'load avg':>10}  report"
    )
    for n, rss, stopping, seconds, first_row, load, report in rows:
        shown = f"{first_row:.1f}" if first_row is not None else "-"
        stop = f"{stopping:.0f} MiB" if stopping is not None else "-"
        print(f"{n:>8} {rss:>12.0f} MiB {stop:>13} {shown:>12} {seconds:>9.1f} {load:>10}  {report}")


if __name__ == "__main__":
    main()
