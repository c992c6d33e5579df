"""Storage: every path goes through ``fsspec.core.url_to_fs``; retries and atomic writes live here.

Nothing else in segbatch looks at a URL's scheme. A location is handled as ``(fs, path)``: the
filesystem fsspec picked for the URL, and the path in that filesystem's own terms.
"""

from __future__ import annotations

import logging
import posixpath
import random
import time
import uuid
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

import fsspec
from fsspec.core import split_protocol, url_to_fs

from segbatch.errors import is_transient

log = logging.getLogger(__name__)
T = TypeVar("T")

RETRY_ATTEMPTS = 6  # tries in all; with the delays below a call gives up after ~15 s of trouble
RETRY_BASE_DELAY = 0.25  # seconds before the second try; doubles each time
RETRY_MAX_DELAY = 4.0  # seconds; the cap of the exponential backoff

# Object stores publish an object whole when its PUT completes, so a plain write is already atomic
# there. Filesystems not listed get a temporary name and a rename.
_ATOMIC_PUT_PROTOCOLS = frozenset({"s3", "s3a", "gs", "gcs", "az", "abfs", "abfss", "adl", "memory", "oci"})

MAX_NAME_BYTES = 255  # bytes in one file name segment on common filesystems (ext4, XFS, APFS, NTFS)


def open_url(url: str, storage_options: Mapping[str, Any] | None = None) -> tuple[fsspec.AbstractFileSystem, str]:
    """The filesystem for ``url`` and the path in its own terms, without a trailing slash."""
    fs, path = url_to_fs(url, **dict(storage_options or {}))
    return fs, path.rstrip("/") or path


class Location:
    """A URL and its storage options that pickle into Ray tasks and open their filesystem lazily, once per
    worker (an open filesystem holds sockets and event loops that must not travel)."""

    def __init__(self, url: str, storage_options: Mapping[str, Any] | None = None):
        self.url = url
        self.storage_options = dict(storage_options or {})
        self._opened: tuple[fsspec.AbstractFileSystem, str] | None = None

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_opened": None}

    def open(self) -> tuple[fsspec.AbstractFileSystem, str]:
        if self._opened is None:
            self._opened = open_url(self.url, self.storage_options)
        return self._opened


def absolute_url(url: str) -> str:
    """A URL as users should see it in outputs: plain paths made absolute, URLs kept as typed."""
    protocol, _ = split_protocol(url)
    if protocol is None:
        import os

        return os.path.abspath(os.path.expanduser(url))
    return url.rstrip("/")


def join_url(root_url: str, relative: str) -> str:
    return root_url.rstrip("/") + "/" + relative.lstrip("/")


def is_local(fs: fsspec.AbstractFileSystem) -> bool:
    """Whether ``fs`` is the local disk (where renames are atomic and os calls apply)."""
    protocols = {fs.protocol} if isinstance(fs.protocol, str) else set(fs.protocol)
    return bool(protocols & {"file", "local"})


def join_path(root: str, relative: str) -> str:
    return posixpath.join(root, relative) if root else relative


def retry(fn: Callable[..., T], *args: Any, what: str = "storage call", **kwargs: Any) -> T:
    """Call ``fn`` with capped exponential backoff (with jitter) on transient errors (``errors.classify``)."""
    delay = RETRY_BASE_DELAY
    for attempt in range(1, RETRY_ATTEMPTS + 1):
        try:
            return fn(*args, **kwargs)
        except Exception as exc:
            if attempt == RETRY_ATTEMPTS or not is_transient(exc):
                raise
            log.warning(
                "%s failed (%s), try %d of %d in %.2fs", what, type(exc).__name__, attempt + 1, RETRY_ATTEMPTS, delay
            )
            time.sleep(delay * (0.5 + random.random()))
            delay = min(delay * 2, RETRY_MAX_DELAY)
    raise AssertionError("unreachable")


