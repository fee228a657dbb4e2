"""``python -m cluster bench routing``: routing policies compared on a real local Ray cluster.

Every figure in the report comes from this run:
  * live comparison — for each policy, a fresh Ray cluster of N nodes on 127.0.0.1
    (``ray.cluster_utils.Cluster``), the deployment (router + one node actor per Ray node,
    ``cluster.distributed.deploy``), then the same workload (``cluster.bench.workload``: same
    conversations, same arrival times) sent concurrently from this process with
    ``Client.aevents``. A conversation's next turn is sent at its arrival time or when its
    previous turn finished, whichever is later (with ``--concurrency C``, a closed loop instead:
    C clients, each taking the next conversation and sending its turns back to back, arrival
    times ignored), and carries the conversation so far — the
    earlier prompts and the answers this deployment gave. The cluster is torn down after
    each policy. Expert bytes read come from the nodes' cache counters (``Client.status``)
    and the per-request cache counters (``Completion.cache``). With ``--kill-node-after S``
    the last node actor's process is killed (SIGKILL) S seconds into every policy's run
    (``NodeCrash``): the report then says what the failure cost.
  * decision cost — ``cluster.bench.decision_cost``: what one routing decision costs the router.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import tempfile
import threading
import time
from collections import Counter
from dataclasses import asdict
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"  # Ray on loopback (DESIGN.md); read when ray is imported

from cluster.bench import command_line, log_progress, out_flag, percentile
from cluster.bench.decision_cost import run_decision_cost  # noqa: E402
from cluster.bench.workload import Workload, conversation_prompt, for_model  # noqa: E402
from cluster.distributed.protocol import NodeReady  # noqa: E402
from cluster.distributed.status import RouterStatus  # noqa: E402

DEFAULT_POLICIES = ("warmth", "least_loaded", "round_robin")
REQUEST_TIMEOUT_S = 300.0



# -- a local Ray cluster -------------------------------------------------------------------

class LocalRayCluster:
    """N Ray nodes on 127.0.0.1 in this machine (``ray.cluster_utils.Cluster``), torn down on exit.

    Only the processes this object started are stopped (never ``ray stop``, which would end
    every Ray cluster on the machine). Ray records the newest cluster's address for
    ``ray.init(address="auto")``; the previous record is put back, so other clusters on the
    machine keep being found.
    """

    def __init__(self, n_nodes: int, *, cpus_per_node: int = 1, object_store_bytes: int = 80 << 20) -> None:
        if n_nodes < 1:
            raise ValueError(f"n_nodes must be >= 1, got {n_nodes}")
        self.n_nodes = n_nodes
        self.cpus_per_node = cpus_per_node
        self.object_store_bytes = object_store_bytes
        self._cluster: Any = None

    @property
    def address(self) -> str:
        return self._cluster.address

    def __enter__(self) -> "LocalRayCluster":
        from ray._private import ray_constants
        from ray._private.utils import get_ray_address_file
        from ray.cluster_utils import Cluster

        if ray_constants.ENABLE_RAY_CLUSTER:
            raise RuntimeError("ray was imported before RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 was set, so its nodes "
                               "would not bind to 127.0.0.1; import cluster.bench.routing_bench (or set the variable) "
                               "before ray")
        address_file = Path(get_ray_address_file(None))
        previous = address_file.read_text() if address_file.is_file() else None
        args = {"num_cpus": self.cpus_per_node, "node_ip_address": "127.0.0.1",
                "object_store_memory": self.object_store_bytes}
        try:
            self._cluster = Cluster(initialize_head=True, head_node_args={**args, "include_dashboard": False})
            for _ in range(self.n_nodes - 1):
                self._cluster.add_node(**args)
            self._cluster.wait_for_nodes()
        except BaseException:
            self.__exit__()
            raise
        finally:
            if previous is not None:
                address_file.write_text(previous)
        return self

    def __exit__(self, *exc: object) -> None:
        import ray

        if ray.is_initialized():
            ray.shutdown()
        if self._cluster is not None:
            self._cluster.shutdown()
            self._cluster = None


def _remove_node_cgroups(nodes: Sequence[NodeReady]) -> None:
    """Removes the memory cgroups the node actors created (NodeServer leaves them behind)."""
    from cluster.distributed import memory_limit as memlimit

    for node in nodes:
        for root in (memlimit.V1_ROOT, memlimit.V2_ROOT):
            path = root / f"sniper-{node.node}-{node.pid}"  # MemoryLimit's name, see NodeServer
            for _ in range(20):
                try:
                    path.rmdir()
                    break
                except FileNotFoundError:
                    break
                except OSError:  # the actor's process is still exiting
                    time.sleep(0.1)


# -- one policy on a live cluster ----------------------------------------------------------

class NodeCrash:
    """A node actor's process killed with SIGKILL ``after_s`` seconds into a run, as a crash or the
    kernel's OOM killer would end it; then, watched while the run goes on, how long until the
    router had the node back (Ray starts a new process in its place, ``cluster.distributed.deploy``)."""

    def __init__(self, client: Any, node: NodeReady, after_s: float, timeout_s: float = 120.0) -> None:
        self.client = client
        self.node = node  # NodeActor.ready() of the victim: name and pid
        self.after_s = after_s
        self.timeout_s = timeout_s
        self.killed_at: float | None = None
        self.back_at: float | None = None
        self._run_over = threading.Event()
        self._thread = threading.Thread(target=self._crash_and_watch, name="node-crash", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def _crash_and_watch(self) -> None:
        if self._run_over.wait(self.after_s):  # the run ended first
            return
        try:
            os.kill(self.node.pid, signal.SIGKILL)
        except ProcessLookupError:
            return
        self.killed_at = time.monotonic()
        while time.monotonic() < self.killed_at + self.timeout_s:
            node = self.client.status().node(self.node.node)
            if node is not None and node.alive and node.restarts >= 1:
                self.back_at = time.monotonic()
                return
            time.sleep(0.1)

    def outcome(self) -> dict[str, Any]:
        """Once the run is over: killed or not, and when the new process was back (None: not within the timeout)."""
        self._run_over.set()
        self._thread.join()
        back = None if self.killed_at is None or self.back_at is None else self.back_at - self.killed_at
        return {"node": self.node.node, "after_s": self.after_s, "killed": self.killed_at is not None,
                "back_after_s": back, "timeout_s": self.timeout_s}

    def new_process(self) -> NodeReady:
        """``NodeActor.ready()`` of the process that took the killed one's place."""
        import ray

        from cluster.distributed.protocol import NAMESPACE

        return ray.get(ray.get_actor(self.node.node, namespace=NAMESPACE).ready.remote(), timeout=60)


