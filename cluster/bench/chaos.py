"""``python -m cluster bench chaos``: faults on a schedule under steady load; nothing may hang.

A local cluster started as ``serve --local-nodes`` starts one (``cluster.distributed.local_cluster``: a daemon
owning N Ray nodes on 127.0.0.1, with a state file of its own) serves a model on ``nodes`` node
actors, with the HTTP gateway in front. ``clients`` concurrent callers send requests back to back
for ``duration_s`` seconds, taking turns over four ways in: the Python client streamed and whole,
and the OpenAI HTTP API streamed and whole. On a schedule, faults hit the deployment:

* ``node``: the process of a node actor that is streaming answers killed with SIGKILL (a crash,
  the OOM killer) mid-stream: its answers must be continued on another node, each identical to
  its undisturbed twin (greedy decoding: the same prompt answered before any fault);
* ``ray-node``: a whole Ray node killed, the raylet the local-cluster daemon started for a node
  actor's machine (SIGKILL): the daemon must put a new Ray node in its place, and the node
  actor must come back on it by itself;
* ``router``: the router actor killed (Ray restarts it; it rebuilds its state from reports);
* ``client``: a Python caller abandons a stream after its first pieces (the node must stop, the
  router's count must settle);
* ``http-client``: an HTTP caller closes its connection in the middle of a stream;
* ``router-gone``: at the end, the router killed for good: requests must fail with the typed
  ``RouterUnavailableError`` (HTTP 503 ``router_unavailable``) within the wait, not hang.

Every request ends as ``completed`` (``retried`` when it went to another node or started again;
``continued`` when its answer was continued on another node after text had been sent — seen by
the Python callers, who see each dispatch; ``mismatched`` when its text differs from its twin's),
``typed error`` (a ``SniperError``, or over HTTP an OpenAI error body with its code: the
documented errors), ``raw error`` (anything else, a 500 or an error without a code included:
must be 0) or ``hung`` (no answer within ``REQUEST_TIMEOUT_S``: must be 0). Per fault: when it
hit and how long until the next request sent after it completed (recovery); for a node or a Ray
node, also how long until the router had the node back. Every error a caller received (Python
exception text, HTTP error bodies and stream error events) is searched for Ray's words — its
exception names and 32-hex actor ids — which must never reach a caller (``leaked``).
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import requests

os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"  # Ray on loopback (DESIGN.md); read when ray is imported

from cluster.bench.local_run import local_ray  # noqa: E402
from cluster.bench.workload import topic_prompts  # noqa: E402
from cluster.distributed import local_cluster  # noqa: E402
from cluster.distributed.status import NodeStatus  # noqa: E402
from cluster.bench import command_line, free_port, log_progress, out_flag  # noqa: E402

NAMESPACE = "sniper-bench-chaos"
REQUEST_TIMEOUT_S = 120.0
API_KEY = "chaos-bench"  # the gateway's key in this run
AUTH = {"Authorization": f"Bearer {API_KEY}"}
ROUTER_WAIT_S = 20.0


@dataclass(frozen=True)
class HttpApi:
    """The gateway under test: its address and the model name it serves."""

    url: str
    model: str


WAYS = ("python stream", "python whole", "http stream", "http whole")  # how callers take turns
RAY_WORDS = re.compile(r"Ray\w*Error|Actor\w*Error|ActorUnavailable|ActorDied|\b[0-9a-f]{32}\b")  # must not reach callers


def _schedule(duration_s: float) -> list[tuple[float, str]]:
    return [(0.15 * duration_s, "node"), (0.3 * duration_s, "ray-node"), (0.45 * duration_s, "node"),
            (0.5 * duration_s, "router"), (0.6 * duration_s, "client"), (0.65 * duration_s, "http-client"),
            (0.8 * duration_s, "node")]


def _leaks(text: str) -> bool:
    return bool(RAY_WORDS.search(text))


async def _request(client: Any, http: HttpApi, prompt: str, way: str, max_tokens: int,
                   twins: dict[str, str] | None = None) -> dict[str, Any]:
    started = time.monotonic()
    outcome: dict[str, Any] = {"sent": started, "way": way}
    if way.startswith("http"):
        outcome.update(await asyncio.to_thread(_http_request, http, prompt, way == "http stream", max_tokens))
    else:
        outcome.update(await _python_request(client, prompt, way == "python stream", max_tokens))
    outcome["done"] = time.monotonic()
    text = outcome.pop("text", None)
    if twins is not None and outcome["result"] == "completed" and text is not None:
        outcome["mismatched"] = text != twins[prompt]
    outcome["leaked"] = _leaks(outcome.get("error", "") + outcome.pop("body", ""))
    return outcome


async def _python_request(client: Any, prompt: str, stream: bool, max_tokens: int) -> dict[str, Any]:
    from cluster.errors import SniperError
    from cluster.distributed.protocol import Finished, Piece, Restarted, Routed

    outcome: dict[str, Any] = {}
    try:
        async def run() -> None:
            attempts, text = 0, []
            async for item in client.aevents(prompt, max_tokens=max_tokens, temperature=0.0, restartable=not stream):
                if isinstance(item, Routed):
                    attempts = item.attempt
                    outcome["continued"] = outcome.get("continued", False) or bool(text)
                elif isinstance(item, Piece):
                    text.append(item.text)
                elif isinstance(item, Restarted):
                    outcome["restarted"] = True
                    text.clear()
                elif isinstance(item, Finished):
                    outcome["tokens"] = item.usage.completion_tokens
            outcome["retried"] = attempts > 1 or bool(outcome.get("restarted"))
            outcome["text"] = "".join(text)

        await asyncio.wait_for(run(), REQUEST_TIMEOUT_S)
        outcome["result"] = "completed"
    except asyncio.TimeoutError:
        outcome["result"] = "hung"
    except SniperError as exc:
        outcome.update(result="typed error", error=f"{type(exc).__name__}: {str(exc)[:160]}")
    except Exception as exc:  # noqa: BLE001  (what the report must show as raw)
        outcome.update(result="raw error", error=f"{type(exc).__name__}: {str(exc)[:160]}")
    return outcome


def _http_error(status: int, body: Any) -> dict[str, Any]:
    """An OpenAI error body with its code is a documented error; anything else (a 500, a body
    without a code, not JSON) is raw."""
    error = body.get("error") if isinstance(body, dict) else None
    code = error.get("code") if isinstance(error, dict) else None
    typed = status != 500 and code is not None
    return {"result": "typed error" if typed else "raw error",
            "error": f"HTTP {status} {code}: {str(error.get('message') if isinstance(error, dict) else body)[:140]}"}


def _http_request(http: HttpApi, prompt: str, stream: bool, max_tokens: int) -> dict[str, Any]:
    """One request to the gateway's /v1/completions, classified as ``_python_request`` is."""
    body = {"model": http.model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0, "stream": stream}
    try:
        with requests.post(f"{http.url}/v1/completions", json=body, stream=stream, headers=AUTH,
                           timeout=REQUEST_TIMEOUT_S) as response:
            if response.status_code != 200:
                try:
                    return {**_http_error(response.status_code, response.json()), "body": response.text}
                except ValueError:
                    return {**_http_error(response.status_code, response.text[:140]), "body": response.text}
            if not stream:
                done = response.json()
                return {"result": "completed", "tokens": done["usage"]["completion_tokens"],
                        "text": done["choices"][0]["text"]}
            pieces, text = 0, []
            for line in response.iter_lines():
                if not line.startswith(b"data: "):
                    continue
                if line == b"data: [DONE]":
                    return {"result": "completed", "tokens": pieces, "text": "".join(text)}
                event = json.loads(line[6:])
                if "error" in event:
                    return {**_http_error(200, event), "body": line.decode("utf-8", "replace")}
                pieces += 1
                text += [c.get("text", "") for c in event.get("choices", []) if c.get("index", 0) == 0]
            return {"result": "raw error", "error": "the stream ended without [DONE]"}
    except requests.Timeout:
        return {"result": "hung"}
    except requests.RequestException as exc:
        return {"result": "raw error", "error": f"{type(exc).__name__}: {str(exc)[:160]}"}


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


