"""A real multi-node Ray on 127.0.0.1, in its own process, driven over stdin (tests only).

    python tests/_cluster.py NODES CPUS GPUS
prints one JSON line {"address": ..., "nodes": [node ids]} once every node is up, then reads commands:
``remove I`` stops node I (a worker node dies), ``add`` starts one more node (a node joins), ``quit``.
Each node is a separate raylet with its own workers; the GPUs are declared, not real, so actors fall back
to the CPU. Ray's loopback-only mode (RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0) keeps every node on 127.0.0.1.
"""

from __future__ import annotations

import json
import os
import sys

os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
os.environ.setdefault("RAY_AUTH_MODE", "disabled")

from ray.cluster_utils import Cluster  # noqa: E402


def main() -> None:
    n, cpus, gpus = int(sys.argv[1]), float(sys.argv[2]), float(sys.argv[3])
    args = {"num_cpus": cpus, "num_gpus": gpus, "object_store_memory": 150 * 1024 * 1024}
    cluster = Cluster(initialize_head=True, head_node_args={**args, "include_dashboard": False})
    nodes = [cluster.head_node] + [cluster.add_node(**args) for _ in range(n - 1)]
    cluster.wait_for_nodes()

    def say(**msg):
        print(json.dumps(msg), flush=True)

    say(address=cluster.address, nodes=[node.node_id for node in nodes])
    for line in sys.stdin:
        cmd = line.split()
        if not cmd or cmd[0] == "quit":
            break
        if cmd[0] == "remove":
            node = nodes[int(cmd[1])]
            cluster.remove_node(node, allow_graceful=False)
            say(removed=node.node_id)
        elif cmd[0] == "add":
            node = cluster.add_node(**args)
            nodes.append(node)
            cluster.wait_for_nodes()
            say(added=node.node_id)
    cluster.shutdown()


if __name__ == "__main__":
    main()
