"""A whole Ray node lost under load, on its own local 3-node cluster (loopback): no request is
lost or hangs, the router stops using the node, and a node joining in its place gets the
node actor back (its placement-group bundle is rescheduled there)."""

from __future__ import annotations

import os
import time

import pytest

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

import ray  # noqa: E402
from bursts import burst_with_a_failure  # noqa: E402
from local_ray import NODE_ARGS, loopback_cluster  # noqa: E402

from cluster.distributed import deploy  # noqa: E402
from cluster.models import synth  # noqa: E402
from cluster.distributed.client import Client  # noqa: E402
from cluster.distributed.protocol import node_name  # noqa: E402
from cluster.distributed.status import NodeStatus  # noqa: E402

N_NODES = 3
NAMESPACE = "node-loss"


@pytest.fixture()
def cluster():
    with loopback_cluster(N_NODES, NAMESPACE) as cluster:
        yield cluster


def _node(client: Client, name: str) -> NodeStatus:
    return client.status().node(name)


def test_a_ray_node_lost_during_a_burst_loses_no_request_and_its_replacement_serves(cluster, tiny_model,
                                                                                      tiny_layout, tiny_topics):
    budget = int(0.4 * tiny_layout.unit_bytes.sum())
    info = deploy.deploy(str(tiny_model), N_NODES, cache_bytes=budget, policy="round_robin", namespace=NAMESPACE,
                         n_threads=1, n_ctx=512)
    client = Client(ray.get_actor("sniper-router", namespace=NAMESPACE))
    try:
        workers = {n.node_id: n for n in cluster.worker_nodes}
        victim = next(r.node for r in info.nodes if r.ray_node_id in workers)  # not the head's
        ray_node = workers[next(r.ray_node_id for r in info.nodes if r.node == victim)]
        router_started = client.status().started_at
        prompt = synth.topic_prompt(tiny_topics, 1, 12, seed=8)
        outcomes = burst_with_a_failure(client, prompt, lambda: cluster.remove_node(ray_node, allow_graceful=False))
        assert outcomes.count("ok") == len(outcomes)
        deadline = time.monotonic() + 30
        while _node(client, victim).alive:
            assert time.monotonic() < deadline, "the router still lists the lost node as alive"
            time.sleep(0.5)
        served = {client.generate(prompt, max_tokens=4).node for _ in range(N_NODES)}
        assert victim not in served and len(served) == N_NODES - 1
        assert client.status().started_at == router_started  # the router lives on the head: it never went away

        cluster.add_node(**NODE_ARGS)  # a machine joins in the lost one's place
        deadline = time.monotonic() + 180
        while not (node := _node(client, victim)).alive:
            assert time.monotonic() < deadline, f"the node actor did not come back on the new node: {node}"
            time.sleep(0.5)
        assert node.restarts == 1
        moved = ray.get(ray.get_actor(victim, namespace=NAMESPACE).ready.remote(), timeout=60).ray_node_id
        assert moved != ray_node.node_id
        served = [client.generate(prompt, max_tokens=4).node for _ in range(N_NODES)]
        assert sorted(served) == [node_name(i) for i in range(N_NODES)]
    finally:
        deploy.shutdown(NAMESPACE)
