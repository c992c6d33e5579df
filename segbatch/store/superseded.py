"""The one-ok-row rule after redo runs: superseded ok rows leave the summary.

``--redo-changed`` and ``--redo-all`` give an input a second ok row. The output contract allows one per
input, so :func:`drop_superseded` removes the older ones once the newer ones are written: only the
summary files that hold superseded rows are rewritten (atomically), and the newer row is always on
storage before the older one goes, so a crash at any point leaves at least one ok row per input, never
none.
"""

from __future__ import annotations

import io
import logging
from collections import defaultdict
from collections.abc import Mapping
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from segbatch._internal import _storage
from segbatch.store import compact, summary

log = logging.getLogger(__name__)


def drop_superseded(output_url: str, storage_options: Mapping[str, Any] | None = None) -> int:
    """Keep only the newest ok row of every input; returns how many older ok rows were dropped.

    Newest is :data:`segbatch.store.summary.NEWEST_FIRST`'s: the latest ``written_at``, then the greater
    ``run_id``. Error rows are left alone: the output contract lets them remain beside an ok row.
    """
    compact.finish_pending(output_url, storage_options)  # no half-done merge while files are rewritten
    ds = summary.dataset(output_url, storage_options)
    if ds is None:
        return 0
    is_ok = pc.field("status") == "ok"
    # First pass reads one column: which inputs have more than one ok row at all.
    uris = ds.to_table(columns=["uri"], filter=is_ok)
    counts = uris.group_by("uri").aggregate([("uri", "count")])
    dups = counts.filter(pc.greater(counts["uri_count"], 1))["uri"]
    if len(dups) == 0:
        return 0
    rows = ds.to_table(columns=["uri", "run_id", "written_at", "__filename"], filter=is_ok & pc.field("uri").isin(dups))
    ordered, newest = summary.newest_first(rows)
    superseded = ordered.filter(pc.invert(newest))  # every row after the newest of its uri
    losers: dict[str, set[tuple[str, str]]] = defaultdict(set)
    for uri, run_id, filename in zip(*(superseded[c].to_pylist() for c in ("uri", "run_id", "__filename"))):
        losers[filename].add((uri, run_id))

    fs, _root = _storage.open_url(output_url, storage_options)
    dropped = 0
    for filename, keys in sorted(losers.items()):
        dropped += _rewrite_without(fs, filename, keys)
    log.info("dropped %d superseded ok rows from %d summary files", dropped, len(losers))
    return dropped


def _rewrite_without(fs, path: str, keys: set[tuple[str, str]]) -> int:
    """Rewrite one summary file without the ok rows named by (uri, run_id); delete it if nothing is left."""
    raw = _storage.retry(fs.cat_file, path, what=f"read {path}")
    table = pq.read_table(io.BytesIO(raw))
    drop = [
        status == "ok" and (uri, run_id) in keys
        for uri, run_id, status in zip(*(table[c].to_pylist() for c in ("uri", "run_id", "status")))
    ]
    kept = table.filter(pc.invert(pa.array(drop, pa.bool_())))
    if kept.num_rows == 0:
        _storage.retry(fs.rm, path, what=f"delete {path}")
    else:
        buf = pa.BufferOutputStream()
        pq.write_table(kept, buf, compression="zstd")  # the file's schema metadata (class names) goes along
        _storage.write_atomic(fs, path, buf.getvalue().to_pybytes())
    return table.num_rows - kept.num_rows


__all__ = ["drop_superseded"]
