"""Run records: ``OUTPUT/runs/<run_id>.json``, written at the end of every run, and read back.

Skipped inputs write no summary rows, so the summary alone cannot say what a run skipped or when it ran.
Each run therefore leaves ``OUTPUT/runs/<run_id>.json`` (docs/output-contract.md, "Run records"), which
`segbatch status` and `segbatch report` read beside the summary's key columns.
"""

from __future__ import annotations

import json
import logging
import posixpath
import re
import time
from collections.abc import Mapping
from typing import Any

from segbatch._internal import _storage
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


__all__ = ["read_records", "record"]
