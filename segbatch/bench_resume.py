"""Resume at scale: how long deciding what to skip takes, and how much driver memory, over a large summary.

    python -m segbatch.bench_resume /tmp/resume-bench --rows 1000000

writes a synthetic OUTPUT whose summary has ``--rows`` ok rows in files of 64 rows (as runs write them,
every column filled as a real run fills it), builds a listing of those inputs plus 10% new ones, then times
``summary.done_keys`` + ``listing.drop_done`` (what a resumed run does), with and without --redo-changed,
and, for contrast, reading the whole summary. Peak memory is the driver's resident set above what it held
before each step, sampled every few milliseconds. Numbers go to docs/benchmarks.md ("Resume at scale").
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from segbatch import listing, summary
from segbatch.contract import SUMMARY_DIR, SUMMARY_SCHEMA, summary_metadata

ROWS_PER_FILE = 64  # what pipeline.SUMMARY_ROWS_PER_FILE writes per summary file
NEW_FRACTION = 0.1  # share of listed inputs that are new since the last run
NUM_CLASSES = 21  # VOC classes: the length of every pixel_counts list
SAMPLE_SECONDS = 0.005  # RSS sampling period
MODES = ("skip", "skip_redo_changed", "read_whole_summary")


def _uri(i: int) -> str:
    return f"s3://example-bucket/images/{i // 10_000:04d}/{i:09d}.jpg"


def _size(i: int) -> int:
    """An input's size in bytes, the same in the listing and in its summary row: nothing changed."""
    return 50_000 + (i * 7919) % 450_000


def write_summary(out: Path, rows: int) -> None:
    rng = np.random.default_rng(0)
    folder = out / SUMMARY_DIR
    folder.mkdir(parents=True, exist_ok=True)
    schema = SUMMARY_SCHEMA.with_metadata(summary_metadata(tuple(f"class_{i}" for i in range(NUM_CLASSES))))
    for start in range(0, rows, ROWS_PER_FILE):
        n = min(ROWS_PER_FILE, rows - start)
        ids = range(start, start + n)
        counts = rng.integers(0, 20_000, size=(n, NUM_CLASSES))
        table = pa.table({
            "uri": [_uri(i) for i in ids], "status": ["ok"] * n, "error": [None] * n,
            "width": np.full(n, 640, np.int32), "height": np.full(n, 480, np.int32),
            "mask_uri": [f"s3://example-bucket/labels/masks/{_uri(i)[27:]}.png" for i in ids],
            "pixel_counts": counts.tolist(), "run_id": ["20260101T000000Z-abcdef"] * n,
            "model": ["deeplabv3_resnet101"] * n, "weights": ["DeepLabV3_ResNet101_Weights.COCO_WITH_VOC_LABELS_V1"] * n,
            "node_id": ["f" * 56] * n, "device": ["cuda:0"] * n, "size": [_size(i) for i in ids],
            "etag": [f"{i:032x}" for i in ids], "mtime": np.full(n, 1.7e9), "written_at": np.full(n, 1_700_000_000_000),
        }, schema=schema)
        pq.write_table(table, folder / f"part-bench-{start // ROWS_PER_FILE:08d}.parquet", compression="zstd")


def make_listing(rows: int) -> pa.Table:
    total = int(rows * (1 + NEW_FRACTION))
    uris = [_uri(i) for i in range(total)]
    return pa.table({"uri": uris, "path": [u[5:] for u in uris], "rel": [u[27:] for u in uris],
                     "size": [_size(i) for i in range(total)], "etag": [f"{i:032x}" for i in range(total)],
                     "mtime": np.full(total, 1.7e9)}, schema=listing.LISTING_SCHEMA)


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def measure(fn):
    """(result, seconds, peak RSS growth in bytes) of ``fn()``."""
    gc.collect()
    before = peak = _rss()
    done = threading.Event()

    def sample():
        nonlocal peak
        while not done.is_set():
            peak = max(peak, _rss())
            time.sleep(SAMPLE_SECONDS)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    started = time.perf_counter()
    result = fn()
    seconds = time.perf_counter() - started
    done.set()
    sampler.join()
    return result, seconds, max(peak, _rss()) - before


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("output", help="folder for the synthetic OUTPUT (reused when it exists)")
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--only", choices=MODES, help="measure one step in this process")
    args = parser.parse_args()
    out = Path(args.output)
    mib = 1024 * 1024
    if not (out / SUMMARY_DIR).exists():
        _, seconds, _ = measure(lambda: write_summary(out, args.rows))
        print(f"wrote {args.rows} summary rows in {seconds:.0f}s")
    files = len(list((out / SUMMARY_DIR).glob("*.parquet")))
    size = sum(p.stat().st_size for p in (out / SUMMARY_DIR).glob("*.parquet"))
    results = {"rows": args.rows, "files": files, "summary_mib": round(size / mib, 1)}
    if args.only is None:
        # One fresh process per step: Arrow's memory pool keeps what an earlier step freed, which would
        # hide a later step's growth.
        for mode in MODES:
            got = subprocess.run([sys.executable, "-m", "segbatch.bench_resume", str(out), "--rows",
                                  str(args.rows), "--only", mode], check=True, capture_output=True, text=True)
            results.update(json.loads(got.stdout.strip().splitlines()[-1]))
        print(json.dumps(results, indent=1))
        return
    listed = make_listing(args.rows)
    results = {"listed": listed.num_rows, "listing_mib": round(listed.nbytes / mib, 1)}

    def resume(redo_changed: bool):
        return listing.drop_done(listed, summary.done_keys(str(out)), redo_changed=redo_changed)

    fn = {"skip": lambda: resume(False), "skip_redo_changed": lambda: resume(True),
          "read_whole_summary": lambda: summary.read(str(out))}[args.only]
    result, seconds, grown = measure(fn)
    results[args.only] = {"seconds": round(seconds, 2), "peak_rss_growth_mib": round(grown / mib, 1),
                          "rows_out": result.num_rows}
    print(json.dumps(results))


if __name__ == "__main__":
    main()
