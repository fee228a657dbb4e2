"""``python -m cluster bench batch``: continuous batching on one node, against llama.cpp's own server.

Closed loop: C clients each send a request (greedy, ``max_tokens``), wait for its answer and
send the next, for C = 1, 2, 4, 8, 16. Side by side on the same model, prompts and thread count:

* ``engine``: ``MoEEngine`` with C sequence slots and the expert cache (a child process,
  ``cluster.bench.batch_worker``); C = 1 is the engine with one slot. Under the limit the engine
  adapts how many sequences run together (``cluster.engine.batch_width``) and batches sequences expected
  to need the same experts (``cluster.engine.batch_admission``); beside it, the same engine without
  each rule (``LIMITED_VARIANTS``): ``first come, first served`` (no expert admission) and
  ``all slots`` (neither: every sequence decodes at once), to show what each rule is worth;
* ``llama-server``: llama.cpp's server with ``-np C`` (built by this benchmark from the llama.cpp
  sources in the pinned llama-cpp-python distribution if there is none), streamed over loopback.

Each in two regimes: the model in RAM (a cache budget of the whole model), and under a cgroup
memory limit of ``limit_fraction`` of the model file (the cache's budget ``auto``; the page cache
dropped before each run). Each run warms up with one request per client, then measures a window
of ``window_s`` seconds: aggregate generated tokens per second (tokens as they arrive), time to
first token and time per output token of the requests that completed in it (p50, p99), the bytes
the process made the kernel read per generated token, and for the engine the expert units each
step selected (the union of its sequences' experts, all layers), decoding sequences per step and
the cache's expert bytes per generated token. Figures are ratios measured in the same run.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import requests

from cluster.distributed import memory_limit as memlimit
from cluster.bench import command_line, log_progress, out_flag, percentile
from cluster.bench.closed_loop import closed_loop
from cluster.bench.llama_server import LlamaServer, find_llama_server
from cluster.bench.worker import read_bytes
from cluster.engine.node_memory import MIB

CONCURRENCY = (1, 2, 4, 8, 16)
LIMITED_VARIANTS: dict[str, dict[str, bool]] = {  # the engine without its rules, under the limit at C > 1
    "engine_fifo": {"expert_admission": False},
    "engine_all_slots": {"expert_admission": False, "adaptive_width": False},
}
N_CTX = 1024


def _summary(elapsed: float, reqs: list[dict[str, Any]], disk_bytes: int) -> dict[str, Any]:
    tokens = sum(r["tokens"] for r in reqs)
    done = [r for r in reqs if r["complete"]]
    ttft = [r["ttft_s"] for r in done]
    tpot = [r["tpot_s"] for r in done if r.get("tpot_s") is not None]
    return {"tok_s": tokens / elapsed if elapsed > 0 else float("nan"), "tokens": tokens, "requests": len(done),
            "ttft_p50_s": percentile(ttft, 50, observed=True), "ttft_p99_s": percentile(ttft, 99, observed=True),
            "tpot_p50_s": percentile(tpot, 50, observed=True), "tpot_p99_s": percentile(tpot, 99, observed=True),
            "disk_bytes_per_token": disk_bytes / tokens if tokens else None}


def run_engine(model: str, prompts: list[str], clients: int, *, cache_bytes: int | str, max_tokens: int, n_threads: int,
               window_s: float, warmup_s: float, limit_bytes: int | None,
               knobs: dict[str, Any] | None = None) -> dict[str, Any]:
    """The engine with ``clients`` slots in a closed loop (a child process, under ``limit_bytes``
    if given); ``knobs``: other ``EngineConfig`` fields (``LIMITED_VARIANTS``)."""
    spec = {"model": model, "cache_bytes": cache_bytes, "n_ctx": N_CTX, "slots": clients, "clients": clients,
            "n_threads": n_threads, "prompts": prompts, "max_tokens": max_tokens, "window_s": window_s,
            "warmup_s": warmup_s, "knobs": knobs or {}}
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(spec, f)
    argv = [sys.executable, "-m", "cluster.bench.batch_worker", f.name]
    timeout = 4 * (window_s + warmup_s) + 600
    try:
        if limit_bytes is None:
            proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
        else:
            memlimit.drop_page_cache(model)
            with memlimit.MemoryLimit("sniper-batch", limit_bytes) as limit:
                proc = limit.run(argv, timeout_s=timeout)
                if proc.returncode != 0 and limit.oom_kills():
                    return {"error": _oom(limit_bytes), "oom_killed": True}
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    finally:
        os.unlink(f.name)
    if proc.returncode != 0:
        return {"error": f"exit {proc.returncode}: {proc.stderr.strip()[-500:]}"}
    raw = json.loads(proc.stdout.strip().splitlines()[-1])
    out = _summary(raw["elapsed_s"], raw["requests"], raw["disk_read_bytes"])
    cache = raw["cache"]
    if cache and raw["steps"]:
        selected = sum(cache[k] for k in ("n_hits_decode", "n_misses_decode", "n_hits_prefill", "n_misses_prefill"))
        out["experts_per_step"] = selected / raw["steps"]
        out["expert_bytes_per_token"] = ((cache["bytes_read_decode"] + cache["bytes_read_prefill"]) / out["tokens"]
                                         if out["tokens"] else None)
        out["decode_hit_rate"] = (cache["n_hits_decode"] / (cache["n_hits_decode"] + cache["n_misses_decode"])
                                  if cache["n_hits_decode"] + cache["n_misses_decode"] else None)
    out["decode_batch"] = raw["decode_batch"]
    out["width"] = raw.get("width")
    out["budget_bytes"] = raw["budget_bytes"]
    return out


def run_llama_server(binary: str, model: str, prompts: list[str], clients: int, *, max_tokens: int, n_threads: int,
                     window_s: float, warmup_s: float, limit_bytes: int | None) -> dict[str, Any]:
    limit = None
    if limit_bytes is not None:
        memlimit.drop_page_cache(model)
        limit = memlimit.MemoryLimit("sniper-batch-server", limit_bytes)
    try:
        with LlamaServer(binary, model, n_threads, n_slots=clients, n_ctx=N_CTX, limit=limit) as server:
            return _drive_server(server, prompts, clients, max_tokens, window_s, warmup_s)
    except RuntimeError as exc:
        if limit is not None and limit.oom_kills():
            return {"error": _oom(limit.limit_bytes), "oom_killed": True}
        return {"error": str(exc)[-500:]}
    finally:
        if limit is not None:
            limit.close()


def _oom(limit_bytes: int) -> str:
    return f"killed by the kernel's OOM killer under the {limit_bytes / MIB:.0f} MiB cgroup limit"


def _drive_server(server: LlamaServer, prompts: list[str], clients: int, max_tokens: int, window_s: float,
                  warmup_s: float) -> dict[str, Any]:
    measured: dict[str, int] = {}

    def begin() -> None:
        measured["io"] = read_bytes(server.pid or 0)

    def one(prompt: str, deadline: float) -> dict[str, Any]:
        body = {"prompt": prompt, "n_predict": max_tokens, "temperature": 0.0, "stream": True, "cache_prompt": False}
        sent, first, n = time.perf_counter(), None, 0
        try:
            with requests.post(f"{server.url}/completion", json=body, stream=True,
                               timeout=max(1.0, deadline - sent) if deadline != float("inf") else 3600) as response:
                response.raise_for_status()
                for line in response.iter_lines():
                    if time.perf_counter() > deadline:
                        return {"tokens": n, "complete": False}
                    if not line.startswith(b"data: "):
                        continue
                    event = json.loads(line[6:])
                    if event.get("content"):
                        n += 1
                        first = first or time.perf_counter()
                    if event.get("stop"):
                        n = event.get("tokens_predicted", n)
                        break
        except requests.RequestException:
            return {"tokens": n, "complete": False}
        end = time.perf_counter()
        first = first or end
        return {"tokens": n, "complete": True, "ttft_s": first - sent,
                "tpot_s": (end - first) / (n - 1) if n > 1 else None}

    elapsed, measured_requests = closed_loop(clients, prompts, one, warmup_s=warmup_s, window_s=window_s, begin=begin)
    return _summary(elapsed, measured_requests, read_bytes(server.pid or 0) - measured["io"])


def ensure_llama_server(path: str | None, progress: bool) -> str | None:
    """The llama-server binary; built from the pinned llama-cpp-python sources if there is none."""
    found = find_llama_server(path)
    if found:
        return found
    script = Path(__file__).resolve().parents[2] / "scripts" / "build-llama-server.sh"
    if not script.is_file():
        return None
    log_progress(progress, "building llama-server from the pinned llama.cpp sources (a few minutes)")
    venv = Path(sys.executable).parent.parent
    proc = subprocess.run(["bash", str(script), str(venv)], capture_output=True, text=True)
    if proc.returncode != 0:
        log_progress(progress, f"  llama-server build failed: {proc.stderr.strip()[-300:]}")
        return None
    return find_llama_server(None)


def bench_batch(model: str, prompts: list[str], *, concurrency: tuple[int, ...] = CONCURRENCY, max_tokens: int = 64,
                n_threads: int = 2, window_s: float = 20.0, warmup_s: float = 60.0, limit_fraction: float | None = 0.5,
                llama_server: str | None = None, progress: bool = True) -> dict[str, Any]:
    from cluster.engine.cache import discover_layout

    layout = discover_layout(model)
    footprint = int(layout.unit_bytes.sum())
    binary = ensure_llama_server(llama_server, progress)
    regimes: dict[str, int | None] = {"in_ram": None}
    skipped: dict[str, str] = {}
    if limit_fraction is not None:
        reason = memlimit.unavailable_reason()
        if reason:
            skipped["limited"] = reason
        else:
            regimes["limited"] = int(limit_fraction * os.path.getsize(model))
    if binary is None:
        skipped["llama-server"] = "no llama-server binary (scripts/build-llama-server.sh builds it)"
    results: dict[str, Any] = {}
    for regime, limit_bytes in regimes.items():
        rows: dict[str, Any] = {}
        for c in concurrency:
            budget: int | str = int(footprint * 1.05) if limit_bytes is None else "auto"
            log_progress(progress, f"{regime}: engine, {c} slots, {c} clients")
            engine = run_engine(model, prompts, c, cache_bytes=budget, max_tokens=max_tokens, n_threads=n_threads,
                                window_s=window_s, warmup_s=warmup_s, limit_bytes=limit_bytes)
            row: dict[str, Any] = {"engine": engine}
            for variant, knobs in LIMITED_VARIANTS.items() if limit_bytes is not None and c > 1 else ():
                log_progress(progress, f"{regime}: {variant} ({knobs}), {c} clients")
                row[variant] = run_engine(model, prompts, c, cache_bytes=budget, max_tokens=max_tokens,
                                          n_threads=n_threads, window_s=window_s, warmup_s=warmup_s,
                                          limit_bytes=limit_bytes, knobs=knobs)
            if binary is not None:
                log_progress(progress, f"{regime}: llama-server -np {c}, {c} clients")
                row["llama_server"] = run_llama_server(binary, model, prompts, c, max_tokens=max_tokens,
                                                       n_threads=n_threads, window_s=window_s, warmup_s=warmup_s,
                                                       limit_bytes=limit_bytes)
            rows[str(c)] = row
        results[regime] = {"limit_bytes": limit_bytes, "by_concurrency": rows}
    return {"model": model, "file_bytes": os.path.getsize(model), "expert_bytes": footprint,
            "n_layers": layout.n_layers, "n_experts": layout.n_experts, "top_k": layout.n_experts_used,
            "max_tokens": max_tokens, "n_threads": n_threads, "window_s": window_s, "n_prompts": len(prompts),
            "regimes": results, "skipped": skipped, "targets": targets(results)}


def _ratio(a: Any, b: Any) -> float | None:
    return a / b if isinstance(a, (int, float)) and isinstance(b, (int, float)) and b else None


def targets(results: dict[str, Any]) -> dict[str, Any]:
    """The issue's targets at C = 8 (each a ratio measured in this run) and whether they are met."""
    out: dict[str, Any] = {}

    def cell(regime: str, c: int, who: str, key: str) -> Any:
        return (results.get(regime, {}).get("by_concurrency", {}).get(str(c), {}).get(who) or {}).get(key)

    ram = _ratio(cell("in_ram", 8, "engine", "tok_s"), cell("in_ram", 8, "llama_server", "tok_s"))
    out["in_ram_c8_vs_llama_server"] = {"value": ram, "target": 0.9, "met": ram is not None and ram >= 0.9}
    tpot = _ratio(cell("in_ram", 8, "engine", "tpot_p99_s"), cell("in_ram", 1, "engine", "tpot_p99_s"))
    out["in_ram_c8_tpot_p99_vs_one_slot"] = {"value": tpot, "target": 3.0, "met": tpot is not None and tpot <= 3.0,
                                             "lower_is_better": True}
    agg = _ratio(cell("limited", 8, "engine", "tok_s"), cell("limited", 1, "engine", "tok_s"))
    out["limited_c8_vs_one_slot"] = {"value": agg, "target": 2.0, "met": agg is not None and agg >= 2.0}
    per_token = _ratio(cell("limited", 8, "engine", "expert_bytes_per_token"),
                       cell("limited", 1, "engine", "expert_bytes_per_token"))
    out["limited_c8_expert_bytes_per_token_vs_one_slot"] = {"value": per_token, "target": 0.5,
                                                            "met": per_token is not None and per_token <= 0.5,
                                                            "lower_is_better": True}
    server = _ratio(cell("limited", 8, "engine", "tok_s"), cell("limited", 8, "llama_server", "tok_s"))
    out["limited_c8_vs_llama_server"] = {"value": server, "target": 10.0, "met": server is not None and server >= 10.0}
    if cell("limited", 8, "llama_server", "oom_killed") and cell("limited", 8, "engine", "tok_s"):
        out["limited_c8_vs_llama_server"]["note"] = "llama-server was killed by the OOM killer; the engine served"
    return out


