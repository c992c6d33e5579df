"""`segbatch status OUTPUT`: what the runs into OUTPUT did, from the summary's key columns and run records.

It reads four small columns of the summary (uri, status, run_id, written_at), never masks or pixel counts,
and the ``OUTPUT/runs/*.json`` records for what the summary cannot say: skipped counts and run times.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from segbatch._internal import _storage
from segbatch.errors import InputError
from segbatch.store import runs, summary

KEY_COLUMNS = ["uri", "status", "run_id", "written_at"]


@dataclass
class RunCounts:
    run_id: str
    ok: int = 0
    error: int = 0
    skipped: int | None = None  # None: the run left no record (it crashed, or predates run records)
    started_at: str | None = None
    finished_at: str | None = None
    completed: bool | None = None


@dataclass
class Status:
    output: str
    runs: list[RunCounts] = field(default_factory=list)
    inputs_ok: int = 0  # inputs with an ok row
    inputs_failing: int = 0  # inputs whose latest row is an error
    extra_ok_rows: int = 0  # ok rows beyond one per input: a redo cleanup that did not finish
    identity: str | None = None  # the model OUTPUT is bound to (OUTPUT/_segbatch.json), described
    earlier_model_ok: int = 0  # inputs whose only ok row is from the model OUTPUT was bound to before

    @property
    def last_run(self) -> RunCounts | None:
        return self.runs[-1] if self.runs else None

    def __str__(self) -> str:
        lines = [f"segbatch status {self.output}"]
        if not self.runs:
            return lines[0] + "\n  no runs yet"
        width = max(len("run"), *(len(r.run_id) for r in self.runs))
        lines.append(f"  {'run':<{width}}  {'started (UTC)':<20}  {'ok':>8}  {'error':>8}  {'skipped':>8}")
        for r in self.runs:
            skipped = "-" if r.skipped is None else str(r.skipped)
            note = "" if r.completed in (True, None) else "  (stopped early)"
            lines.append(
                f"  {r.run_id:<{width}}  {r.started_at or '-':<20}  {r.ok:>8}  {r.error:>8}  {skipped:>8}{note}"
            )
        last = self.last_run
        lines.append(f"last run: {last.run_id}, finished {last.finished_at or 'at an unknown time'}")
        if self.identity:
            lines.append(f"labelled by: {self.identity}")
        lines.append(f"inputs with an ok row: {self.inputs_ok}")
        if self.earlier_model_ok:
            lines.append(
                f"WARNING: {self.earlier_model_ok} of them only have an ok row from the model OUTPUT was "
                "labelled with before; the next `segbatch run` relabels them"
            )
        lines.append(f"inputs whose latest row is an error: {self.inputs_failing}")
        if self.extra_ok_rows:
            lines.append(
                f"WARNING: {self.extra_ok_rows} extra ok rows from an unfinished redo cleanup; "
                "the next `segbatch run --redo-changed` removes them"
            )
        return "\n".join(lines)


def collect(output_url: str, storage_options: Mapping[str, Any] | None = None) -> Status:
    fs, root = _storage.open_url(output_url, storage_options)
    if not _storage.retry(fs.exists, root, what=f"check {output_url}"):
        raise InputError(f"OUTPUT {output_url} does not exist (check the path; `segbatch run` creates it)")
    table = summary.read(output_url, storage_options, columns=KEY_COLUMNS)
    records = {r["run_id"]: r for r in runs.read_records(output_url, storage_options) if r.get("run_id")}
    status = Status(output=_storage.absolute_url(output_url))

    per_run: dict[str, RunCounts] = {}
    first_written: dict[str, Any] = {}
    grouped = table.group_by(["run_id", "status"]).aggregate([("uri", "count"), ("written_at", "min")])
    for run_id, st, count, written in zip(
        *(grouped[c].to_pylist() for c in ("run_id", "status", "uri_count", "written_at_min"))
    ):
        counts = per_run.setdefault(run_id, RunCounts(run_id))
        if st == "ok":
            counts.ok += count
        else:
            counts.error += count
        if written is not None and (run_id not in first_written or written < first_written[run_id]):
            first_written[run_id] = written
    for run_id, record in records.items():
        counts = per_run.setdefault(run_id, RunCounts(run_id))
        counts.skipped = record.get("skipped")
        counts.started_at = record.get("started_at")
        counts.finished_at = record.get("finished_at")
        counts.completed = record.get("completed")
    for run_id, written in first_written.items():
        if per_run[run_id].started_at is None:
            per_run[run_id].started_at = written.strftime("%Y-%m-%dT%H:%M:%SZ")
    status.runs = sorted(per_run.values(), key=lambda r: (r.started_at or "", r.run_id))

    ok_uris = table.filter(pc.equal(table["status"], "ok"))["uri"]
    status.inputs_ok = pc.count_distinct(ok_uris).as_py() if len(ok_uris) else 0
    status.extra_ok_rows = len(ok_uris) - status.inputs_ok
    latest = summary.newest_per_uri(table)["status"]
    status.inputs_failing = pc.sum(pc.equal(latest, "error")).as_py() or 0 if len(latest) else 0
    _add_identity(status, table, output_url, storage_options)
    return status


def _add_identity(status: Status, table: pa.Table, output_url: str, storage_options) -> None:
    from segbatch.store import identity

    try:
        bound = identity.read(output_url, storage_options)
    except Exception:
        return
    if bound is None:
        return
    status.identity = identity.describe(bound["identity"])
    since = bound.get("relabel_since")
    if since is None or table.num_rows == 0:
        return
    ok = table.filter(pc.equal(table["status"], "ok"))
    current = ok.filter(summary.written_since(since))
    status.earlier_model_ok = status.inputs_ok - (pc.count_distinct(current["uri"]).as_py() if current.num_rows else 0)


__all__ = ["Status", "RunCounts", "collect"]
