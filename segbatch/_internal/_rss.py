"""Peak resident memory of a process tree, sampled in a thread: `segbatch bench` and benchmarks/ use it."""

from __future__ import annotations

import threading
import time

SAMPLE_INTERVAL = 0.1  # seconds between samples; short peaks between two samples are missed


class PeakRSS:
    """Samples ``pid`` (and, per name, children whose command line contains that name) until stopped.

    >>> with PeakRSS(proc.pid, children={"actors": "Segmenter"}) as peaks:
    ...     proc.wait()
    >>> peaks.mib("root"), peaks.mib("actors")
    """

    def __init__(self, pid: int, children: dict[str, str] | None = None, interval: float = SAMPLE_INTERVAL):
        self.pid = pid
        self.children = children or {}
        self.interval = interval
        self.peaks: dict[str, int] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def mib(self, name: str = "root") -> float:
        return self.peaks.get(name, 0) / 2**20

    def _note(self, name: str, rss: int) -> None:
        self.peaks[name] = max(self.peaks.get(name, 0), rss)

    def _run(self) -> None:
        import psutil

        try:
            root = psutil.Process(self.pid)
        except psutil.Error:
            return
        while not self._stop.is_set():
            try:
                self._note("root", root.memory_info().rss)
                for child in root.children(recursive=True) if self.children else ():
                    try:
                        cmdline = " ".join(child.cmdline())
                        for name, marker in self.children.items():
                            if marker in cmdline:
                                self._note(name, child.memory_info().rss)
                    except psutil.Error:
                        continue
            except psutil.Error:
                return
            time.sleep(self.interval)

    def __enter__(self) -> PeakRSS:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
