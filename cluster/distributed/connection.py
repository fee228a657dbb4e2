"""Joining a Ray cluster: the local one ``cluster.distributed.local_cluster`` started, an address, or Ray's own.

An address nobody answers at is refused in one line (``ray.init`` would wait for minutes), and
Ray is kept on loopback for local clusters (DESIGN.md, "Running Ray on these machines").
"""

from __future__ import annotations

import os

from cluster.distributed import local_cluster
from cluster.errors import SniperError
from cluster.distributed.protocol import NAMESPACE

RAY_CURRENT_CLUSTER = "/tmp/ray/ray_current_cluster"  # where `ray start` / ray.init record the last cluster's address


def resolve_address(address: str | None) -> str:
    """The GCS address to join: ``address``; else the running local cluster; else $RAY_ADDRESS; else
    the cluster Ray last started on this machine. It must answer, or this says so in one line
    (ray.init would wait for minutes on an address nobody listens at)."""
    where = "--address"
    if address is None:
        running = local_cluster.state()
        if running is not None:
            address, where = running.address, f"the local cluster ({local_cluster.STATE_FILE})"
        elif os.environ.get("RAY_ADDRESS"):
            address, where = os.environ["RAY_ADDRESS"], "$RAY_ADDRESS"
        elif os.path.exists(RAY_CURRENT_CLUSTER):
            with open(RAY_CURRENT_CLUSTER) as f:
                address, where = f.read().strip(), RAY_CURRENT_CLUSTER
        else:
            raise SniperError("no Ray cluster is running here; start one with: python -m cluster serve --local-nodes N")
    bare = address.removeprefix("ray://").removeprefix("http://")
    if ":" not in bare or not local_cluster.answers(bare):
        raise SniperError(f"no Ray cluster answers at {address} (from {where}); start one with: "
                          f"python -m cluster serve --local-nodes N")
    return address


def connect(address: str | None = None, namespace: str = NAMESPACE, *, log_to_driver: bool = False) -> None:
    """Joins the Ray cluster at ``address`` (``resolve_address``), unless this process already has.
    ``log_to_driver``: what this process's actors print reaches its standard error, prefixed by
    Ray with the actor (``serve`` shows its nodes' start-up phases so); otherwise it stays in
    Ray's log files."""
    import ray

    if ray.is_initialized():
        return
    address = resolve_address(address)
    from ray._private import ray_constants

    if address.startswith("127.") and ray_constants.ENABLE_RAY_CLUSTER:
        raise SniperError("ray was imported with RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER unset or 1, so it would "
                          "replace 127.0.0.1 by this machine's outward address; import cluster before ray "
                          "or set RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0")
    ray.init(address=address, namespace=namespace, logging_level="ERROR", log_to_driver=log_to_driver)
