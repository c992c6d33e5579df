"""Fixtures: one shared local Ray for the session, seeded weights, and test images."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# Every Ray started by the tests (this process's, and `ray start` in subprocesses) agrees on auth.
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
# Ray then uses 127.0.0.1 as its node address (it otherwise maps loopback to the host's address), so the
# tests' Ray talks over loopback only. Set before anything imports ray.
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

from _helpers import TEST_ARCH, make_checkpoint  # noqa: E402

# Tests that start Ray, an S3 server, a browser or a segbatch process; `make test-fast` leaves them out.
_INTEGRATION_FIXTURES = {"ray_local", "s3_server", "s3_bucket"}
_INTEGRATION_MODULES = {"test_faults", "test_incremental", "test_multinode", "test_ray_jobs", "test_s3_secrets"}


def pytest_collection_modifyitems(config, items):
    for item in items:
        if _INTEGRATION_FIXTURES & set(item.fixturenames) or item.module.__name__ in _INTEGRATION_MODULES:
            item.add_marker(pytest.mark.integration)


from _helpers import free_port  # noqa: E402
from _s3 import S3Endpoint, clear_s3fs_cache, configure_environment  # noqa: E402

# S3 credentials and endpoint go into the environment now, before any Ray starts: Ray workers inherit
# the driver's environment at ray.init and never see a later change. The server starts on first use.
_S3 = S3Endpoint(free_port())
configure_environment(_S3.port)


@pytest.fixture(scope="session")
def ray_local():
    """One embedded Ray on 127.0.0.1 for the whole session; pipeline.run() reuses it."""
    import ray

    if not ray.is_initialized():
        ray.init(
            address="local", num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1", log_to_driver=False
        )
    from ray.data import DataContext

    DataContext.get_current().enable_progress_bars = False
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory) -> Path:
    """A seeded, content-sensitive mobilenet checkpoint (state_dict file) for the test architecture."""
    return make_checkpoint(tmp_path_factory.mktemp("weights") / f"{TEST_ARCH}-seeded.pt")


@pytest.fixture(scope="session")
def s3_server():
    """A real S3 endpoint: moto's ThreadedMotoServer on 127.0.0.1 and a free port (tests/_s3.py).

    Only the standard AWS variables point clients at it (AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID,
    AWS_SECRET_ACCESS_KEY with the fake values in ``_s3.SECRETS``, AWS_DEFAULT_REGION); they are set
    when this conftest is imported, so Ray workers, subprocesses and the CLI all see them. Yields the
    ``S3Endpoint``: ``.url``, ``.client()`` (boto3), ``.new_bucket()``, ``.upload_dir(local, url)``,
    ``.keys(bucket)``, ``.delete_bucket(bucket)``.
    """
    yield _S3.start()
    clear_s3fs_cache()
    _S3.stop()


@pytest.fixture
def s3_bucket(s3_server):
    """A fresh, empty bucket for one test (its name); deleted afterwards. s3fs's instance cache (and
    with it every cached listing) is cleared before and after, so no test sees another's state."""
    clear_s3fs_cache()
    bucket = s3_server.new_bucket()
    yield bucket
    clear_s3fs_cache()
    s3_server.delete_bucket(bucket)
