"""``python -m cluster bench serving``: one stream's speed through each way of reaching a node.

Side by side on one model, the same prompt, greedy, the same number of tokens, alternated round by
round so that a noisy machine affects every way alike:

* ``engine``: ``MoEEngine`` in this process (what ``python -m cluster run`` does);
* ``client.generate`` and ``client.stream``: a one-node deployment on a local Ray cluster through
  the Python client (router asked once, tokens streamed node -> caller);
* ``http.stream``: the same deployment through the OpenAI gateway, server-sent events;
* ``llama-server``: llama.cpp's own server with one slot (``scripts/build-llama-server.sh``
  builds it from the pinned llama-cpp-python sources), streamed; skipped, saying so, without it.

Every way runs with the same thread count and context; ours with an expert cache covering the
whole model (no memory pressure: the cost measured is the transport's). A figure is tokens per
second of the whole request as its caller sees it (first byte sent to last token received, a short
prompt's prefill included), the median of the rounds, and its ratio to ``engine`` and to
``llama-server`` taken round by round.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"  # Ray on loopback (DESIGN.md); read when ray is imported

import requests  # noqa: E402

from cluster.bench import command_line, free_port, log_progress, out_flag  # noqa: E402
from cluster.bench.routing_bench import LocalRayCluster  # noqa: E402

NAMESPACE = "sniper-bench-serving"
TARGET = 0.9  # every served way at >= 0.9x the engine alone and llama-server (issue 12)
N_CTX = 1024
PROMPT = "the quick brown fox jumps over the lazy dog and then"


def find_llama_server(path: str | None) -> str | None:
    """``path``, else ``llama-server`` next to this Python (where the build script puts it), else on PATH."""
    if path:
        return path
    beside = Path(sys.executable).parent / "llama-server"
    return str(beside) if beside.is_file() else shutil.which("llama-server")


class LlamaServer:
    """llama.cpp's ``llama-server`` on 127.0.0.1 (``n_slots`` parallel slots of ``n_ctx`` each; in a
    memory cgroup when ``limit`` is given), stopped on exit."""

    def __init__(self, binary: str, model: str, n_threads: int, n_slots: int = 1, n_ctx: int = N_CTX,
                 limit: Any = None) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._cmd = [binary, "-m", model, "--host", "127.0.0.1", "--port", str(self.port), "-t", str(n_threads),
                     "-tb", str(n_threads), "-c", str(n_ctx * n_slots), "-np", str(n_slots), "--no-webui"]
        self._limit = limit
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def __enter__(self) -> "LlamaServer":
        self._log = tempfile.TemporaryFile()  # a pipe nobody reads would fill and stop the server
        self._proc = subprocess.Popen(self._cmd, stdout=subprocess.DEVNULL, stderr=self._log,
                                      preexec_fn=self._limit.enter if self._limit is not None else None)
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                self._log.seek(0)
                raise RuntimeError(f"llama-server exited ({self._proc.returncode}): "
                                   f"{self._log.read().decode(errors='replace')[-2000:]}")
            try:
                if requests.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return self
            except requests.ConnectionError:
                pass
            time.sleep(0.2)
        self.__exit__()
        raise RuntimeError("llama-server did not answer /health within 600 s")

    def __exit__(self, *exc: object) -> None:
        if self._proc is not None and self._proc.poll() is None:
            self._proc.send_signal(signal.SIGTERM)
            try:
                self._proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()

    def stream(self, prompt: str, n_tokens: int) -> int:
        body = {"prompt": prompt, "n_predict": n_tokens, "temperature": 0.0, "stream": True, "ignore_eos": True}
        n = 0
        with requests.post(f"{self.url}/completion", json=body, stream=True, timeout=600) as response:
            response.raise_for_status()
            for line in response.iter_lines():
                if line.startswith(b"data: "):
                    event = json.loads(line[6:])
                    n = event.get("tokens_predicted", n) if event.get("stop") else n + (1 if event.get("content") else 0)
        return n


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
                  llama_server: str | None = None, progress: bool = True) -> dict[str, Any]:
    import ray

    from cluster.distributed import deploy
    from cluster.engine.cache import discover_layout
    from cluster.distributed.client import Client
    from cluster.distributed.deploy import stop_http
    from cluster.engine.moe_engine import MoEEngine
    from cluster.api.gateway import GatewayConfig, start_http
    from cluster.distributed.protocol import Finished
    from cluster.engine.sampling import SamplingParams

    budget = int(discover_layout(model_path).unit_bytes.sum())
    params = SamplingParams(max_tokens=n_tokens, temperature=0.0)
    binary = find_llama_server(llama_server)
    result: dict[str, Any] = {"model": model_path, "n_tokens": n_tokens, "rounds": rounds, "n_threads": n_threads,
                              "cpus": os.cpu_count(), "prompt": PROMPT, "cache_bytes": budget}
    api_key = "bench-serving"
    with LocalRayCluster(1, cpus_per_node=n_threads) as cluster:
        ray.init(address=cluster.address, namespace=NAMESPACE, logging_level="ERROR")
        deploy.deploy(model_path, 1, cache_bytes=budget, namespace=NAMESPACE, n_threads=n_threads, n_ctx=N_CTX)
        url = start_http(GatewayConfig(namespace=NAMESPACE, api_key=api_key), "127.0.0.1", free_port())
        client = Client(namespace=NAMESPACE)
        model_name = os.path.basename(model_path).removesuffix(".gguf")
        engine = MoEEngine(model_path, budget, n_ctx=N_CTX, n_threads=n_threads)
        server = LlamaServer(binary, model_path, n_threads).__enter__() if binary else None
        if server is None:
            result["llama_server_skipped"] = ("no llama-server binary (build it with scripts/build-llama-server.sh, "
                                              "or pass --llama-server PATH)")

        def stream_count() -> int:
            finished = [item for item in client.events(PROMPT, params) if isinstance(item, Finished)]
            return finished[-1].usage["completion_tokens"]

        ways: dict[str, Callable[[], int]] = {
            "engine": lambda: engine.generate(PROMPT, params).n_generated,
            "client.generate": lambda: client.generate(PROMPT, params).usage["completion_tokens"],
            "client.stream": stream_count,
            "http.stream": lambda: _sse_tokens(url, api_key, model_name, PROMPT, n_tokens),
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
            stop_http(NAMESPACE)
            deploy.shutdown(NAMESPACE)
    result["ways"] = {name: {"tok_s": statistics.median(values), "samples": values, "tokens": generated[name]}
                      for name, values in samples.items()}
    for anchor in ("engine", "llama-server"):
        if anchor not in samples:
            continue
        for name, values in samples.items():
            ratios = [v / a for v, a in zip(values, samples[anchor])]
            result["ways"][name][f"vs_{anchor}"] = statistics.median(ratios)
    return result


def write_report(result: dict[str, Any], out_dir: Path, command: str) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "bench-serving.json").write_text(json.dumps(result, indent=1) + "\n")
    lines = ["# Serving path: one stream through each way of reaching a node", "",
             f"Produced by `{command}` on {time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime())} "
             f"({result['cpus']} CPUs). Raw numbers: `bench-serving.json`.", "",
             f"Model `{result['model']}`; {result['n_tokens']} tokens, greedy, {result['n_threads']} threads everywhere, "
             f"{result['rounds']} rounds alternating the ways; our engine with an expert cache holding the whole "
             "model. Tokens per second of the whole request as its caller sees it (a short prompt's prefill "
             "included); ratios are medians of per-round ratios.", "",
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
    path = out_dir / "serving.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def main(model: str, *, n_tokens: int, rounds: int, n_threads: int, llama_server: str | None,
         out_dir: str | None) -> Path:
    result = bench_serving(model, n_tokens=n_tokens, rounds=rounds, n_threads=n_threads, llama_server=llama_server)
    command = command_line("serving", [("--model", model), ("--max-tokens", n_tokens), ("--quick", rounds < 5),
                                       ("--llama-server", llama_server), ("--out", out_flag(out_dir))])
    return write_report(result, Path(out_dir or "docs"), command)
