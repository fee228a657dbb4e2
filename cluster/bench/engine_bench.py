"""``python -m cluster bench engine``: overhead, bounded memory and cache-policy benchmarks.

Every figure in the report comes from this run:
  * overhead — the same model twice in one process, no memory pressure, generations
    alternated side by side: decode tok/s with the cache (budget >= model) / without.
  * bounded memory — child processes under a cgroup memory limit of 50 % of the model file,
    the file's page cache dropped before each run: plain llama.cpp (mmap) vs the engine with
    the cache under the same limit, and the engine with no limit; disk bytes read per token
    (prefill and decode separately) from /proc/self/io.
  * policy — routing traces recorded from the model, replayed through the policy core at
    budgets of 10 %..100 % of the expert bytes: ours (the default LFU) vs scan_resistant vs lru vs
    Belady's MIN vs the best static set.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from cluster.bench import command_line, log_progress, offline, out_flag, workload
from cluster.distributed import memory_limit as memlimit
from cluster.engine.cache import CacheConfig, CachePolicy, RoutingTrace, discover_layout
from cluster.engine.expert_selection import CACHE_AWARE, ExpertSelection
from cluster.engine.node_memory import MIB
from cluster.errors import InvalidParameterError
from cluster.models import synth
from cluster.models.synth import default_model

LIBRARY_BYTES = 64 * MIB  # page cache of Python, numpy and llama.cpp's libraries in the limited process
PROCESS_BYTES = 200 * MIB  # what a serving process holds besides the model (Python, libraries, KV, buffers)


def limit_too_small(file_bytes: int, fraction: float) -> str | None:
    """Why a cgroup limit of ``fraction`` of a model file measures nothing, or None: under about
    twice a serving process's own memory, the process rather than the model fills the limit (the
    kernel kills it before the cache has anything to decide)."""
    limit = fraction * file_bytes
    if limit < 2 * PROCESS_BYTES:
        return (f"a limit of {100 * fraction:.0f} % of this {file_bytes / MIB:.0f} MiB model ({limit / MIB:.0f} MiB) is "
                f"smaller than twice a serving process's own memory (~{PROCESS_BYTES / MIB:.0f} MiB): the model is too "
                f"small for a memory-limit measurement")
    return None


def _prompts(model_path: str, n: int, *, n_words: int, preamble_words: int = 0, seed: int = 0,
             topic_order: list[int] | None = None) -> list[str]:
    """Topic prompts (a mixed-topic preamble first when preamble_words > 0)."""
    try:
        topics = synth.read_topics(model_path)
    except ValueError:
        return [f"Question {i}: explain how experts are routed in a mixture of experts model." for i in range(n)]
    order = topic_order or [i % len(topics) for i in range(n)]
    out = []
    for i, t in enumerate(order[:n]):
        text = ""
        if preamble_words:
            per = max(1, preamble_words // len(topics))
            text = synth.mixed_prompt(topics, list(range(len(topics))), per, seed=seed + 1000 + i)
        text += synth.topic_prompt(topics, t % len(topics), n_words, seed=seed + i)
        out.append(text)
    return out


@dataclass(frozen=True)
class Workloads:
    """The prompts of one engine benchmark run: synthetic topic prompts, or a JSONL workload's.

    ``policy`` holds each policy-table workload as its requests in order, each request the
    conversation so far (earlier turns and the answers they got, filled in as the run goes)
    then the new turn: ``(conversation, prompt)`` pairs."""

    single: list[str]  # standalone prompts (overhead, bounded memory)
    policy: dict[str, list[tuple[str, str]]]
    source: str


def workloads(model_path: str, prompts: str | None, n_requests: int) -> Workloads:
    """``prompts`` (a JSONL workload, ``cluster.bench.workload``) or the synthetic topic prompts.

    From a JSONL file: ``chat`` takes each conversation's turns one after another (what a node
    sees when the router keeps a conversation on it); ``interleaved`` takes them in file order
    (conversations alternate, as arrivals would interleave them on one node).
    """
    if prompts:
        with open(prompts, encoding="utf-8") as f:
            records = workload.parse_jsonl(f, prompts)
        turns = [(r["session"] or f"line-{i}", r["prompt"]) for i, r in enumerate(records)]
        grouped: dict[str, list[tuple[str, str]]] = {}
        for turn in turns:
            grouped.setdefault(turn[0], []).append(turn)
        chat = [t for conversation in grouped.values() for t in conversation]
        return Workloads(single=[p for _, p in turns[:n_requests]], source=prompts,
                         policy={"chat": chat, "interleaved": turns})
    # chat: one conversation's turns after another, each turn re-reading a long mixed-topic
    # preamble (a prefill scan). interleaved: two conversations alternate, two turns each, then
    # the next two; no preamble. Each request is standalone (its own conversation).
    half = max(1, n_requests // 2)
    sequential = [i // half for i in range(n_requests)]
    interleaved = [t for pair in range(0, half, 2) for t in (pair, pair + 1, pair, pair + 1)][:n_requests]
    chat = _prompts(model_path, n_requests, n_words=24, preamble_words=160, topic_order=sequential)
    mixed = _prompts(model_path, n_requests, n_words=48, topic_order=interleaved)
    return Workloads(single=_prompts(model_path, n_requests, n_words=48, preamble_words=96),
                     policy={"chat": [(f"c{i}", p) for i, p in enumerate(chat)],
                             "interleaved": [(f"i{i}", p) for i, p in enumerate(mixed)]},
                     source="synthetic topic prompts")


# -- overhead ------------------------------------------------------------------------------

def bench_overhead(model_path: str, prompt: str, *, pairs: int, max_tokens: int, progress: bool) -> dict[str, Any]:
    from cluster.engine.moe_engine import MoEEngine

    layout = discover_layout(model_path)
    budget = int(layout.unit_bytes.sum() * 1.05)
    with MoEEngine(model_path, None, n_ctx=1024) as plain, MoEEngine(model_path, budget, n_ctx=1024) as cached:
        engines = {"plain": plain, "cache": cached}
        for engine in engines.values():  # warm-up: page cache, thread pools
            engine.generate(prompt, max_tokens=8)
        samples: dict[str, list[float]] = {"plain": [], "cache": []}
        decode_s: dict[str, float] = {"plain": 0.0, "cache": 0.0}
        decode_steps: dict[str, int] = {"plain": 0, "cache": 0}
        texts = set()
        before = cached.cache_stats()
        for i in range(pairs):
            order = ("plain", "cache") if i % 2 == 0 else ("cache", "plain")
            for name in order:
                gen = engines[name].generate(prompt, max_tokens=max_tokens)
                samples[name].append(gen.decode_tok_s)
                decode_s[name] += gen.decode_s
                decode_steps[name] += max(0, gen.n_generated - 1)
                texts.add(gen.text)
            log_progress(progress, f"  overhead pair {i + 1}/{pairs}: plain {samples['plain'][-1]:.1f} tok/s, "
                           f"cache {samples['cache'][-1]:.1f} tok/s")
        after = cached.cache_stats()
    ratios = [c / p for c, p in zip(samples["cache"], samples["plain"])]
    steps = after["n_steps"] - before["n_steps"]  # ubatches: one prefill + one per decode token
    per_step_ms = {key: (after[key] - before[key]) / 1e6 / max(1, steps)
                   for key in ("ns_callback", "ns_predict", "ns_demand_read", "ns_prefetch_wait", "ns_drop")}
    return {
        "pairs": pairs,
        "max_tokens": max_tokens,
        "budget_bytes": budget,
        "plain_tok_s": samples["plain"],
        "cache_tok_s": samples["cache"],
        "ratio_median": statistics.median(ratios),
        "ratio_of_medians": statistics.median(samples["cache"]) / statistics.median(samples["plain"]),
        "ratios": ratios,
        "same_text": len(texts) == 1,
        "cache_hit_rate": after["hit_rate"],
        # where the cache's time goes, per evaluated step (milliseconds), against the time of a
        # plain step; the rest of the difference is the graph splits the callback causes
        "callback_ms_per_step": per_step_ms,
        "plain_ms_per_step": 1e3 * decode_s["plain"] / max(1, decode_steps["plain"]),
        "cache_ms_per_step": 1e3 * decode_s["cache"] / max(1, decode_steps["cache"]),
    }


# -- bounded memory ------------------------------------------------------------------------

CACHE_AWARE_SETTING = ExpertSelection(CACHE_AWARE)
"""The cache-aware run of the bounded-memory benchmark: the default bounds (docs/quality.md gives their cost)."""

def _run_worker(spec: dict[str, Any], limit: memlimit.MemoryLimit | None, timeout_s: float) -> dict[str, Any]:
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(spec, f)
        spec_path = f.name
    argv = [sys.executable, "-m", "cluster.bench.worker", spec_path]
    env = dict(os.environ)
    t0 = time.perf_counter()
    try:
        if limit is None:
            proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout_s, env=env)
        else:
            proc = limit.run(argv, timeout_s=timeout_s, env=env)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout_s:.0f} s", "wall_s": time.perf_counter() - t0}
    finally:
        os.unlink(spec_path)
    if proc.returncode != 0:
        killed = " (killed: out of memory?)" if proc.returncode in (-9, 137) else ""
        return {"error": f"exit {proc.returncode}{killed}: {proc.stderr.strip()[-500:]}",
                "wall_s": time.perf_counter() - t0}
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result["wall_s"] = time.perf_counter() - t0
    if limit is not None:
        result["cgroup_peak_bytes"] = limit.peak_bytes()
    return result


def _summarise_run(run: dict[str, Any]) -> dict[str, Any]:
    if "error" in run:
        return run
    reqs = run["requests"]
    n_prompt = sum(r["n_prompt_tokens"] for r in reqs)
    n_gen = sum(r["n_generated"] for r in reqs)
    decode_steps = sum(max(0, r["n_generated"] - 1) for r in reqs)
    decode_s = sum(r["decode_s"] for r in reqs)
    out = {
        "load_s": run["load_s"],
        "prefill_s": sum(r["prefill_s"] for r in reqs),
        "decode_tok_s": decode_steps / decode_s if decode_s > 0 else float("nan"),
        "n_prompt_tokens": n_prompt,
        "n_generated": n_gen,
        "prefill_read_bytes_per_token": sum(r["prefill_read_bytes"] for r in reqs) / max(1, n_prompt),
        "decode_read_bytes_per_token": sum(r["decode_read_bytes"] for r in reqs) / max(1, decode_steps),
        "rss_anon_bytes": run["rss_anon_bytes"],
        "wall_s": run["wall_s"],
        "texts": [r["text"] for r in reqs],
    }
    if run.get("cgroup_peak_bytes") is not None:
        out["cgroup_peak_bytes"] = run["cgroup_peak_bytes"]
    if run.get("auto_budget"):
        out["auto_budget"] = run["auto_budget"]
    if run.get("cache_stats"):
        c = run["cache_stats"]
        out["cache_decode_hit_rate"] = c["decode_hit_rate"]
        out["cache_bytes_read_decode_per_token"] = c["bytes_read_decode"] / max(1, c["n_tokens_decode"])
        out["cache_bytes_read_prefill_per_token"] = c["bytes_read_prefill"] / max(1, c["n_tokens_prefill"])
        out["prefetch_precision"] = c["prefetch_precision"]
        out["budget_bytes"] = c["budget_bytes"]
    return out


def disk_read_bandwidth(path: str, max_bytes: int = 1 << 30) -> float:
    """Bytes per second of a cold sequential read of (the first GiB of) ``path``: the disk's bound."""
    memlimit.drop_page_cache(path)
    fd = os.open(path, os.O_RDONLY)
    try:
        t0, done = time.perf_counter(), 0
        while done < max_bytes:
            chunk = os.read(fd, 8 << 20)
            if not chunk:
                break
            done += len(chunk)
        seconds = time.perf_counter() - t0
    finally:
        os.close(fd)
    memlimit.drop_page_cache(path)
    return done / seconds if seconds > 0 else float("nan")


