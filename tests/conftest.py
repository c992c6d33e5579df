"""Fixtures: one shared local Ray for the session, seeded weights, and test images."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

# Every Ray started by the tests (this process's, and `ray start` in subprocesses) agrees on auth.
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")

from _helpers import TEST_ARCH, make_checkpoint  # noqa: E402


@pytest.fixture(scope="session")
def ray_local():
    """One embedded Ray on 127.0.0.1 for the whole session; pipeline.run() reuses it."""
    import ray

    if not ray.is_initialized():
        ray.init(address="local", num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1",
                 log_to_driver=False)
    from ray.data import DataContext

    DataContext.get_current().enable_progress_bars = False
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory) -> Path:
    """A seeded, content-sensitive mobilenet checkpoint (state_dict file) for the test architecture."""
    return make_checkpoint(tmp_path_factory.mktemp("weights") / f"{TEST_ARCH}-seeded.pt")
