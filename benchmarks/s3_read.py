"""Reading many small objects from S3: one ``cat_file`` at a time vs segbatch's batched ``read_many``.

Runs against moto's ThreadedMotoServer on 127.0.0.1 (started here, in a child process so that the
server's CPU time does not share this process's GIL). Prints both rates side by side:

    .venv/bin/python benchmarks/s3_read.py --objects 400 --size 40000

Loopback has next to no latency, so this understates the gain: against a real region each request
waits ~10-30 ms, which the batched read overlaps and the sequential one pays in full.
"""

from __future__ import annotations

import argparse
import os
import platform
import time

from _moto import start_server

BUCKET = "segbatch-bench"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--objects", type=int, default=400)
    parser.add_argument("--size", type=int, default=40_000, help="bytes per object (a small JPEG)")
    parser.add_argument("--repeat", type=int, default=3, help="best of N timings of each method")
    args = parser.parse_args()

    proc, endpoint = start_server()
    import s3fs

    from segbatch._internal import _storage

    fs = s3fs.S3FileSystem()
    fs.mkdir(BUCKET)
    payload = os.urandom(args.size)
    paths = [f"{BUCKET}/img/{i:06d}.jpg" for i in range(args.objects)]
    fs.pipe({p: payload for p in paths})

    def sequential() -> None:
        for p in paths:
            assert len(fs.cat_file(p)) == args.size

    def batched() -> None:
        got = _storage.read_many(fs, paths)
        assert all(len(g) == args.size for g in got)

    rates = {}
    for name, fn in (("sequential cat_file", sequential), ("batched cat (read_many)", batched)):
        best = float("inf")
        for _ in range(args.repeat):
            t0 = time.perf_counter()
            fn()
            best = min(best, time.perf_counter() - t0)
        rates[name] = args.objects / best
    print(
        f"{platform.node()} {platform.processor() or platform.machine()} cores={os.cpu_count()} "
        f"python={platform.python_version()} s3fs={s3fs.__version__} endpoint={endpoint}"
    )
    print(f"{args.objects} objects of {args.size} bytes, best of {args.repeat}")
    for name, rate in rates.items():
        print(f"  {name:26s} {rate:8.0f} objects/s")
    print(f"  speed-up                   {rates['batched cat (read_many)'] / rates['sequential cat_file']:8.1f}x")
    proc.terminate()


if __name__ == "__main__":
    main()