def read_many(fs: fsspec.AbstractFileSystem, paths: list[str]) -> list[bytes | BaseException]:
    """Read whole files, concurrently where the filesystem can (s3fs batches ``cat`` on its event loop).

    Each entry is the file's bytes or the exception that reading it ended with, after retries.
    """
    if not paths:
        return []
    try:
        got = fs.cat(paths, on_error="return")
    except Exception as exc:  # the whole call broke (e.g. the endpoint is gone); retry one by one
        log.warning("batched read of %d files failed (%s); reading one by one", len(paths), type(exc).__name__)
        got = {p: exc for p in paths}
    if not isinstance(got, dict):  # a single path comes back bare
        got = {paths[0]: got}
    out: list[bytes | BaseException] = []
    for path in paths:
        value = got.get(path, FileNotFoundError(path))
        if isinstance(value, BaseException) and is_transient(value):
            try:
                value = retry(fs.cat_file, path, what=f"read {path}")
            except Exception as exc:
                value = exc
        out.append(value)
    return out


def read_urls(urls: list[str], storage_options: Mapping[str, Any] | None = None) -> list[bytes | BaseException]:
    """``read_many`` for full URLs that may name different filesystems (a manifest's lines): one batched
    read per filesystem. A URL fsspec cannot open gets its exception, like a failed read."""
    out: list[bytes | BaseException | None] = [None] * len(urls)
    groups: dict[int, tuple[fsspec.AbstractFileSystem, list[int], list[str]]] = {}
    for i, url in enumerate(urls):
        try:
            fs, path = url_to_fs(url, **dict(storage_options or {}))
        except Exception as exc:
            out[i] = exc
            continue
        _, where, paths = groups.setdefault(id(fs), (fs, [], []))
        where.append(i)
        paths.append(path)
    for fs, where, paths in groups.values():
        for i, value in zip(where, read_many(fs, paths)):
            out[i] = value
    return out  # type: ignore[return-value]


def write_atomic(fs: fsspec.AbstractFileSystem, path: str, data: bytes) -> None:
    """Write a whole file so that readers never see a partial one."""
    _publish(fs, path, lambda target: retry(fs.pipe_file, target, data, what=f"write {target}"))


def put_atomic(fs: fsspec.AbstractFileSystem, local_path: str, path: str) -> None:
    """:func:`write_atomic` for a local file too large to hold in memory (an export's shard)."""
    _publish(fs, path, lambda target: retry(fs.put_file, local_path, target, what=f"upload {target}"))


def _publish(fs: fsspec.AbstractFileSystem, path: str, write: Callable[[str], None]) -> None:
    protocols = {fs.protocol} if isinstance(fs.protocol, str) else set(fs.protocol)
    if protocols & _ATOMIC_PUT_PROTOCOLS:
        write(path)
        return
    parent, name = posixpath.split(path)
    fs.makedirs(parent, exist_ok=True)
    # A leading dot keeps pyarrow's dataset discovery and most listings from seeing the temporary. Its
    # name keeps as much of the file's name as fits in a name segment: a 250-byte name must not fail
    # (ENAMETOOLONG) for the sake of its temporary.
    suffix = f".{uuid.uuid4().hex[:12]}.tmp"
    head = name
    while len(f".{head}{suffix}".encode("utf-8", "surrogateescape")) > MAX_NAME_BYTES:
        head = head[:-1]
    tmp = posixpath.join(parent, f".{head}{suffix}")
    try:
        write(tmp)
        retry(fs.mv, tmp, path, what=f"rename {tmp}")
    except BaseException:
        # A full disk leaves a partial temporary behind; nothing ever reads it, so it goes now.
        try:
            fs.rm(tmp)
        except Exception:
            pass
        raise


def file_identity(info: Mapping[str, Any]) -> tuple[int | None, str | None, float | None]:
    """(size, etag, mtime) from an fsspec ``info``/``find(detail=True)`` entry, whatever the backend."""
    size = info.get("size")
    etag = info.get("ETag") or info.get("etag") or info.get("md5Hash")
    etag = etag.strip('"') if isinstance(etag, str) else None
    mtime = info.get("mtime") or info.get("LastModified") or info.get("last_modified") or info.get("updated")
    if hasattr(mtime, "timestamp"):
        mtime = mtime.timestamp()
    try:
        mtime = float(mtime) if mtime is not None else None
    except (TypeError, ValueError):
        mtime = None
    return (int(size) if size is not None else None), etag, mtime


def to_pyarrow_fs(fs: fsspec.AbstractFileSystem):
    """Hand Ray Data the filesystem we configured (pyarrow's own S3 ignores AWS_ENDPOINT_URL)."""
    from pyarrow.fs import FSSpecHandler, PyFileSystem

    return PyFileSystem(FSSpecHandler(fs))
