"""Manifest input (``--manifest FILE_OR_URL``): image URLs from a file, read by Ray, never by the driver.

Formats, picked by the manifest's name:
- ``*.parquet`` / ``*.pq`` (or a folder of them): a ``uri`` column.
- ``*.csv``: a header row, then a ``uri`` column (or else the first column).
- anything else: text, one URL per line; blank lines and lines starting with ``#`` are skipped.

A line is a full URL (``s3://bucket/key``), an absolute path, or a path relative to the manifest's own
folder. Lines are taken as given: no extension filter, no existence check (a missing object becomes that
image's error row).

Every line is first made canonical (:func:`canonical_uri`), so one file has one ``uri`` however it is
written: ``/data/a.jpg``, ``//data/a.jpg``, ``file:///data/./a.jpg`` and ``local:///data/a.jpg`` are all
``/data/a.jpg``; ``s3a://b/k`` is ``s3://b/k``. Masks are named after ``rel``, which for a manifest is
the filesystem's protocol, then the path: ``s3://bucket/a/b.jpg`` -> ``masks/s3/bucket/a/b.jpg.png``,
``/data/x.png`` -> ``masks/file/data/x.png.png``, so ``/data/a.jpg`` and ``s3://data/a.jpg`` never share
a mask.
A listing's rule (relative to INPUT) needs the common prefix of every line, which a distributed read
cannot know. ``.``, ``..`` and empty segments of an S3 URL are escaped in the mask's name
(contract.DOT_SEGMENTS), so a mask never leaves OUTPUT.

Duplicate lines and inputs that already have an ok row in OUTPUT are dropped by one distributed
group-by on ``uri`` over the manifest and the summary's ok rows together, so resuming a 10^7-line
manifest costs the driver nothing either. Manifest rows carry no size/ETag/mtime, so ``--redo-changed``
needs a listed INPUT.
"""

from __future__ import annotations

import functools
import hashlib
import math
import posixpath
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from fsspec.core import split_protocol, url_to_fs

from segbatch._internal import _ray, _storage
from segbatch.config import RunConfig
from segbatch.errors import ConfigError
from segbatch.stages.inputs import INPUT_KINDS
from segbatch.stages.listing import BLOCK_ROWS, LISTING_SCHEMA, check_output, require_exists
from segbatch.store import summary

URI_COLUMN = "uri"
COMMENT = "#"
BYTES_PER_PARTITION = 64 * 1024 * 1024  # manifest bytes per shuffle partition; bounds one reducer's memory
MIN_PARTITIONS_CAP = 16  # at least min(cluster CPUs, this) partitions, so the group-by runs in parallel
MAX_PARTITIONS = 2048  # more partitions only add scheduling overhead
# One row per manifest line (done 0, listed 1) or earlier ok row (done 1, listed 0); grouped by uri.
_KEYS = pa.schema([(URI_COLUMN, pa.string()), ("done", pa.int8()), ("listed", pa.int8())])


