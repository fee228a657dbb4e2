"""End-to-end tests of the Ray deployment on a real local 3-node cluster (loopback)."""

from __future__ import annotations

import os
import signal
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

import ray  # noqa: E402
from bursts import burst_with_a_failure  # noqa: E402
from local_ray import loopback_cluster  # noqa: E402

from cluster.distributed import deploy  # noqa: E402
from cluster.models import synth  # noqa: E402
from cluster.distributed.client import Client  # noqa: E402
from cluster.errors import (  # noqa: E402
    CacheBudgetError,
    InvalidParameterError,
    OverloadedError,  # noqa: E402
    PromptTooLongError,
    SniperError,
)
from cluster.distributed.protocol import node_name  # noqa: E402

N_NODES = 3


@pytest.fixture(scope="module")
def ray_cluster():
    with loopback_cluster(N_NODES, "sniper") as cluster:
        yield cluster


@pytest.fixture()
def deployment(ray_cluster, tiny_model, tiny_layout, request):
    """A fresh deployment per test, in its own namespace."""
    namespace = f"t-{request.node.name[:40]}".replace("[", "-").replace("]", "")
    knobs = getattr(request, "param", {})
    budget = int(0.4 * tiny_layout.unit_bytes.sum())
    deploy.deploy(str(tiny_model), N_NODES, cache_bytes=budget, namespace=namespace, n_threads=1, n_ctx=512, **knobs)
    yield Client(ray.get_actor("sniper-router", namespace=namespace)), namespace
    deploy.shutdown(namespace)


def test_client_generate_stream_and_status_end_to_end(deployment, tiny_topics):
    client, _ = deployment
    prompt = synth.topic_prompt(tiny_topics, 0, 12, seed=1)
    done = client.generate(prompt, max_tokens=8)
    assert done.text.strip() and done.node.startswith("sniper-node-")
    assert done.usage.completion_tokens == 8 and done.finish_reason == "length"
    assert "".join(client.stream(prompt, max_tokens=8)) == done.text
    status = client.status()
    assert status.policy == "warmth"
    assert sorted(n.name for n in status.nodes) == [node_name(i) for i in range(N_NODES)]
    assert sum(n.served for n in status.nodes) == 2


def test_the_heat_map_is_asked_of_the_nodes_and_their_own_reports_carry_no_heat(deployment, tiny_topics, tiny_layout,
                                                                                 tmp_path):
    from cluster.cli.status_plot import plot_heat
    from cluster.engine.warmth_report import decode

    client, namespace = deployment
    done = client.generate(synth.topic_prompt(tiny_topics, 0, 12, seed=2), max_tokens=8)
    heat = client.heat()
    assert sorted(heat) == [node_name(i) for i in range(N_NODES)]
    assert all(h.shape == (tiny_layout.n_layers, tiny_layout.n_experts) for h in heat.values())
    assert heat[done.node].max() > 0, "the node that served has warm experts"
    report = ray.get(ray.get_actor(done.node, namespace=namespace).report.remote())
    assert decode(report.warmth).heat is None and decode(report.warmth).resident.any()
    plot_heat(heat, str(tmp_path / "heat.png"))
    assert (tmp_path / "heat.png").stat().st_size > 1000


def test_conversations_stay_on_the_node_that_holds_their_state(deployment, tiny_topics):
    client, _ = deployment
    history = {t: "" for t in range(N_NODES)}
    nodes: dict[int, list[str]] = {t: [] for t in range(N_NODES)}
    reused: dict[int, list[int]] = {t: [] for t in range(N_NODES)}
    with ThreadPoolExecutor(N_NODES) as pool:
        for turn in range(3):
            prompts = {t: history[t] + synth.topic_prompt(tiny_topics, t, 12, seed=10 * turn + t) for t in history}
            futures = {t: pool.submit(client.generate, prompts[t], max_tokens=8, session_id=f"c{t}") for t in history}
            for t, future in futures.items():
                done = future.result(timeout=120)
                history[t] = prompts[t] + done.text
                nodes[t].append(done.node)
                reused[t].append(done.usage.reused_prompt_tokens)
    for t in history:
        assert len(set(nodes[t][1:])) == 1 and nodes[t][1] == nodes[t][2], nodes
        assert min(reused[t][1:]) > 8, reused  # the history was not prefilled again


