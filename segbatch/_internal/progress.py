"""A run's progress as the driver sees it: one tqdm bar on a terminal, one short line every so often in a log.

The driver counts images as their result batches come back (pipeline.py); this module only shows the
counts. On a TTY the bar shows images done / total, images/s, the ETA and the ok / error counts. When
the stream is not a TTY (a log file, ``| tee``, a Ray Job's driver log) a bar would write a carriage-
return frame many times a second, so one plain line is written every :data:`LOG_INTERVAL_S` seconds
instead, and none of it carries colour codes.
"""

from __future__ import annotations

import os
import sys
import time
from typing import TextIO

# One line per 30 s: an hour-long run logs 120 lines, and a stalled run shows within half a minute.
LOG_INTERVAL_S = 30.0
# Tests and impatient users may set another interval (seconds) in the environment.
INTERVAL_ENV = "SEGBATCH_PROGRESS_INTERVAL"


def _interval() -> float:
    try:
        return max(0.1, float(os.environ.get(INTERVAL_ENV, LOG_INTERVAL_S)))
    except ValueError:
        return LOG_INTERVAL_S


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s" if m else f"{s}s"


class RunProgress:
    """Progress of one run. ``update`` takes deltas; ``close`` ends the bar (or writes nothing more).

    ``enabled=False`` (``--no-progress``) shows nothing at all."""

    def __init__(
        self, enabled: bool = True, stream: TextIO | None = None, *, unit: str = "images", action: str = "labelling"
    ):
        self.stream = stream if stream is not None else sys.stderr
        self.enabled = enabled
        self.unit = unit
        self.action = action
        self.total: int | None = None
        self.ok = self.error = self.skipped = 0
        self.tty = enabled and _isatty(self.stream)
        self.interval = _interval()
        self._bar = None
        self._started = time.monotonic()
        self._last_line = self._started
        self._closed = False

    # -- the interface the pipeline uses --------------------------------------------------------------
    def set_total(self, n: int | None) -> None:
        """Images this run will label (None: not known yet, e.g. a manifest Ray still reads)."""
        self.total = n
        if not self.enabled or self._closed:
            return
        if self.tty:
            if self._bar is None:
                self._bar = self._make_bar()
            else:  # the bar's format depends on whether the total is known
                self._bar.close()
                self._bar = self._make_bar()
        else:
            of = f"{n} {self.unit}" if n is not None else f"{self.unit} (count not known until read)"
            skipped = f", {self.skipped} skipped (already labelled)" if self.skipped else ""
            self._write(f"segbatch: {self.action} {of}{skipped}; progress every {self.interval:g}s")

    def update(self, ok: int = 0, error: int = 0, skipped: int = 0) -> None:
        self.ok += ok
        self.error += error
        self.skipped += skipped
        if not self.enabled or self._closed:
            return
        if self.tty:
            if self._bar is None:
                self._bar = self._make_bar()
            self._bar.set_postfix_str(self._postfix(), refresh=False)
            self._bar.update(ok + error)
        elif time.monotonic() - self._last_line >= self.interval:
            self._write(self.line())

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._bar is not None:
            self._bar.set_postfix_str(self._postfix(), refresh=False)
            self._bar.close()
            self._bar = None

    def __enter__(self) -> RunProgress:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- what is shown --------------------------------------------------------------------------------
    @property
    def done(self) -> int:
        return self.ok + self.error

    def line(self) -> str:
        """The plain progress line: ``segbatch: 120/500 images (24%), 118 ok, 2 error, 3.1 images/s, ETA 2m03s``."""
        elapsed = max(time.monotonic() - self._started, 1e-9)
        rate = self.done / elapsed
        if self.total:
            head = f"{self.done}/{self.total} {self.unit} ({self.done / self.total:.0%})"
            left = self.total - self.done
            eta = f", ETA {_duration(left / rate)}" if rate > 0 and left > 0 else ""
        else:
            head, eta = f"{self.done} {self.unit}", ""
        return f"segbatch: {head}, {self.ok} ok, {self.error} error, {rate:.2f} {self.unit}/s{eta}"

    def _postfix(self) -> str:
        return f"ok={self.ok} error={self.error}" + (f" skipped={self.skipped}" if self.skipped else "")

    def _make_bar(self):
        from tqdm import tqdm

        # A terminal that reports no width (a pty nobody sized, as `script` makes) would get an empty bar.
        try:
            sized = os.get_terminal_size(self.stream.fileno()).columns > 0
        except (OSError, ValueError, AttributeError):
            sized = False
        return tqdm(
            total=self.total,
            initial=self.ok + self.error,  # a bar remade once the total is known keeps what is done
            unit=" " + self.unit,  # tqdm writes the rate as f"{rate}{unit}/s"
            file=self.stream,
            dynamic_ncols=sized,
            ncols=None if sized else _columns(),
            nrows=None if sized else 20,  # tqdm hides a bar below a terminal's last row; unsized: row 0 of 0
            smoothing=0.1,
            desc="segbatch",
            # Always images/s (tqdm's default turns a rate below 1 into s/image).
            bar_format=(
                "{desc}: {percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} [{elapsed}<{remaining}, {rate_noinv_fmt}{postfix}]"
                if self.total
                else "{desc}: {n_fmt} [{elapsed}, {rate_noinv_fmt}{postfix}]"
            ),
            postfix=self._postfix(),
            leave=True,
        )

    def _write(self, text: str) -> None:
        self._last_line = time.monotonic()
        try:
            print(text, file=self.stream, flush=True)
        except (OSError, ValueError):  # a closed pipe must not stop the run
            self.enabled = False


def _columns() -> int:
    try:
        return max(40, int(os.environ.get("COLUMNS", "")))
    except ValueError:
        return 100


def _isatty(stream: TextIO) -> bool:
    try:
        return bool(stream.isatty()) and os.environ.get("TERM") != "dumb"
    except (AttributeError, ValueError):
        return False


__all__ = ["INTERVAL_ENV", "LOG_INTERVAL_S", "RunProgress"]