def _requests(prompts: list[str], max_tokens: int) -> list[dict[str, Any]]:
    return [{"prompt": p, "max_tokens": max_tokens} for p in prompts]


def _limited_run(spec: dict[str, Any], limit_bytes: int, timeout_s: float) -> dict[str, Any]:
    memlimit.drop_page_cache(spec["model"])
    with memlimit.MemoryLimit("sniper-bench", limit_bytes) as limit:
        return _summarise_run(_run_worker(spec, limit, timeout_s))


def bench_bounded(model_path: str, prompts: list[str], *, max_tokens: int, progress: bool,
                  limit_fraction: float = 0.5, timeout_s: float = 1500.0,
                  selection: ExpertSelection = CACHE_AWARE_SETTING) -> dict[str, Any]:
    """Decode speed under a cgroup limit of ``limit_fraction`` of the file: plain llama.cpp, the cache
    with exact selection, and with cache-aware ``selection``; against the cache with no limit, and the
    disk's bound at the bytes each run read per decoded token."""
    file_size = os.path.getsize(model_path)
    reason = memlimit.unavailable_reason() or limit_too_small(file_size, limit_fraction)
    if reason:
        return {"skipped": reason}
    limit_bytes = int(limit_fraction * file_size)
    base = {"model": model_path, "requests": _requests(prompts, max_tokens), "n_ctx": 1024}
    layout = discover_layout(model_path)

    log_progress(progress, "  bounded memory: disk bandwidth (cold sequential read)")
    bandwidth = disk_read_bandwidth(model_path)
    log_progress(progress, "  bounded memory: engine with cache, no limit")
    memlimit.drop_page_cache(model_path)
    unlimited = _run_worker({**base, "cache_bytes": int(layout.unit_bytes.sum() * 1.05)}, None, timeout_s)
    if "error" in unlimited:
        return {"error": f"unlimited run failed: {unlimited['error']}"}
    runs = {"cache_unlimited": _summarise_run(unlimited)}
    aware = asdict(selection)
    for name, cache_bytes, chosen in (("plain_limited", None, None), ("cache_limited", "auto", None),
                                      ("cache_aware_limited", "auto", aware)):
        log_progress(progress, f"  bounded memory: {name} (limit {limit_bytes / MIB:.0f} MiB)")
        runs[name] = _limited_run({**base, "cache_bytes": cache_bytes, "expert_selection": chosen}, limit_bytes,
                                  timeout_s)
    ok = all("error" not in r for r in runs.values())
    result: dict[str, Any] = {
        "limit_bytes": limit_bytes,
        "file_bytes": file_size,
        "disk_bytes_per_s": bandwidth,
        "n_requests": len(prompts),
        "max_tokens": max_tokens,
        "runs": runs,
    }
    if ok:
        limited = runs["cache_limited"]
        result["cache_budget_bytes"] = limited.get("budget_bytes")
        result["auto_budget"] = limited.get("auto_budget")
        result["speedup_vs_plain"] = limited["decode_tok_s"] / runs["plain_limited"]["decode_tok_s"]
        result["fraction_of_unlimited"] = limited["decode_tok_s"] / runs["cache_unlimited"]["decode_tok_s"]
        # the disk's bound on decode speed at the bytes this run read per decoded token
        per_token = limited["decode_read_bytes_per_token"]
        result["disk_bound_tok_s"] = bandwidth / per_token if per_token > 0 else float("inf")
        result["same_text"] = limited["texts"] == runs["plain_limited"]["texts"] == runs["cache_unlimited"]["texts"]
        aware_run = runs["cache_aware_limited"]
        aware_bytes = aware_run["decode_read_bytes_per_token"]
        result["cache_aware"] = {
            "selection": asdict(selection),
            "fraction_of_unlimited": aware_run["decode_tok_s"] / runs["cache_unlimited"]["decode_tok_s"],
            "disk_bound_tok_s": bandwidth / aware_bytes if aware_bytes > 0 else float("inf"),
            "same_text_as_exact": aware_run["texts"] == limited["texts"],
        }
    return result


