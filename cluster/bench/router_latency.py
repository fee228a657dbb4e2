"""bench router: an ordinary request's routing latency, with the router idle and while callers send 10 MB prompts.

The router decides and does nothing else (``cluster.distributed.router``): prompts are rendered
and tokenized where they enter (``cluster.distributed.edge``), so a caller's huge prompt costs
that caller's process, not the one router every request waits for (issue 26, item 5; target: an
ordinary request's routing p99 within 2x of an idle router's).

Procedure: a local cluster as ``serve --local-nodes`` starts one (its daemon, 127.0.0.1) runs the
model on ``nodes`` node actors. This process prepares ordinary requests at its own edge (a topic
prompt of 16 words, tokenized before the clock starts) and times each ``router.route`` call, from
the call to the ``Route`` (one every ``INTERVAL_S``, each told ended with the next ask, so no
node fills up):

1. idle: routes with nothing else going on;
2. loaded: routes while ``heavy`` caller processes (Ray actors, each with its own ``Client``, as
   gateway replicas are) send ``prompt_mb`` MB prompts through the ordinary client path, each
   the next ``HEAVY_PAUSE_S`` after its last one ended (without a pause a caller refused at once
   spins a core of its own, and the machine's cores are the router's too);

alternating, ``ROUNDS`` times each (``requests`` routes per condition in all), so that whatever
else the machine runs meanwhile weighs on both alike. It reports p50 / p99 of both, the ratio of
the p99s, and what became of the heavy prompts (how many were sent, how each ended, how long each
took to end).
"""

from __future__ import annotations

import asyncio
import json
import os
import statistics
import time
import uuid
from pathlib import Path
from typing import Any

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # Ray binds to 127.0.0.1 (DESIGN.md)

from cluster.bench import command_line, log_progress, out_flag, percentile  # noqa: E402
from cluster.bench.local_run import local_ray  # noqa: E402
from cluster.bench.workload import topic_prompts  # noqa: E402

NAMESPACE = "sniper-bench-router"
INTERVAL_S = 0.01  # between an ordinary request's Route and the next one's ask
WARMUP = 10  # routes before each phase's clock starts counting
ROUNDS = 5  # idle and loaded phases, alternating
HEAVY_PAUSE_S = 0.01  # a heavy caller sends its next prompt this long after its last one ended


