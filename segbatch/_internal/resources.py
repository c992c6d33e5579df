"""Default sizing: how many inference actors, CPUs and torch threads each, and what decoding keeps.

:func:`plan_pool` is a pure function of the cluster's resources, so the choice is testable without a
cluster; the pipeline calls it with ``ray.cluster_resources()`` and lets every flag the user gave win.

The rule (docs/scaling.md explains it, docs/benchmarks.md has the measurements behind it):

- **No GPU.** Inference takes the cores decoding does not need. Decoding, resizing and PNG-encoding a
  640x480 photo costs ~10 ms of one core against ~160 ms of one core for the smallest model's forward
  pass, so the tasks around the model need about 1/16 of the CPU time; :data:`TASK_SHARE` keeps 1/8 of
  the cores (at least :data:`MIN_TASK_CPUS`) for them. The rest goes to actors of about
  :data:`THREADS_PER_ACTOR` torch threads each: one torch process scales poorly past a few threads,
  several processes with a few threads each do not share a thread barrier.
- **GPUs.** One actor per GPU with :data:`CPUS_PER_GPU_ACTOR` CPU; every other CPU decodes and writes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

TASK_SHARE = 0.125  # of a CPU-only cluster's cores kept for decode and write tasks
MIN_TASK_CPUS = 0.25  # ... and never less than this
MANIFEST_TASK_CPUS = 1.0  # a manifest run's read and group-by tasks each take a whole CPU (Ray Data's default)
THREADS_PER_ACTOR = 4  # torch threads per CPU inference actor, about
CPUS_PER_GPU_ACTOR = 1.0  # a GPU actor's host work (staging, copying masks back) needs one core
MAX_DECODE_CPUS = 1.0  # a decode/write task never reserves more than one CPU

# CPUs a listing read task reserves (segbatch/stages/listing.py). It mostly waits on storage, and all of a
# run's read tasks together (up to listing.MAX_SHARDS_PER_CPU per CPU) must leave room for a decode task
# beside the actors: at 0.05 each, the 7 read tasks of a 2-core run took all 0.25 CPU the actor left, and
# no image was decoded until listing ended (no first row within 45 s at 10^6 inputs).
LIST_TASK_CPUS = 0.01
# Read tasks running at once, per cluster CPU. The reservation above is logical: walking a local tree
# (scandir, stat, Arrow) keeps a core busy, and 7 read tasks at once on 2 cores left decoding a seventh of
# the CPU (the first row came at 35 s for 10^6 inputs against 12 s for 10^3). One running task per 4 CPUs
# still lists ~4,000 names/s each, far ahead of what the CPUs beside it can decode.
LIST_TASKS_RUNNING_PER_CPU = 0.25


def list_tasks_running(cpus: float) -> int:
    """Listing read tasks a run lets run at once on a cluster of ``cpus`` CPUs."""
    return max(1, int(cpus * LIST_TASKS_RUNNING_PER_CPU))


def listing_cpus(cpus: float) -> float:
    """CPUs the running listing read tasks of a cluster of ``cpus`` CPUs reserve."""
    return list_tasks_running(cpus) * LIST_TASK_CPUS


# Default --batch-size. CPU: one image per pass. On the 2-core VM, deeplabv3_mobilenet_v3_large at
# 520x693, channels_last, two threads: 91 ms per image at batch 1, 108 ms at batch 4 (docs/benchmarks.md):
# a larger batch only adds memory traffic on a CPU, and batch 1 needs no shape probing while listing.
# GPU: the rule in gpu_batch_size.
CPU_BATCH_SIZE = 1
# Images per block: a block is what one decode task decodes, and one write task writes (masks, then one
# summary file). Small enough that the first masks appear within seconds of the model being ready, large
# enough that per-task overhead and summary files stay few: on a CPU ~2 s of the smallest model on 2 cores
# (8 passes of ~0.25 s); on a GPU two passes of batch 16.
CPU_BLOCK_ROWS = 8
GPU_BLOCK_ROWS = 32
# The GPU memory one image needs in a forward pass is each model's own (Architecture.gpu_bytes_per_image in
# segbatch/models/architectures.py), halved under bf16/fp16 autocast.
ASSUMED_GPU_BYTES = 16 * 1024**3  # the smallest common datacenter GPU, when the real size is not known
GPU_MEMORY_SHARE = 0.5  # of the device's memory the batch may take; the rest is model, allocator slack
MAX_GPU_BATCH = 64
# Ray labels GPU nodes with an `accelerator_type:<TYPE>` resource; the memory of the common types (the
# smaller variant where a type comes in two sizes).
GPU_MEMORY_GIB = {
    "T4": 16,
    "V100": 16,
    "A10G": 24,
    "L4": 24,
    "A100": 40,
    "L40S": 48,
    "H100": 80,
    "H200": 141,
    "B200": 180,
}


@dataclass(frozen=True)
class PoolPlan:
    actors: int
    cpus_per_actor: float
    threads: int  # torch threads per actor
    gpus_per_actor: float
    decode_cpus: float  # per decode / write task


def plan_pool(cpus: float, gpus: float) -> PoolPlan:
    """The default inference pool for a cluster of ``cpus`` CPUs and ``gpus`` GPUs (see the module doc)."""
    cpus = max(float(cpus), 1.0)
    if gpus >= 1:
        actors = int(gpus)
        per_actor = min(CPUS_PER_GPU_ACTOR, max(0.25, (cpus - MIN_TASK_CPUS) / actors / 2))
        spare = cpus - actors * per_actor
        return PoolPlan(actors, per_actor, max(1, math.floor(per_actor)), 1.0, _decode_cpus(spare - listing_cpus(cpus)))
    tasks = max(MIN_TASK_CPUS, cpus * TASK_SHARE)
    inference = cpus - tasks
    actors = max(1, round(inference / THREADS_PER_ACTOR))
    per_actor = inference / actors
    threads = max(1, math.ceil(per_actor - 1e-6))
    return PoolPlan(actors, round(per_actor, 4), threads, 0.0, _decode_cpus(tasks - listing_cpus(cpus)))


@dataclass(frozen=True)
class Sizing:
    """A run's pool and batch settings: the flags the user gave, :func:`plan_pool` for the rest."""

    min_actors: int
    max_actors: int
    cpus_per_actor: float
    threads: int
    gpus_per_actor: float  # 0: CPU inference
    decode_cpus: float
    batch_size: int
    block_rows: int  # images per decode / write task: a whole number of forward passes