async def _abandon_http(http: HttpApi, prompt: str) -> dict[str, Any]:
    """An HTTP caller that reads the first events of a long stream and closes its connection."""
    def run() -> int:
        body = {"model": http.model, "prompt": prompt, "max_tokens": 512, "stream": True}
        n = 0
        with requests.post(f"{http.url}/v1/completions", json=body, stream=True, headers=AUTH,
                           timeout=REQUEST_TIMEOUT_S) as response:
            for line in response.iter_lines():
                n += line.startswith(b"data: ")
                if n >= 3:
                    break
        return n

    return {"abandoned_after_items": await asyncio.to_thread(run)}


def _node_pid(node: str) -> int:
    import ray

    return ray.get(ray.get_actor(node, namespace=NAMESPACE).ready.remote(), timeout=60).pid


def _parent(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as f:
        return int(f.read().rsplit(")", 1)[1].split()[1])


def _is_head_raylet(pid: int) -> bool:
    with open(f"/proc/{pid}/cmdline", "rb") as f:
        return b"--head" in f.read().split(b"\0")


def _worker_ray_node(n_nodes: int, index: int) -> tuple[str, int]:
    """A node actor on a worker Ray node (the head holds the router and the gateway) and that
    node's raylet: the actor's worker process is a child of its node's raylet."""
    from cluster.distributed.protocol import node_name

    for i in range(n_nodes):
        name = node_name((index + i) % n_nodes)
        raylet = _parent(_node_pid(name))
        if not _is_head_raylet(raylet):
            return name, raylet
    raise RuntimeError("no node actor runs on a worker Ray node")


def _streaming_node(n_nodes: int, index: int, wait_s: float = 10.0) -> tuple[str, int]:
    """The node actor with the most sequences running in its engine (started, so streaming or
    about to: a request waiting for a slot has sent nothing), trying from node ``index`` on;
    waits for one up to ``wait_s``, then takes node ``index`` whatever it holds. Returns it and
    its count of running sequences."""
    import ray

    from cluster.distributed.protocol import node_name

    deadline = time.monotonic() + wait_s
    while True:
        running = {}
        for i in range(n_nodes):
            name = node_name((index + i) % n_nodes)
            try:
                report = ray.get(ray.get_actor(name, namespace=NAMESPACE).report.remote(), timeout=10)
            except Exception:  # noqa: BLE001  (restarting: try the next one)
                continue
            running[name] = int(report.stats.slots_busy or 0) if report.stats is not None else 0
        busiest = max(running, key=lambda n: running[n], default=None)  # ties: the first from ``index`` on
        if busiest is not None and running[busiest]:
            return busiest, running[busiest]
        if time.monotonic() > deadline:
            return node_name(index % n_nodes), 0
        time.sleep(0.05)


async def _until_back(client: Any, victim: str, restarts_before: int, since: float) -> float | None:
    """Seconds from ``since`` until the router has ``victim`` alive again after a restart."""
    while time.monotonic() < since + REQUEST_TIMEOUT_S:
        node = await _node_status(client, victim)
        if node is not None and node.alive and node.restarts > restarts_before:
            return time.monotonic() - since
        await asyncio.sleep(0.2)
    return None


async def _node_status(client: Any, name: str) -> NodeStatus | None:
    """The router's view of one node (None if it does not know it)."""
    return (await client.astatus()).node(name)


async def _until_dead(actor: Any, timeout_s: float = 30.0) -> None:
    """Returns once a call to ``actor`` fails because it died (it may take Ray a moment)."""
    import ray

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            await actor.__ray_ready__.remote()
        except ray.exceptions.RayActorError:
            return
        await asyncio.sleep(0.05)
    raise TimeoutError(f"the actor was not dead {timeout_s:g} s after ray.kill")


async def _restarts(client: Any, victim: str) -> int:
    node = await _node_status(client, victim)
    return node.restarts if node is not None else 0


async def _fault(kind: str, client: Any, http: HttpApi, prompt: str, n_nodes: int, index: int,
                 state_file: str) -> dict[str, Any]:
    import ray

    from cluster.distributed.protocol import ROUTER_NAME

    fault: dict[str, Any] = {"kind": kind, "at": time.monotonic()}
    if kind == "node":
        victim, streams = await asyncio.to_thread(_streaming_node, n_nodes, index)
        before = await _restarts(client, victim)
        os.kill(await asyncio.to_thread(_node_pid, victim), signal.SIGKILL)
        fault.update(target=victim, at=time.monotonic(), streams_in_hand=streams)
        fault["node_back_s"] = await _until_back(client, victim, before, fault["at"])
    elif kind == "ray-node":
        victim, raylet = await asyncio.to_thread(_worker_ray_node, n_nodes, index)
        before = await _restarts(client, victim)
        os.kill(raylet, signal.SIGKILL)
        fault.update(target=f"the Ray node of {victim} (raylet pid {raylet})", at=time.monotonic())
        fault["node_back_s"] = await _until_back(client, victim, before, fault["at"])
        running = local_cluster.state(announce=False, state_file=state_file)
        fault["ray_nodes_replaced"] = running.replaced if running is not None else None
    elif kind == "router":
        ray.kill(await asyncio.to_thread(ray.get_actor, ROUTER_NAME, namespace=NAMESPACE), no_restart=False)
        fault.update(target=ROUTER_NAME, at=time.monotonic())
    elif kind == "client":
        fault.update(target="a Python caller", **await _abandon(client, prompt))
    elif kind == "http-client":
        fault.update(target="an HTTP caller", **await _abandon_http(http, prompt))
    return fault


async def _run(client: Any, http: HttpApi, prompts: list[str], *, n_nodes: int, clients: int, duration_s: float,
               max_tokens: int, state_file: str, progress: bool) -> dict[str, Any]:
    import ray

    from cluster.distributed.protocol import ROUTER_NAME

    twins = {}  # each prompt's undisturbed greedy answer, before any fault
    for prompt in prompts:
        twins[prompt] = (await client.agenerate(prompt, max_tokens=max_tokens, temperature=0.0)).text
    t0 = time.monotonic()
    outcomes: list[dict[str, Any]] = []
    faults: list[dict[str, Any]] = []

    async def caller(i: int) -> None:
        k = 0
        while time.monotonic() - t0 < duration_s:
            outcomes.append(await _request(client, http, prompts[(i + k) % len(prompts)], WAYS[(i + k) % len(WAYS)],
                                           max_tokens, twins))
            k += 1

    async def injector() -> None:
        for at_s, kind in _schedule(duration_s):
            await asyncio.sleep(max(0.0, t0 + at_s - time.monotonic()))
            n_before = sum(f["kind"] == kind for f in faults)  # each node fault hits the next node
            faults.append(await _fault(kind, client, http, prompts[0], n_nodes, n_before + 1, state_file))
            log_progress(progress, f"  {time.monotonic() - t0:5.1f} s: {kind} fault done")

    await asyncio.gather(injector(), *(caller(i) for i in range(clients)))
    deadline, in_flight = time.monotonic() + 15, None
    while time.monotonic() < deadline and in_flight != 0:  # nothing left counted: abandoned streams settled too
        in_flight = sum(n.load for n in (await client.astatus()).nodes)
        await asyncio.sleep(0.2)
    # the router gone for good: typed errors within the wait (both ways in), no hang
    router = await asyncio.to_thread(ray.get_actor, ROUTER_NAME, namespace=NAMESPACE)
    ray.kill(router, no_restart=True)
    gone_at = time.monotonic()
    await _until_dead(router)  # ray.kill only asks: a request sent at once could still reach the live router
    after_gone = await asyncio.gather(*(_request(client, http, prompts[i % len(prompts)], WAYS[i % len(WAYS)],
                                                 max_tokens) for i in range(max(clients, len(WAYS)))))
    faults.append({"kind": "router-gone", "target": ROUTER_NAME, "at": gone_at,
                   "answers": sorted({o["result"] for o in after_gone}),
                   "slowest_answer_s": max(o["done"] - gone_at for o in after_gone)})
    for fault in faults:
        if fault["kind"] == "router-gone":
            continue
        later = [o for o in outcomes if o["sent"] >= fault["at"] and o["result"] == "completed"]
        fault["recovered_s"] = min(o["done"] for o in later) - fault["at"] if later else None
    return {"outcomes": outcomes, "after_router_gone": after_gone, "faults": faults, "t0": t0, "in_flight": in_flight}


def bench_chaos(model_path: str, *, n_nodes: int = 3, clients: int = 8, duration_s: float = 120.0,
                max_tokens: int = 96, progress: bool = True) -> dict[str, Any]:
    from cluster.distributed import deploy
    from cluster.engine.cache import discover_layout
    from cluster.distributed.client import Client
    from cluster.api.gateway import GatewayConfig, start_http

    prompts = topic_prompts(model_path)
    budget = int(discover_layout(model_path).unit_bytes.sum() * 0.5)
    with local_ray(n_nodes, NAMESPACE) as state_file:
        deploy.deploy(model_path, n_nodes, cache_bytes=budget, namespace=NAMESPACE, n_threads=1, n_ctx=1024)
        url = start_http(GatewayConfig(namespace=NAMESPACE, api_key=API_KEY), port=free_port())
        http = HttpApi(url, requests.get(f"{url}/v1/models", headers=AUTH, timeout=30).json()["data"][0]["id"])
        client = Client(namespace=NAMESPACE, router_wait_s=ROUTER_WAIT_S)
        log_progress(progress, f"chaos: {n_nodes} nodes, {clients} callers, {duration_s:g} s, gateway {url}")
        run = asyncio.run(_run(client, http, prompts, n_nodes=n_nodes, clients=clients, duration_s=duration_s,
                               max_tokens=max_tokens, state_file=state_file, progress=progress))
    outcomes = run["outcomes"]
    results = ("completed", "typed error", "raw error", "hung")
    counts = {r: sum(o["result"] == r for o in outcomes) for r in results}
    by_way = {way: {"sent": sum(o["way"] == way for o in outcomes),
                    **{r: sum(o["way"] == way and o["result"] == r for o in outcomes) for r in results}}
              for way in WAYS}
    faults = [{k: (v - run["t0"] if k == "at" else v) for k, v in f.items()} for f in run["faults"]]
    latencies = [o["done"] - o["sent"] for o in outcomes if o["result"] == "completed"]
    return {"model": model_path, "nodes": n_nodes, "clients": clients, "duration_s": duration_s,
            "max_tokens": max_tokens, "sent": len(outcomes), **counts, "by_way": by_way,
            "retried": sum(bool(o.get("retried")) for o in outcomes if o["result"] == "completed"),
            "continued": sum(bool(o.get("continued")) for o in outcomes if o["result"] == "completed"),
            "mismatched": sum(bool(o.get("mismatched")) for o in outcomes),
            "leaked": sum(o["leaked"] for o in outcomes) + sum(o["leaked"] for o in run["after_router_gone"]),
            "streams": {r: sum(o["way"].endswith("stream") and o["result"] == r for o in outcomes) for r in results},
            "errors": sorted({o["error"] for o in outcomes if "error" in o})[:10],
            "p50_latency_s": statistics.median(latencies) if latencies else None,
            "max_latency_s": max(latencies) if latencies else None, "faults": faults,
            "in_flight_after_run": run["in_flight"],
            "after_router_gone": [{k: o.get(k) for k in ("way", "result", "error")} for o in run["after_router_gone"]]}


def write_report(result: dict[str, Any], out_dir: Path, command: str) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "bench-chaos.json").write_text(json.dumps(result, indent=1) + "\n")
    f = lambda x: "n/a" if x is None else f"{x:.2f}"  # noqa: E731
    lines = ["# Chaos run: faults on a schedule under steady load", "",
             f"Produced by `{command}` on {time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime())}. Raw numbers: "
             "`bench-chaos.json`.", "",
             f"Model `{result['model']}` on {result['nodes']} node actors of a local cluster as `serve --local-nodes` "
             f"starts one (its daemon, 127.0.0.1), the HTTP gateway in front; {result['clients']} callers send "
             f"requests back to back for {result['duration_s']:g} s ({result['max_tokens']} tokens at most), taking "
             f"turns over the Python client (streamed, whole answers) and the OpenAI HTTP API (streamed, whole).", "",
             "| way in | sent | completed | typed error | raw error | hung |", "|---|---|---|---|---|---|"]
    for way, row in result["by_way"].items():
        lines.append(f"| {way} | {row['sent']} | {row['completed']} | {row['typed error']} | {row['raw error']} | "
                     f"{row['hung']} |")
    lines += [f"| **all** | {result['sent']} | {result['completed']} (retried or restarted: {result['retried']}) | "
              f"{result['typed error']} | {result['raw error']} | {result['hung']} |", "",
              f"Streams (both ways in): {result['streams']['completed']} completed, "
              f"{result['streams']['typed error'] + result['streams']['raw error']} failed, {result['streams']['hung']} "
              f"hung. Answers continued on another node after their node died mid-stream (seen by the Python callers): "
              f"{result['continued']}. Completed answers whose text differs from their undisturbed greedy twin: "
              f"{result['mismatched']}. Errors that showed a caller Ray's words (exception names, actor ids): "
              f"{result['leaked']}.", "",
              f"Latency of completed requests: p50 {f(result['p50_latency_s'])} s, slowest "
              f"{f(result['max_latency_s'])} s.", "",
              "| fault | at s | target | recovered s (first completed request sent after it) | node back s |",
              "|---|---|---|---|---|"]
    for fault in result["faults"]:
        if fault["kind"] == "router-gone":
            continue
        lines.append(f"| {fault['kind']} | {fault['at']:.1f} | {fault.get('target', '')} | "
                     f"{f(fault.get('recovered_s'))} | {f(fault.get('node_back_s'))} |")
    replaced = [x.get("ray_nodes_replaced") for x in result["faults"] if x["kind"] == "ray-node"]
    if replaced:
        lines += ["", f"Ray nodes the local-cluster daemon had replaced by the time the node actor was back: "
                  f"{replaced[-1]}."]
    gone = next(x for x in result["faults"] if x["kind"] == "router-gone")
    kills = [x for x in result["faults"] if x["kind"] == "node"]
    lines += ["", f"Node actors killed mid-stream: {len(kills)}, with "
              f"{', '.join(str(x.get('streams_in_hand', 0)) for x in kills)} sequences running in their engines "
              "(requests waiting for a slot there had sent nothing: they are retried, not continued)."]
    lines += ["", f"Router killed for good at the end: {len(result['after_router_gone'])} requests (every way in) "
              f"answered {', '.join(gone['answers'])}, the slowest after {gone['slowest_answer_s']:.1f} s (callers "
              f"wait for a router to come back: the Python client {ROUTER_WAIT_S:g} s here, the gateway its "
              f"default).", ""]
    lines += [f"Requests the router still counted in flight once the load stopped (abandoned streams included; "
              f"15 s allowed): {result['in_flight_after_run']}.", ""]
    if result["errors"]:
        lines += ["Errors seen:", ""] + [f"- `{e}`" for e in result["errors"]] + [""]
    ok = (result["raw error"] == 0 and result["hung"] == 0 and gone["answers"] == ["typed error"]
          and result["in_flight_after_run"] == 0
          and all(x.get("node_back_s") is not None for x in result["faults"] if x["kind"] in ("node", "ray-node")))
    streams_ok = (result["streams"]["typed error"] + result["streams"]["raw error"] + result["streams"]["hung"] == 0
                  and result["mismatched"] == 0 and result["leaked"] == 0)
    lines.append("Targets (0 hung, 0 raw errors, typed errors once the router is gone, nothing left in flight, every "
                 f"killed node back by itself): {'met' if ok else 'NOT met'}.")
    lines.append("Targets of nodes killed mid-stream (0 streams failed or hung, every answer identical to its "
                 f"undisturbed twin, no Ray words shown to a caller): {'met' if streams_ok else 'NOT met'}.")
    path = out_dir / "chaos.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def main(model: str, *, duration_s: float, out_dir: str | None, progress: bool) -> Path:
    result = bench_chaos(model, duration_s=duration_s, progress=progress)
    command = command_line("chaos", [("--model", model), ("--duration", f"{duration_s:g}"),
                                     ("--out", out_flag(out_dir))])
    return write_report(result, Path(out_dir or "docs"), command)
