"""How to split a CPU between model processes: P processes x T torch threads, the bare model, side by side.

    python benchmarks/cpu_split.py --cores 2 --seconds 20

For each split with P x T = cores (and each batch size given), P processes each run the bare model
(channels_last, inference mode, seeded random weights) on 520x693 inputs for ``--seconds`` and count the
images; the table gives images/s for the whole machine. segbatch's CPU default (segbatch/_internal/resources.py) is
chosen from this table (docs/benchmarks.md).
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import time

ARCH = "deeplabv3_mobilenet_v3_large"
HEIGHT, WIDTH = 520, 693  # a 640x480 photo after the weights' 520-px resize


def _worker(threads: int, batch: int, seconds: float, arch: str, start, result) -> None:
    import torch

    from segbatch.models.weights import resolve
    from segbatch.stages.model import Predictor

    torch.set_num_threads(threads)
    predictor = Predictor(resolve(arch, "random"), device=torch.device("cpu"), threads=threads)
    images = torch.randint(0, 255, (batch, HEIGHT, WIDTH, 3), dtype=torch.uint8)
    sizes = [(480, 640)] * batch
    predictor.masks(images, sizes)  # warm-up: one pass, not counted
    start.wait()
    done, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        predictor.masks(images, sizes)
        done += batch
    result.put(done / (time.perf_counter() - t0))


def measure(processes: int, threads: int, batch: int, seconds: float, arch: str) -> float:
    ctx = mp.get_context("spawn")
    start, result = ctx.Barrier(processes + 1), ctx.Queue()
    procs = [ctx.Process(target=_worker, args=(threads, batch, seconds, arch, start, result)) for _ in range(processes)]
    for p in procs:
        p.start()
    start.wait()
    rates = [result.get() for _ in procs]
    for p in procs:
        p.join()
    return sum(rates)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cores", type=int, default=os.cpu_count())
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--model", default=ARCH)
    args = parser.parse_args()
    print(f"{args.model}, {HEIGHT}x{WIDTH} inputs (masks at 480x640), load {os.getloadavg()[0]:.2f}")
    print(f"{'processes':>9} {'threads':>7} {'batch':>5} {'images/s':>9}")
    for processes in [p for p in range(1, args.cores + 1) if args.cores % p == 0]:
        for batch in args.batch:
            rate = measure(processes, args.cores // processes, batch, args.seconds, args.model)
            print(f"{processes:>9} {args.cores // processes:>7} {batch:>5} {rate:>9.2f}", flush=True)


if __name__ == "__main__":
    main()
