"""Reading many small objects from S3: one ``cat_file`` at a time vs segbatch's batched ``read_many``.

Runs against moto's ThreadedMotoServer on 127.0.0.1 (started here, in a child process so that the
server's CPU time does not share this process's GIL). Prints both rates side by side:

    .venv/bin/python benchmarks/s3_read.py --objects 400 --size 40000

Loopback has next to no latency, so this understates the gain: against a real region each request
waits ~10-30 ms, which the batched read overlaps and the sequential one pays in full.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import platform
import socket
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

BUCKET = "segbatch-bench"


def _serve(port: int, ready) -> None:
    import logging

    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    ready.set()
    while True:
        time.sleep(3600)


def start_server() -> tuple[mp.Process, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ready = mp.get_context("spawn").Event()
    proc = mp.get_context("spawn").Process(target=_serve, args=(port, ready), daemon=True)
    proc.start()
    ready.wait(60)
    endpoint = f"http://127.0.0.1:{port}"
    os.environ.update({"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench",
                       "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL": endpoint})
    return proc, endpoint


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--objects", type=int, default=400)
    parser.add_argument("--size", type=int, default=40_000, help="bytes per object (a small JPEG)")
    parser.add_argument("--repeat", type=int, default=3, help="best of N timings of each method")
    args = parser.parse_args()

    proc, endpoint = start_server()
    import s3fs

    from segbatch import _storage

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
    print(f"{platform.node()} {platform.processor() or platform.machine()} cores={os.cpu_count()} "
          f"python={platform.python_version()} s3fs={s3fs.__version__} endpoint={endpoint}")
    print(f"{args.objects} objects of {args.size} bytes, best of {args.repeat}")
    for name, rate in rates.items():
        print(f"  {name:26s} {rate:8.0f} objects/s")
    print(f"  speed-up                   {rates['batched cat (read_many)'] / rates['sequential cat_file']:8.1f}x")
    proc.terminate()


if __name__ == "__main__":
    main()
