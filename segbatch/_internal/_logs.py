"""What segbatch prints: its own lines by default; Ray's as well with ``-v``/``--verbose``.

A default run would otherwise print Ray's start-up lines (the token-authentication notice, "Started a
local Ray instance"), Ray Data's execution plan and its "progress bars disabled" warning, every actor's
log lines with colour codes, and error-level lines of Ray's C++ core about its own internals. None of
them is something a user of segbatch acts on; all of them still go to Ray's session logs
(``/tmp/ray/session_latest/logs``) except the C++ core's, which ``-v`` brings back.

The CLI (and ``make demo``) call :func:`configure`; a library caller who does not keeps Ray's defaults.
"""

from __future__ import annotations

import logging
import os
import re
import sys
import threading

# How much of Ray the driver shows: None (not configured: Ray's own defaults), 0 (quiet), 1+ (verbose).
_verbosity: int | None = None

# A line of Ray's C++ core, e.g. "[2026-12-02 03:51:17,084 E 4503 4503] core_worker.cc:2465: Actor ...".
# The core writes ERROR lines to the driver's stderr whatever the log level, and the one a default run
# meets is about Ray Data's own actors (ray-project/ray#53727), nothing a user can act on. Setting
# RAY_BACKEND_LOG_LEVEL instead makes the core print a line saying so, and drops its errors from the log
# files too; so the driver's native stderr is filtered while Ray runs (NativeStderrFilter).
RAY_NATIVE_LINE = re.compile(rb"^\[\d{4}-\d\d-\d\d [\d:,.]+ ([DIWEF]) \d+ \d+\] [\w./-]+\.(cc|h):\d+: ")
# The ERROR lines that are noise; any other ERROR line of the core still reaches the terminal.
RAY_NATIVE_NOISE = (rb"has constructor arguments in the object store and max_restarts > 0",)


class _Format(logging.Formatter):
    """``message`` for INFO, ``LEVEL: message`` above; the logger's name only when verbose."""

    def __init__(self, verbose: bool):
        super().__init__()
        self.verbose = verbose

    def format(self, record: logging.LogRecord) -> str:
        text = record.getMessage()
        if record.exc_info:
            text += "\n" + self.formatException(record.exc_info)
        if self.verbose:
            return f"{record.levelname} {record.name}: {text}"
        return text if record.levelno <= logging.INFO else f"{record.levelname}: {text}"


def configure(verbose: int = 0) -> None:
    """Set up segbatch's own log lines and how much of Ray's a run shows (before Ray starts)."""
    global _verbosity
    _verbosity = verbose
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_Format(verbose > 0))
    root = logging.getLogger()
    for old in [h for h in root.handlers if getattr(h, "_segbatch", False)]:
        root.removeHandler(old)
    handler._segbatch = True  # type: ignore[attr-defined]
    root.addHandler(handler)
    root.setLevel(logging.DEBUG if verbose > 1 else logging.INFO)
    if verbose:
        return
    os.environ.setdefault("RAY_COLOR_PREFIX", "0")  # no colour codes around forwarded lines
    # "Matplotlib is building the font cache" on the first `segbatch report`: a one-off, not a problem.
    logging.getLogger("matplotlib").setLevel(logging.ERROR)


def quiet() -> bool:
    return _verbosity == 0


def ray_init_kwargs() -> dict:
    """ray.init's arguments for the driver's own logging: Ray's "ray" logger at ERROR and no forwarded
    worker lines when quiet; Ray's defaults (INFO, forwarded) otherwise."""
    if quiet():
        return {"logging_level": logging.ERROR, "log_to_driver": False}
    return {"log_to_driver": True}


class _DropProgressNotices(logging.Filter):
    """Ray Data's notices about its own progress bars (off: segbatch shows its own, segbatch._internal.progress)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.name.startswith("ray.data._internal.progress") and record.levelno < logging.ERROR)


def quiet_ray_data() -> None:
    """Ray Data's console handler (Ray Data's own logging configuration, set when ray.data is imported)
    shows WARNING and above, without the progress-bar notices; its session log file keeps everything."""
    if not quiet():
        return
    import ray.data  # noqa: F401  (configures Ray Data's loggers)

    for handler in logging.getLogger("ray.data").handlers:
        if type(handler).__name__ != "SessionFileHandler":
            handler.setLevel(max(handler.level, logging.WARNING))
            if not any(isinstance(f, _DropProgressNotices) for f in handler.filters):
                handler.addFilter(_DropProgressNotices())


def is_ray_noise(line: bytes) -> bool:
    """A line of Ray's C++ core below ERROR, or one of the known ERROR lines about Ray's internals."""
    match = RAY_NATIVE_LINE.match(line)
    if not match:
        return False
    return match.group(1) in b"DIW" or any(noise in line for noise in RAY_NATIVE_NOISE)


class NativeStderrFilter:
    """While open, file descriptor 2 of this process is a pipe whose lines reach the real stderr unless
    :func:`is_ray_noise` says they are Ray's C++ core talking about itself. ``sys.stderr`` is pointed at
    the real stderr meanwhile, so Python's own writes (and a progress bar's TTY check) do not go through
    the pipe. A no-op unless :func:`quiet`, and where fd 2 cannot be replaced."""

    def __init__(self) -> None:
        self._saved: int | None = None
        self._thread: threading.Thread | None = None
        self._read: int | None = None
        self._old_stderr = None

    def start(self) -> NativeStderrFilter:
        if not quiet() or self._saved is not None:
            return self
        try:
            sys.stderr.flush()
            saved = os.dup(2)
            read, write = os.pipe()
            os.dup2(write, 2)
            os.close(write)
        except (OSError, ValueError, AttributeError):
            return self
        self._saved, self._read = saved, read
        self._old_stderr = sys.stderr
        sys.stderr = os.fdopen(os.dup(saved), "w", buffering=1, encoding="utf-8", errors="backslashreplace")
        self._thread = threading.Thread(target=self._pump, name="segbatch-stderr", daemon=True)
        self._thread.start()
        return self

    def _pump(self) -> None:
        pending = b""
        while True:
            try:
                chunk = os.read(self._read, 65536)
            except OSError:
                chunk = b""
            if not chunk:
                break
            pending += chunk
            *lines, pending = pending.split(b"\n")
            out = b"".join(line + b"\n" for line in lines if not is_ray_noise(line))
            if out:
                os.write(self._saved, out)
        if pending and not is_ray_noise(pending):
            os.write(self._saved, pending)

    def stop(self) -> None:
        if self._saved is None:
            return
        try:
            sys.stderr.flush()
        except (OSError, ValueError):
            pass
        os.dup2(self._saved, 2)  # closes the pipe's write end held as fd 2: the pump sees EOF
        if self._thread is not None:
            # Processes Ray started may still hold the write end; the pump ends when they exit.
            self._thread.join(timeout=2.0)
        replaced, sys.stderr = sys.stderr, self._old_stderr
        if replaced is not self._old_stderr:
            replaced.close()
        os.close(self._saved)
        self._saved = self._thread = self._old_stderr = None

    def __enter__(self) -> NativeStderrFilter:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


__all__ = ["NativeStderrFilter", "is_ray_noise", "configure", "quiet", "quiet_ray_data", "ray_init_kwargs"]