async def _drive(client: Any, workload: Workload, max_tokens: int, concurrency: int | None = None) -> list[dict[str, Any]]:
    """Sends the workload (conversations concurrently, turns in order; with ``concurrency``, at most
    that many conversations at once, back to back); one outcome per turn."""
    from cluster.distributed.client import completion
    from cluster.distributed.protocol import Piece, Restarted

    loop = asyncio.get_running_loop()
    t0 = loop.time()
    outcomes: list[dict[str, Any]] = []

    async def timed(events: Any, first: list[float]) -> Any:
        async for item in events:
            if isinstance(item, Restarted):  # the text kept comes from the next node
                first.clear()
            elif isinstance(item, Piece) and not first:
                first.append(loop.time() - t0)
            yield item

    async def conversation(turns: list[Any]) -> None:
        history: list[tuple[str, str]] = []
        for turn in turns:
            delay = turn.arrival_s - (loop.time() - t0)
            if delay > 0 and concurrency is None:
                await asyncio.sleep(delay)
            prompt = conversation_prompt(history, turn.prompt)
            sent = loop.time() - t0
            outcome: dict[str, Any] = {"conversation": turn.conversation, "turn": turn.index, "sent_s": sent}
            first: list[float] = []
            try:
                # the whole answer is kept: a node that dies mid-way costs a restart elsewhere, as for agenerate
                events = client.aevents(prompt, max_tokens=max_tokens, session_id=turn.conversation, restartable=True)
                done = await asyncio.wait_for(completion(timed(events, first)), REQUEST_TIMEOUT_S)
            except Exception as exc:  # counted as an error; the conversation goes on without an answer
                outcome.update(error=f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}",
                               done_s=loop.time() - t0)
                history.append((turn.prompt, ""))
            else:
                outcome.update(done_s=loop.time() - t0, node=done.node, text=done.text, usage=asdict(done.usage),
                               cache=dict(done.cache), routing=dict(done.routing),
                               first_s=first[0] if first else loop.time() - t0)
                history.append((turn.prompt, done.text))
            outcomes.append(outcome)

    conversations = list(workload.conversations().values())
    if concurrency is None:
        await asyncio.gather(*(conversation(turns) for turns in conversations))
        return outcomes
    queue = list(reversed(conversations))

    async def client_loop() -> None:
        while queue:
            await conversation(queue.pop())

    await asyncio.gather(*(client_loop() for _ in range(concurrency)))
    return outcomes


