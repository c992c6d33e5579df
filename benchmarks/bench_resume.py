"""Resume at scale: how long deciding what to skip takes, and how much driver memory, over a large summary.

    python benchmarks/bench_resume.py /tmp/resume-bench --rows 1000000 [--layout compacted]

writes a synthetic OUTPUT whose summary has ``--rows`` ok rows (every column filled as a real run fills it)
in one of three layouts: ``small``, files of 64 rows as write tasks leave them; ``compacted``, the same
files merged by ``segbatch compact`` (timed); ``direct``, merged files written straight away (the layout
``compacted`` ends with, quicker to make at 10^7 rows). It then builds a listing of those inputs plus 10%
new ones and times what a resumed run does, ``summary.done_key_chunks`` + ``listing.drop_done``, with and
without --redo-changed, and, for contrast, reading the whole summary. Peak memory is the driver's resident
set above what it held before each step (the listing included), sampled every few milliseconds; each
step runs in a fresh process. Numbers go to docs/benchmarks.md ("Resume at scale").
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

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from segbatch.stages import listing  # noqa: E402
from segbatch.store import compact, summary
from segbatch.store.contract import SUMMARY_DIR, SUMMARY_SCHEMA, summary_metadata  # noqa: E402

ROWS_PER_FILE = 64  # what pipeline.SUMMARY_ROWS_PER_FILE writes per summary file
NEW_FRACTION = 0.1  # share of listed inputs that are new since the last run
NUM_CLASSES = 21  # VOC classes: the length of every pixel_counts list
SAMPLE_SECONDS = 0.005  # RSS sampling period
MODES = ("skip", "skip_redo_changed", "read_whole_summary")
LAYOUTS = ("small", "compacted", "direct")


def _uri(i: int) -> str:
    return f"s3://example-bucket/images/{i // 10_000:04d}/{i:09d}.jpg"


def _size(i: int) -> int:
    """An input's size in bytes, the same in the listing and in its summary row: nothing changed."""
    return 50_000 + (i * 7919) % 450_000


def summary_rows(start: int, n: int, rng: np.random.Generator, schema: pa.Schema) -> pa.Table:
    ids = range(start, start + n)
    counts = rng.integers(0, 20_000, size=n * NUM_CLASSES)
    pixel_counts = pa.ListArray.from_arrays(
        pa.array(np.arange(0, (n + 1) * NUM_CLASSES, NUM_CLASSES, np.int32)), pa.array(counts)
    )
    return pa.table(
        {
            "uri": [_uri(i) for i in ids],
            "status": ["ok"] * n,
            "error": pa.nulls(n, pa.string()),
            "width": np.full(n, 640, np.int32),
            "height": np.full(n, 480, np.int32),
            "mask_uri": [f"s3://example-bucket/labels/masks/{_uri(i)[27:]}.png" for i in ids],
            "pixel_counts": pixel_counts,
            "run_id": ["20260101T000000Z-abcdef"] * n,
            "model": ["deeplabv3_resnet101"] * n,
            "weights": ["DeepLabV3_ResNet101_Weights.COCO_WITH_VOC_LABELS_V1"] * n,
            "node_id": ["f" * 56] * n,
            "device": ["cuda:0"] * n,
            "size": [_size(i) for i in ids],
            "etag": [f"{i:032x}" for i in ids],
            "mtime": np.full(n, 1.7e9),
            "written_at": np.full(n, 1_700_000_000_000),
        },
        schema=schema,
    )