@INPUT_KINDS.register
class ManifestInputs:
    """The inputs of a manifest run (:class:`segbatch.stages.inputs.Inputs`): checked in the driver, read lazily
    by Ray inside the session."""

    name = "manifest"
    parts = None  # the manifest's batches are known only once Ray has read it

    @classmethod
    def selected_by(cls, config: RunConfig) -> bool:
        return bool(config.manifest)

    def __init__(self, config: RunConfig, relabel_since: float | None = None, run_id: str = "plan"):
        if config.redo_changed:
            raise ConfigError(
                "redo_changed",
                "needs a listed INPUT; manifest rows carry no size/ETag/mtime",
                "use --redo-all, or list INPUT instead",
            )
        check_output(config.output, config.storage_options)
        self.url = config.manifest
        self._options = dict(config.storage_options)
        self._output = config.output
        self._redo_all = config.redo_all
        fs, path = _storage.open_url(self.url, self._options)
        require_exists(fs, path, f"manifest {self.url}")
        self._fs, self._path = fs, path
        self._bytes = int(_storage.retry(fs.du, path, what=f"size of {self.url}") or 0)
        self._is_dir = _storage.retry(fs.isdir, path, what=f"check {self.url}")
        self.run_id = run_id
        self.relabel_since = relabel_since  # from OUTPUT's identity binding

    block_rows = BLOCK_ROWS  # a manifest is not probed for shapes: blocks are listing-order slices

    def plan(self, *, run_id: str, block_rows: int = BLOCK_ROWS, **_sizing: Any) -> None:
        self.run_id = run_id
        self.block_rows = block_rows

    def counts(self) -> tuple[int, int]:
        """(distinct inputs in the manifest, of which skipped as already labelled), once Ray has read it."""
        from segbatch._internal import _tally

        totals = _tally.totals(self.run_id)
        return totals.listed, totals.skipped

    def verification(self, run_id: str):
        raise NotImplementedError("a manifest run's missing inputs are found by rerunning it")

    def _format(self) -> str:
        name = self._path.lower()
        if self._is_dir or name.endswith((".parquet", ".pq")):
            return "parquet"
        if name.endswith((".csv", ".csv.gz")):
            return "csv"
        return "text"

    def dataset(self):
        """The Ray Dataset of listing rows (``LISTING_SCHEMA``) still to do. Needs a running Ray."""
        import ray
        from ray.data.aggregate import Max

        pafs = _storage.to_pyarrow_fs(self._fs)
        fmt = self._format()
        if fmt == "parquet":
            lines = ray.data.read_parquet(self._path, filesystem=pafs).select_columns([URI_COLUMN])
        elif fmt == "csv":
            lines = ray.data.read_csv(self._path, filesystem=pafs)
        else:
            lines = ray.data.read_text(self._path, filesystem=pafs)
        base = (
            posixpath.dirname(_storage.absolute_url(self.url)) if not self._is_dir else _storage.absolute_url(self.url)
        )
        keys = lines.map_batches(_manifest_keys, fn_kwargs={"base_url": base}, batch_format="pyarrow", batch_size=None)
        done = None if self._redo_all else self._done_keys()
        if done is not None:
            keys = keys.union(done)
        partitions = max(
            min(int(_ray.cluster_cpus()), MIN_PARTITIONS_CAP), math.ceil(self._bytes / BYTES_PER_PARTITION)
        )
        unique = keys.groupby(URI_COLUMN, num_partitions=min(partitions, MAX_PARTITIONS)).aggregate(
            Max("done", alias_name="done"), Max("listed", alias_name="listed")
        )
        # Blocks of BLOCK_ROWS rows, as the listing's: a decode task then holds that many images.
        return unique.map_batches(
            _listing_rows, fn_kwargs={"run_id": self.run_id}, batch_format="pyarrow", batch_size=self.block_rows
        )

    def _done_keys(self):
        """uri of every ok row in OUTPUT's summary, as a Ray Dataset (or None before the first run)."""
        import ray

        ds = summary.dataset(self._output, self._options)  # the files readers take (segbatch/store/compact.py)
        if ds is None:
            return None
        fs, _root = _storage.open_url(self._output, self._options)
        rows = ray.data.read_parquet(ds.files, filesystem=_storage.to_pyarrow_fs(fs))
        since = getattr(self, "relabel_since", None)
        if since is not None:  # only rows of OUTPUT's current model count as done (identity.py)
            rows = rows.select_columns([URI_COLUMN, "status", "written_at"])
            return rows.map_batches(_ok_keys, fn_kwargs={"since": since}, batch_format="pyarrow", batch_size=None)
        rows = rows.select_columns([URI_COLUMN, "status"])
        return rows.map_batches(_ok_keys, batch_format="pyarrow", batch_size=None)


def _manifest_keys(batch: pa.Table, base_url: str) -> pa.Table:
    """Manifest lines -> absolute URLs (``done`` = 0)."""
    name = URI_COLUMN if URI_COLUMN in batch.column_names else batch.column_names[0]
    uris = []
    for value in batch[name].to_pylist():
        line = str(value).strip() if value is not None else ""
        if not line or line.startswith(COMMENT):
            continue
        protocol, _ = split_protocol(line)
        if protocol is None and not posixpath.isabs(line):
            line = _storage.join_url(base_url, line)  # relative to the manifest's folder
        uris.append(canonical_uri(line))
    n = len(uris)
    return pa.table(
        [pa.array(uris, pa.string()), pa.array([0] * n, pa.int8()), pa.array([1] * n, pa.int8())], schema=_KEYS
    )


