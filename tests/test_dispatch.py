"""The router decides and steps aside: streams go node -> caller, survive the router, and cost it
the same per request whatever their length; callers that vanish leak nothing (a real local cluster)."""

from __future__ import annotations

import os
import time

import pytest

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

import ray  # noqa: E402
from local_ray import loopback_cluster  # noqa: E402

from cluster.distributed import deploy  # noqa: E402
from cluster.models import synth  # noqa: E402
from cluster.distributed.client import Client  # noqa: E402
from cluster.errors import RouterUnavailableError  # noqa: E402
from cluster.distributed.protocol import ROUTER_NAME  # noqa: E402
from cluster.distributed.status import RouterStatus  # noqa: E402

N_NODES = 2
NAMESPACE = "t-dispatch"


@pytest.fixture(scope="module")
def deployment(tiny_model, tiny_layout):
    with loopback_cluster(N_NODES, NAMESPACE):
        try:
            deploy.deploy(str(tiny_model), N_NODES, cache_bytes=int(0.5 * tiny_layout.unit_bytes.sum()),
                          namespace=NAMESPACE, n_threads=1, n_ctx=1024)
            yield Client(namespace=NAMESPACE)
        finally:
            deploy.shutdown(NAMESPACE)


def _router_status() -> RouterStatus:
    return ray.get(ray.get_actor(ROUTER_NAME, namespace=NAMESPACE).status.remote(), timeout=60)


def test_router_work_per_request_does_not_grow_with_the_tokens_generated(deployment, tiny_topics):
    client = deployment
    prompt = synth.topic_prompt(tiny_topics, 0, 8, seed=1)
    costs = {}
    for max_tokens in (16, 512):
        before = _router_status()
        for _ in range(3):
            done = client.generate(prompt, max_tokens=max_tokens, temperature=0.0)
            assert done.usage.completion_tokens == max_tokens
        after = _router_status()
        assert after.n_routes - before.n_routes == 3, "one route call per request, nothing per token"
        costs[max_tokens] = (after.route_s - before.route_s) / 3
    assert costs[512] <= 1.5 * costs[16] + 0.002, costs  # decision time is per request (±noise), not per token


def test_a_finished_request_frees_its_node_before_the_callers_next_ask(deployment, tiny_topics):
    """The caller tells the router a request ended ahead of its next call on the same handle, so a
    conversation's next turn never finds its node still counted busy (the node's report may lag)."""
    client = deployment
    for turn in range(5):
        client.generate(synth.topic_prompt(tiny_topics, turn % 3, 8, seed=20 + turn), max_tokens=4)
        assert all(n.load == 0 for n in client.status().nodes), client.status().nodes


def test_a_stream_survives_the_router_being_killed_mid_stream(deployment, tiny_topics):
    client = deployment
    prompt = synth.topic_prompt(tiny_topics, 1, 8, seed=2)
    want = client.generate(prompt, max_tokens=256, temperature=0.0).text
    pieces, killed = [], False
    for piece in client.stream(prompt, max_tokens=256, temperature=0.0):
        pieces.append(piece)
        if len(pieces) == 3 and not killed:
            ray.kill(ray.get_actor(ROUTER_NAME, namespace=NAMESPACE), no_restart=False)  # restarts, state rebuilt
            killed = True
    assert killed and "".join(pieces) == want
    assert client.generate(prompt, max_tokens=256, temperature=0.0).text == want  # the restarted router routes again


def test_a_caller_that_goes_away_leaks_no_in_flight_count(deployment, tiny_topics):
    client = deployment
    prompt = synth.topic_prompt(tiny_topics, 2, 8, seed=3)
    stream = client.stream(prompt, max_tokens=512, temperature=0.0)
    next(stream)
    next(stream)
    stream.close()  # cancels on the node; the node's end-of-request report settles the router's count
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if all(n.load == 0 for n in _router_status().nodes):
            break
        time.sleep(0.2)
    assert all(n.load == 0 for n in _router_status().nodes), _router_status().nodes


def test_a_router_gone_for_good_is_a_typed_error_not_a_hang(deployment, tiny_topics, tiny_model, tiny_layout):
    impatient = Client(namespace=NAMESPACE, router_wait_s=3.0)
    ray.kill(ray.get_actor(ROUTER_NAME, namespace=NAMESPACE), no_restart=True)
    started = time.monotonic()
    with pytest.raises(RouterUnavailableError, match="did not answer within 3 s"):
        impatient.generate(synth.topic_prompt(tiny_topics, 0, 4, seed=4), max_tokens=4)
    assert time.monotonic() - started < 30

