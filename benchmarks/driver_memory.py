"""Driver memory and time to the first row against input count: `segbatch run`'s driver, side by side.

    python benchmarks/driver_memory.py --counts 1000 20000 100000
    python benchmarks/driver_memory.py --counts 1000 1000000 --max-seconds 90 [--flat]

Time to the first row is from the command's start to the first summary file in OUTPUT. Inputs sit in
folders of 1,000 (`--flat`: all in one folder, which one listing task streams).

`--max-seconds S` stops each run after S seconds (as Ctrl-C does) and reports its peak RSS so far and
about how many rows it had written, for input counts whose full run takes hours on a small machine.
The inputs are zero-byte `.jpg` files: each becomes an error row ("empty file"), so the run goes through
listing, the input blocks, decode tasks, the inference actor pool (which skips error rows), the summary writes
and the driver's tally exactly as a real run does, without hours of CPU inference. The driver is a fresh
`python -m segbatch run` process; its RSS is sampled with psutil (segbatch/_rss.py).
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

from segbatch._rss import PeakRSS


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
) -> tuple[float, float, str, float | None]:
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    first = FirstFile(os.path.join(output, "summary"), "part-*.parquet", start)
    with PeakRSS(proc.pid) as rss:
        try:
            out, _ = proc.communicate(timeout=max_seconds)
        except subprocess.TimeoutExpired:  # stop a long run: its peak so far, and the rows it wrote
            written = sum(1 for _ in Path(output, "summary").glob("part-*.parquet"))
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
            rss.mib(),
            time.perf_counter() - start,
            f"stopped after {max_seconds:.0f}s, {written} summary files",
            first_row,
        )
    if proc.returncode != 0:
        raise RuntimeError(out[-3000:])
    report = next((line for line in out.splitlines() if line.startswith("segbatch run")), "")
    return rss.mib(), time.perf_counter() - start, report, first_row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--counts", type=int, nargs="+", default=[1000, 20000, 100000])
    parser.add_argument("--max-seconds", type=float, help="stop each run after this long and report its peak so far")
    parser.add_argument("--flat", action="store_true", help="all inputs in one folder")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for n in args.counts:
            src = os.path.join(tmp, f"in{n}")
            for i in range(n):
                folder = src if args.flat else os.path.join(src, f"{i // 1000:04d}")
                os.makedirs(folder, exist_ok=True)
                open(os.path.join(folder, f"{i:07d}.jpg"), "wb").close()
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
            rss, seconds, report, first_row = peak_rss(cmd, args.max_seconds, os.path.join(tmp, f"out{n}"))
            rows.append((n, rss, seconds, first_row, f"{load:.1f}-{os.getloadavg()[0]:.1f}", report))
            shutil.rmtree(src)
            print(f"{n} inputs done", file=sys.stderr, flush=True)
    print(f"{'inputs':>8} {'driver peak RSS':>16} {'first row s':>12} {'seconds':>9} {'load avg':>10}  report")
    for n, rss, seconds, first_row, load, report in rows:
        shown = f"{first_row:.1f}" if first_row is not None else "-"
        print(f"{n:>8} {rss:>12.0f} MiB {shown:>12} {seconds:>9.1f} {load:>10}  {report}")


if __name__ == "__main__":
    main()