AUTO_SWEEP_LIMITS = (0.3, 0.5, 0.7)  # cgroup limits, as fractions of the model file
AUTO_SWEEP_BUDGETS = (0.15, 0.3, 0.45, 0.6, 0.75)  # manual budgets, as fractions of the limit


def bench_auto_budget(model_path: str, prompts: list[str], *, max_tokens: int, progress: bool,
                      timeout_s: float = 1500.0) -> dict[str, Any]:
    """``cache_bytes="auto"`` against a sweep of manual budgets under cgroup limits of 30/50/70 %
    of the model: decode tok/s, and whether the process survived (the OOM killer)."""
    layout = discover_layout(model_path)
    reason = memlimit.unavailable_reason() or limit_too_small(layout.file_size, min(AUTO_SWEEP_LIMITS))
    if reason:
        return {"skipped": reason}
    footprint = int(layout.unit_bytes.sum())
    from cluster import _native

    floor = int(_native.min_budget(layout))
    base = {"model": model_path, "requests": _requests(prompts, max_tokens), "n_ctx": 1024}
    limits = []
    for fraction in AUTO_SWEEP_LIMITS:
        limit_bytes = int(fraction * layout.file_size)
        rows = []
        for b in AUTO_SWEEP_BUDGETS:
            budget = min(footprint, max(floor, int(b * limit_bytes)))
            log_progress(progress, f"  auto budget: limit {100 * fraction:.0f} %, manual budget {budget / MIB:.0f} MiB")
            rows.append({"budget_bytes": budget, **_limited_run({**base, "cache_bytes": budget}, limit_bytes, timeout_s)})
        log_progress(progress, f"  auto budget: limit {100 * fraction:.0f} %, auto")
        auto = _limited_run({**base, "cache_bytes": "auto"}, limit_bytes, timeout_s)
        ok = [r for r in rows if "error" not in r]
        best = max(ok, key=lambda r: r["decode_tok_s"], default=None)
        entry: dict[str, Any] = {"limit_fraction": fraction, "limit_bytes": limit_bytes, "manual": rows, "auto": auto}
        if best is not None and "error" not in auto:
            entry["best_manual_budget_bytes"] = best["budget_bytes"]
            entry["auto_vs_best"] = auto["decode_tok_s"] / best["decode_tok_s"]
        limits.append(entry)
    return {"budget_fractions_of_limit": list(AUTO_SWEEP_BUDGETS), "limits": limits}


