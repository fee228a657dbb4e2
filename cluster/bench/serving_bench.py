"""``python -m cluster bench serving``: the speed of each way of reaching a node, one stream and C at once.

Side by side on one model, the same prompt, greedy, the same number of tokens, alternated round by
round so that a noisy machine affects every way alike:

* ``engine``: ``MoEEngine`` in this process (what ``python -m cluster run`` does);
* ``client.generate`` and ``client.stream``: a one-node deployment on a local Ray cluster through
  the Python client (router asked once, tokens streamed node -> caller);
* ``http.stream``: the same deployment through the OpenAI gateway, server-sent events;
* ``llama-server``: llama.cpp's own server with one slot (``scripts/build-llama-server.sh``
  builds it from the pinned llama-cpp-python sources), streamed; skipped, saying so, without it.

Every way runs with the same thread count and context, and at this process's niceness (Ray's
workers too: ``RAY_worker_niceness=0``); ours with an expert cache covering the whole model (no
memory pressure: the cost measured is the transport's). A figure is tokens per
second of the whole request as its caller sees it (first byte sent to last token received, a short
prompt's prefill included), the median of the rounds, and its ratio to ``engine`` and to
``llama-server`` taken round by round.

With ``concurrency`` (``--concurrency 1,8``), then for each C: C closed-loop callers
(``cluster.bench.closed_loop``: one warm-up request each, then requests back to back for a
``window_s`` window), greedy, the same prompts (``batch_bench.default_prompts``) and token budget,
alternated round by round, through

* ``engine``: ``MoEEngine`` with C slots alone in a child process (``batch_bench.run_engine``);
* ``client.stream``: a one-node deployment with C slots through the Python client (sync,
  ``Client.events``), one client object shared by the C caller threads;
* ``http.stream``: the same deployment through the gateway, server-sent events;
* ``llama-server``: ``-np C`` (``batch_bench.run_llama_server``), streamed.

A figure is the aggregate of generated tokens per second over the window (tokens as they arrive;
a request the window's end cuts counts what it had, except through HTTP, whose chunks do not
count tokens: an HTTP request started in the window runs to its end and the window lasts until
it did, which counts against HTTP); ratios are medians of per-round ratios.
"""

from __future__ import annotations

import json
import os
import statistics
import time
from pathlib import Path
from typing import Any, Callable

os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"  # Ray on loopback (DESIGN.md); read when ray is imported
# Ray starts its workers 15 nicer than itself: the gateway's proxy and replica would then wait for
# the node's compute (which takes its raylet's niceness back: node.take_back_priority) and for
# everything else on the machine. Every way measured here runs at this process's niceness.
os.environ.setdefault("RAY_worker_niceness", "0")

import requests  # noqa: E402

from cluster.bench import command_line, free_port, log_progress, out_flag, percentile  # noqa: E402
from cluster.bench.closed_loop import Send, closed_loop  # noqa: E402
from cluster.bench.llama_server import N_CTX, LlamaServer, find_llama_server  # noqa: E402
from cluster.bench.routing_bench import LocalRayCluster  # noqa: E402

NAMESPACE = "sniper-bench-serving"
TARGET = 0.9  # every served way at >= 0.9x the engine alone and llama-server (issue 12)
PROMPT = "the quick brown fox jumps over the lazy dog and then"


def _sse_tokens(url: str, api_key: str, model: str, prompt: str, n_tokens: int) -> int:
    body = {"model": model, "prompt": prompt, "max_tokens": n_tokens, "temperature": 0.0, "stream": True,
            "stream_options": {"include_usage": True}}
    n = 0
    with requests.post(f"{url}/v1/completions", json=body, stream=True, timeout=600,
                       headers={"Authorization": f"Bearer {api_key}"}) as response:
        response.raise_for_status()
        for line in response.iter_lines():
            if line.startswith(b"data: {"):
                usage = json.loads(line[6:]).get("usage")
                if usage:
                    n = usage["completion_tokens"]
    return n


def _timed(call: Callable[[], int]) -> tuple[float, int]:
    started = time.perf_counter()
    n = call()
    return time.perf_counter() - started, n