class HeavyCaller:
    """A caller process that sends one huge prompt back to back through ``Client`` until stopped
    (a Ray actor of the benchmark: ``ray.remote(HeavyCaller)``)."""

    def __init__(self, namespace: str, prompt_bytes: int) -> None:
        from cluster.distributed.client import Client

        self.client = Client(namespace=namespace)
        self.prompt = ("kalo meni " * (prompt_bytes // 10 + 1))[:prompt_bytes]
        self.outcomes: list[tuple[str, float]] = []  # (how it ended, seconds it took)
        self._stop = False
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> int:
        """Starts sending; returns once the first prompt has ended (the load is on)."""
        self._task = asyncio.create_task(self._send())
        while not self.outcomes and not self._task.done():
            await asyncio.sleep(0.01)
        return len(self.outcomes)

    async def _send(self) -> None:
        while not self._stop:
            started = time.perf_counter()
            try:
                await self.client.agenerate(self.prompt, max_tokens=1)
                outcome = "completed"
            except Exception as exc:  # noqa: BLE001  (the benchmark counts how each ended)
                outcome = type(exc).__name__
            self.outcomes.append((outcome, time.perf_counter() - started))
            await asyncio.sleep(HEAVY_PAUSE_S)

    async def stop(self) -> dict[str, Any]:
        """Stops sending; what was sent since ``start``."""
        self._stop = True
        if self._task is not None:
            await self._task
        self._stop, self._task = False, None
        times = [t for _, t in self.outcomes]
        ends: dict[str, int] = {}
        for outcome, _ in self.outcomes:
            ends[outcome] = ends.get(outcome, 0) + 1
        self.outcomes = []
        return {"sent": len(times), "ends": ends, "total_s": sum(times), "max_s": max(times, default=0.0)}


async def _route_times(router: Any, asks: list[Any], n: int) -> list[float]:
    """Seconds of ``n`` router.route calls (after WARMUP more), each ask telling the last one ended."""
    import dataclasses

    times = []
    last: tuple[str, ...] = ()
    for i in range(WARMUP + n):
        ask = dataclasses.replace(asks[i % len(asks)], request_id=uuid.uuid4().hex, ended=last)
        started = time.perf_counter()
        await router.route.remote(ask)
        if i >= WARMUP:
            times.append(time.perf_counter() - started)
        last = (ask.request_id,)
        await asyncio.sleep(INTERVAL_S)
    await router.ended.remote(last)
    return times


def _summary(times: list[float]) -> dict[str, float]:
    return {"n": len(times), "p50_ms": 1e3 * statistics.median(times), "p99_ms": 1e3 * percentile(times, 99),
            "max_ms": 1e3 * max(times)}


def bench_router(model_path: str, *, nodes: int = 2, heavy: int = 3, prompt_mb: float = 10.0, requests: int = 500,
                 progress: bool = True) -> dict[str, Any]:
    import ray

    from cluster.distributed import deploy
    from cluster.distributed.edge import Edge, PromptRequest
    from cluster.distributed.protocol import ROUTER_NAME
    from cluster.engine.sampling import SamplingParams

    prompts = topic_prompts(model_path)
    prompt_bytes = int(prompt_mb * 1e6)
    with local_ray(nodes, NAMESPACE):
        deploy.deploy(model_path, nodes, cache_bytes=None, namespace=NAMESPACE, n_threads=1)
        router = ray.get_actor(ROUTER_NAME, namespace=NAMESPACE)
        source = ray.get(router.model_source.remote())
        edge = Edge.load(source)  # this process's edge: the ordinary requests are tokenized here, untimed
        params = SamplingParams(max_tokens=1)
        asks = [edge.prepare(PromptRequest(uuid.uuid4().hex, p, params)).ask for p in prompts]
        log_progress(progress, f"router bench: {nodes} nodes, {requests} ordinary routes idle, then with {heavy} "
                               f"callers sending {prompt_mb:g} MB prompts")
        callers = [ray.remote(HeavyCaller).options(num_cpus=0, namespace=NAMESPACE).remote(NAMESPACE, prompt_bytes)
                   for _ in range(heavy)]
        idle: list[float] = []
        loaded: list[float] = []
        heavy_runs: list[dict[str, Any]] = []
        per_round = -(-requests // ROUNDS)
        load_before = os.getloadavg()[0]
        for _ in range(ROUNDS):
            idle += asyncio.run(_route_times(router, asks, per_round))
            ray.get([c.start.remote() for c in callers], timeout=600)
            loaded += asyncio.run(_route_times(router, asks, per_round))
            heavy_runs += ray.get([c.stop.remote() for c in callers], timeout=600)
        load_after = os.getloadavg()[0]
        status = ray.get(router.status.remote())
    idle_s, loaded_s = _summary(idle), _summary(loaded)
    ends: dict[str, int] = {}
    for run in heavy_runs:
        for outcome, count in run["ends"].items():
            ends[outcome] = ends.get(outcome, 0) + count
    sent = sum(r["sent"] for r in heavy_runs)
    return {"model": model_path, "nodes": nodes, "heavy_callers": heavy, "prompt_bytes": prompt_bytes,
            "requests": len(idle), "rounds": ROUNDS, "interval_s": INTERVAL_S, "heavy_pause_s": HEAVY_PAUSE_S,
            "n_ctx": source.n_ctx, "cpus": os.cpu_count(), "load_average": [load_before, load_after],
            "longest_token_bytes": edge.longest_token_bytes, "ordinary_prompt_tokens": [len(a.tokens) for a in asks],
            "idle": idle_s, "loaded": loaded_s, "p99_ratio": loaded_s["p99_ms"] / idle_s["p99_ms"],
            "p50_ratio": loaded_s["p50_ms"] / idle_s["p50_ms"],
            "heavy": {"sent": sent, "ends": ends, "mean_s": sum(r["total_s"] for r in heavy_runs) / max(sent, 1),
                      "max_s": max(r["max_s"] for r in heavy_runs)},
            "router_routes": status.n_routes}


def write_report(result: dict[str, Any], out_dir: Path, command: str) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "bench-router.json").write_text(json.dumps(result, indent=1) + "\n")
    idle, loaded, heavy = result["idle"], result["loaded"], result["heavy"]
    ends = ", ".join(f"{count} {outcome}" for outcome, count in sorted(heavy["ends"].items()))
    lo, hi = min(result["ordinary_prompt_tokens"]), max(result["ordinary_prompt_tokens"])
    sizes = str(lo) if lo == hi else f"{lo}-{hi}"
    lines = ["# Routing latency with huge prompts in flight", "",
             f"Produced by `{command}` on {time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime())}. Raw numbers: "
             "`bench-router.json`. Procedure: `cluster/bench/router_latency.py`.", "",
             f"Model `{result['model']}` on {result['nodes']} node actors of a local cluster. An ordinary request (a "
             f"topic prompt of {sizes} tokens, "
             f"tokenized at this process's edge before the clock starts) is routed every {1e3 * result['interval_s']:g} "
             f"ms; its routing time is the `router.route` call's, from the call to the `Route`. Idle and loaded phases "
             f"alternate, {result['rounds']} of each. The machine has {result['cpus']} cores; its load average "
             f"(1 min) was {result['load_average'][0]:.1f} when the phases began and {result['load_average'][1]:.1f} "
             f"when they ended (what else it ran weighs on both conditions alike, mostly on their tails).", "",
             "| router | routes | p50 ms | p99 ms | slowest ms |", "|---|---|---|---|---|",
             f"| idle | {idle['n']} | {idle['p50_ms']:.2f} | {idle['p99_ms']:.2f} | {idle['max_ms']:.2f} |",
             f"| {result['heavy_callers']} callers sending {result['prompt_bytes'] / 1e6:g} MB prompts | {loaded['n']} | "
             f"{loaded['p50_ms']:.2f} | {loaded['p99_ms']:.2f} | {loaded['max_ms']:.2f} |", "",
             f"p99 loaded / idle: **{result['p99_ratio']:.2f}x** (target: at most 2x); p50: {result['p50_ratio']:.2f}x.",
             "",
             f"The heavy callers sent {heavy['sent']} prompts, each the next {1e3 * result['heavy_pause_s']:g} ms after "
             f"their last one ended ({ends}); each ended after "
             f"{heavy['mean_s'] * 1e3:.1f} ms on average (slowest {heavy['max_s'] * 1e3:.1f} ms): a node's context holds "
             f"{result['n_ctx']} tokens and no token of this model covers more than {result['longest_token_bytes']} "
             f"bytes, so each was refused where it entered, before it was tokenized, and the router never heard of it "
             f"(`cluster/distributed/edge.py`)."]
    path = out_dir / "router-latency.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def main(model: str, *, requests: int, out_dir: str | None, progress: bool) -> Path:
    result = bench_router(model, requests=requests, progress=progress)
    command = command_line("router", [("--model", model), ("--requests", requests), ("--out", out_flag(out_dir))])
    return write_report(result, Path(out_dir or "docs"), command)