def _fmt(value: Any, scale: float = 1.0, digits: int = 1) -> str:
    return "-" if not isinstance(value, (int, float)) or value != value else f"{value * scale:.{digits}f}"


def _variant(run: dict[str, Any]) -> str:
    if "error" in run:
        return "error"
    return (f"{_fmt(run.get('tok_s'))}, {_fmt(run.get('expert_bytes_per_token'), 1 / 1024, 0)}, "
            f"{_fmt(run.get('ttft_p50_s'), 1e3, 0)}")


def write_report(report: dict[str, Any], out_dir: Path, command: str) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "batching.json").write_text(json.dumps(report, indent=1, default=float))
    plots = _plot(report, out_dir)
    lines = ["# Continuous batching on one node", "",
             f"Produced by `{command}`. Model `{report['model']}` ({report['file_bytes'] / MIB:.0f} MiB file, "
             f"{report['n_layers']} layers × {report['n_experts']} experts, top-{report['top_k']}); "
             f"{report['n_threads']} threads; greedy, {report['max_tokens']} tokens per request; closed loop of C "
             f"clients; a {report['window_s']:.0f} s window after one warm-up request per client. See the module "
             "docstring of `cluster/bench/batch_bench.py` for what each column measures.", ""]
    if report.get("n_topics"):
        lines += [f"Prompts: the synthetic model's first {report['n_topics']} topics in turn (users of that many "
                  "domains).", ""]
    for name, why in report["skipped"].items():
        lines.append(f"Skipped {name}: {why}.")
    for data in report["regimes"].values():
        limit = data["limit_bytes"]
        lines += ["", f"## {'model in RAM' if limit is None else f'cgroup limit {limit / MIB:.0f} MiB (50 % of the file)'}", "",
                  "| C | engine tok/s | llama-server tok/s | ratio | engine TTFT p50/p99 ms | server TTFT p50/p99 ms | "
                  "engine TPOT p50/p99 ms | server TPOT p50/p99 ms | decoding seqs/step | experts/step | "
                  "expert KiB/token | disk KiB/token engine / server | width at the end | first come first served: "
                  "tok/s, expert KiB/token, TTFT p50 ms | all slots: tok/s, expert KiB/token, TTFT p50 ms |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for c, row in data["by_concurrency"].items():
            e, s = row.get("engine", {}), row.get("llama_server", {})
            if "error" in e:
                lines.append(f"| {c} | error: {e['error'][:80]} |")
                continue
            server_tok_s = _fmt(s.get('tok_s')) if "error" not in s else "OOM-killed" if s.get("oom_killed") else "error"
            lines.append(
                f"| {c} | {_fmt(e.get('tok_s'))} | {server_tok_s} | "
                f"{_fmt(_ratio(e.get('tok_s'), s.get('tok_s')), 1, 2)} | "
                f"{_fmt(e.get('ttft_p50_s'), 1e3, 0)}/{_fmt(e.get('ttft_p99_s'), 1e3, 0)} | "
                f"{_fmt(s.get('ttft_p50_s'), 1e3, 0)}/{_fmt(s.get('ttft_p99_s'), 1e3, 0)} | "
                f"{_fmt(e.get('tpot_p50_s'), 1e3)}/{_fmt(e.get('tpot_p99_s'), 1e3)} | "
                f"{_fmt(s.get('tpot_p50_s'), 1e3)}/{_fmt(s.get('tpot_p99_s'), 1e3)} | {_fmt(e.get('decode_batch'), 1, 2)} | "
                f"{_fmt(e.get('experts_per_step'), 1, 0)} | {_fmt(e.get('expert_bytes_per_token'), 1 / 1024, 0)} | "
                f"{_fmt(e.get('disk_bytes_per_token'), 1 / 1024, 0)} / {_fmt(s.get('disk_bytes_per_token'), 1 / 1024, 0)} | "
                f"{_fmt(e.get('width'), 1, 0)} | " + " | ".join(_variant(row.get(v) or {}) for v in LIMITED_VARIANTS) + " |")
        failed = sorted({f"{who} at C = {c}: {run['error']}" for c, row in data["by_concurrency"].items()
                         for who, run in row.items() if isinstance(run, dict) and "error" in run})
        if failed:
            lines += ["", "Runs that failed:", "", *[f"- {line}" for line in failed]]
    lines += ["", "## Targets (C = 8)", "", "| target | measured | wanted | met |", "|---|---|---|---|"]
    for name, t in report["targets"].items():
        wanted = f"{'≤' if t.get('lower_is_better') else '≥'} {t['target']}"
        met = "yes" if t["met"] else f"no ({t['note']})" if t.get("note") else "no"
        lines.append(f"| {name} | {_fmt(t['value'], 1, 2)} | {wanted} | {met} |")
    lines += ["", *[f"![{p.stem}]({p.name})" for p in plots], ""]
    path = out_dir / "batching.md"
    path.write_text("\n".join(lines))
    return path


def _plot(report: dict[str, Any], out_dir: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    for regime, data in report["regimes"].items():
        cs = [int(c) for c in data["by_concurrency"]]
        fig, ax = plt.subplots(figsize=(6, 4))
        for who, label in (("engine", "engine (C slots, expert cache)"), ("llama_server", "llama-server -np C")):
            ys = [(data["by_concurrency"][str(c)].get(who) or {}).get("tok_s") for c in cs]
            if any(isinstance(y, (int, float)) for y in ys):
                ax.plot(cs, [y if isinstance(y, (int, float)) else float("nan") for y in ys], marker="o", label=label)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("concurrent clients C")
        ax.set_ylabel("aggregate generated tokens/s")
        ax.set_title(f"{Path(report['model']).name}: {regime.replace('_', ' ')}")
        ax.legend()
        fig.tight_layout()
        path = out_dir / f"batching-{regime}.png"
        fig.savefig(path, dpi=90)
        plt.close(fig)
        paths.append(path)
    return paths


def default_prompts(model: str, n: int = 32, n_topics: int | None = None) -> list[str]:
    """``n`` prompts of a synthetic model, taking its topics (the first ``n_topics``) in turn."""
    from cluster.models import synth

    try:
        topics = synth.read_topics(model)
    except ValueError:
        if n_topics is not None:
            raise ValueError(f"--topics needs a synthetic model with topics; {model} has none") from None
        return [f"request {i}: the story goes on and on" for i in range(n)]
    if n_topics is not None and n_topics > len(topics):
        raise ValueError(f"--topics {n_topics}: {model} has {len(topics)} topics")
    used = n_topics or len(topics)
    return [synth.topic_prompt(topics, i % used, 24, seed=i) for i in range(n)]


def main(model: str, *, prompts_file: str | None, concurrency: tuple[int, ...], max_tokens: int, n_threads: int,
         window_s: float, limit_fraction: float | None, llama_server: str | None, out_dir: Path | None,
         progress: bool, n_topics: int | None = None) -> dict[str, Any]:
    if prompts_file:
        with open(prompts_file) as f:
            prompts = [json.loads(line)["prompt"] for line in f if line.strip()][:64]
    else:
        prompts = default_prompts(model, n_topics=n_topics)
    report = bench_batch(model, prompts, concurrency=concurrency, max_tokens=max_tokens, n_threads=n_threads,
                         window_s=window_s, limit_fraction=limit_fraction, llama_server=llama_server, progress=progress)
    report["n_topics"] = n_topics
    command = command_line("batch", [("--model", model), ("--prompts", prompts_file), ("--topics", n_topics),
                                     ("--concurrency", ",".join(map(str, concurrency))), ("--max-tokens", max_tokens),
                                     ("--window-s", window_s), ("--no-limit", limit_fraction is None),
                                     ("--out", out_flag(out_dir))])
    report["command"] = command
    from cluster.bench import DEFAULT_OUT

    path = write_report(report, Path(out_dir or DEFAULT_OUT), command)
    log_progress(progress, f"report: {path}")
    report["report"] = str(path)
    return report