def bench_serving(model_path: str, *, n_tokens: int = 128, rounds: int = 5, n_threads: int = 2,
                  llama_server: str | None = None, concurrency: tuple[int, ...] = (), window_s: float = 8.0,
                  progress: bool = True) -> dict[str, Any]:
    """One stream through each way (``ways``), then C concurrent callers for each C of
    ``concurrency`` (``concurrent``), all on one local Ray cluster (see the module docstring)."""
    import ray

    from cluster.engine.cache import discover_layout

    budget = int(discover_layout(model_path).unit_bytes.sum())
    binary = find_llama_server(llama_server)
    result: dict[str, Any] = {"model": model_path, "n_tokens": n_tokens, "rounds": rounds, "n_threads": n_threads,
                              "cpus": os.cpu_count(), "prompt": PROMPT, "cache_bytes": budget,
                              "load_average_start": os.getloadavg()}
    if binary is None:
        result["llama_server_skipped"] = ("no llama-server binary (build it with scripts/build-llama-server.sh, "
                                          "or pass --llama-server PATH)")
    with LocalRayCluster(1, cpus_per_node=n_threads) as cluster:
        ray.init(address=cluster.address, namespace=NAMESPACE, logging_level="ERROR")
        port = free_port()  # Serve keeps its first HTTP options: every deployment's gateway answers here
        result["ways"] = _one_stream(model_path, budget, binary, port, n_tokens=n_tokens, rounds=rounds,
                                     n_threads=n_threads, progress=progress)
        if concurrency:
            result["window_s"] = window_s
            result["concurrent"] = {str(c): _concurrent(model_path, budget, binary, port, c, n_tokens=n_tokens,
                                                        rounds=rounds, n_threads=n_threads, window_s=window_s,
                                                        progress=progress)
                                    for c in concurrency}
    result["load_average_end"] = os.getloadavg()
    return result


class _Deployment:
    """A one-node deployment with ``n_slots`` slots on the connected Ray cluster, its HTTP gateway
    and a Python client; removed on exit."""

    def __init__(self, model_path: str, budget: int, port: int, n_threads: int, n_slots: int) -> None:
        self._args = (model_path, budget, port, n_threads, n_slots)
        self.api_key = "bench-serving"
        self.model_name = os.path.basename(model_path).removesuffix(".gguf")

    def __enter__(self) -> "_Deployment":
        from cluster.api.gateway import GatewayConfig, start_http
        from cluster.distributed import deploy
        from cluster.distributed.client import Client

        model_path, budget, port, n_threads, n_slots = self._args
        try:
            deploy.deploy(model_path, 1, cache_bytes=budget, namespace=NAMESPACE, n_threads=n_threads, n_ctx=N_CTX,
                          n_slots=n_slots, max_queue=max(8, 2 * n_slots))  # room for cut requests ending
            self.url = start_http(GatewayConfig(namespace=NAMESPACE, api_key=self.api_key), "127.0.0.1", port)
        except BaseException:
            self.__exit__()
            raise
        self.client = Client(namespace=NAMESPACE)
        return self

    def __exit__(self, *exc: object) -> None:
        from cluster.distributed import deploy

        deploy.shutdown(NAMESPACE)  # the gateway, the router and the node