def test_requests_of_a_topic_go_to_the_node_warm_for_it(deployment, tiny_topics):
    """Checked against the nodes' real warmth: the experts each request then selected, and the
    residency every node reported when the router decided (``decision_audit``)."""
    client, _ = deployment
    topics = range(N_NODES)

    def burst(seed: int) -> dict[int, list[str]]:
        served: dict[int, list[str]] = {t: [] for t in topics}
        for round_ in range(3):
            for t in topics:  # one at a time: every node has room, warmth alone decides
                prompt = synth.topic_prompt(tiny_topics, t, 16, seed=seed + 10 * round_ + t)
                served[t].append(client.generate(prompt, max_tokens=6).node)
        return served

    burst(seed=100)  # nodes warm up on what they serve; the router learns the topics' experts
    before = client.status().decision_audit
    served = burst(seed=200)
    after = client.status().decision_audit
    n = after.n - before.n
    assert n == 3 * N_NODES, (before, after)
    warmest = round(after.warmest_share * after.n_choices - (before.warmest_share or 0) * before.n_choices)
    served_cov = (after.served_coverage * after.n - (before.served_coverage or 0) * before.n) / n
    mean_cov = (after.mean_coverage * after.n - (before.mean_coverage or 0) * before.n) / n
    assert warmest >= n - 1, (warmest, n, served)  # the warmest node for the experts it then used, all but once at most
    assert served_cov > mean_cov + 0.1, (served_cov, mean_cov)
    assert all(len(set(nodes)) == 1 for nodes in served.values()), served  # a warm topic stays put
    assert len({nodes[0] for nodes in served.values()}) == N_NODES, served  # idle nodes were not left cold


def test_bad_parameters_get_clear_errors(deployment, tiny_topics):
    client, _ = deployment
    with pytest.raises(InvalidParameterError, match="max_tokens"):
        client.generate("x", max_tokens=0)
    with pytest.raises(InvalidParameterError, match="temperature"):
        client.generate("x", temperature=-1.0)
    with pytest.raises(InvalidParameterError, match="prompt"):
        client.generate("")
    with pytest.raises(PromptTooLongError, match="context"):
        client.generate(synth.topic_prompt(tiny_topics, 0, 600, seed=1), max_tokens=4)
    assert client.generate(synth.topic_prompt(tiny_topics, 1, 8, seed=2), max_tokens=4).text


@pytest.mark.parametrize("deployment", [{"max_queue": 1}], indirect=True)
def test_overload_is_refused_at_once_and_nothing_hangs(deployment, tiny_topics):
    client, _ = deployment
    prompt = synth.topic_prompt(tiny_topics, 2, 12, seed=3)

    def call(i: int) -> str:
        try:
            client.generate(prompt, max_tokens=48, seed=i)
            return "ok"
        except OverloadedError as exc:
            assert "capacity" in str(exc) or "max_queue" in str(exc)
            return "overloaded"

    with ThreadPoolExecutor(12) as pool:
        outcomes = list(pool.map(call, range(12), timeout=180))
    assert outcomes.count("ok") >= N_NODES
    assert outcomes.count("overloaded") >= 1


def test_node_killed_during_a_burst_loses_no_request(deployment, tiny_topics):
    client, namespace = deployment
    prompt = synth.topic_prompt(tiny_topics, 3, 12, seed=4)
    victim = ray.get_actor(node_name(1), namespace=namespace)
    outcomes = burst_with_a_failure(client, prompt, lambda: ray.kill(victim, no_restart=True))
    assert outcomes.count("ok") == len(outcomes)
    deadline = time.monotonic() + 15  # a dead node is noticed on use or after 5 s without reports
    while client.status().node(node_name(1)).alive:
        assert time.monotonic() < deadline, "the router still lists the killed node as alive"
        time.sleep(0.5)


