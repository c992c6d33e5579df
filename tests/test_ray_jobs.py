"""`segbatch run` as a Ray Job on a real head started with `ray start --head`, submitted with `ray job submit`.

The head gets its own ports, temp dir and process group, so it never meets the session's embedded Ray
(tests/conftest.py) or anyone else's Ray on the machine, and teardown signals only the process it started
(`ray stop` would stop every Ray on the machine).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pyarrow.compute as pc
import pyarrow.dataset as pads
import pytest
import yaml
from PIL import Image

from _helpers import TEST_ARCH, free_port, photo_like

pytestmark = [pytest.mark.slow, pytest.mark.integration]  # a Ray cluster and `ray job submit`

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent  # the venv's `ray` and `segbatch`, as a cluster image would have them
HEAD_START_TIMEOUT = 150  # seconds for the head and its dashboard to come up on a busy 2-core machine
JOB_TIMEOUT = 240  # seconds per job: start a driver, load the model, label a few small images
HEAD_STOP_GRACE = 10  # seconds between SIGTERM and SIGKILL of the head's process group (all its processes are ours)


@pytest.fixture(scope="module")
def ray_head():
    """A single-node Ray cluster (head only, 2 CPUs) on 127.0.0.1; yields its dashboard URL and env."""
    # Ray's unix sockets live under the temp dir, and their paths must stay short (108 bytes).
    temp_dir = tempfile.mkdtemp(prefix="sbjob", dir="/tmp")
    env = {
        **os.environ,
        "RAY_AUTH_MODE": "disabled",
        "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        "RAY_DATA_DISABLE_PROGRESS_BARS": "1",
    }
    env.pop("RAY_ADDRESS", None)
    dashboard = free_port()
    ports = {
        "--port": free_port(),
        "--dashboard-port": dashboard,
        "--ray-client-server-port": free_port(),
        "--dashboard-agent-listen-port": free_port(),
        "--dashboard-agent-grpc-port": free_port(),
        "--runtime-env-agent-port": free_port(),
        "--metrics-export-port": free_port(),
        "--node-manager-port": free_port(),
        "--object-manager-port": free_port(),
    }
    cmd = [
        str(BIN / "ray"),
        "start",
        "--head",
        "--block",
        "--node-ip-address",
        "127.0.0.1",
        "--dashboard-host",
        "127.0.0.1",
        "--include-dashboard",
        "true",
        "--num-cpus",
        "2",
        "--disable-usage-stats",
        "--temp-dir",
        temp_dir,
    ]
    for flag, port in ports.items():
        cmd += [flag, str(port)]
    log = open(Path(temp_dir) / "ray-start.log", "wb")
    # Its own session: teardown signals this process group only, by the id of the process started here.
    head = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    address = f"http://127.0.0.1:{dashboard}"
    try:
        _wait_for_dashboard(address, head, Path(temp_dir) / "ray-start.log")
        yield address, env
    finally:
        _stop(head)
        log.close()
        shutil.rmtree(temp_dir, ignore_errors=True)


def _wait_for_dashboard(address: str, head: subprocess.Popen, log: Path) -> None:
    from ray.job_submission import JobSubmissionClient

    deadline = time.monotonic() + HEAD_START_TIMEOUT
    while True:
        if head.poll() is not None:
            pytest.fail(f"ray start exited with {head.returncode}:\n{log.read_text()[-3000:]}")
        try:
            JobSubmissionClient(address).list_jobs()
            return
        except Exception:
            if time.monotonic() > deadline:
                pytest.fail(
                    f"the Ray head's dashboard at {address} did not answer in {HEAD_START_TIMEOUT}s:\n"
                    f"{log.read_text()[-3000:]}"
                )
            time.sleep(1)


def _stop(head: subprocess.Popen) -> None:
    try:
        os.killpg(head.pid, signal.SIGTERM)
        head.wait(timeout=HEAD_STOP_GRACE)
    except ProcessLookupError:
        return
    except subprocess.TimeoutExpired:
        pass
    try:
        os.killpg(head.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    head.wait(timeout=HEAD_STOP_GRACE)


def job_config(tmp: Path, src: Path, out: Path, checkpoint: Path) -> Path:
    """jobs/label-nightly.yaml with only what a CPU-only test head and test weights need changed."""
    values = yaml.safe_load((REPO / "jobs" / "label-nightly.yaml").read_text())
    values.update(input=str(src), output=str(out), model=TEST_ARCH, weights=str(checkpoint), actors="1", batch_size=4)
    values.pop("gpus_per_actor")  # this head has no GPU: inference falls back to CPU
    path = tmp / "label-nightly-test.yaml"
    path.write_text(yaml.safe_dump(values))
    return path


def submit(address: str, env: dict, submission_id: str, *entrypoint: str) -> str:
    """`ray job submit` from the repo root with jobs/runtime_env.yaml, as README shows; returns its output."""
    cmd = [
        str(BIN / "ray"),
        "job",
        "submit",
        "--address",
        address,
        "--submission-id",
        submission_id,
        "--runtime-env",
        "jobs/runtime_env.yaml",
        "--",
        *entrypoint,
    ]
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=JOB_TIMEOUT)
    from ray.job_submission import JobStatus, JobSubmissionClient

    client = JobSubmissionClient(address)
    status = client.get_job_status(submission_id)
    assert done.returncode == 0 and status == JobStatus.SUCCEEDED, (
        f"job {submission_id}: {status}, exit {done.returncode}\n{done.stdout[-4000:]}\n{done.stderr[-4000:]}"
    )
    return client.get_job_logs(submission_id)


def test_segbatch_run_as_a_ray_job_labels_and_then_only_new_images(ray_head, checkpoint, tmp_path):
    address, env = ray_head
    src, out = tmp_path / "in", tmp_path / "out"
    src.mkdir()
    for i in range(3):
        Image.fromarray(photo_like(64, 48, i)).save(src / f"img{i}.jpg", quality=90)
    config = job_config(tmp_path, src, out, checkpoint)
    entrypoint = ["segbatch", "run", "--config", str(config), "--run-id"]

    logs = submit(address, env, "segbatch-first", *entrypoint, "job-first")
    # Inside a job, segbatch attaches to the cluster (RAY_ADDRESS, set by the job supervisor), never
    # starting a Ray of its own.
    assert "attaching to the Ray cluster" in logs
    assert "3 ok, 0 error, 0 skipped" in logs

    for i in (10, 11):
        Image.fromarray(photo_like(64, 48, i)).save(src / f"new{i}.jpg", quality=90)
    logs = submit(address, env, "segbatch-second", *entrypoint, "job-second")
    assert "2 ok, 0 error, 3 skipped" in logs

    table = pads.dataset(out / "summary", format="parquet").to_table(
        columns=["uri", "status", "run_id", "node_id", "device"]
    )
    second = table.filter(pc.equal(table["run_id"], "job-second"))
    assert sorted(second["uri"].to_pylist()) == [str(src / "new10.jpg"), str(src / "new11.jpg")]
    first = table.filter(pc.equal(table["run_id"], "job-first"))
    assert sorted(first["uri"].to_pylist()) == [str(src / f"img{i}.jpg") for i in range(3)]
    assert set(table["status"].to_pylist()) == {"ok"} and set(table["device"].to_pylist()) == {"cpu"}
    assert len(list((out / "masks").glob("*.png"))) == 5

    # The rows were written by the cluster's own node, the one that ran the jobs' drivers.
    from ray.job_submission import JobSubmissionClient

    driver_node = JobSubmissionClient(address).get_job_info("segbatch-second").driver_node_id
    assert set(table["node_id"].to_pylist()) == {driver_node}
