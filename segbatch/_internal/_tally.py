"""What the listing stage tells the driver: how many inputs each read task listed and skipped.

Listing runs in Ray read tasks across the cluster, so the driver never holds the listing; each task puts
its running counts into Ray's cluster-wide key-value store (the GCS, which outlives every worker) under
``segbatch/<run_id>/<part>``. The driver sums them for the progress total and, at the end, to check that
every listed input came back as a row (segbatch/pipeline.py). A retried task overwrites its own key with
the counts of its new attempt, so a retry never counts twice. Nothing here is per-run state in an actor:
a dead worker loses nothing that its retry does not write again.

The driver puts the number of rows it has seen written under ``segbatch/written/<run_id>``; read tasks
compare it with the rows they have handed on (``emitted``) to keep the listing a bounded number of rows
ahead of the run (segbatch/stages/listing.py, :class:`~segbatch.stages.listing.Pace`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass

NAMESPACE = "segbatch"


@dataclass(frozen=True)
class Totals:
    listed: int = 0
    skipped: int = 0
    emitted: int = 0  # rows handed on to decoding (listed less skipped, less what a task still holds)
    parts: int = 0  # read tasks (or manifest batches) that reported at least once
    finished: int = 0  # ... of which reported their last count


def _key(run_id: str, part: str) -> bytes:
    return f"{run_id}/{part}".encode()


def _written_key(run_id: str) -> bytes:
    return f"written/{run_id}".encode()  # outside the run's prefix, which totals() sums


def put(run_id: str, part: str, listed: int, skipped: int, finished: bool, emitted: int | None = None) -> None:
    from ray.experimental.internal_kv import _internal_kv_put

    emitted = listed - skipped if emitted is None else emitted
    value = json.dumps({"listed": listed, "skipped": skipped, "emitted": emitted, "finished": finished}).encode()
    _internal_kv_put(_key(run_id, part), value, overwrite=True, namespace=NAMESPACE)


def totals(run_id: str) -> Totals:
    from ray.experimental.internal_kv import _internal_kv_get, _internal_kv_list

    listed = skipped = emitted = parts = finished = 0
    for key in _internal_kv_list(_key(run_id, ""), namespace=NAMESPACE):
        raw = _internal_kv_get(key, namespace=NAMESPACE)
        if raw is None:
            continue
        value = json.loads(raw)
        listed += int(value["listed"])
        skipped += int(value["skipped"])
        emitted += int(value.get("emitted", value["listed"] - value["skipped"]))
        parts += 1
        finished += bool(value["finished"])
    return Totals(listed, skipped, emitted, parts, finished)


def put_written(run_id: str, rows: int) -> None:
    """The driver: ``rows`` of the run have come back written."""
    from ray.experimental.internal_kv import _internal_kv_put

    _internal_kv_put(_written_key(run_id), str(rows).encode(), overwrite=True, namespace=NAMESPACE)


def written(run_id: str) -> int | None:
    """Rows of the run the driver has seen written, or None when it has not said."""
    from ray.experimental.internal_kv import _internal_kv_get

    raw = _internal_kv_get(_written_key(run_id), namespace=NAMESPACE)
    return None if raw is None else int(raw)


def clear(run_id: str) -> None:
    from ray.experimental.internal_kv import _internal_kv_del

    _internal_kv_del(_key(run_id, ""), del_by_prefix=True, namespace=NAMESPACE)
    _internal_kv_del(_written_key(run_id), namespace=NAMESPACE)


__all__ = ["Totals", "clear", "put", "put_written", "totals", "written"]
