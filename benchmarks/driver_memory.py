"""Driver memory against input count: peak RSS of `segbatch run`'s driver for 10^3 and 10^5 inputs, side by side.

    python benchmarks/driver_memory.py --counts 1000 100000

The inputs are zero-byte `.jpg` files: each becomes an error row ("empty file"), so the run goes through
listing, the input blocks, decode tasks, the inference actor pool (which skips error rows), the summary writes
and the driver's tally exactly as a real run does, without hours of CPU inference. The driver is a fresh
`python -m segbatch run` process; its RSS is sampled with psutil (segbatch/_rss.py).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time

from segbatch._rss import PeakRSS


def peak_rss(cmd: list[str]) -> tuple[float, float, str]:
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    with PeakRSS(proc.pid) as rss:
        out, _ = proc.communicate()
    if proc.returncode != 0:
        raise RuntimeError(out[-3000:])
    report = next((line for line in out.splitlines() if line.startswith("segbatch run")), "")
    return rss.mib(), time.perf_counter() - start, report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--counts", type=int, nargs="+", default=[1000, 100000])
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for n in args.counts:
            src = os.path.join(tmp, f"in{n}")
            for i in range(n):
                folder = os.path.join(src, f"{i // 1000:04d}")
                os.makedirs(folder, exist_ok=True)
                open(os.path.join(folder, f"{i:07d}.jpg"), "wb").close()
            cmd = [sys.executable, "-m", "segbatch", "run", src, os.path.join(tmp, f"out{n}"), "--model",
                   "deeplabv3_mobilenet_v3_large", "--weights", "random", "--no-progress"]
            rss, seconds, report = peak_rss(cmd)
            rows.append((n, rss, seconds, report))
    print(f"{'inputs':>8} {'driver peak RSS':>16} {'seconds':>9}  report")
    for n, rss, seconds, report in rows:
        print(f"{n:>8} {rss:>12.0f} MiB {seconds:>9.1f}  {report}")


if __name__ == "__main__":
    main()