@pytest.mark.parametrize("deployment", [{"policy": "round_robin"}], indirect=True)
def test_a_node_process_killed_during_a_burst_is_restarted_and_serves_again(deployment, tiny_topics):
    """A crash (SIGKILL of the node's process, as the kernel's OOM killer would) loses no request,
    and the node comes back: a new process, counted by the router, cold, taking requests again."""
    client, namespace = deployment
    victim = ray.get_actor(node_name(1), namespace=namespace)
    pid = ray.get(victim.ready.remote(), timeout=30).pid
    prompt = synth.topic_prompt(tiny_topics, 2, 12, seed=7)
    outcomes = burst_with_a_failure(client, prompt, lambda: os.kill(pid, signal.SIGKILL))
    assert outcomes.count("ok") == len(outcomes)
    deadline = time.monotonic() + 120
    while True:
        node = client.status().node(node_name(1))
        if node.alive and node.restarts == 1:
            break
        assert time.monotonic() < deadline, f"the killed node did not come back: {node}"
        time.sleep(0.5)
    assert ray.get(victim.ready.remote(), timeout=60).pid != pid
    served = [client.generate(prompt, max_tokens=4).node for _ in range(N_NODES)]
    assert sorted(served) == [node_name(i) for i in range(N_NODES)]  # round_robin: the new process takes its turn


def test_router_killed_comes_back_and_rebuilds_state_from_reports(deployment, tiny_topics):
    client, namespace = deployment
    prompt = synth.topic_prompt(tiny_topics, 0, 8, seed=5)
    client.generate(prompt, max_tokens=4)
    first_start = client.status().started_at
    ray.kill(ray.get_actor("sniper-router", namespace=namespace), no_restart=False)
    deadline = time.monotonic() + 60
    while True:
        try:
            status = client.status()
            if status.started_at != first_start and len(status.live_nodes()) == N_NODES:
                break
        except (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError):
            pass  # restarting
        assert time.monotonic() < deadline, "the router did not come back with every node"
        time.sleep(0.5)
    while not status.policy_state.affinity_tokens:  # taught back by the nodes, no request needed
        assert time.monotonic() < deadline, f"the restarted router learned no affinity: {status.policy_state}"
        time.sleep(0.5)
        status = client.status()
    assert status.decisions == {}  # nothing was routed by this incarnation: it learned from the nodes' traces
    assert client.generate(prompt, max_tokens=4).text


def test_cli_generate_and_status_against_the_running_deployment(deployment, ray_cluster, tiny_topics):
    import json
    import subprocess
    import sys

    _, namespace = deployment
    common = ["--address", ray_cluster.address, "--namespace", namespace, "--json"]
    env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
    prompt = synth.topic_prompt(tiny_topics, 1, 8, seed=6)
    out = subprocess.run([sys.executable, "-m", "cluster", "generate", prompt, "--max-tokens", "6", *common],
                         capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["text"] and result["usage"]["completion_tokens"] == 6
    out = subprocess.run([sys.executable, "-m", "cluster", "status", *common], capture_output=True, text=True,
                         env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    status = json.loads(out.stdout.strip().splitlines()[-1])
    assert len(status["nodes"]) == N_NODES and sum(n["served"] for n in status["nodes"]) == 1
    bad = subprocess.run([sys.executable, "-m", "cluster", "generate", "x", "--max-tokens", "0", *common],
                         capture_output=True, text=True, env=env, timeout=60)
    assert bad.returncode == 2 and "--max-tokens must be an integer >= 1, got 0" in bad.stderr


def test_a_deployment_that_cannot_start_says_why_and_leaves_nothing_behind(ray_cluster, tiny_model, bad_model_files):
    namespace = "t-cannot-start"
    with pytest.raises(CacheBudgetError, match="largest experts of layer"):  # checked before anything starts
        deploy.deploy(str(tiny_model), N_NODES, cache_bytes=4096, namespace=namespace)
    with pytest.raises(InvalidParameterError, match="max_queue"):
        deploy.deploy(str(tiny_model), N_NODES, cache_bytes=None, namespace=namespace, max_queue=0)
    broken = [str(tiny_model)] * (N_NODES - 1) + [str(bad_model_files["truncated"])]  # one node's copy is damaged
    with pytest.raises(SniperError, match=f"did not start: .*{bad_model_files['truncated'].name}"):
        deploy.deploy(str(tiny_model), N_NODES, cache_bytes=None, namespace=namespace, n_threads=1, n_ctx=512,
                      node_model_paths=broken)
    deadline = time.monotonic() + 30
    for name in ["sniper-router"] + [node_name(i) for i in range(N_NODES)]:
        while True:
            try:
                ray.get_actor(name, namespace=namespace)
            except ValueError:
                break
            assert time.monotonic() < deadline, f"{name} was left behind"
            time.sleep(0.2)
