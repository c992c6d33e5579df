"""Fixtures: one shared local Ray for the session, seeded weights, and test images."""

from __future__ import annotations

import functools
import inspect
import os
import re
from pathlib import Path

import pytest

# Every Ray started by the tests (this process's, and `ray start` in subprocesses) agrees on auth.
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
# Ray then uses 127.0.0.1 as its node address (it otherwise maps loopback to the host's address), so the
# tests' Ray talks over loopback only. Set before anything imports ray.
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

from _helpers import TEST_ARCH, make_checkpoint  # noqa: E402

# `make test-fast` leaves out tests marked integration: they start Ray, an S3 server, a browser or a
# segbatch process. The mark is derived, not kept by hand:
# - a test that uses one of these fixtures, directly or through other fixtures (item.fixturenames is the
#   whole closure, so a module's own fixture built on ray_local counts);
# - a test whose own code, or one of its fixtures' code, starts a process or a run: subprocess calls,
#   sys.executable, multiprocessing, ray.init, or an in-process `run(...)` / `main(["run", ...])` (which
#   starts Ray, in the background even when a check then refuses the run);
# - a module or test that starts one less visibly (through a helper) says so with
#   `pytestmark = pytest.mark.integration` or `@pytest.mark.integration`.
_INTEGRATION_FIXTURES = {"ray_local", "s3_server", "s3_bucket"}
_STARTS_A_PROCESS = re.compile(
    r"subprocess\.(Popen|run|call|check_call|check_output)\(|sys\.executable|\bray\.init\(|\.Process\("
    r"|(?<![.\w])run\(\s*(RunConfig|config|cfg)\b"
)
_CLI_RUN = (re.compile(r"\bmain\("), re.compile(r"\[\s*\"run\"\s*,"))  # cli.main(["run", ...]): a run, so Ray


@functools.cache
def _starts_a_process(func) -> bool:
    try:
        source = inspect.getsource(func)
    except (OSError, TypeError):
        return False
    return bool(_STARTS_A_PROCESS.search(source)) or all(p.search(source) for p in _CLI_RUN)


def _is_integration(item) -> bool:
    if _INTEGRATION_FIXTURES & set(item.fixturenames):
        return True
    funcs = [getattr(item, "function", None)]
    info = getattr(item, "_fixtureinfo", None)
    for defs in info.name2fixturedefs.values() if info else ():
        funcs += [
            d.func for d in defs if not getattr(d.func, "__module__", "_pytest").startswith(("_pytest", "pytest"))
        ]
    return any(f is not None and _starts_a_process(f) for f in funcs)


def pytest_collection_modifyitems(config, items):
    for item in items:
        if _is_integration(item):
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