# -- policy --------------------------------------------------------------------------------

def record_traces(model_path: str, workloads: dict[str, list[tuple[str, str]]], max_tokens: int,
                  progress: bool) -> tuple[dict[str, RoutingTrace], dict[str, dict[str, float]]]:
    """Runs each workload on an engine with the whole model resident and keeps its routing trace.
    A request is its conversation so far (earlier turns and their answers) then the new turn."""
    from cluster.engine.moe_engine import MoEEngine

    layout = discover_layout(model_path)
    traces, live = {}, {}
    with MoEEngine(model_path, int(layout.unit_bytes.sum() * 1.05), n_ctx=2048, predict="always") as engine:
        for name, turns in workloads.items():
            parts, history = [], {}
            for conversation, prompt in turns:
                gen = engine.generate(workload.conversation_prompt(history.get(conversation, []), prompt),
                                      max_tokens=max_tokens)
                history.setdefault(conversation, []).append((prompt, gen.text))
                parts.append(gen.trace)
            traces[name] = RoutingTrace.concat(parts)
            stats = engine.cache_stats()
            live[name] = {"prefetch_precision": stats["prefetch_precision"], "prefetch_recall": stats["prefetch_recall"]}
            log_progress(progress, f"  recorded {name}: {len(traces[name])} events")
    return traces, live


