"""Local multi-node Ray clusters on loopback for the tests (``ray.cluster_utils.Cluster``)."""

from __future__ import annotations

import contextlib
import os
from typing import Iterator

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # Ray binds to 127.0.0.1 (DESIGN.md)

import ray  # noqa: E402
from ray.cluster_utils import Cluster  # noqa: E402

NODE_ARGS = {"num_cpus": 2, "node_ip_address": "127.0.0.1"}


@contextlib.contextmanager
def loopback_cluster(n_nodes: int, namespace: str) -> Iterator[Cluster]:
    """``n_nodes`` Ray nodes (a head and workers, 2 CPUs each) with this process connected."""
    cluster = Cluster(initialize_head=True, head_node_args={**NODE_ARGS, "include_dashboard": False})
    try:
        for _ in range(n_nodes - 1):
            cluster.add_node(**NODE_ARGS)
        cluster.wait_for_nodes()
        ray.init(address=cluster.address, namespace=namespace, logging_level="ERROR", log_to_driver=False)
        yield cluster
    finally:
        ray.shutdown()
        cluster.shutdown()