def _one_stream(model_path: str, budget: int, binary: str | None, port: int, *, n_tokens: int, rounds: int,
                n_threads: int, progress: bool) -> dict[str, Any]:
    """One stream through each way, ``rounds`` rounds alternating the ways: tok/s and ratios."""
    from cluster.distributed.protocol import Finished
    from cluster.engine.moe_engine import MoEEngine
    from cluster.engine.sampling import SamplingParams

    params = SamplingParams(max_tokens=n_tokens, temperature=0.0)
    with _Deployment(model_path, budget, port, n_threads, n_slots=4) as served:
        client = served.client
        engine = MoEEngine(model_path, budget, n_ctx=N_CTX, n_threads=n_threads)
        server = LlamaServer(binary, model_path, n_threads).__enter__() if binary else None

        def stream_count() -> int:
            finished = [item for item in client.events(PROMPT, params) if isinstance(item, Finished)]
            return finished[-1].usage.completion_tokens

        ways: dict[str, Callable[[], int]] = {
            "engine": lambda: engine.generate(PROMPT, params).n_generated,
            "client.generate": lambda: client.generate(PROMPT, params).usage.completion_tokens,
            "client.stream": stream_count,
            "http.stream": lambda: _sse_tokens(served.url, served.api_key, served.model_name, PROMPT, n_tokens),
        }
        if server is not None:
            ways["llama-server"] = lambda: server.stream(PROMPT, n_tokens)
        samples: dict[str, list[float]] = {name: [] for name in ways}
        generated: dict[str, list[int]] = {name: [] for name in ways}
        try:
            for way in ways.values():  # warm-up: page cache, KV prefix, Ray handles
                way()
            for r in range(rounds):
                for name, way in ways.items():
                    seconds, n = _timed(way)
                    samples[name].append(n / seconds)
                    generated[name].append(n)
                log_progress(progress, f"  round {r + 1}/{rounds}: " +
                             ", ".join(f"{name} {samples[name][-1]:.0f} tok/s" for name in ways))
        finally:
            if server is not None:
                server.__exit__()
            engine.close()
    out = {name: {"tok_s": statistics.median(values), "samples": values, "tokens": generated[name]}
           for name, values in samples.items()}
    _ratios(out, samples)
    return out


def _ratios(out: dict[str, Any], samples: dict[str, list[float]]) -> None:
    """Adds each way's median per-round ratio to ``engine`` and to ``llama-server`` (where measured)."""
    for anchor in ("engine", "llama-server"):
        if anchor not in samples or len(samples[anchor]) != max(len(v) for v in samples.values()):
            continue
        for name, values in samples.items():
            ratios = [v / a for v, a in zip(values, samples[anchor]) if a]
            if ratios:
                out[name][f"vs_{anchor}"] = statistics.median(ratios)


def _client_send(client: Any, params: Any) -> Send:
    """One request through the Python client, measured as ``closed_loop`` wants it; cut at its
    deadline (it counts the tokens its pieces carried)."""
    from cluster.distributed.protocol import Finished, Piece

    def one(prompt: str, deadline: float) -> dict[str, Any]:
        sent, first, n = time.perf_counter(), None, 0
        events = client.events(prompt, params)
        try:
            for item in events:
                if isinstance(item, Piece):
                    n += len(item.tokens)
                    first = first or time.perf_counter()
                elif isinstance(item, Finished):
                    end = time.perf_counter()
                    return _measured(item.usage.completion_tokens, sent, first or end, end)
                if time.perf_counter() > deadline:
                    return {"tokens": n, "complete": False}
        finally:
            events.close()  # cancels a cut request on its node
        raise RuntimeError("the stream ended without its final message")

    return one


def _http_send(url: str, api_key: str, model: str, n_tokens: int) -> Send:
    """One streamed request through the gateway, run to its end (its usage chunk counts the tokens)."""
    body = {"model": model, "max_tokens": n_tokens, "temperature": 0.0, "stream": True,
            "stream_options": {"include_usage": True}}

    def one(prompt: str, deadline: float) -> dict[str, Any]:
        sent, first, n = time.perf_counter(), None, 0
        with requests.post(f"{url}/v1/completions", json={**body, "prompt": prompt}, stream=True, timeout=600,
                           headers={"Authorization": f"Bearer {api_key}"}) as response:
            response.raise_for_status()
            for line in response.iter_lines():
                if not line.startswith(b"data: {"):
                    continue
                event = json.loads(line[6:])
                if event.get("usage"):
                    n = event["usage"]["completion_tokens"]
                elif first is None and any(c.get("text") for c in event.get("choices", ())):
                    first = time.perf_counter()
        end = time.perf_counter()
        return _measured(n, sent, first or end, end)

    return one


def _measured(n: int, sent: float, first: float, end: float) -> dict[str, Any]:
    return {"tokens": n, "complete": True, "ttft_s": first - sent, "tpot_s": (end - first) / (n - 1) if n > 1 else None}


def _window(elapsed: float, requests_: list[dict[str, Any]]) -> dict[str, Any]:
    """A closed loop's window: aggregate tok/s, requests completed, their TTFT p50."""
    done = [r for r in requests_ if r["complete"]]
    return {"tok_s": sum(r["tokens"] for r in requests_) / elapsed, "requests": len(done),
            "ttft_p50_s": percentile([r["ttft_s"] for r in done], 50, observed=True)}


