"""A local multi-node Ray cluster on loopback that outlives the command that started it.

``ray start --address`` cannot add a node on 127.0.0.1 while RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0
(and with it set to 1 Ray swaps 127.0.0.1 for the machine's outward address), so local
clusters use ``ray.cluster_utils.Cluster`` inside a small daemon process:
``python -m cluster.local_cluster N STATE.json [CPUS [DASHBOARD_PORT]]`` starts N nodes (the head
with Ray's dashboard and job server on 127.0.0.1:DASHBOARD_PORT, for ``ray job submit``; 0: none),
writes ``{"address", "dashboard", "pid"}`` to STATE.json and keeps them up until it receives
SIGTERM or SIGINT.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import threading


def main(argv: list[str]) -> int:
    n_nodes, state_path = int(argv[0]), argv[1]
    cpus = int(argv[2]) if len(argv) > 2 else 2
    dashboard_port = int(argv[3]) if len(argv) > 3 else 0
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    # job entrypoints (`ray job submit -- python ...`) run with the interpreter this cluster runs
    os.environ["PATH"] = os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", "")
    from ray.cluster_utils import Cluster

    head: dict[str, object] = {"num_cpus": cpus, "node_ip_address": "127.0.0.1", "include_dashboard": bool(dashboard_port)}
    if dashboard_port:
        head.update(dashboard_host="127.0.0.1", dashboard_port=dashboard_port)
    cluster = Cluster(initialize_head=True, head_node_args=head)
    for _ in range(n_nodes - 1):
        cluster.add_node(num_cpus=cpus, node_ip_address="127.0.0.1")
    cluster.wait_for_nodes()
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    tmp = state_path + ".tmp"
    with open(tmp, "w") as f:
        json.dump({"address": cluster.address, "pid": os.getpid(), "n_nodes": n_nodes,
                   "dashboard": f"http://127.0.0.1:{dashboard_port}" if dashboard_port else None}, f)
    os.replace(tmp, state_path)
    stop.wait()
    cluster.shutdown()
    if os.path.exists(state_path):
        os.unlink(state_path)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
