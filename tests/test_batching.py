"""Shape batching (segbatch/batching.py) without Ray: never mixes shapes, never drops or repeats a row."""

from __future__ import annotations

import collections
import random

import pyarrow as pa
import pytest

from segbatch.batching import ShapeBatcher

SHAPES = [(520, 693), (693, 520), (520, 520), (520, 780)]


def decoded(uris: list[str], shapes: list[tuple[int, int] | None]) -> pa.Table:
    """Rows as DecodeImages emits them; a None shape is a decode error (no pixels). Pixels are tiny
    stand-ins tagged with the shape, so a mixed-up row would show."""
    return pa.table(
        {
            "uri": pa.array(uris, pa.string()),
            "pixels": pa.array([b"" if s is None else f"{s[0]}x{s[1]}".encode() * 10 for s in shapes], pa.binary()),
            "in_h": pa.array([0 if s is None else s[0] for s in shapes], pa.int32()),
            "in_w": pa.array([0 if s is None else s[1] for s in shapes], pa.int32()),
            "error": pa.array([("cannot decode" if s is None else None) for s in shapes], pa.string()),
        }
    )


def feed(batcher: ShapeBatcher, blocks: list[pa.Table]) -> list[pa.Table]:
    out = []
    for block in blocks:
        out.extend(batcher(block))
    return out


def interleaved(n: int, seed: int, error_every: int = 0) -> tuple[list[str], list[tuple[int, int] | None]]:
    rng = random.Random(seed)
    uris = [f"img{i:04d}.jpg" for i in range(n)]
    shapes = [None if error_every and i % error_every == 0 else rng.choice(SHAPES) for i in range(n)]
    return uris, shapes


def blocks_of(uris, shapes, sizes: list[int]) -> list[pa.Table]:
    out, i, k = [], 0, 0
    while i < len(uris):
        step = sizes[k % len(sizes)]
        out.append(decoded(uris[i : i + step], shapes[i : i + step]))
        i, k = i + step, k + 1
    return out


@pytest.mark.parametrize(
    "n,batch_size,block_sizes,error_every",
    [
        (320, 16, [16], 0),
        (320, 16, [5, 16, 33, 1], 0),
        (101, 8, [7], 9),  # decode errors and a last partial group of every shape
        (3, 16, [1], 0),  # fewer rows than one batch
        (64, 1, [10], 5),
    ],
)
def test_every_row_once_never_mixed(n, batch_size, block_sizes, error_every):
    uris, shapes = interleaved(n, seed=n, error_every=error_every)
    batcher = ShapeBatcher(batch_size, expected_rows=n)
    out = feed(batcher, blocks_of(uris, shapes, block_sizes))

    seen = collections.Counter(u for t in out for u in t["uri"].to_pylist())
    assert seen == collections.Counter(uris)  # nothing dropped, nothing twice
    assert batcher.held_rows == 0 and batcher.held_bytes == 0
    shape_of = dict(zip(uris, shapes))
    partial = collections.Counter()
    for t in out:
        rows_shapes = {shape_of[u] for u in t["uri"].to_pylist()}
        assert len(rows_shapes) == 1  # one shape per released table (or only error rows)
        shape = rows_shapes.pop()
        if shape is None:
            continue
        assert {bytes(p) for p in t["pixels"].to_pylist()} == {f"{shape[0]}x{shape[1]}".encode() * 10}
        assert t.num_rows <= batch_size
        if t.num_rows < batch_size:
            partial[shape] += 1
    # Without a memory bound, each shape has at most one partial batch: its last.
    assert all(c == 1 for c in partial.values())
    counts = collections.Counter(s for s in shapes if s is not None)
    for shape, count in counts.items():
        assert partial[shape] == (1 if count % batch_size else 0)


def test_full_batches_for_six_interleaved_sizes():
    """The benchmark's case: 320 photos whose resize gives four shapes, at batch 16, in listing blocks of 16."""
    six = [SHAPES[0], SHAPES[1], SHAPES[2], SHAPES[3], SHAPES[0], SHAPES[1]]  # six sizes, four model shapes
    uris = [f"img{i:04d}.jpg" for i in range(320)]
    shapes = [six[i % 6] for i in range(320)]
    out = feed(ShapeBatcher(16, expected_rows=320), blocks_of(uris, shapes, [16]))
    assert len(out) <= sum(-(-c // 16) for c in collections.Counter(shapes).values())
    assert 320 / len(out) >= 14


def test_memory_bound_releases_partial_batches():
    uris, shapes = interleaved(200, seed=3)
    row_bytes = len(b"520x693" * 10)
    bound = 20 * row_bytes
    batcher = ShapeBatcher(16, expected_rows=200, max_held_bytes=bound)
    out = []
    for block in blocks_of(uris, shapes, [8]):
        out.extend(batcher(block))
        assert batcher.held_bytes <= bound
    assert sorted(u for t in out for u in t["uri"].to_pylist()) == sorted(uris)


def test_without_a_count_rows_stay_until_flushed():
    uris, shapes = interleaved(40, seed=1)
    batcher = ShapeBatcher(16, expected_rows=None)
    out = feed(batcher, blocks_of(uris, shapes, [10]))
    out += list(batcher.flush())
    assert sorted(u for t in out for u in t["uri"].to_pylist()) == sorted(uris)
