"""The data path's own ceiling: segbatch's stages with the model replaced by a stand-in.

    python benchmarks/data_path.py bench-data/jpeg640 --batch-size 16 --pass-seconds 0
    python benchmarks/data_path.py bench-data/jpeg640 --batch-size 16 --pass-seconds 0.05 --address 127.0.0.1:6379
    python benchmarks/data_path.py bench-data/jpeg640 --batch-size 16 --nodes 2 --node-cpus 1

The stand-in returns all-zero masks of each image's displayed size after ``--pass-seconds`` per forward
pass (0: a model that costs nothing; 0.05 at batch 16: a GPU labelling 320 images/s). Everything else is
the real run, assembled by ``segbatch.pipeline.build_dataset``: listing read tasks, decode tasks, the actor
pool, write tasks, summary files. Without ``--address`` an embedded one-node Ray is used; give the address of
a running cluster to measure more nodes, or ``--nodes N``: N raylets on 127.0.0.1, each a node with its own
workers and object store (``ray.cluster_utils.Cluster``, as the multi-node tests use), ``--node-cpus`` each.

It prints images/s end to end and per decode CPU, forward passes, and, from Ray Data's own statistics, the
tasks and bytes of each stage: which process count carries the image bytes, and how many bytes each image
costs at each hand-off.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import tempfile
import time

import numpy as np

from segbatch import pipeline
from segbatch._internal import _ray
from segbatch.config import RunConfig
from segbatch.models import weights

ARCH = "deeplabv3_mobilenet_v3_large"  # only its resize (520 px shorter side) and 21 classes matter here


class StandInPredictor:
    """Predictor's interface (segbatch.stages.model.Predictor) at a fixed cost per forward pass."""

    min_confidence = None

    def __init__(self, pass_seconds: float, num_classes: int):
        import torch

        self.device = torch.device("cpu")
        self.pass_seconds = pass_seconds
        self.num_classes = num_classes

    def stage(self, images):
        return images

    def masks(self, images, sizes):
        from segbatch.stages.model import Labelled

        if self.pass_seconds:
            time.sleep(self.pass_seconds)
        out = []
        for h, w in sizes:
            counts = np.zeros(self.num_classes, np.int64)
            counts[0] = h * w
            out.append(Labelled(np.zeros((h, w), np.uint8), counts))
        return out


STAT_LINE = re.compile(r"^Operator \d+ (?P<op>[^:]+): (?P<tasks>\d+) tasks executed, (?P<blocks>\d+) blocks produced")


def stage_summary(stats: str) -> list[str]:
    """The per-operator lines of Ray Data's stats that say how many tasks ran and what they output."""
    keep = []
    for line in stats.splitlines():
        text = line.strip()
        if STAT_LINE.match(text) or text.startswith(("* Output num rows", "* Output size bytes", "* Remote wall time")):
            keep.append(text)
    return keep


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("input", help="a folder of images (benchmarks/bench_data.py makes one)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--pass-seconds", type=float, default=0.0, help="stand-in cost per forward pass")
    parser.add_argument("--address", help="a running Ray cluster (default: an embedded one-node Ray)")
    parser.add_argument("--actors", type=int, help="stand-in actors (default: segbatch's own sizing)")
    parser.add_argument("--nodes", type=int, help="start this many local nodes on 127.0.0.1 and run on them")
    parser.add_argument("--node-cpus", type=float, default=1.0, help="--nodes: CPUs of each node (default 1)")
    args = parser.parse_args()
    cluster = None
    if args.nodes:
        os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"  # every node on loopback
        from ray.cluster_utils import Cluster

        node_args = {"num_cpus": args.node_cpus, "object_store_memory": 512 * 1024 * 1024}
        cluster = Cluster(initialize_head=True, head_node_args={**node_args, "include_dashboard": False})
        for _ in range(args.nodes - 1):
            cluster.add_node(**node_args)
        cluster.wait_for_nodes()
        args.address = cluster.address

    out = tempfile.mkdtemp(prefix="segbatch-datapath-")
    try:
        config = RunConfig(
            input=args.input,
            output=out,
            model=ARCH,
            weights="random",
            batch_size=args.batch_size,
            progress=False,
            actors=str(args.actors) if args.actors else None,
        )
        spec = weights.resolve(ARCH, "random")
        run_id = pipeline.new_run_id()
        inputs = pipeline.plan_inputs(config, run_id=run_id)
        report = pipeline.RunReport(run_id=run_id, output=out)
        with _ray.session(args.address):
            import ray
            from ray.data import DataContext

            context = DataContext.get_current()
            context.enable_progress_bars = False
            context.target_max_block_size = pipeline.STREAM_BLOCK_BYTES
            size = pipeline.sizing(config)
            predictor = StandInPredictor(args.pass_seconds, spec.num_classes)
            started = time.perf_counter()
            ds = pipeline.build_dataset(config, spec, inputs, run_id, predictor=predictor, size=size)
            first = None
            for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
                first = first or time.perf_counter() - started
                pipeline._count_rows(report, batch)
            seconds = time.perf_counter() - started
            nodes = len([n for n in ray.nodes() if n["Alive"]])
            cpus = _ray.cluster_cpus()
            stats = ds.stats()
        images = report.ok + report.errors
        print(f"cluster: {nodes} node(s), {cpus:g} CPUs; load {os.getloadavg()[0]:.2f}")
        print(
            f"sizing: {size.max_actors} actor(s) x {size.cpus_per_actor:g} CPU, decode/write tasks "
            f"{size.decode_cpus:g} CPU, batch {size.batch_size}; stand-in {args.pass_seconds * 1000:.0f} ms per pass"
        )
        print(
            f"{images} images ({report.errors} errors) in {seconds:.1f} s: {images / seconds:.1f} images/s; "
            f"first row after {first or 0:.1f} s"
        )
        spare = max(cpus - size.max_actors * size.cpus_per_actor, size.decode_cpus)
        print(f"per CPU left to decode and write: {images / seconds / spare:.1f} images/s/CPU ({spare:g} CPUs)")
        print(f"forward passes: {report.forward_passes} ({report.images_per_forward_pass:.1f} images per pass)")
        print("Ray Data, per stage:")
        for line in stage_summary(stats):
            print("  " + line)
    finally:
        shutil.rmtree(out, ignore_errors=True)
        if cluster is not None:
            cluster.shutdown()


if __name__ == "__main__":
    main()