def write_summary(out: Path, rows: int, layout: str) -> None:
    rng = np.random.default_rng(0)
    folder = out / SUMMARY_DIR
    folder.mkdir(parents=True, exist_ok=True)
    schema = SUMMARY_SCHEMA.with_metadata(summary_metadata(tuple(f"class_{i}" for i in range(NUM_CLASSES))))
    if layout == "direct":  # what compaction leaves: files of compact.MAX_ROWS rows in large row groups
        for start in range(0, rows, compact.MAX_ROWS):
            n = min(compact.MAX_ROWS, rows - start)
            with pq.ParquetWriter(
                folder / f"merged-bench{start // compact.MAX_ROWS:08d}.parquet", schema, compression="zstd"
            ) as writer:
                for s in range(start, start + n, compact.ROW_GROUP_ROWS):
                    m = min(compact.ROW_GROUP_ROWS, start + n - s)
                    writer.write_table(summary_rows(s, m, rng, schema), row_group_size=compact.ROW_GROUP_ROWS)
        return
    for start in range(0, rows, ROWS_PER_FILE):
        n = min(ROWS_PER_FILE, rows - start)
        pq.write_table(
            summary_rows(start, n, rng, schema),
            folder / f"part-bench-{start // ROWS_PER_FILE:08d}.parquet",
            compression="zstd",
        )


def make_listing(rows: int) -> pa.Table:
    total = int(rows * (1 + NEW_FRACTION))
    parts = []
    for start in range(0, total, 1_000_000):  # in slices, so the Python strings of 10^7 rows never coexist
        ids = range(start, min(total, start + 1_000_000))
        uris = [_uri(i) for i in ids]
        parts.append(
            pa.table(
                {
                    "uri": uris,
                    "path": [u[5:] for u in uris],
                    "rel": [u[27:] for u in uris],
                    "size": [_size(i) for i in ids],
                    "etag": [f"{i:032x}" for i in ids],
                    "mtime": np.full(len(ids), 1.7e9),
                    "model_h": np.zeros(len(ids), np.int32),
                    "model_w": np.zeros(len(ids), np.int32),
                },
                schema=listing.LISTING_SCHEMA,
            )
        )
    return pa.concat_tables(parts).combine_chunks()


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
    parser.add_argument("--layout", choices=LAYOUTS, default="compacted")
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    parser.add_argument("--only", choices=MODES, help="measure one step in this process")
    args = parser.parse_args()
    out = Path(args.output)
    mib = 1024 * 1024
    results = {"rows": args.rows, "layout": args.layout}
    if args.only is None and not (out / SUMMARY_DIR).exists():
        _, seconds, _ = measure(lambda: write_summary(out, args.rows, "direct" if args.layout == "direct" else "small"))
        print(f"wrote {args.rows} summary rows in {seconds:.0f}s", flush=True)
        if args.layout == "compacted":
            report, seconds, grown = measure(lambda: compact.compact(str(out)))
            results["compaction"] = {
                "seconds": round(seconds, 1),
                "peak_rss_growth_mib": round(grown / mib, 1),
                "files_merged": report.files_merged,
                "merged_written": report.merged_written,
            }
            print(f"{report} in {seconds:.0f}s", flush=True)
    files = list((out / SUMMARY_DIR).glob("*.parquet"))
    results.update({"files": len(files), "summary_mib": round(sum(p.stat().st_size for p in files) / mib, 1)})
    if args.only is None:
        # One fresh process per step: Arrow's memory pool keeps what an earlier step freed, which would
        # hide a later step's growth.
        for mode in args.modes:
            got = subprocess.run(
                [sys.executable, __file__, str(out), "--rows", str(args.rows), "--layout", args.layout, "--only", mode],
                check=True,
                capture_output=True,
                text=True,
            )
            results.update(json.loads(got.stdout.strip().splitlines()[-1]))
        print(json.dumps(results, indent=1))
        return
    listed = make_listing(args.rows)
    results = {"listed": listed.num_rows, "listing_mib": round(listed.nbytes / mib, 1)}

    def resume(redo_changed: bool):
        chunks = summary.done_key_chunks(str(out), identity=redo_changed)
        return listing.drop_done(listed, chunks, redo_changed=redo_changed)

    fn = {
        "skip": lambda: resume(False),
        "skip_redo_changed": lambda: resume(True),
        "read_whole_summary": lambda: summary.read(str(out)),
    }[args.only]
    result, seconds, grown = measure(fn)
    results[args.only] = {
        "seconds": round(seconds, 2),
        "peak_rss_growth_mib": round(grown / mib, 1),
        "rows_out": result.num_rows,
    }
    print(json.dumps(results))


if __name__ == "__main__":
    main()
