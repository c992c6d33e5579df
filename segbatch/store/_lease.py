"""One writer per OUTPUT: the lease file ``OUTPUT/_segbatch.lease`` (docs/recurring-runs.md).

A run takes the lease before any work, renews it from a background thread of the driver, and deletes it
at the end. Taking it is an exclusive create: ``O_CREAT | O_EXCL`` on a local filesystem, a conditional
PUT (``If-None-Match: *``) on S3. A second run finds the file, reads who holds it, and stops (exit 2).
A run whose lease was taken over mid-run stops writing (exit 7).

A lease whose last renewal is older than its timeout is stale: its run died without releasing it. So is
a lease whose holder ran on this same host and whose process no longer exists. The next run takes it
over, with a warning, by replacing exactly the stale copy it read (S3: ``If-Match``
on its ETag; local: rename it aside, check that what was renamed is the copy that was read, then
create anew), so two runs that find the same stale lease cannot both take it.
"""

from __future__ import annotations

import errno
import json
import logging
import math
import os
import socket
import threading
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from segbatch._internal import _storage
from segbatch.errors import ConfigError, Fault, LeaseHeldError, LeaseLostError, classify

log = logging.getLogger(__name__)

LEASE_NAME = "_segbatch.lease"
#: Seconds after its last renewal that a lease counts as stale and may be taken over. Override with the
#: environment variable SEGBATCH_LEASE_TIMEOUT (seconds); the holder renews every timeout / 4.
DEFAULT_TIMEOUT_S = 120.0
TIMEOUT_ENV = "SEGBATCH_LEASE_TIMEOUT"
#: Seconds a lease's renewal time may lie ahead of this host's clock (clock skew between hosts); one
#: further ahead (``renewed_at`` 1e20) is damaged, and counts as unreadable.
MAX_CLOCK_SKEW_S = 3600.0
# errnos of a filesystem that cannot make hard links; the lease is then created with O_EXCL alone.
_NO_LINK_ERRNOS = frozenset({errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV, errno.ENOSYS})


def lease_timeout() -> float:
    text = os.environ.get(TIMEOUT_ENV)
    if not text:
        return DEFAULT_TIMEOUT_S
    try:
        value = float(text)
    except ValueError:
        raise ConfigError(TIMEOUT_ENV, f"{text!r} is not a number of seconds", "e.g. 120") from None
    if value <= 0:
        raise ConfigError(TIMEOUT_ENV, "must be > 0 seconds", "e.g. 120")
    return value


def _iso(seconds: float) -> str:
    try:
        return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(seconds))
    except (OverflowError, OSError, ValueError):  # not a time gmtime can show (nan, 1e20)
        return f"{seconds!r} (not a time)"


def _number(data: dict, key: str, default: float) -> float:
    value = data.get(key, default)
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise TypeError(f"{key} is not a number")
    number = float(value)
    if not math.isfinite(number):
        raise ValueError(f"{key} is not finite")
    return number


@dataclass
class Holder:
    host: str
    pid: int
    run_id: str
    token: str
    acquired_at: float
    renewed_at: float
    timeout_s: float
    #: Set when the file could not be read as a lease (being written at this moment, or damaged): the
    #: holder is unknown, and the lease counts as renewed when the file was last modified.
    unreadable: bool = False

    def to_bytes(self) -> bytes:
        data = {k: v for k, v in self.__dict__.items() if k != "unreadable"}
        data.update(acquired_at_utc=_iso(self.acquired_at), renewed_at_utc=_iso(self.renewed_at))
        return (json.dumps(data, indent=1) + "\n").encode()

    @classmethod
    def from_bytes(cls, raw: bytes) -> Holder:
        """The holder in a lease file; ValueError or TypeError when it is not one (empty while its
        creator writes it, cut short, or edited into something else: ``[1,2]``, ``5``, ``"nan"``)."""
        data = json.loads(raw)
        if not isinstance(data, dict):
            raise TypeError("a lease is a JSON object")
        renewed_at = _number(data, "renewed_at", 0)
        if renewed_at > time.time() + MAX_CLOCK_SKEW_S:
            raise ValueError("renewed_at lies in the future")
        timeout_s = _number(data, "timeout_s", DEFAULT_TIMEOUT_S)
        if timeout_s <= 0:
            raise ValueError("timeout_s must be > 0")
        return cls(
            host=str(data.get("host", "?")),
            pid=int(_number(data, "pid", 0)),
            run_id=str(data.get("run_id", "?")),
            token=str(data.get("token", "")),
            acquired_at=_number(data, "acquired_at", 0),
            renewed_at=renewed_at,
            timeout_s=timeout_s,
        )

    def describe(self, now: float) -> str:
        if self.unreadable:
            return (
                f"an unreadable lease file (being written, or damaged), last modified {_iso(self.renewed_at)} "
                f"({max(0.0, now - self.renewed_at):.0f}s ago)"
            )
        return (
            f"run {self.run_id} (host {self.host}, pid {self.pid}), last renewed {_iso(self.renewed_at)} "
            f"({max(0.0, now - self.renewed_at):.0f}s ago)"
        )