def block_rows(batch_size: int, gpu: bool) -> int:
    """Images per block for ``batch_size`` images per pass: :data:`GPU_BLOCK_ROWS` or :data:`CPU_BLOCK_ROWS`,
    rounded up to whole passes."""
    rows = max(GPU_BLOCK_ROWS if gpu else CPU_BLOCK_ROWS, batch_size)
    return math.ceil(rows / batch_size) * batch_size


def size_for_cluster(
    config, cpus: float, gpus: float, gpu_bytes: int | None = None, node_cpus: float | None = None
) -> Sizing:
    """Fill in what ``config`` (a RunConfig) leaves open for a cluster of ``cpus`` CPUs and ``gpus`` GPUs
    (of ``gpu_bytes`` memory each, when known) whose largest node has ``node_cpus`` CPUs (when known): an
    actor never asks for more than one node holds, or Ray would wait for ever to place it."""
    cpus = max(float(cpus), 1.0)
    gpus_per_actor = config.gpus_per_actor
    if gpus_per_actor is None:
        gpus_per_actor = 1.0 if gpus > 0 else 0.0
    plan = plan_pool(cpus, gpus if gpus_per_actor else 0.0)
    if config.actor_bounds:
        min_actors, max_actors = config.actor_bounds
    elif gpus_per_actor:
        min_actors = max_actors = max(1, int(gpus // gpus_per_actor))
    else:
        min_actors = max_actors = plan.actors
    if config.cpus_per_actor is not None:
        per_actor = float(config.cpus_per_actor)
    elif gpus_per_actor:
        per_actor = min(CPUS_PER_GPU_ACTOR, max(0.25, (cpus - MIN_TASK_CPUS) / max_actors / 2))
    else:
        # A manifest is read and de-duplicated by Ray Data tasks of one CPU each while the pool runs: keep
        # one free, or they never start beside the actors (a deadlock).
        floor = MANIFEST_TASK_CPUS if getattr(config, "manifest", None) else MIN_TASK_CPUS
        inference = cpus - max(floor, cpus * TASK_SHARE)
        per_actor = max(MIN_TASK_CPUS, round(inference / max_actors, 4))
        per_node = node_cpus and max(MIN_TASK_CPUS, node_cpus - max(MIN_TASK_CPUS, node_cpus * TASK_SHARE))
        if per_node and per_actor > per_node and not config.actor_bounds:
            # Nodes smaller than the planned actor: actors of what one node holds less its share for tasks.
            per_actor = round(per_node, 4)
            min_actors = max_actors = max(1, math.floor(inference / per_node + 1e-9))
    # A listed INPUT's read tasks run beside decoding; a manifest's tasks have the CPU kept above.
    listing = 0.0 if getattr(config, "manifest", None) else listing_cpus(cpus)
    decode = (
        config.decode_cpus if config.decode_cpus is not None else _decode_cpus(cpus - max_actors * per_actor - listing)
    )
    batch = config.batch_size or default_batch_size(
        config.model, config.precision, gpus if gpus_per_actor else 0.0, gpu_bytes
    )
    return Sizing(
        min_actors,
        max_actors,
        per_actor,
        max(1, math.ceil(per_actor - 1e-6)),
        float(gpus_per_actor),
        float(decode),
        batch,
        block_rows(batch, gpu=bool(gpus_per_actor)),
    )


def check_fits(size: Sizing, cpus: float, gpus: float, node_cpus: float | None = None) -> None:
    """Refuse (ConfigError, exit 2) a pool the cluster of ``cpus`` CPUs and ``gpus`` GPUs (``node_cpus`` on
    its largest node) cannot hold: Ray would wait forever for actors it cannot place (``--gpus-per-actor 1``
    without a GPU, ``--actors 100`` on 2 CPUs, ``--cpus-per-actor 8`` on nodes of 4). Called right after
    Ray starts, before any work."""
    from segbatch.errors import ConfigError

    for name, value in (("cpus_per_actor", size.cpus_per_actor), ("gpus_per_actor", size.gpus_per_actor)):
        if not 0 <= value < math.inf:
            raise ConfigError(name, f"must be a finite number >= 0, got {value!r}")
    if node_cpus is not None and size.cpus_per_actor > node_cpus + 1e-9:
        raise ConfigError(
            "cpus_per_actor",
            f"an inference actor of {size.cpus_per_actor:g} CPUs fits on no node: the largest has {node_cpus:g}",
            "pass more --actors or a --cpus-per-actor of at most the largest node's CPUs",
        )
    for field, unit, per_actor, have, fix in (
        (
            "gpus_per_actor",
            "GPU",
            size.gpus_per_actor,
            gpus,
            "pass --gpus-per-actor 0 to run on CPUs, lower --actors, or add GPU nodes",
        ),
        ("actors", "CPU", size.cpus_per_actor, cpus, "lower --actors or --cpus-per-actor, or add CPUs"),
    ):
        need = size.min_actors * per_actor
        if need > have + 1e-9:
            raise ConfigError(
                field,
                f"{size.min_actors} inference actor(s) x {per_actor:g} {unit} need {need:g} {unit}s; the cluster has {have:g}",
                fix,
            )
    spare = cpus - size.min_actors * size.cpus_per_actor
    if spare + 1e-9 < size.decode_cpus:  # the actors would start, and decoding would wait for ever
        raise ConfigError(
            "cpus_per_actor",
            f"{size.min_actors} inference actor(s) x {size.cpus_per_actor:g} CPU leave {spare:g} of the cluster's "
            f"{cpus:g} CPUs for decode and write tasks, which need {size.decode_cpus:g} each",
            "lower --cpus-per-actor or --actors, lower --decode-cpus, or add CPUs",
        )


def _decode_cpus(spare: float) -> float:
    """Per-task reservation: two tasks fit in the ``spare`` CPUs (the decode of one block beside the write of
    another), which the callers count after the listing's running read tasks (:func:`listing_cpus`). When
    the read task's 0.01 CPU was left out, one 0.125-CPU task fitted in a 2-core run's 0.25 while listing
    went on, and Ray Data, handed a flood of listed blocks, kept starting decode tasks: a 10^6-input run
    wrote its first row ~4 s after the model was ready, where a 10^3-input run, whose listing had ended,
    wrote it at once."""
    return round(min(MAX_DECODE_CPUS, max(spare / 2, 0.0625)), 4)


def gpu_batch_size(arch: str, precision: str = "fp32", gpu_bytes: int | None = None) -> int:
    """Images per forward pass of model ``arch`` (its registered ``gpu_bytes_per_image``) that fill a GPU: the largest power of two whose activations fit in
    :data:`GPU_MEMORY_SHARE` of its memory (:data:`ASSUMED_GPU_BYTES` when unknown), capped at
    :data:`MAX_GPU_BATCH`."""
    from segbatch.models.architectures import get_architecture

    per_image = get_architecture(arch).gpu_bytes_per_image / (2 if precision in ("bf16", "fp16") else 1)
    fit = int((gpu_bytes or ASSUMED_GPU_BYTES) * GPU_MEMORY_SHARE // per_image)
    return max(1, min(MAX_GPU_BATCH, 2 ** int(math.log2(fit)) if fit >= 1 else 1))


def gpu_bytes_of(resources: dict) -> int | None:
    """The smallest GPU memory among the cluster's known accelerator types, or None when none is known."""
    known = [
        GPU_MEMORY_GIB[k.split(":", 1)[1]]
        for k in resources
        if k.startswith("accelerator_type:") and k.split(":", 1)[1] in GPU_MEMORY_GIB
    ]
    return min(known) * 1024**3 if known else None


def default_batch_size(arch: str, precision: str, gpus: float, gpu_bytes: int | None = None) -> int:
    return gpu_batch_size(arch, precision, gpu_bytes) if gpus >= 1 else CPU_BATCH_SIZE


def auto_rules() -> dict[str, str]:
    """The rule behind each sizing flag's default, in words, from the constants above: what ``--help`` and
    docs/cli.md print after "auto:". tests/test_terminal.py checks them against :func:`size_for_cluster`."""
    tasks = f"{TASK_SHARE:.1%} of the CPUs (at least {MIN_TASK_CPUS:g}; a whole CPU for a manifest run)"
    return {
        "actors": f"one per GPU; without GPUs, one per ~{THREADS_PER_ACTOR} of the CPUs left after {tasks} "
        "is kept for decode and write tasks",
        "cpus_per_actor": f"with GPUs {CPUS_PER_GPU_ACTOR:g} (less on a node with few CPUs); without, the CPUs "
        f"left after {tasks} is kept for decode and write tasks, split among the actors",
        "decode_cpus": f"half the CPUs the actors leave, at most {MAX_DECODE_CPUS:g}",
        "batch_size": f"{CPU_BATCH_SIZE} on CPU; on a GPU the largest power of two whose activations fit in "
        f"{GPU_MEMORY_SHARE:.0%} of its memory ({ASSUMED_GPU_BYTES / 1024**3:g} GiB assumed where Ray does not name "
        f"the GPU type), at most {MAX_GPU_BATCH}",
    }


__all__ = [
    "PoolPlan",
    "Sizing",
    "auto_rules",
    "block_rows",
    "check_fits",
    "default_batch_size",
    "gpu_batch_size",
    "gpu_bytes_of",
    "plan_pool",
    "size_for_cluster",
]
