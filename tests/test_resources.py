"""Default pool, thread and batch choices (segbatch/_internal/resources.py) for CPU-only and GPU clusters."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from segbatch import RunConfig
from segbatch._internal.resources import gpu_batch_size, plan_pool, size_for_cluster
from segbatch.errors import ConfigError


@pytest.mark.parametrize("cpus", [1, 2, 4, 8, 16, 64, 96])
def test_cpu_only_inference_covers_the_cores_decoding_does_not_need(cpus):
    plan = plan_pool(cpus, 0)
    inference = plan.actors * plan.cpus_per_actor
    assert plan.gpus_per_actor == 0
    assert inference >= 0.85 * cpus - 1e-9 if cpus > 1 else inference > 0
    assert cpus - inference >= plan.decode_cpus > 0  # decode and write tasks can always run
    assert plan.threads == max(1, -(-plan.cpus_per_actor // 1))  # one torch thread per CPU held
    assert plan.actors * plan.threads <= cpus  # never more torch threads than cores
    assert plan.threads <= 4


def test_the_two_core_machine_gives_one_actor_both_threads():
    plan = plan_pool(2, 0)
    assert (plan.actors, plan.threads) == (1, 2)
    assert plan.cpus_per_actor == 1.75 and plan.decode_cpus == 0.12  # two beside the read task's 0.01


def test_sixteen_cores_without_a_gpu():
    plan = plan_pool(16, 0)
    assert (plan.actors, plan.threads) == (4, 4)
    assert plan.actors * plan.cpus_per_actor == 14.0 and plan.decode_cpus == 0.98  # 4 read tasks hold 0.04


@pytest.mark.parametrize("cpus,gpus", [(8, 1), (16, 1), (96, 8), (4, 4)])
def test_gpu_clusters_get_one_actor_per_gpu_and_the_rest_decodes(cpus, gpus):
    plan = plan_pool(cpus, gpus)
    assert plan.actors == gpus and plan.gpus_per_actor == 1.0
    assert plan.cpus_per_actor <= 1.0
    assert cpus - plan.actors * plan.cpus_per_actor >= plan.decode_cpus > 0


def test_flags_win_over_the_plan():
    config = RunConfig(actors="3", cpus_per_actor=0.5, decode_cpus=0.25, batch_size=7)
    size = size_for_cluster(config, 16, 0)
    assert (size.min_actors, size.max_actors, size.cpus_per_actor, size.threads) == (3, 3, 0.5, 1)
    assert (size.decode_cpus, size.batch_size) == (0.25, 7)
    # --actors alone: the inference share is split among them
    size = size_for_cluster(RunConfig(actors="2"), 16, 0)
    assert size.max_actors == 2 and size.cpus_per_actor == 7.0 and size.threads == 7


def test_manifest_runs_keep_a_whole_cpu_for_their_read_and_group_by_tasks():
    """Ray Data reads and de-duplicates a manifest with tasks of one CPU each while the pool runs; a pool
    that left less would never let them start (the run would hang)."""
    listed = size_for_cluster(RunConfig(input="in", output="out"), 2, 0)
    manifest = size_for_cluster(RunConfig(manifest="m.txt", output="out"), 2, 0)
    assert listed.cpus_per_actor == 1.75
    assert 2 - manifest.max_actors * manifest.cpus_per_actor >= 1.0
    assert manifest.threads == 1 and manifest.decode_cpus == 0.5
    assert size_for_cluster(RunConfig(manifest="m.txt", output="out"), 16, 0).cpus_per_actor == 3.5  # 1/8 kept anyway


def test_default_batch_size_cpu_and_gpu():
    assert size_for_cluster(RunConfig(model="deeplabv3_mobilenet_v3_large"), 2, 0).batch_size == 1  # CPUs: one per pass
    gpu = size_for_cluster(RunConfig(model="deeplabv3_resnet101"), 16, 1)
    assert gpu.batch_size == gpu_batch_size("deeplabv3_resnet101", "fp32") == 4  # 8 GiB / 1.5 GiB -> 5 -> 4
    assert gpu_batch_size("deeplabv3_resnet101", "bf16", 80 * 1024**3) == 32
    assert gpu_batch_size("deeplabv3_mobilenet_v3_large", "fp32", 80 * 1024**3) == 64
    assert gpu_batch_size("fcn_resnet50", "fp32", 1024**3) == 1


def test_blocks_are_whole_passes_small_on_a_cpu_for_early_masks():
    from segbatch._internal.resources import CPU_BLOCK_ROWS, GPU_BLOCK_ROWS, block_rows

    assert size_for_cluster(RunConfig(model="deeplabv3_mobilenet_v3_large"), 2, 0).block_rows == CPU_BLOCK_ROWS == 8
    assert size_for_cluster(RunConfig(model="deeplabv3_mobilenet_v3_large"), 16, 1).block_rows == GPU_BLOCK_ROWS == 32
    assert block_rows(3, gpu=False) == 9  # rounded up to whole passes of 3
    assert block_rows(64, gpu=True) == 64  # one pass, never less


def test_gpu_memory_from_ray_accelerator_labels():
    from segbatch._internal.resources import gpu_bytes_of

    assert gpu_bytes_of({"CPU": 16, "GPU": 1, "accelerator_type:H100": 1}) == 80 * 1024**3
    assert gpu_bytes_of({"CPU": 16, "GPU": 2, "accelerator_type:T4": 1, "accelerator_type:L4": 1}) == 16 * 1024**3
    assert gpu_bytes_of({"CPU": 16, "GPU": 1}) is None
    size = size_for_cluster(RunConfig(model="deeplabv3_resnet101"), 16, 1, gpu_bytes_of({"accelerator_type:H100": 1}))
    assert size.batch_size == 16  # 40 GiB / 1.5 GiB -> 26 -> 16


def test_a_simulated_sixteen_core_cluster(tmp_path):
    """The pipeline reads the plan off a real Ray's resources: one started with num_cpus=16 on this machine."""
    code = (
        "import json, ray\n"
        "ray.init(address='local', num_cpus=16, include_dashboard=False, _node_ip_address='127.0.0.1')\n"
        "from segbatch import RunConfig\n"
        "from segbatch.pipeline import sizing\n"
        "s = sizing(RunConfig(model='deeplabv3_mobilenet_v3_large'))\n"
        "print(json.dumps(s.__dict__))\n"
        "ray.shutdown()\n"
    )
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env=env,
        timeout=180,
        cwd=os.path.dirname(os.path.dirname(__file__)),
    )
    assert out.returncode == 0, out.stderr[-2000:]
    size = json.loads(out.stdout.strip().splitlines()[-1])
    assert (size["max_actors"], size["threads"], size["cpus_per_actor"], size["gpus_per_actor"]) == (4, 4, 3.5, 0.0)
    assert size["decode_cpus"] == 0.98 and size["batch_size"] == 1  # beside 4 read tasks of 0.01


