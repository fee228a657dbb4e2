"""``python -m cluster bench chaos``: faults on a schedule under steady load; nothing may hang.

A local Ray cluster on 127.0.0.1 serves a model on ``nodes`` node actors while ``clients``
concurrent callers send requests back to back (half streamed, half whole answers, through the
Python client) for ``duration_s`` seconds. On a schedule, faults hit the deployment:

* ``node``: a node actor's process killed with SIGKILL (a crash, the OOM killer);
* ``router``: the router actor killed (Ray restarts it; it rebuilds its state from reports);
* ``client``: a caller abandons a stream after its first pieces (the node must stop, the
  router's count must settle);
* ``router-gone``: at the end, the router killed for good: requests must fail with the typed
  ``RouterUnavailableError`` within the client's wait, not hang.

Every request ends as ``completed`` (``retried`` when it went to another node or started again),
``typed error`` (a ``SniperError``: the documented errors), ``raw error`` (anything else: must be
0) or ``hung`` (no answer within ``REQUEST_TIMEOUT_S``: must be 0). Per fault: when it hit and how
long until the next request sent after it completed (recovery); for a node, also how long until
the router had the node back.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import statistics
import time
from pathlib import Path
from typing import Any

os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"  # Ray on loopback (DESIGN.md); read when ray is imported

from cluster.bench import command_line, log_progress, out_flag  # noqa: E402
from cluster.bench.routing_bench import LocalRayCluster  # noqa: E402

NAMESPACE = "sniper-bench-chaos"
REQUEST_TIMEOUT_S = 120.0
ROUTER_WAIT_S = 20.0


def _schedule(duration_s: float) -> list[tuple[float, str]]:
    return [(0.2 * duration_s, "node"), (0.45 * duration_s, "router"), (0.6 * duration_s, "client"),
            (0.75 * duration_s, "node")]


async def _request(client: Any, prompt: str, stream: bool, max_tokens: int) -> dict[str, Any]:
    from cluster.errors import SniperError
    from cluster.protocol import Finished, Restarted, Routed

    started = time.monotonic()
    outcome: dict[str, Any] = {"sent": started, "stream": stream}
    try:
        async def run() -> None:
            attempts = 0
            async for item in client.aevents(prompt, max_tokens=max_tokens, restartable=not stream):
                if isinstance(item, Routed):
                    attempts = item.attempt
                elif isinstance(item, Restarted):
                    outcome["restarted"] = True
                elif isinstance(item, Finished):
                    outcome["tokens"] = item.usage["completion_tokens"]
            outcome["retried"] = attempts > 1 or bool(outcome.get("restarted"))

        await asyncio.wait_for(run(), REQUEST_TIMEOUT_S)
        outcome["result"] = "completed"
    except asyncio.TimeoutError:
        outcome["result"] = "hung"
    except SniperError as exc:
        outcome.update(result="typed error", error=f"{type(exc).__name__}: {str(exc)[:160]}")
    except Exception as exc:  # noqa: BLE001  (what the report must show as raw)
        outcome.update(result="raw error", error=f"{type(exc).__name__}: {str(exc)[:160]}")
    outcome["done"] = time.monotonic()
    return outcome


async def _abandon(client: Any, prompt: str) -> dict[str, Any]:
    """A caller that reads two pieces of a long stream and goes away."""
    events = client.aevents(prompt, max_tokens=512)
    n = 0
    async for _ in events:
        n += 1
        if n >= 3:
            break
    await events.aclose()
    return {"abandoned_after_items": n}


def _node_pid(node: str) -> int:
    import ray

    return int(ray.get(ray.get_actor(node, namespace=NAMESPACE).ready.remote(), timeout=60)["pid"])


async def _fault(kind: str, client: Any, prompt: str, n_nodes: int, index: int) -> dict[str, Any]:
    import ray

    from cluster.protocol import ROUTER_NAME, node_name

    fault: dict[str, Any] = {"kind": kind, "at": time.monotonic()}
    if kind == "node":
        victim = node_name(index % n_nodes)
        before = {n["name"]: n for n in (await client.astatus())["nodes"]}.get(victim, {}).get("restarts", 0)
        os.kill(await asyncio.to_thread(_node_pid, victim), signal.SIGKILL)
        fault.update(target=victim, at=time.monotonic())
        deadline = fault["at"] + REQUEST_TIMEOUT_S
        while time.monotonic() < deadline:
            node = {n["name"]: n for n in (await client.astatus())["nodes"]}.get(victim, {})
            if node.get("alive") and node.get("restarts", 0) > before:
                fault["node_back_s"] = time.monotonic() - fault["at"]
                break
            await asyncio.sleep(0.2)
    elif kind == "router":
        ray.kill(await asyncio.to_thread(ray.get_actor, ROUTER_NAME, namespace=NAMESPACE), no_restart=False)
        fault.update(target=ROUTER_NAME, at=time.monotonic())
    elif kind == "client":
        fault.update(target="a caller", **await _abandon(client, prompt))
    return fault


async def _run(client: Any, prompts: list[str], *, n_nodes: int, clients: int, duration_s: float,
               max_tokens: int, progress: bool) -> dict[str, Any]:
    import ray

    from cluster.protocol import ROUTER_NAME

    t0 = time.monotonic()
    outcomes: list[dict[str, Any]] = []
    faults: list[dict[str, Any]] = []

    async def caller(i: int) -> None:
        k = 0
        while time.monotonic() - t0 < duration_s:
            outcomes.append(await _request(client, prompts[(i + k) % len(prompts)], stream=(i + k) % 2 == 0,
                                           max_tokens=max_tokens))
            k += 1

    async def injector() -> None:
        for at_s, kind in _schedule(duration_s):
            await asyncio.sleep(max(0.0, t0 + at_s - time.monotonic()))
            n_before = sum(f["kind"] == kind for f in faults)  # each node fault hits the next node
            faults.append(await _fault(kind, client, prompts[0], n_nodes, n_before))
            log_progress(progress, f"  {time.monotonic() - t0:5.1f} s: {kind} fault done")

    await asyncio.gather(injector(), *(caller(i) for i in range(clients)))
    deadline, in_flight = time.monotonic() + 15, None
    while time.monotonic() < deadline and in_flight != 0:  # nothing left counted: abandoned streams settled too
        in_flight = sum(n["load"] for n in (await client.astatus())["nodes"])
        await asyncio.sleep(0.2)
    # the router gone for good: typed errors within the client's wait, no hang
    ray.kill(await asyncio.to_thread(ray.get_actor, ROUTER_NAME, namespace=NAMESPACE), no_restart=True)
    gone_at = time.monotonic()
    after_gone = await asyncio.gather(*(_request(client, prompts[i % len(prompts)], stream=i % 2 == 0,
                                                 max_tokens=max_tokens) for i in range(clients)))
    faults.append({"kind": "router-gone", "target": ROUTER_NAME, "at": gone_at,
                   "answers": sorted({o["result"] for o in after_gone}),
                   "slowest_answer_s": max(o["done"] - gone_at for o in after_gone)})
    for fault in faults:
        if fault["kind"] == "router-gone":
            continue
        later = [o for o in outcomes if o["sent"] >= fault["at"] and o["result"] == "completed"]
        fault["recovered_s"] = min(o["done"] for o in later) - fault["at"] if later else None
    return {"outcomes": outcomes, "after_router_gone": after_gone, "faults": faults, "t0": t0, "in_flight": in_flight}


def bench_chaos(model_path: str, *, n_nodes: int = 3, clients: int = 4, duration_s: float = 120.0,
                max_tokens: int = 48, progress: bool = True) -> dict[str, Any]:
    import ray

    from cluster import deploy, synth
    from cluster.cache import discover_layout
    from cluster.client import Client

    topics = synth.read_topics(model_path)
    prompts = [synth.topic_prompt(topics, i % len(topics), 16, seed=i) for i in range(16)] if topics else \
        [f"request {i} about the weather and the sea" for i in range(16)]
    budget = int(discover_layout(model_path).unit_bytes.sum() * 0.5)
    with LocalRayCluster(n_nodes, cpus_per_node=1) as cluster:
        ray.init(address=cluster.address, namespace=NAMESPACE, logging_level="ERROR")
        try:
            deploy.deploy(model_path, n_nodes, cache_bytes=budget, namespace=NAMESPACE, n_threads=1, n_ctx=1024)
            client = Client(namespace=NAMESPACE, router_wait_s=ROUTER_WAIT_S)
            log_progress(progress, f"chaos: {n_nodes} nodes, {clients} callers, {duration_s:g} s")
            run = asyncio.run(_run(client, prompts, n_nodes=n_nodes, clients=clients, duration_s=duration_s,
                                   max_tokens=max_tokens, progress=progress))
        finally:
            deploy.shutdown(NAMESPACE)
    outcomes = run["outcomes"]
    counts = {r: sum(o["result"] == r for o in outcomes) for r in ("completed", "typed error", "raw error", "hung")}
    faults = [{k: (v - run["t0"] if k == "at" else v) for k, v in f.items()} for f in run["faults"]]
    latencies = [o["done"] - o["sent"] for o in outcomes if o["result"] == "completed"]
    return {"model": model_path, "nodes": n_nodes, "clients": clients, "duration_s": duration_s,
            "max_tokens": max_tokens, "sent": len(outcomes), **counts,
            "retried": sum(bool(o.get("retried")) for o in outcomes if o["result"] == "completed"),
            "errors": sorted({o["error"] for o in outcomes if "error" in o})[:10],
            "p50_latency_s": statistics.median(latencies) if latencies else None,
            "max_latency_s": max(latencies) if latencies else None, "faults": faults,
            "in_flight_after_run": run["in_flight"],
            "after_router_gone": [{k: o.get(k) for k in ("result", "error")} for o in run["after_router_gone"]]}


def write_report(result: dict[str, Any], out_dir: Path, command: str) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "bench-chaos.json").write_text(json.dumps(result, indent=1) + "\n")
    f = lambda x: "n/a" if x is None else f"{x:.2f}"  # noqa: E731
    lines = ["# Chaos run: faults on a schedule under steady load", "",
             f"Produced by `{command}` on {time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime())}. Raw numbers: "
             "`bench-chaos.json`.", "",
             f"Model `{result['model']}` on {result['nodes']} node actors of a local Ray cluster (127.0.0.1); "
             f"{result['clients']} callers send requests back to back for {result['duration_s']:g} s (half streamed, "
             f"half whole answers, {result['max_tokens']} tokens at most), through the Python client.", "",
             "| sent | completed | of which retried or restarted | typed error | raw error | hung | p50 latency s | "
             "slowest s |", "|---|---|---|---|---|---|---|---|",
             f"| {result['sent']} | {result['completed']} | {result['retried']} | {result['typed error']} | "
             f"{result['raw error']} | {result['hung']} | {f(result['p50_latency_s'])} | {f(result['max_latency_s'])} |",
             "", "| fault | at s | target | recovered s (first completed request sent after it) | node back s |",
             "|---|---|---|---|---|"]
    for fault in result["faults"]:
        if fault["kind"] == "router-gone":
            continue
        lines.append(f"| {fault['kind']} | {fault['at']:.1f} | {fault.get('target', '')} | "
                     f"{f(fault.get('recovered_s'))} | {f(fault.get('node_back_s'))} |")
    gone = next(x for x in result["faults"] if x["kind"] == "router-gone")
    lines += ["", f"Router killed for good at the end: {len(result['after_router_gone'])} requests answered "
              f"{', '.join(gone['answers'])}, the slowest after {gone['slowest_answer_s']:.1f} s (the client waits "
              f"{ROUTER_WAIT_S:g} s for a router to come back).", ""]
    lines += [f"Requests the router still counted in flight once the load stopped (abandoned streams included; "
              f"15 s allowed): {result['in_flight_after_run']}.", "",
              "Not injected: killing the local-cluster daemons' child processes (this run's cluster is "
              "`ray.cluster_utils.Cluster`, not `serve --local-nodes`; `tests/test_local_cluster.py` kills those "
              "daemons with SIGKILL).", ""]
    if result["errors"]:
        lines += ["Errors seen:", ""] + [f"- `{e}`" for e in result["errors"]] + [""]
    ok = (result["raw error"] == 0 and result["hung"] == 0 and gone["answers"] == ["typed error"]
          and result["in_flight_after_run"] == 0)
    lines.append("Targets (0 hung, 0 raw errors, typed errors once the router is gone, nothing left in flight): "
                 f"{'met' if ok else 'NOT met'}.")
    path = out_dir / "chaos.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def main(model: str, *, duration_s: float, out_dir: str | None, progress: bool) -> Path:
    result = bench_chaos(model, duration_s=duration_s, progress=progress)
    command = command_line("chaos", [("--model", model), ("--duration", f"{duration_s:g}"),
                                     ("--out", out_flag(out_dir))])
    return write_report(result, Path(out_dir or "docs"), command)
