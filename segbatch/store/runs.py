"""What happens after a run: its record in ``OUTPUT/runs/``, and the one-ok-row rule after redo runs.

Skipped inputs write no summary rows, so the summary alone cannot say what a run skipped or when it ran.
Each run therefore leaves ``OUTPUT/runs/<run_id>.json`` (docs/output-contract.md, "Run records"), which `segbatch status`
reads beside the summary's key columns.

``--redo-changed`` and ``--redo-all`` give an input a second ok row. The output contract allows one per input, so
:func:`drop_superseded` removes the older ones once the newer ones are written: only the summary files
that hold superseded rows are rewritten (atomically), and the newer row is always on storage before the
older one goes, so a crash at any point leaves at least one ok row per input, never none.
"""

from __future__ import annotations

import io
import json
import logging
import posixpath
import re
import time
from collections import defaultdict
from collections.abc import Mapping
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from segbatch._internal import _storage
from segbatch.store import compact, summary
from segbatch.store.contract import RUNS_DIR

log = logging.getLogger(__name__)

RECORD_VERSION = 1  # bump when a field of the run record changes meaning

_USERINFO = re.compile(r"(?<=://)[^/@]*@")  # user:password@ in a URL never reaches a record


def _iso(seconds: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(seconds))


def record(config, report, *, completed: bool) -> dict[str, Any]:
    """Write ``OUTPUT/runs/<run_id>.json`` for a finished (or stopped) run and return it."""
    finished = time.time()
    data = {
        "version": RECORD_VERSION,
        "run_id": report.run_id,
        "started_at": _iso(finished - report.seconds),
        "finished_at": _iso(finished),
        "seconds": round(report.seconds, 3),
        "completed": completed,
        "listed": report.listed,
        "skipped": report.skipped,
        "ok": report.ok,
        "error": report.errors,
        "redo": "all" if config.redo_all else "changed" if config.redo_changed else None,
        "input": _USERINFO.sub("", _storage.absolute_url(config.input or config.manifest or "")),
        "stopped_early": report.stopped_early,
        "forward_passes": report.forward_passes,
        "images_per_forward_pass": round(report.images_per_forward_pass, 2),
    }
    fs, root = _storage.open_url(config.output, config.storage_options)
    path = _storage.join_path(root, posixpath.join(RUNS_DIR, f"{report.run_id}.json"))
    _storage.write_atomic(fs, path, (json.dumps(data, indent=1) + "\n").encode())
    return data


def read_records(output_url: str, storage_options: Mapping[str, Any] | None = None) -> list[dict[str, Any]]:
    """Every run record of OUTPUT, oldest first; unreadable ones are skipped with a warning."""
    fs, root = _storage.open_url(output_url, storage_options)
    path = _storage.join_path(root, RUNS_DIR)
    if not _storage.retry(fs.exists, path, what=f"check {path}"):
        return []
    names = [
        p
        for p in _storage.retry(fs.find, path, what=f"list {path}")
        if p.endswith(".json") and not posixpath.basename(p).startswith(".")
    ]
    records = []
    for name, raw in zip(names, _storage.read_many(fs, names)):
        try:
            if isinstance(raw, BaseException):
                raise raw
            records.append(json.loads(raw))
        except Exception as exc:
            log.warning("ignoring run record %s: %s", name, exc)
    return sorted(records, key=lambda r: (r.get("started_at") or "", r.get("run_id") or ""))


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


def finish(config, report, *, completed: bool, cleanup: bool = False) -> None:
    """Record the run; after a redo run (or any run while OUTPUT still holds an earlier model's rows,
    ``cleanup``) drop superseded ok rows; then merge the run's summary files (segbatch/store/compact.py). Never
    raises: every row already written is valid, and a failure here must not hide the run's own outcome."""
    try:
        record(config, report, completed=completed)
    except Exception as exc:
        log.error("could not write the run record of %s: %s", report.run_id, exc)
    if config.redo_all or config.redo_changed or cleanup:
        try:
            drop_superseded(config.output, config.storage_options)
        except Exception as exc:
            log.error(
                "could not drop superseded ok rows (%s); inputs keep an extra older ok row until the next "
                "--redo-changed run finishes this cleanup",
                exc,
            )
    try:
        compact.compact(config.output, config.storage_options, run_id=report.run_id)
    except Exception as exc:
        log.error(
            "could not merge the run's summary files (%s); its rows are all there, in small files: "
            "`segbatch compact OUTPUT` merges them",
            exc,
        )


__all__ = ["drop_superseded", "finish", "read_records", "record"]