def _node_totals(status: RouterStatus) -> dict[str, dict[str, float]]:
    return {n.name: {"bytes_read": n.bytes_read or 0, "generated_tokens": n.generated_tokens or 0} for n in status.nodes}


def _await_reports(client: Any, before: dict[str, dict[str, float]], generated: int,
                   timeout_s: float = 15.0) -> RouterStatus:
    """The router's status once every node's report counts the run's generated tokens."""
    deadline = time.monotonic() + timeout_s
    while True:
        status = client.status()
        after = _node_totals(status)
        seen = sum(after[n]["generated_tokens"] - before.get(n, {}).get("generated_tokens", 0) for n in after)
        if seen >= generated or time.monotonic() > deadline:
            return status
        time.sleep(0.2)


def summarise_live(outcomes: list[dict[str, Any]], before: RouterStatus, after: RouterStatus,
                   wall_s: float) -> dict[str, Any]:
    """Per-policy metrics of a live run (see the module docstring for where each comes from)."""
    ok = [o for o in outcomes if "error" not in o]
    generated = sum(o["usage"]["completion_tokens"] for o in ok)

    def total(key: str) -> float:
        return float(sum(o["cache"].get(key, 0) or 0 for o in ok))

    start, end = _node_totals(before), _node_totals(after)
    node_bytes = sum(end[n]["bytes_read"] - start.get(n, {}).get("bytes_read", 0) for n in end)
    hits, misses = total("hits"), total("misses")
    n_decode = total("n_tokens_decode")
    decode_hit = sum((o["cache"].get("decode_hit_rate") or 0) * o["cache"].get("n_tokens_decode", 0) for o in ok
                     if o["cache"].get("decode_hit_rate") == o["cache"].get("decode_hit_rate"))
    latencies = [o["done_s"] - o["sent_s"] for o in ok]
    ttft = [o["first_s"] - o["sent_s"] for o in ok if "first_s" in o]
    prompt_tokens = sum(o["usage"]["prompt_tokens"] for o in ok)
    reused = sum(o["usage"].get("reused_prompt_tokens", 0) for o in ok)
    after_json = after.as_json()
    errors = [o["error"] for o in outcomes if "error" in o]
    return {
        "n_requests": len(outcomes),
        "hit_rate": hits / (hits + misses) if hits + misses else None,
        "decode_hit_rate": decode_hit / n_decode if n_decode else None,
        "bytes_read_per_token": node_bytes / generated if generated else None,
        "bytes_read_per_token_prefill": (total("bytes_read_prefill") / total("n_tokens_prefill")
                                         if total("n_tokens_prefill") else None),
        "bytes_read_per_token_decode": total("bytes_read_decode") / n_decode if n_decode else None,
        "bytes_read_nodes": node_bytes,
        "bytes_read_requests": total("bytes_read_prefill") + total("bytes_read_decode"),
        "generated_tokens": generated,
        "tok_s": generated / wall_s if wall_s > 0 else None,
        "wall_s": wall_s,
        "p50_latency_s": percentile(latencies, 50),
        "p99_latency_s": percentile(latencies, 99),
        "p50_ttft_s": percentile(ttft, 50),
        "p99_ttft_s": percentile(ttft, 99),
        "reused_prompt_fraction": reused / prompt_tokens if prompt_tokens else None,
        "requests_per_node": dict(sorted(Counter(o["node"] for o in ok).items())),
        "prediction_precision": after.prediction.precision,
        "prediction_recall": after.prediction.recall,
        "decision_audit": after_json["decision_audit"],
        "decisions": after_json["decisions"],
        "policy_state": after_json.get("policy_state"),
        "retried_requests": sum(1 for o in ok if o.get("routing", {}).get("attempts", 1) > 1),
        "errors": len(errors),
        "error_examples": sorted(set(errors))[:5],
    }


