"""Driver memory against input count: peak RSS of `segbatch run`'s driver for 10^3 and 10^5 inputs, side by side.

    python benchmarks/driver_memory.py --counts 1000 20000 100000

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


def peak_rss(cmd: list[str], max_seconds: float | None = None, output: str = "") -> tuple[float, float, str]:
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    with PeakRSS(proc.pid) as rss:
        try:
            out, _ = proc.communicate(timeout=max_seconds)
        except subprocess.TimeoutExpired:  # stop a long run: its peak so far, and the rows it wrote
            written = len(list(Path(output, "summary").glob("part-*.parquet"))) * 64
            proc.send_signal(signal.SIGINT)  # the run stops as on Ctrl-C and shuts its Ray down
            try:
                proc.communicate(timeout=300)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.communicate()
            out = None
    if out is None:
        return rss.mib(), time.perf_counter() - start, f"stopped after {max_seconds:.0f}s, ~{written} rows written"
    if proc.returncode != 0:
        raise RuntimeError(out[-3000:])
    report = next((line for line in out.splitlines() if line.startswith("segbatch run")), "")
    return rss.mib(), time.perf_counter() - start, report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--counts", type=int, nargs="+", default=[1000, 20000, 100000])
    parser.add_argument("--max-seconds", type=float, help="stop each run after this long and report its peak so far")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for n in args.counts:
            src = os.path.join(tmp, f"in{n}")
            for i in range(n):
                folder = os.path.join(src, f"{i // 1000:04d}")
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
            rss, seconds, report = peak_rss(cmd, args.max_seconds, os.path.join(tmp, f"out{n}"))
            rows.append((n, rss, seconds, f"{load:.1f}-{os.getloadavg()[0]:.1f}", report))
            shutil.rmtree(src)
            print(f"{n} inputs done", file=sys.stderr, flush=True)
    print(f"{'inputs':>8} {'driver peak RSS':>16} {'seconds':>9} {'load avg':>10}  report")
    for n, rss, seconds, load, report in rows:
        print(f"{n:>8} {rss:>12.0f} MiB {seconds:>9.1f} {load:>10}  {report}")


if __name__ == "__main__":
    main()
