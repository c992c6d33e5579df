"""Starting or attaching to Ray: embedded by default, a cluster with --address or RAY_ADDRESS."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
import threading
from collections.abc import Iterator

log = logging.getLogger(__name__)

LOOPBACK = "127.0.0.1"  # an embedded Ray listens on loopback only
# Ray reads this once, when it is imported: "0" makes it use 127.0.0.1 as the node address.
LOOPBACK_ONLY_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"
# Seconds between re-installs of the driver's signal handlers while Ray shuts down (see _shutdown).
HANDLER_REINSTALL_INTERVAL_S = 0.002
# Idle worker processes an embedded Ray keeps. Ray's default keeps as many as the machine has CPUs and
# kills the rest after 1 s idle; a run's listing, decode and write tasks plus Ray Data's own actors need
# more than 2 on a 2-core machine, so each pause between blocks cost a new worker: ~2 s of CPU (Python,
# Ray, pyarrow) five times in a 128-image run there. A kept worker costs ~100 MB while idle.
MIN_WORKERS_KEPT = 12
# What an embedded Ray runs without: nobody scrapes its metrics (it has no dashboard), and exporting
# them costs its agent CPU every few seconds.
EMBEDDED_SYSTEM_CONFIG = {"enable_metrics_collection": False}


@contextlib.contextmanager
def session(address: str | None = None) -> Iterator[None]:
    """Use the Ray already initialised in this process, attach to ``address`` / ``RAY_ADDRESS`` (this is
    what a Ray Job's entrypoint sees), or start an embedded single-node Ray for the run and stop it after."""
    starter = Starter(address, background=False)
    with starter.session():
        yield


class Starter:
    """Starts (or attaches to) Ray, in a background thread when asked, so that Ray's start-up overlaps the
    driver's own (listing INPUT, resolving weights). :meth:`session` waits for it; :meth:`close` stops
    a Ray this starter started even when no session was entered."""

    def __init__(self, address: str | None = None, *, background: bool = True):
        self._address = address or os.environ.get("RAY_ADDRESS")
        if not self._address:
            os.environ.setdefault(LOOPBACK_ONLY_ENV, "0")  # before ray is first imported

        self._owned = False
        self._error: BaseException | None = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._release = threading.Event()
        self._stderr_filter = None
        # Importing ray alone takes a second or two: a Ray that is not imported yet is not running, and the
        # import happens in the background with the start.
        ray = sys.modules.get("ray")
        if ray is not None and ray.is_initialized():
            return
        from segbatch._internal import _logs

        # Ray's C++ core lines stay off the terminal unless -v (segbatch/_internal/_logs.py); on from before Ray starts.
        self._stderr_filter = _logs.NativeStderrFilter().start()
        if background:
            # The thread lives until close(): Ray's GCS and raylet are started with a parent-death signal,
            # which Linux ties to the starting *thread*, so they would be killed when it ended.
            self._thread = threading.Thread(target=self._start_and_hold, name="segbatch-ray", daemon=True)
            self._thread.start()
        else:
            self._start()

    def _start_and_hold(self) -> None:
        self._start()
        self._ready.set()
        self._release.wait()

    def _start(self) -> None:
        from segbatch._internal import _logs

        quiet = _logs.ray_init_kwargs()  # Ray's own lines: off unless -v (segbatch/_internal/_logs.py)
        try:
            import ray

            if self._address:
                log.info("attaching to the Ray cluster at %s", self._address)
                ray.init(address=self._address, **quiet)
            else:
                # "local" never attaches to a cluster found on this machine: the run gets its own Ray.
                # Ray maps 127.0.0.1 to the host's address unless LOOPBACK_ONLY_ENV (set above) says that
                # this is a single-machine Ray; an embedded Ray has no peers, so it listens on loopback only.
                system_config = {
                    **EMBEDDED_SYSTEM_CONFIG,
                    "num_workers_soft_limit": max(os.cpu_count() or 1, MIN_WORKERS_KEPT),
                }
                ray.init(
                    address="local",
                    include_dashboard=False,
                    _node_ip_address=LOOPBACK,
                    _system_config=system_config,
                    **quiet,
                )
            self._owned = True
            _logs.quiet_ray_data()
        except BaseException as exc:  # re-raised in the caller's thread by wait()
            self._error = exc

    def wait(self) -> None:
        if self._thread is not None:
            self._ready.wait()
        if self._error is not None:
            error, self._error = self._error, None
            self.close()
            raise error

    @contextlib.contextmanager
    def session(self) -> Iterator[None]:
        self.wait()
        try:
            yield
        finally:
            self.close()

    def close(self) -> None:
        import ray

        if self._thread is not None:
            self._ready.wait()
        if self._owned:
            self._owned = False
            _shutdown(ray)
        if self._thread is not None:
            self._release.set()
            self._thread.join()
            self._thread = None
        if self._stderr_filter is not None:
            self._stderr_filter.stop()
            self._stderr_filter = None


def _shutdown(ray) -> None:
    """ray.shutdown(), keeping the driver's SIGINT/SIGTERM handlers in force throughout.

    Ray's core worker uninstalls its native signal handlers as it shuts down, which leaves SIGTERM at
    the default action (terminate) for the second or so the shutdown takes: a SIGTERM then killed the
    driver before it wrote its run record or released its lease. Only the main thread may set a Python
    handler, so there the shutdown runs in a helper thread while the main thread puts the handlers back
    every HANDLER_REINSTALL_INTERVAL_S."""
    if threading.current_thread() is not threading.main_thread():
        ray.shutdown()
        return
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    failed: list[BaseException] = []

    def stop() -> None:
        try:
            ray.shutdown()
        except BaseException as exc:  # re-raised in the caller's thread below
            failed.append(exc)

    stopper = threading.Thread(target=stop, name="segbatch-ray-shutdown")
    stopper.start()
    while True:
        for signum, handler in handlers.items():
            if handler is not None:
                signal.signal(signum, handler)
        if not stopper.is_alive():
            break
        stopper.join(HANDLER_REINSTALL_INTERVAL_S)
    for signum, handler in handlers.items():  # once more: the core may reset them just before it ends
        if handler is not None:
            signal.signal(signum, handler)
    if failed:
        raise failed[0]


def largest_node_cpus() -> float:
    """The CPUs of the cluster's largest live node: what one actor can ask for at most."""
    import ray

    return max((float(n["Resources"].get("CPU", 0.0)) for n in ray.nodes() if n.get("Alive")), default=1.0)


def cluster_cpus() -> float:
    import ray

    return float(ray.cluster_resources().get("CPU", 1.0))