def run_policy(model_path: str, policy: str, workload: Workload, *, n_nodes: int, cache_bytes: int,
               memory_limit_bytes: int | None, max_tokens: int, progress: bool,
               node_model_paths: list[str] | None = None, kill_node_after_s: float | None = None,
               concurrency: int | None = None) -> tuple[dict[str, Any], list[str]]:
    """One policy on a fresh local cluster; returns its metrics and the answers (turn order).

    With ``node_model_paths`` each node reads its own copy of the model, whose page cache is
    dropped first: every policy starts cold, and no node is served from pages another read.
    With ``kill_node_after_s`` the last node's process is killed that long into the run.
    """
    from cluster.distributed import connection
    from cluster.distributed import deploy
    from cluster.distributed import memory_limit as memlimit
    from cluster.distributed.client import Client
    from cluster.distributed.protocol import NAMESPACE

    t_setup = time.perf_counter()
    nodes: list[dict[str, Any]] = []
    failure: dict[str, Any] | None = None
    with LocalRayCluster(n_nodes) as cluster:
        connection.connect(cluster.address, NAMESPACE)
        try:
            # one compute thread per node: the simulated nodes share this machine's cores
            for path in node_model_paths or ():
                memlimit.drop_page_cache(path)
            info = deploy.deploy(model_path, n_nodes, cache_bytes=cache_bytes, policy=policy,
                                 memory_limit_bytes=memory_limit_bytes, n_threads=1, node_model_paths=node_model_paths)
            nodes = list(info.nodes)
            client = Client.connect(cluster.address, NAMESPACE)
            before = client.status()
            setup_s = time.perf_counter() - t_setup
            log_progress(progress, f"  {policy}: {n_nodes} nodes ready in {setup_s:.0f} s; "
                           f"sending {len(workload.turns)} requests")
            crash = NodeCrash(client, nodes[-1], kill_node_after_s) if kill_node_after_s is not None else None
            t0 = time.perf_counter()
            if crash is not None:
                crash.start()
            outcomes = asyncio.run(_drive(client, workload, max_tokens, concurrency))
            wall_s = (max((o["done_s"] for o in outcomes), default=0.0)
                      - min((o["sent_s"] for o in outcomes), default=0.0))
            generated = sum(o["usage"]["completion_tokens"] for o in outcomes if "error" not in o)
            if crash is not None:
                failure = crash.outcome()
                if failure["back_after_s"] is not None:  # the new process made a cgroup of its own too
                    nodes = [*nodes, crash.new_process()]
                log_progress(progress, f"  {policy}: {failure['node']} killed {kill_node_after_s:g} s in: "
                               + ("run ended first" if not failure["killed"] else
                                  f"back after {failure['back_after_s']:.1f} s" if failure["back_after_s"] is not None
                                  else "not back"))
            after = _await_reports(client, _node_totals(before), generated)
            log_progress(progress, f"  {policy}: done in {time.perf_counter() - t0:.0f} s")
            deploy.shutdown(NAMESPACE)
        finally:
            if memory_limit_bytes:
                _remove_node_cgroups(nodes)
    result = summarise_live(outcomes, before, after, wall_s)
    result["setup_s"] = setup_s
    if failure is not None:
        result["node_crash"] = failure
    order = {(t.conversation, t.index): i for i, t in enumerate(workload.turns)}
    answers = [""] * len(workload.turns)
    for o in outcomes:
        answers[order[(o["conversation"], o["turn"])]] = o.get("text", "")
    return result, answers


@contextlib.contextmanager
def _node_copies(model_path: str, n_nodes: int) -> Iterator[list[str] | None]:
    """``n_nodes`` copies of the model next to it (none for 0), removed afterwards."""
    if n_nodes == 0:
        yield None
        return
    directory = tempfile.mkdtemp(prefix="sniper-node-models-", dir=os.path.dirname(model_path))
    try:
        paths = []
        for i in range(n_nodes):
            paths.append(shutil.copyfile(model_path, os.path.join(directory, f"node-{i}.gguf")))
        yield paths
    finally:
        shutil.rmtree(directory, ignore_errors=True)


# -- the benchmark -------------------------------------------------------------------------

