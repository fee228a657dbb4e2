"""A benchmark's own local Ray cluster: ``local_ray(n_nodes, namespace)`` starts one (a node per
simulated machine, one CPU each, on loopback), connects this process to it, and on the way out
removes the deployment in ``namespace``, the connection and the cluster, whatever happened."""

from __future__ import annotations

import contextlib
import os
import tempfile
from typing import Iterator

from cluster.distributed import local_cluster


@contextlib.contextmanager
def local_ray(n_nodes: int, namespace: str) -> Iterator[str]:
    """Yields the cluster's state file (``local_cluster.state`` reads its nodes) with this process
    connected to it in ``namespace``."""
    import ray

    from cluster.distributed import deploy

    with tempfile.TemporaryDirectory(prefix=f"{namespace}-") as tmp:
        state_file = os.path.join(tmp, "local-cluster.json")
        address = local_cluster.start(n_nodes, cpus_per_node=1, dashboard_port=0, state_file=state_file)
        try:
            ray.init(address=address, namespace=namespace, logging_level="ERROR")
            yield state_file
        finally:
            try:
                deploy.shutdown(namespace)
            finally:
                ray.shutdown()
                local_cluster.stop(state_file=state_file)