POLICIES: dict[str, dict[str, Any]] = {
    "ours": {},  # the default CacheConfig (adaptive: LFU with a half-life of 8 steps, or recency, per node)
    "scan_resistant": {"eviction": "scan_resistant", "heat_half_life_steps": 2.0},  # the previous default
    "lru": {"eviction": "lru"},
}
"""The online policies the tables compare, by name: CacheConfig fields besides the budget."""


def replay_policy(trace: RoutingTrace, unit_bytes: np.ndarray, n_experts_used: int, budget: int,
                  policy_name: str = "ours") -> dict[str, float]:
    """The policy core (the code the eval callback drives) over a recorded trace, under one of ``POLICIES``."""
    n_layers, n_experts = unit_bytes.shape
    policy = CachePolicy(n_layers, n_experts, unit_bytes, CacheConfig(budget_bytes=budget, **POLICIES[policy_name]),
                         n_experts_used)
    policy.replay(trace)
    c = policy.counters()
    decode = c["n_hits_decode"] + c["n_misses_decode"]
    hits, misses = c["n_hits_decode"] + c["n_hits_prefill"], c["n_misses_decode"] + c["n_misses_prefill"]
    return {"hit_rate": hits / max(1, hits + misses),
            "decode_hit_rate": c["n_hits_decode"] / decode if decode else float("nan"),
            "decode_bytes_read_per_token": c["bytes_read_decode"] / max(1, c["n_tokens_decode"]),
            "prefetch_used_fraction": c["n_prefetch_used"] / max(1, c["n_prefetch_issued"])}


POLICY_BUDGETS = (0.1, 0.2, 1 / 3, 0.4, 0.5, 0.6, 0.8)
ONLINE_POLICIES = tuple(POLICIES)