# -- issue 22 items 9 and 11: a pool the cluster cannot hold is refused, never waited for ----------------
@pytest.mark.parametrize("cpus", [1, 2, 4, 16, 96])
@pytest.mark.parametrize("gpus", [0, 1, 8])
@pytest.mark.parametrize("manifest", [None, "m.txt"])
def test_the_default_pool_always_fits(cpus, gpus, manifest):
    from segbatch._internal.resources import check_fits

    if cpus < 2 * gpus:
        pytest.skip("a GPU actor needs at least a quarter CPU, and decoding some: no real cluster is this thin")
    config = RunConfig(input="" if manifest else "in", manifest=manifest, output="out")
    check_fits(size_for_cluster(config, cpus, gpus), cpus, gpus)


@pytest.mark.parametrize(
    "flags,cpus,gpus,field",
    [
        ({"gpus_per_actor": 1.0}, 2, 0, "gpus_per_actor"),
        ({"gpus_per_actor": 0.5, "actors": "4"}, 16, 1, "gpus_per_actor"),
        ({"actors": "100"}, 2, 0, "actors"),
        ({"cpus_per_actor": 3.0}, 2, 0, "actors"),
        ({"decode_cpus": 64.0}, 2, 0, "cpus_per_actor"),
        ({"actors": "2", "cpus_per_actor": 1.0}, 2, 0, "cpus_per_actor"),
    ],
)
def test_a_pool_that_cannot_be_placed_is_refused(flags, cpus, gpus, field):
    from segbatch._internal.resources import check_fits
    from segbatch.errors import ConfigError

    size = size_for_cluster(RunConfig(input="in", output="out", **flags), cpus, gpus)
    with pytest.raises(ConfigError) as err:
        check_fits(size, cpus, gpus)
    has = gpus if field == "gpus_per_actor" else cpus
    assert err.value.field == field
    assert f"the cluster has {has}" in str(err.value) or f"of the cluster's {has} CPUs" in str(err.value)