def _concurrent(model_path: str, budget: int, binary: str | None, port: int, c: int, *, n_tokens: int, rounds: int,
                n_threads: int, window_s: float, progress: bool) -> dict[str, Any]:
    """C closed-loop callers through each way, ``rounds`` rounds alternating the ways."""
    from cluster.bench.batch_bench import default_prompts, run_engine, run_llama_server
    from cluster.engine.sampling import SamplingParams

    prompts = default_prompts(model_path)
    params = SamplingParams(max_tokens=n_tokens, temperature=0.0)
    warmup_s = 60.0
    common = {"max_tokens": n_tokens, "n_threads": n_threads, "window_s": window_s, "warmup_s": warmup_s,
              "limit_bytes": None}
    samples: dict[str, list[float]] = {}
    runs: dict[str, list[dict[str, Any]]] = {}
    with _Deployment(model_path, budget, port, n_threads, n_slots=c) as served:
        ways: dict[str, Callable[[], dict[str, Any]]] = {
            "engine": lambda: run_engine(model_path, prompts, c, cache_bytes=budget, **common),
            "client.stream": lambda: _window(*closed_loop(c, prompts, _client_send(served.client, params),
                                                          warmup_s=warmup_s, window_s=window_s)),
            "http.stream": lambda: _window(*closed_loop(
                c, prompts, _http_send(served.url, served.api_key, served.model_name, n_tokens),
                warmup_s=warmup_s, window_s=window_s)),
        }
        if binary is not None:
            ways["llama-server"] = lambda: run_llama_server(binary, model_path, prompts, c, **common)
        for r in range(rounds):
            for name, way in ways.items():
                run = way()
                if "error" in run:
                    raise RuntimeError(f"{name} with {c} callers failed: {run['error']}")
                runs.setdefault(name, []).append(run)
                samples.setdefault(name, []).append(run["tok_s"])
            log_progress(progress, f"  {c} callers, round {r + 1}/{rounds}: " +
                         ", ".join(f"{name} {samples[name][-1]:.0f} tok/s" for name in ways))
    out: dict[str, Any] = {}
    for name, values in samples.items():
        ttft = [run["ttft_p50_s"] for run in runs[name] if run.get("ttft_p50_s") is not None]
        out[name] = {"tok_s": statistics.median(values), "samples": values,
                     "ttft_p50_s": statistics.median(ttft) if ttft else None}
    _ratios(out, samples)
    return out


def write_report(result: dict[str, Any], out_dir: Path, command: str) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "bench-serving.json").write_text(json.dumps(result, indent=1) + "\n")
    lines = ["# Serving path: each way of reaching a node", "",
             f"Produced by `{command}` on {time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime())} "
             f"({result['cpus']} CPUs; load average {_load(result, 'start')} at the start, {_load(result, 'end')} at "
             "the end: other work on the machine takes its CPUs from every way alike, round by round). Raw numbers: "
             "`bench-serving.json`.", "",
             f"Model `{result['model']}`; {result['n_tokens']} tokens, greedy, {result['n_threads']} threads everywhere, "
             f"{result['rounds']} rounds alternating the ways; our engine with an expert cache holding the whole "
             "model. Tokens per second of the whole request as its caller sees it (a short prompt's prefill "
             "included); ratios are medians of per-round ratios.", "", "## One stream", "",
             "| way | tok/s (median) | vs engine alone | vs llama-server |", "|---|---|---|---|"]
    for name, way in result["ways"].items():
        vs_server = f"{way['vs_llama-server']:.3f}" if "vs_llama-server" in way else "n/a"
        lines.append(f"| {name} | {way['tok_s']:.1f} | {way['vs_engine']:.3f} | {vs_server} |")
    lines.append("")
    if "llama_server_skipped" in result:
        lines += [f"llama-server not measured: {result['llama_server_skipped']}.", ""]
    served = [n for n in result["ways"] if n.startswith(("client", "http"))]
    met = {n: all(result["ways"][n].get(f"vs_{a}", 1.0) >= TARGET for a in ("engine", "llama-server")) for n in served}
    lines.append("Target (every served way ≥ 0.9× the engine alone and ≥ 0.9× llama-server): " +
                 ", ".join(f"{n} {'met' if ok else 'NOT met'}" for n, ok in met.items()) + ".")
    if result.get("concurrent"):
        lines += ["", *_concurrent_report(result)]
    path = out_dir / "serving.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def _load(result: dict[str, Any], when: str) -> str:
    load = result.get(f"load_average_{when}")
    return "/".join(f"{x:.1f}" for x in load) + " (1/5/15 min)" if load else "n/a"


