"""Listing a large S3 prefix with segbatch's ``list_inputs``: time and driver memory.

moto's ThreadedMotoServer runs in a child process, so this process's memory is the lister's alone.
Keys go straight into moto's in-process backend there (10^6 PUTs over HTTP would take hours); the
listing then goes over HTTP with s3fs, 1000 keys per page, as against S3:

    .venv/bin/python benchmarks/s3_list.py --keys 1000000

moto answers each ListObjectsV2 page by sorting the whole bucket (O(N log N) per page, so O(N^2 log N)
for a full listing). S3 answers a page in O(page). The child therefore replaces moto's
``list_objects_v2`` with a bisect over a sorted key index that returns the same pages; what is timed is
HTTP, moto's XML rendering, s3fs's parsing and segbatch's columns, not moto's sort.
"""

from __future__ import annotations

import argparse
import bisect
import functools
import os
import platform
import resource
import time

from _moto import start_server

BUCKET = "segbatch-bench-list"
PREFIX = "imgs/"
FOLDER_SIZE = 1000  # keys per sub-folder, like a dataset sharded into directories


def _fast_list_v2(self, bucket, prefix, delimiter, continuation_token, start_after, max_keys):
    """moto's list_objects_v2 contract, answered from a sorted index in O(page)."""
    from moto.s3.models import FakeDeleteMarker
    from moto.utilities.utils import md5_hash

    names = getattr(bucket, "_bench_index", None)
    if names is None or len(names) != len(bucket.keys):
        names = bucket._bench_index = sorted(bucket.keys.keys())
    prefix = prefix or ""
    i = bisect.bisect_left(names, prefix)
    limit = self._pagination_tokens.get(continuation_token) if continuation_token else start_after
    if limit:
        i = max(i, bisect.bisect_right(names, limit))
    out: list = []
    while i < len(names) and names[i].startswith(prefix) and len(out) < max_keys:
        rest = names[i][len(prefix) :]
        if delimiter and delimiter in rest:
            folder = prefix + rest.split(delimiter)[0] + delimiter
            if not (limit and folder <= limit):
                out.append(folder)
            i = bisect.bisect_left(names, folder + "\U0010ffff")
            continue
        key = bucket.keys[names[i]]
        if not isinstance(key, FakeDeleteMarker):
            out.append(key)
        i += 1
    truncated = i < len(names) and names[i].startswith(prefix)
    token = None
    if truncated and out:
        last = out[-1] if isinstance(out[-1], str) else out[-1].name
        token = md5_hash(last.encode()).hexdigest()
        self._pagination_tokens[token] = last
    return out, truncated, token


def insert_keys(prefixes: list[tuple[str, int]], folder_size: int) -> None:
    """Runs in the server's process: (prefix, count) keys straight into moto's backend, far faster than PUTs."""
    from moto.core import DEFAULT_ACCOUNT_ID
    from moto.s3.models import FakeKey, S3Backend, s3_backends

    S3Backend.list_objects_v2 = _fast_list_v2
    backend = s3_backends[DEFAULT_ACCOUNT_ID]["aws"]
    backend.create_bucket(BUCKET, "us-east-1")
    bucket = backend.get_bucket(BUCKET)
    t0 = time.perf_counter()
    body = b"\xff\xd8\xff"  # three bytes: the keys matter here, not the contents
    for prefix, keys in prefixes:
        for i in range(keys):
            name = f"{prefix}{i // folder_size:05d}/{i:08d}.jpg" if folder_size else f"{prefix}{i:08d}.jpg"
            bucket.keys[name] = FakeKey(
                name, body, account_id=DEFAULT_ACCOUNT_ID, region_name="us-east-1", bucket_name=BUCKET
            )
    total = sum(keys for _, keys in prefixes)
    print(f"  (server: inserted {total} keys in {time.perf_counter() - t0:.0f}s)", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keys", type=int, default=100_000)
    parser.add_argument("--folder-size", type=int, default=FOLDER_SIZE, help="keys per folder; 0: one flat prefix")
    args = parser.parse_args()
    proc, _endpoint = start_server(functools.partial(insert_keys, [(PREFIX, args.keys)], args.folder_size))

    import s3fs

    from segbatch.config import DEFAULT_EXTENSIONS
    from segbatch.stages import listing

    s3fs.S3FileSystem(skip_instance_cache=True).ls(BUCKET)  # imports, connection pool: not timed
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    t0 = time.perf_counter()
    table = listing.list_inputs(f"s3://{BUCKET}/{PREFIX}", {}, DEFAULT_EXTENSIONS)
    seconds = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    assert table.num_rows == args.keys, table.num_rows
    print(
        f"{platform.node()} cores={os.cpu_count()} python={platform.python_version()} "
        f"s3fs={s3fs.__version__} date={time.strftime('%Y-%m-%d')}"
    )
    print(
        f"listed {table.num_rows} keys ({args.keys // args.folder_size if args.folder_size else 1} folders) in {seconds:.1f}s = "
        f"{table.num_rows / seconds:.0f} keys/s"
    )
    print(
        f"driver peak RSS grew {(peak - before) / 1024:.0f} MiB during the listing; the listing table "
        f"holds {table.nbytes / 2**20:.0f} MiB ({table.nbytes / table.num_rows:.0f} B/key)"
    )
    proc.terminate()


if __name__ == "__main__":
    main()