def _holder_is_dead(holder: Holder) -> bool:
    """The holder ran on this host and its process is gone (killed with -9, or its machine rebooted
    under it): its lease need not wait for the timeout."""
    if holder.host != socket.gethostname() or holder.pid <= 0 or holder.pid == os.getpid():
        return False
    try:
        os.kill(holder.pid, 0)
    except ProcessLookupError:
        return True
    except OSError:
        return False
    return False


def _is_s3(fs) -> bool:
    protocols = {fs.protocol} if isinstance(fs.protocol, str) else set(fs.protocol)
    return bool(protocols & {"s3", "s3a"})


class Lease:
    """``with Lease(output, options, run_id): ...`` holds OUTPUT for the block (see the module doc)."""

    def __init__(
        self, output_url: str, storage_options: Mapping[str, Any] | None, run_id: str, timeout_s: float | None = None
    ):
        self.url = _storage.join_url(_storage.absolute_url(output_url), LEASE_NAME)
        self._fs, root = _storage.open_url(output_url, storage_options)
        self._path = _storage.join_path(root, LEASE_NAME)
        self.timeout_s = timeout_s if timeout_s is not None else lease_timeout()
        now = time.time()
        self.holder = Holder(
            host=socket.gethostname(),
            pid=os.getpid(),
            run_id=run_id,
            token=uuid.uuid4().hex,
            acquired_at=now,
            renewed_at=now,
            timeout_s=self.timeout_s,
        )
        self._etag: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.lost: str | None = None  # why the lease was lost, once it was
        self.took_over: Holder | None = None

    # -- storage primitives ------------------------------------------------------------------------------
    def _create(self, data: bytes) -> bool:
        """Exclusive create; False when the file already exists."""
        fs, path = self._fs, self._path
        if _storage.is_local(fs):
            return self._create_local(data)
        if _is_s3(fs):
            try:
                _storage.retry(fs.pipe_file, path, data, mode="create", what=f"create {self.url}")
            except OSError as exc:  # s3fs: FileExistsError, or EINVAL with the 412 PreconditionFailed as cause
                if classify(exc) in (Fault.EXISTS, Fault.PRECONDITION):
                    return False
                raise
            self._etag = self._read_etag()
            return True
        # Other filesystems: fsspec's exclusive mode where the backend supports it.
        try:
            with fs.open(path, "xb") as f:
                f.write(data)
        except FileExistsError:
            return False
        except (ValueError, NotImplementedError):
            if fs.exists(path):
                return False
            log.warning("%s cannot create files exclusively: the lease is best effort here", fs.protocol)
            fs.pipe_file(path, data)
        return True

    def _create_local(self, data: bytes) -> bool:
        """Write the whole lease to a temporary, then hard-link it to the lease's name: the link is the
        exclusive create, and the lease is never seen empty or half written (a plain O_EXCL create is,
        for a moment, and another run reading it then would find no holder)."""
        path = self._path
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = os.path.join(os.path.dirname(path), f".{LEASE_NAME}.{uuid.uuid4().hex[:12]}.tmp")
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        try:
            os.link(tmp, path)
            return True
        except FileExistsError:
            return False
        except OSError as exc:
            if exc.errno not in _NO_LINK_ERRNOS:
                raise
        finally:
            os.unlink(tmp)
        # No hard links here: O_EXCL, whose empty moment _read counts as a fresh lease (its mtime).
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        return True

    def _modified_at(self) -> float:
        """When the lease file was last written, by its filesystem's clock; now when it cannot say."""
        try:
            info = self._fs.info(self._path)
        except FileNotFoundError:
            raise
        except OSError:
            return time.time()
        mtime = _storage.file_identity(info)[2]
        return mtime if mtime is not None and math.isfinite(mtime) else time.time()

    def _read_etag(self) -> str | None:
        self._fs.invalidate_cache(self._path)
        info = _storage.retry(self._fs.info, self._path, what=f"check {self.url}")
        return _storage.file_identity(info)[1]

    def _read(self) -> tuple[Holder | None, str | None, bytes | None]:
        """(holder, etag, raw bytes), or (None, None, None) when there is no lease file."""
        try:
            self._fs.invalidate_cache(self._path)
            raw = _storage.retry(self._fs.cat_file, self._path, what=f"read {self.url}")
            etag = self._read_etag() if _is_s3(self._fs) else None
        except FileNotFoundError:
            return None, None, None
        try:
            return Holder.from_bytes(raw), etag, raw
        except (ValueError, TypeError, OverflowError):
            pass
        # Unreadable (being written this moment, or damaged): a lease renewed when the file was last
        # written, by an unknown holder. It is stale only once that is older than the timeout.
        try:
            modified = self._modified_at()
        except FileNotFoundError:
            return None, None, None
        return Holder("?", 0, "?", "", modified, modified, self.timeout_s, unreadable=True), etag, raw

    def _put_if_match(self, data: bytes, etag: str | None) -> bool:
        """S3: overwrite the lease only if it is still the copy with ``etag``; False if it changed."""
        bucket, key, _ = self._fs.split_path(self._path)
        try:
            self._fs.call_s3("put_object", Bucket=bucket, Key=key, Body=data, IfMatch=f'"{etag}"')
        except OSError as exc:  # s3fs: EINVAL with the 412 PreconditionFailed (or a 409 conflict) as cause
            if classify(exc) in (Fault.NOT_FOUND, Fault.PRECONDITION):
                return False
            raise
        self._etag = self._read_etag()
        return True

    def _replace_stale(self, stale_raw: bytes, stale_etag: str | None, data: bytes) -> bool:
        """Replace exactly the stale copy that was read; False if someone else got there first."""
        fs, path = self._fs, self._path
        if _is_s3(fs):
            return self._put_if_match(data, stale_etag)
        if _storage.is_local(fs):
            aside = f"{path}.stale-{uuid.uuid4().hex[:12]}"
            try:
                os.rename(path, aside)
            except FileNotFoundError:
                return False
            with open(aside, "rb") as f:
                moved = f.read()
            if moved != stale_raw:  # we moved a fresh lease another run had just taken: put it back
                try:
                    os.link(aside, path)
                except FileExistsError:
                    pass
                os.unlink(aside)
                return False
            os.unlink(aside)
            return self._create(data)
        fs.rm(path)
        return self._create(data)

    def _write_owned(self, data: bytes) -> bool:
        """Overwrite the lease if it is still ours; False when it was taken over."""
        fs, path = self._fs, self._path
        if _is_s3(fs) and self._etag:
            return self._put_if_match(data, self._etag)
        current, _etag, _raw = self._read()
        if current is None or current.token != self.holder.token:
            return False
        _storage.write_atomic(fs, path, data)
        return True

    # -- the lease ---------------------------------------------------------------------------------------
    def acquire(self) -> Lease:
        data = self.holder.to_bytes()
        for _ in range(3):
            if self._create(data):
                self._start_renewing()
                return self
            current, etag, raw = self._read()
            if current is None:
                continue  # released between our create and our read: try again
            now = time.time()
            age = now - current.renewed_at
            timeout = max(self.timeout_s, current.timeout_s)
            dead = _holder_is_dead(current)
            if age <= timeout and not dead:
                raise LeaseHeldError(
                    f"another run is writing this OUTPUT: {current.describe(now)}",
                    f"wait for it to finish, or use another OUTPUT; a lease not renewed for {timeout:.0f}s "
                    f"is stale and is taken over ({LEASE_NAME} in OUTPUT)",
                )
            if self._replace_stale(raw, etag, data):
                self.took_over = current
                if dead:
                    log.warning(
                        "!! taking over the lease of OUTPUT left by a run that is gone: %s; its process no "
                        "longer exists on this host",
                        current.describe(now),
                    )
                else:
                    log.warning(
                        "!! taking over a STALE lease of OUTPUT: %s; its run stopped renewing it more "
                        "than %.0fs ago. If that run is in fact still writing, stop it now.",
                        current.describe(now),
                        timeout,
                    )
                self._start_renewing()
                return self
        current, _, _ = self._read()
        raise LeaseHeldError(
            "another run took this OUTPUT's lease at the same moment"
            + (f": {current.describe(time.time())}" if current else ""),
            "wait for it to finish, or use another OUTPUT",
        )

    def _start_renewing(self) -> None:
        self._thread = threading.Thread(target=self._renew_loop, name="segbatch-lease", daemon=True)
        self._thread.start()

    def renew(self) -> None:
        self.holder.renewed_at = time.time()
        if not self._write_owned(self.holder.to_bytes()):
            self.lost = (
                f"the lease {self.url} was taken over by another run (this run stalled for more than "
                f"{self.timeout_s:.0f}s)"
            )

    def _renew_loop(self) -> None:
        interval = self.timeout_s / 4
        while not self._stop.wait(interval):
            try:
                self.renew()
            except Exception as exc:  # a passing storage fault: the next try may work, well within the timeout
                log.warning("could not renew the lease %s (%s: %s)", self.url, type(exc).__name__, exc)
            if self.lost:
                log.error("%s; stopping", self.lost)
                return

    def check(self) -> None:
        if self.lost:
            raise LeaseLostError(self.lost)

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
        if self.lost:
            return
        try:
            current, _, _ = self._read()
            if current is not None and current.token == self.holder.token:
                _storage.retry(self._fs.rm, self._path, what=f"delete {self.url}")
        except Exception as exc:
            log.error(
                "could not release the lease %s (%s); the next run takes it over after %.0fs",
                self.url,
                exc,
                self.timeout_s,
            )

    def __enter__(self) -> Lease:
        return self.acquire()

    def __exit__(self, *exc: Any) -> None:
        self.release()
