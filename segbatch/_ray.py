"""Starting or attaching to Ray: embedded by default, a cluster with --address or RAY_ADDRESS."""

from __future__ import annotations

import contextlib
import logging
import os
from typing import Iterator

log = logging.getLogger(__name__)

LOOPBACK = "127.0.0.1"  # an embedded Ray listens on loopback only
# Ray reads this once, when it is imported: "0" makes it use 127.0.0.1 as the node address.
LOOPBACK_ONLY_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"


@contextlib.contextmanager
def session(address: str | None = None) -> Iterator[None]:
    """Use the Ray already initialised in this process, attach to ``address`` / ``RAY_ADDRESS`` (this is
    what a Ray Job's entrypoint sees), or start an embedded single-node Ray for the run and stop it after."""
    address = address or os.environ.get("RAY_ADDRESS")
    if not address:
        os.environ.setdefault(LOOPBACK_ONLY_ENV, "0")  # before ray is first imported
    import ray

    if ray.is_initialized():
        yield
        return
    if address:
        log.info("attaching to the Ray cluster at %s", address)
        ray.init(address=address, log_to_driver=True)
    else:
        # "local" never attaches to a cluster found on this machine: the run gets its own Ray.
        # Ray maps 127.0.0.1 to the host's address unless LOOPBACK_ONLY_ENV (set above) says that this
        # is a single-machine Ray; an embedded Ray has no peers, so it listens on loopback only.
        ray.init(address="local", include_dashboard=False, _node_ip_address=LOOPBACK, log_to_driver=True)
    try:
        yield
    finally:
        ray.shutdown()


def cluster_gpus() -> float:
    import ray

    return float(ray.cluster_resources().get("GPU", 0.0))


def cluster_cpus() -> float:
    import ray

    return float(ray.cluster_resources().get("CPU", 1.0))