def run_routing_bench(model: str | None, out_dir: Path | None, *, prompts: str | None = None, n_nodes: int = 3,
                      cache_mb: int | None = None, node_memory_mb: int | None = None,
                      policies: Sequence[str] = DEFAULT_POLICIES, n_requests: int | None = None,
                      rate: float | None = None, max_tokens: int | None = None, seed: int = 0, quick: bool = False,
                      kill_node_after_s: float | None = None, concurrency: int | None = None,
                      progress: bool = True) -> dict[str, Any]:
    """The live comparison and the decision cost; writes docs/routing.md when ``out_dir`` is set."""
    from cluster.distributed import memory_limit as memlimit
    from cluster.bench.routing_report import _pct, targets, write_routing_report
    from cluster.engine.cache import check_budget, discover_layout
    from cluster.engine.node_memory import MIB
    from cluster.routing import POLICY_NAMES
    from cluster.models.synth import default_model

    unknown = [p for p in policies if p not in POLICY_NAMES]
    if unknown or not policies:
        raise ValueError(f"--policies {','.join(policies)}: expected a comma-separated list of "
                         f"{', '.join(POLICY_NAMES)}")
    if node_memory_mb:
        reason = memlimit.unavailable_reason()
        if reason:
            raise ValueError(f"--node-memory-mb needs a cgroup memory limit per node, but {reason}")
    model_path = os.path.abspath(model or str(default_model("demo", progress=progress)))
    layout = discover_layout(model_path)
    expert_bytes = int(np.asarray(layout.unit_bytes, dtype=np.int64).sum())
    cache_bytes = cache_mb * MIB if cache_mb else expert_bytes // 3
    check_budget(layout, cache_bytes)  # before any cluster starts
    memory_limit = node_memory_mb * MIB if node_memory_mb else None
    n_requests = n_requests or (12 if quick else 48)
    rate = rate if rate is not None else (1.0 if quick else 0.75)
    max_tokens = max_tokens or (16 if quick else 32)
    workload = for_model(model_path, prompts, n_requests, rate=rate, seed=seed, max_open=max(4, n_nodes))

    command = command_line("routing", [
        ("--model", model), ("--prompts", prompts), ("--nodes", n_nodes), ("--cache-mb", cache_mb),
        ("--node-memory-mb", node_memory_mb), ("--policies", ",".join(policies)), ("--requests", n_requests),
        ("--rate", f"{rate:g}"), ("--max-tokens", max_tokens), ("--seed", seed),
        ("--kill-node-after", None if kill_node_after_s is None else f"{kill_node_after_s:g}"),
        ("--concurrency", concurrency),
        ("--out", out_flag(out_dir)), ("--quick", quick)])
    result: dict[str, Any] = {
        "command": command,
        "started": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
        "machine": {"cpus": os.cpu_count(), "load_avg_1m_at_start": os.getloadavg()[0]},
        "model": {"path": model_path, "arch": layout.arch, "n_layers": layout.n_layers,
                  "n_experts": layout.n_experts, "n_experts_used": layout.n_experts_used,
                  "file_bytes": layout.file_size, "expert_bytes": expert_bytes},
        "workload": {**workload.describe(), "max_tokens": max_tokens,
                     "arrivals": f"closed loop, {concurrency} clients" if concurrency else "Poisson"},
        "cluster": {"nodes": n_nodes, "cache_bytes_per_node": cache_bytes, "node_memory_limit_bytes": memory_limit},
        "policies": {},
    }
    log_progress(progress, "decision cost: RouterCore.choose at 64 nodes x 48 layers x 128 experts (before any Ray "
                           "cluster runs)")
    result["decision_cost"] = run_decision_cost(quick=quick)["decision_cost"]
    answers: dict[str, list[str]] = {}
    with _node_copies(model_path, n_nodes if node_memory_mb else 0) as copies:
        for policy in policies:
            log_progress(progress, f"policy {policy}: fresh {n_nodes}-node Ray cluster on 127.0.0.1")
            metrics, answers[policy] = run_policy(
                model_path, policy, workload, n_nodes=n_nodes, cache_bytes=cache_bytes,
                memory_limit_bytes=memory_limit, max_tokens=max_tokens,
                progress=progress, node_model_paths=copies, kill_node_after_s=kill_node_after_s,
                concurrency=concurrency)
            result["policies"][policy] = metrics
            log_progress(progress, f"  {policy}: hit rate {_pct(metrics['hit_rate'])}, "
                           f"{(metrics['bytes_read_per_token'] or 0) / MIB:.2f} MiB read/token, "
                           f"{metrics['tok_s'] or 0:.1f} tok/s, p99 {metrics['p99_latency_s'] or 0:.2f} s, "
                           f"{metrics['errors']} errors")
    result["same_answers"] = len({tuple(a) for a in answers.values()}) == 1
    result["targets"] = targets(result["policies"])
    if out_dir is not None:
        result["report"] = str(write_routing_report(result, out_dir))
    return result