def test_gpus_per_actor_0_means_cpu_inference_even_with_gpus():
    size = size_for_cluster(RunConfig(input="in", output="out", gpus_per_actor=0.0), 16, 2)
    assert size.gpus_per_actor == 0 and size.max_actors == plan_pool(16, 0).actors


@pytest.mark.parametrize("field", ["cpus_per_actor", "gpus_per_actor", "decode_cpus"])
@pytest.mark.parametrize("value", [float("inf"), float("nan"), -1.0])
def test_infinite_or_negative_resources_are_refused_before_ray_starts(field, value):
    from segbatch.errors import ConfigError

    with pytest.raises(ConfigError) as err:
        RunConfig(input="in", output="out", **{field: value})
    assert err.value.field == field


def test_gpu_batch_size_reads_the_models_own_entry_not_its_name(monkeypatch):
    """A model whose name says nothing of its backbone is sized by its registry entry."""
    from segbatch.models.architectures import MODELS, Architecture

    monkeypatch.setitem(MODELS._entries, "tiny_segnet", Architecture("tiny_segnet", "head", gpu_bytes_per_image=2**20))
    assert gpu_batch_size("tiny_segnet", "fp32", 80 * 1024**3) == 64  # 40 GiB / 1 MiB: capped
    assert gpu_batch_size("tiny_segnet", "fp32", 8 * 2**20) == 4  # 4 MiB / 1 MiB
    with pytest.raises(ConfigError, match="valid models"):
        gpu_batch_size("not_registered", "fp32")


def test_actors_fit_on_one_node_of_a_cluster_of_small_nodes():
    """Two 1-CPU nodes: the 1.75-CPU actor planned from the cluster's total fits on neither (Ray would
    wait for ever); the plan gives one actor per node of what a node holds less its share for tasks."""
    from segbatch._internal.resources import check_fits

    small = size_for_cluster(RunConfig(), 2, 0, node_cpus=1)
    assert (small.max_actors, small.cpus_per_actor) == (2, 0.75)
    assert small.cpus_per_actor + small.decode_cpus <= 1  # a decode task still fits beside each actor
    check_fits(small, 2, 0, node_cpus=1)
    assert size_for_cluster(RunConfig(), 2, 0, node_cpus=2) == size_for_cluster(RunConfig(), 2, 0)
    assert size_for_cluster(RunConfig(), 64, 0, node_cpus=16) == size_for_cluster(RunConfig(), 64, 0)


def test_an_actor_larger_than_every_node_is_refused():
    from segbatch._internal.resources import check_fits

    size = size_for_cluster(RunConfig(cpus_per_actor=3.0, actors="1"), 4, 0, node_cpus=2)
    with pytest.raises(ConfigError, match="fits on no node: the largest has 2"):
        check_fits(size, 4, 0, node_cpus=2)
