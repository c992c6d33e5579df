"""Checks of OUTPUT before any work: can this run write there at all? (exit 4 when not)

A read-only folder, OUTPUT that is a file or lies below one, a full disk or a bucket without write access
used to surface only after Ray had started and inferred the first batch, as a traceback. One small probe
object, written and deleted in the driver, finds all of these in milliseconds.
"""

from __future__ import annotations

import errno
import uuid
from typing import Any, Mapping

from segbatch import _storage
from segbatch.errors import InputError

PROBE_PREFIX = "._segbatch-probe-"

#: errno values that no retry fixes: the run stops instead of turning every image into an error row.
FATAL_WRITE_ERRNOS = frozenset({errno.ENOSPC, errno.EROFS, errno.EDQUOT, errno.EACCES, errno.EPERM,
                                errno.ENOTDIR, errno.EFBIG})


class OutputNotWritableError(InputError):
    """OUTPUT cannot be written (exit 4); nothing was done."""


def describe_write_error(exc: BaseException) -> str:
    reason = {errno.ENOSPC: "no space left on the device", errno.EDQUOT: "the disk quota is used up",
              errno.EROFS: "read-only filesystem", errno.EACCES: "permission denied",
              errno.EPERM: "permission denied", errno.ENOTDIR: "a part of the path is a file, not a folder",
              errno.EEXIST: "a file is in the way of a folder"}.get(getattr(exc, "errno", None))
    if isinstance(exc, PermissionError):
        reason = "permission denied"
    if isinstance(exc, (NotADirectoryError, FileExistsError)):
        reason = "OUTPUT, or a folder above it, is a file"
    return f"{reason} ({type(exc).__name__})" if reason else f"{type(exc).__name__}: {exc}"


def is_fatal_write_error(exc: BaseException) -> bool:
    return isinstance(exc, (PermissionError, NotADirectoryError)) or (
        isinstance(exc, OSError) and exc.errno in FATAL_WRITE_ERRNOS)


def probe_output(url: str, storage_options: Mapping[str, Any] | None) -> None:
    """Write and delete a probe object in OUTPUT; raise OutputNotWritableError with the reason."""
    fs, root = _storage.open_url(url, storage_options)
    try:
        if _storage.retry(fs.isfile, root, what=f"check {url}"):
            raise OutputNotWritableError(f"OUTPUT {url} is a file; OUTPUT must be a folder or URL prefix")
        probe = _storage.join_path(root, PROBE_PREFIX + uuid.uuid4().hex[:12])
        _storage.write_atomic(fs, probe, b"segbatch write probe\n")
        _storage.retry(fs.rm, probe, what=f"delete {probe}")
    except OutputNotWritableError:
        raise
    except OSError as exc:
        raise OutputNotWritableError(f"OUTPUT {url} is not writable: {describe_write_error(exc)}; nothing was "
                                     "done") from None