def policy_table(trace: RoutingTrace, unit_bytes: np.ndarray, n_experts_used: int,
                 fractions: tuple[float, ...] = POLICY_BUDGETS) -> dict[str, Any]:
    """Every policy at every budget, in two views of the trace: ``decode`` (the decode ubatches
    alone, as if the prompts had been prefilled elsewhere) and ``request`` (prefill and decode as
    they came). Online policies replay without the predictor's events (eviction alone), and ours
    once more with them (``ours+prefetch``: reads ahead count as bytes, used ones as hits);
    MIN and the best static set know the whole trace."""
    n_layers, n_experts = unit_bytes.shape
    footprint = int(unit_bytes.sum())
    views: dict[str, Any] = {}
    for view, decode_only in (("decode", True), ("request", False)):
        with_predictions = trace.select(decode_only=decode_only)
        bare = with_predictions.select(predictions=False)
        sequence = offline.accesses(bare, n_experts)
        rows = []
        for fraction in fractions:
            budget = int(fraction * footprint)
            try:
                row: dict[str, Any] = {"fraction": fraction}
                for name in ONLINE_POLICIES:
                    row[name] = replay_policy(bare, unit_bytes, n_experts_used, budget, name)
                row["ours+prefetch"] = replay_policy(with_predictions, unit_bytes, n_experts_used, budget, "ours")
            except InvalidParameterError as exc:  # budget below one decode step
                rows.append({"fraction": fraction, "error": str(exc)})
                continue
            row["min"] = offline.belady_min(sequence, unit_bytes, budget, n_layers)
            row["static_best"] = offline.static_best(sequence, unit_bytes, budget, n_layers)
            rows.append(row)
        views[view] = {"rows": rows, "n_decode_tokens": len(bare.decode_steps())}
    return views


def bench_policy(model_path: str, workloads: dict[str, list[tuple[str, str]]], *, max_tokens: int,
                 progress: bool) -> dict[str, Any]:
    layout = discover_layout(model_path)
    unit_bytes = np.asarray(layout.unit_bytes, dtype=np.int64)
    traces, live = record_traces(model_path, workloads, max_tokens, progress)
    result: dict[str, Any] = {"budget_fractions": list(POLICY_BUDGETS), "workloads": {}}
    for name, trace in traces.items():
        result["workloads"][name] = {"views": policy_table(trace, unit_bytes, layout.n_experts_used), **live[name],
                                     "n_decode_tokens": len(trace.decode_steps()), "n_events": len(trace)}
    return result


# -- report --------------------------------------------------------------------------------

ENGINE_PARTS = ("overhead", "bounded", "auto", "policy")
"""The parts of ``bench engine`` (``--parts``), in the order they run."""


def run_engine_bench(model: str | None, out_dir: Path, *, prompts: str | None = None, quick: bool = False,
                     progress: bool = True, parts: tuple[str, ...] = ENGINE_PARTS) -> dict[str, Any]:
    model_path = model or str(default_model("bench", progress=progress))
    layout = discover_layout(model_path)
    out_dir.mkdir(parents=True, exist_ok=True)
    started = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
    wl = workloads(model_path, prompts, n_requests=4 if quick else 8)
    result: dict[str, Any] = {
        "command": command_line("engine", [("--model", model), ("--prompts", prompts), ("--out", out_flag(out_dir)),
                                           ("--quick", quick),
                                           ("--parts", ",".join(parts) if parts != ENGINE_PARTS else None)]),
        "started": started,
        "machine": {"cpus": os.cpu_count(), "kernel": platform.release(), "python": platform.python_version(),
                    "mem_total_bytes": os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")},
        "model": {"path": model_path, "arch": layout.arch, "n_layers": layout.n_layers, "n_experts": layout.n_experts,
                  "n_experts_used": layout.n_experts_used, "file_bytes": layout.file_size,
                  "expert_bytes": layout.expert_bytes, "non_expert_bytes": layout.non_expert_bytes},
        "workload": wl.source,
    }
    bounded = wl.single[:2 if quick else 3]
    if "overhead" in parts:
        log_progress(progress, "overhead (no memory pressure, alternated side by side)")
        result["overhead"] = bench_overhead(model_path, wl.single[0], pairs=3 if quick else 15,
                                            max_tokens=16 if quick else 64, progress=progress)
    if "bounded" in parts:
        log_progress(progress, "bounded memory (cgroup limit = 50 % of the model file, page cache dropped)")
        result["bounded_memory"] = bench_bounded(model_path, bounded, max_tokens=16 if quick else 48, progress=progress)
    if "auto" in parts and not quick:
        log_progress(progress, "auto budget (cgroup limits of 30/50/70 % of the model, manual budgets swept)")
        result["auto_budget"] = bench_auto_budget(model_path, bounded[:2], max_tokens=48, progress=progress)
    if "policy" in parts:
        log_progress(progress, "policy (recorded traces replayed at budgets 10-80 %)")
        result["policy"] = bench_policy(model_path, wl.policy, max_tokens=24 if quick else 64, progress=progress)
    from cluster.bench.report import write_engine_report

    result["report"] = str(write_engine_report(result, out_dir))
    return result
