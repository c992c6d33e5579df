"""Scale-out on a real multi-node Ray (three raylets on 127.0.0.1, one declared GPU each)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from test_faults import assert_exactly_one_ok_row_each, tiny_images

from segbatch.store import summary

from _helpers import TEST_ARCH, wait_for_masks

pytestmark = [pytest.mark.slow, pytest.mark.integration, pytest.mark.timeout(600)]  # `ray start` clusters
CLUSTER = Path(__file__).with_name("_cluster.py")


class RayCluster:
    def __init__(self, nodes: int, cpus: float = 2, gpus: float = 1):
        self.proc = subprocess.Popen(
            [sys.executable, str(CLUSTER), str(nodes), str(cpus), str(gpus)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
        info = self.read()
        self.address, self.nodes = info["address"], info["nodes"]

    def read(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError("the test cluster process died")
        return json.loads(line)

    def send(self, command: str) -> dict:
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()
        return self.read()

    def close(self) -> None:
        try:
            self.proc.stdin.write("quit\n")
            self.proc.stdin.close()
            self.proc.wait(timeout=60)
        except Exception:
            self.proc.kill()
            self.proc.wait(timeout=30)


@pytest.fixture(scope="module")
def cluster():
    c = RayCluster(nodes=3)
    yield c
    c.close()


def segbatch_run(src: Path, out: Path, address: str, *extra: str) -> subprocess.Popen:
    cmd = [
        sys.executable,
        "-m",
        "segbatch",
        "run",
        str(src),
        str(out),
        "--address",
        address,
        "--model",
        TEST_ARCH,
        "--weights",
        "random",
        "--batch-size",
        "2",
        "--no-progress",
        *extra,
    ]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def test_one_actor_per_declared_gpu_on_every_node(cluster, tmp_path):
    images = tiny_images(tmp_path / "in", 18)
    proc = segbatch_run(tmp_path / "in", tmp_path / "out", cluster.address)
    output, _ = proc.communicate(timeout=500)
    assert proc.returncode == 0, output[-3000:]
    rows = summary.read(str(tmp_path / "out")).to_pylist()
    assert_exactly_one_ok_row_each(rows, {str(p) for p in images})
    assert {r["node_id"] for r in rows} == set(cluster.nodes)  # an actor on each node did inference
    assert {r["device"] for r in rows} == {"cpu"}
    assert "torch sees no CUDA device: running on the CPU" in output


def test_autoscaling_pool_starts_small_and_completes(cluster, tmp_path):
    images = tiny_images(tmp_path / "in", 8)
    proc = segbatch_run(tmp_path / "in", tmp_path / "out", cluster.address, "--actors", "1:3")
    output, _ = proc.communicate(timeout=500)
    assert proc.returncode == 0, output[-3000:]
    assert_exactly_one_ok_row_each(summary.read(str(tmp_path / "out")).to_pylist(), {str(p) for p in images})


def test_a_node_dies_mid_run_and_another_joins(cluster, tmp_path):
    """Kill a worker node once masks appear; a fresh node joins (as an autoscaler would add one).
    Runs last on the module's cluster: it changes the cluster's membership."""
    images = tiny_images(tmp_path / "in", 30)
    out = tmp_path / "out"
    proc = segbatch_run(tmp_path / "in", out, cluster.address)
    wait_for_masks(proc, out, 4, timeout=300)
    removed = cluster.send("remove 2")["removed"]
    added = cluster.send("add")["added"]
    output, _ = proc.communicate(timeout=500)
    assert proc.returncode == 0, output[-3000:]
    rows = summary.read(str(out)).to_pylist()
    assert_exactly_one_ok_row_each(rows, {str(p) for p in images})
    assert removed in cluster.nodes and added not in cluster.nodes