def _ok_keys(batch: pa.Table, since: float | None = None) -> pa.Table:
    ok = batch.filter(summary.done_filter(since))
    n = ok.num_rows
    return pa.table(
        [ok[URI_COLUMN].cast(pa.string()), pa.array([1] * n, pa.int8()), pa.array([0] * n, pa.int8())], schema=_KEYS
    )


@functools.lru_cache(maxsize=64)
def _fs_class(protocol: str):
    import fsspec

    try:
        return fsspec.get_filesystem_class(protocol)
    except (ValueError, ImportError):
        return None


def _protocol_and_path(uri: str) -> tuple[str, str] | None:
    """(canonical protocol, path in the filesystem's own terms), or None for an unknown scheme."""
    protocol = split_protocol(uri)[0] or "file"
    cls = _fs_class(protocol)
    if cls is None:
        return None
    name = cls.protocol if isinstance(cls.protocol, str) else cls.protocol[0]
    path = cls._strip_protocol(uri)
    if "://" in path:  # filesystems that keep the whole URL as their path (http, https)
        return split_protocol(path)[0], path
    if name in ("file", "local"):
        # One spelling per local file: no "//" prefix, "." or ".." segments, or doubled slashes.
        name, path = "file", posixpath.normpath("/" + path.lstrip("/"))
    return name, path


def canonical_uri(uri: str) -> str:
    """The one ``uri`` of a manifest line: a plain absolute path for local files, else
    ``protocol://path`` with the filesystem's main protocol name. Unknown schemes stay as written."""
    parsed = _protocol_and_path(uri)
    if parsed is None:
        return uri
    name, path = parsed
    if "://" in path:
        return path
    return path if name == "file" else f"{name}://{path}"


def manifest_rel(uri: str) -> str:
    """A manifest URL's name below OUTPUT/masks: its protocol, then its path (``s3/bucket/key``,
    ``file/data/a.jpg``), so inputs that differ only in their scheme never share a mask."""
    parsed = _protocol_and_path(uri)
    if parsed is None:
        protocol, path = split_protocol(uri)
        return f"{protocol or 'file'}/{path.lstrip('/')}"
    name, path = parsed
    return f"{name}/{split_protocol(path)[1].lstrip('/')}"


def _listing_rows(batch: pa.Table, run_id: str) -> pa.Table:
    """Distinct URLs with their done flag -> the listing rows still to do; counts go to the driver through
    segbatch/_internal/_tally.py, under a key named after the batch's contents (a retried batch overwrites it)."""
    from segbatch._internal import _tally

    # Only the manifest's own lines count as listed: an ok row of OUTPUT that the manifest does not name
    # (another run's input) is neither listed nor skipped.
    batch = batch.filter(pc.fill_null(pc.equal(batch["listed"], 1), False))
    if batch.num_rows == 0:  # only earlier ok rows the manifest does not name: nothing listed here
        return LISTING_SCHEMA.empty_table()
    done = pc.fill_null(pc.equal(batch["done"], 1), False)
    todo = batch.filter(pc.invert(done))
    first_last = "\n".join(
        batch[URI_COLUMN].slice(0, 1).to_pylist() + batch[URI_COLUMN].slice(batch.num_rows - 1).to_pylist()
    )
    part = "manifest-" + hashlib.sha1(f"{batch.num_rows}\n{first_last}".encode()).hexdigest()[:16]
    _tally.put(run_id, part, batch.num_rows, batch.num_rows - todo.num_rows, finished=True)
    uris = todo[URI_COLUMN].to_pylist()
    paths = []
    for uri in uris:
        try:
            paths.append(url_to_fs(uri)[1])
        except Exception:  # an unknown scheme: the read fails too and the row says why
            paths.append(uri)
    n = len(uris)
    return pa.table(
        [
            pa.array(uris, pa.string()),
            pa.array(paths, pa.string()),
            pa.array([manifest_rel(u) for u in uris], pa.string()),
            pa.nulls(n, pa.int64()),
            pa.nulls(n, pa.string()),
            pa.nulls(n, pa.float64()),
            pa.array(np.zeros(n, np.int32)),
            pa.array(np.zeros(n, np.int32)),
        ],
        schema=LISTING_SCHEMA,
    )