def _concurrent_report(result: dict[str, Any]) -> list[str]:
    """The section of C concurrent callers: a table per C, and the targets (issue 26)."""
    levels = result["concurrent"]
    lines = ["## C concurrent callers on one node with C slots", "",
             f"C closed-loop callers, each sending requests back to back (one warm-up request each, then a "
             f"{result['window_s']:g} s window), the synthetic model's prompts in turn ({result['n_tokens']} tokens "
             f"at most, greedy); ways alternated round by round, {result['rounds']} rounds. Aggregate generated "
             "tokens per second over the window (the median round); TTFT: the median of the rounds' medians; "
             "ratios are medians of per-round ratios. `engine`: the engine with C slots alone in a process; "
             "`llama-server`: `-np C`.", ""]
    for c, ways in levels.items():
        lines += [f"### C = {c}", "", "| way | tok/s (median) | vs engine alone | vs llama-server | TTFT p50 ms |",
                  "|---|---|---|---|---|"]
        for name, way in ways.items():
            cells = [f"{way[k]:.3f}" if k in way else "n/a" for k in ("vs_engine", "vs_llama-server")]
            ttft = f"{way['ttft_p50_s'] * 1e3:.0f}" if way.get("ttft_p50_s") is not None else "n/a"
            lines.append(f"| {name} | {way['tok_s']:.1f} | {cells[0]} | {cells[1]} | {ttft} |")
        lines.append("")
    targets = concurrent_targets(result)
    if targets:
        lines += ["Targets:", "", "| target | measured | wanted | met |", "|---|---|---|---|"]
        for name, t in targets.items():
            value = f"{t['value']:.3f}" if t["value"] is not None else "n/a"
            lines.append(f"| {name} | {value} | ≥ {t['target']} | {'yes' if t['met'] else 'no'} |")
        lines.append("")
    return lines


def concurrent_targets(result: dict[str, Any]) -> dict[str, Any]:
    """Issue 26's targets at the largest C measured: the Python client's and the HTTP stream's
    aggregate ≥ 0.9× llama-server ``-np C``, and ≥ one served stream's (their own C = 1 figure)."""
    levels = result.get("concurrent") or {}
    if not levels:
        return {}
    top = max(levels, key=int)
    out: dict[str, Any] = {}
    for way in ("client.stream", "http.stream"):
        if int(top) > 1 and "1" in levels:
            value = levels[top][way]["tok_s"] / levels["1"][way]["tok_s"]
            out[f"{way} C={top} vs C=1"] = {"value": value, "target": 1.0, "met": value >= 1.0}
        value = levels[top][way].get("vs_llama-server")
        out[f"{way} C={top} vs llama-server -np {top}"] = {"value": value, "target": TARGET,
                                                           "met": value is not None and value >= TARGET}
    return out


def main(model: str, *, n_tokens: int, rounds: int, n_threads: int, llama_server: str | None,
         out_dir: str | None, concurrency: tuple[int, ...] = (), window_s: float = 8.0) -> Path:
    result = bench_serving(model, n_tokens=n_tokens, rounds=rounds, n_threads=n_threads, llama_server=llama_server,
                           concurrency=concurrency, window_s=window_s)
    command = command_line("serving", [("--model", model), ("--max-tokens", n_tokens), ("--quick", rounds < 5),
                                       ("--concurrency", ",".join(map(str, concurrency)) or None),
                                       ("--window-s", window_s if concurrency else None),
                                       ("--llama-server", llama_server), ("--out", out_flag(out_dir))])
    return write_report(result, Path(out_dir or "docs"), command)
