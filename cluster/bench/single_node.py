"""``bench scale --parts node``: one node on a model larger than the memory it may use, against stock llama.cpp.

For each memory regime — a cgroup limit that is a fraction of the file, or none (the machine's own memory, for a
file larger than the machine) — from a cold page cache, on the same file:

* ours: ``MoEEngine(model, "auto")`` in a child process (in the cgroup), with exact selection and then with
  cache-aware selection at its default bounds (``cluster.engine.expert_selection``): seconds to open, time to first token of a
  chat-sized prompt, decode tok/s over ``max_tokens``, expert bytes read per decoded token (the cache's counters) and
  disk bytes per token (the block device's own counter), peak memory (the cgroup's, or the child's ``VmHWM``);
* stock: ``llama-server`` (llama.cpp's own mmap load) in the same regime: seconds to ``/health``, then one streamed
  ``/completion`` of the same prompt and length: time to first token, decode tok/s from its tokens' arrival times
  (cut after ``stock_timeout_s``: a thrashing server may not finish), disk bytes per token.

The physical bounds of the machine for the same file: the disk's sequential read rate divided by the expert bytes
our engine read per decoded token while decoding (the prompt's reads left out), and the in-RAM compute rate of the
same shapes, from two layer-truncated copies of the preset (``truncated_layers``, in RAM, every expert cached):
per-token time ``a + b * layers`` extrapolated to the model's layers. The tighter of the two is what decoding can
reach.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import textwrap
import time
from typing import Any, Sequence

import requests

from cluster.bench import log_progress
from cluster.bench.machine import block_device_stat, device_read_bytes, vm_hwm_bytes
from cluster.engine.expert_selection import CACHE_AWARE, EXACT_SELECTION, ExpertSelection

MIB = 1 << 20
GIB = 1 << 30

_OURS = textwrap.dedent("""
    import json, sys, time
    from cluster.engine.expert_selection import ExpertSelection
    from cluster.engine.generation import selection_counts
    from cluster.engine.moe_engine import MoEEngine
    model, prompt, max_tokens, threads, budget = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
    selection = ExpertSelection(**json.loads(sys.argv[6]))
    t0 = time.perf_counter()
    with MoEEngine(model, budget if budget == "auto" else int(budget), n_ctx=1024, n_threads=threads,
                   expert_selection=selection) as engine:
        opened = time.perf_counter() - t0
        gen = engine.generate(prompt, max_tokens=max_tokens)
        stats = engine.cache_stats()
        print(json.dumps({"open_s": opened, "prefill_s": gen.prefill_s, "decode_s": gen.decode_s,
                          "tokens": len(gen.tokens), "prompt_tokens": gen.n_prompt_tokens,
                          "bytes_read": stats.get("bytes_read"), "bytes_read_decode": stats.get("bytes_read_decode"),
                          "budget_bytes": stats.get("budget_bytes"),
                          "hit_rate": stats.get("hit_rate"),
                          "budget": engine.auto_budget.explain() if engine.auto_budget else None,
                          "selections_changed": selection_counts([gen])[0]}))
""")


def run_ours(model: str, prompt: str, *, max_tokens: int, n_threads: int, limit_bytes: int | None,
             budget: str = "auto", timeout_s: float = 1800, selection: ExpertSelection = EXACT_SELECTION) -> dict[str, Any]:
    """Our engine in a child process (in a cgroup of ``limit_bytes`` when given), from a cold page cache, with
    ``selection`` (exact by default)."""
    from cluster.distributed.memory_limit import MemoryLimit, drop_page_cache

    drop_page_cache(model)
    device = block_device_stat(model)
    argv = [sys.executable, "-c", _OURS, model, prompt, str(max_tokens), str(n_threads), budget,
            json.dumps(dataclasses.asdict(selection))]
    disk0 = device_read_bytes(device)
    t0 = time.perf_counter()
    if limit_bytes:
        with MemoryLimit("sniper-scale-node", limit_bytes) as limit:
            proc = limit.run(argv, timeout_s=timeout_s, env=dict(os.environ))
            peak, ooms = limit.peak_bytes(), limit.oom_kills()
    else:
        child = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        peak = 0
        while child.poll() is None:
            peak = max(peak, vm_hwm_bytes(child.pid) or 0)
            time.sleep(0.5)
        out, err = child.communicate()
        proc = subprocess.CompletedProcess(argv, child.returncode, out, err)
        ooms = 0
    wall = time.perf_counter() - t0
    disk1 = device_read_bytes(device)
    if proc.returncode != 0:
        return {"failed": f"exit {proc.returncode}: {proc.stderr[-600:]}", "oom_kills": ooms}
    r = json.loads(proc.stdout.strip().splitlines()[-1])
    n = max(1, r["tokens"] - 1)
    return {"open_s": r["open_s"], "ttft_s": r["prefill_s"], "decode_tok_s": n / r["decode_s"] if r["decode_s"] else None,
            "tokens": r["tokens"], "prompt_tokens": r["prompt_tokens"],
            "expert_bytes_per_token": r["bytes_read"] / r["tokens"] if r["bytes_read"] is not None and r["tokens"] else None,
            "decode_expert_bytes_per_token": r["bytes_read_decode"] / n if r.get("bytes_read_decode") is not None else None,
            "disk_bytes": None if disk0 is None or disk1 is None else disk1 - disk0,
            "disk_bytes_per_token": None if disk0 is None or disk1 is None else (disk1 - disk0) / max(1, r["tokens"]),
            "budget": r["budget"], "hit_rate": r["hit_rate"], "peak_bytes": peak, "oom_kills": ooms, "wall_s": wall,
            "selections_changed": r.get("selections_changed", 0)}


def run_stock(binary: str, model: str, prompt: str, *, max_tokens: int, n_threads: int, limit_bytes: int | None,
              timeout_s: float) -> dict[str, Any]:
    """``llama-server`` on the same file in the same regime: start-up, then one streamed request."""
    from cluster.bench.llama_server import NO_REPACK, LlamaServer
    from cluster.distributed.memory_limit import MemoryLimit, drop_page_cache

    drop_page_cache(model)
    device = block_device_stat(model)
    limit = MemoryLimit("sniper-scale-stock", limit_bytes) if limit_bytes else None
    try:
        t0 = time.perf_counter()
        with LlamaServer(binary, model, n_threads, n_slots=1, n_ctx=1024, limit=limit, extra_args=NO_REPACK) as server:
            start_s = time.perf_counter() - t0
            disk0 = device_read_bytes(device)
            body = {"prompt": prompt, "n_predict": max_tokens, "temperature": 0.0, "stream": True, "ignore_eos": True}
            sent = time.perf_counter()
            times: list[float] = []
            try:
                with requests.post(f"{server.url}/completion", json=body, stream=True, timeout=(10, timeout_s)) as rsp:
                    rsp.raise_for_status()
                    for line in rsp.iter_lines():
                        if line.startswith(b"data: ") and json.loads(line[6:]).get("content"):
                            times.append(time.perf_counter())
                        if time.perf_counter() - sent > timeout_s:
                            break
            except requests.Timeout:
                pass
            disk1 = device_read_bytes(device)
            peak = limit.peak_bytes() if limit is not None else vm_hwm_bytes(server.pid or 0)
    finally:
        if limit is not None:
            ooms = limit.oom_kills()
            limit.close()
        else:
            ooms = 0
    n = len(times)
    return {"start_s": start_s, "ttft_s": times[0] - sent if times else None,
            "decode_tok_s": (n - 1) / (times[-1] - times[0]) if n > 1 and times[-1] > times[0] else None,
            "tokens": n, "cut": n < max_tokens,
            "disk_bytes_per_token": None if disk0 is None or disk1 is None or not n else (disk1 - disk0) / n,
            "peak_bytes": peak, "oom_kills": ooms}


def compute_bound(preset: str, dtype: str | None, layers: Sequence[int], work_dir: str, *, prompt: str,
                  max_tokens: int, n_threads: int, progress: bool) -> dict[str, Any]:
    """In-RAM decode rate of the preset's shapes: two truncated copies, per-token time extrapolated to all layers."""
    from cluster.models import synth

    full = synth.config_from_args(preset, dtype=dtype) if dtype else synth.PRESETS[preset]
    per_token: dict[int, float] = {}
    for n_layers in layers:
        path = os.path.join(work_dir, f"{preset}-{n_layers}L.gguf")
        synth.synthesize(path, dataclasses.replace(full, n_layers=n_layers), progress=False)
        try:
            with open(path, "rb") as f:  # in the page cache: compute, not disk
                while f.read(64 * MIB):
                    pass
            r = run_ours(path, prompt, max_tokens=max_tokens, n_threads=n_threads, limit_bytes=None, budget=str(1 << 50))
        finally:
            os.remove(path)
        if "failed" in r or not r.get("decode_tok_s"):
            return {"failed": r.get("failed", "no decode rate")}
        per_token[n_layers] = 1.0 / r["decode_tok_s"]
        log_progress(progress, f"  compute: {n_layers} layers in RAM decode {r['decode_tok_s']:.2f} tok/s")
    (l1, t1), (l2, t2) = sorted(per_token.items())
    slope = (t2 - t1) / (l2 - l1)
    at_full = t1 + slope * (full.n_layers - l1)
    return {"layers": {str(k): 1.0 / v for k, v in per_token.items()}, "seconds_per_layer": slope,
            "seconds_fixed": t1 - slope * l1, "tok_s": 1.0 / at_full}


def run_single_node(model: str, *, regimes: Sequence[tuple[str, int | None]], binary: str | None, prompt: str,
                    max_tokens: int, n_threads: int, stock_timeout_s: float, progress: bool) -> dict[str, Any]:
    """Ours and stock in each regime (name, cgroup limit or None)."""
    out: dict[str, Any] = {}
    for name, limit in regimes:
        log_progress(progress, f"node/{name}: ours")
        ours = run_ours(model, prompt, max_tokens=max_tokens, n_threads=n_threads, limit_bytes=limit)
        log_progress(progress, f"  ours: {json.dumps({k: v for k, v in ours.items() if k != 'budget'}, default=str)[:300]}")
        log_progress(progress, f"node/{name}: ours, cache-aware")
        aware = run_ours(model, prompt, max_tokens=max_tokens, n_threads=n_threads, limit_bytes=limit,
                         selection=ExpertSelection(CACHE_AWARE))
        shown = {k: v for k, v in aware.items() if k != "budget"}
        log_progress(progress, f"  ours, cache-aware: {json.dumps(shown, default=str)[:300]}")
        stock: dict[str, Any] = {"skipped": "no llama-server binary"}
        if binary:
            log_progress(progress, f"node/{name}: llama-server")
            try:
                stock = run_stock(binary, model, prompt, max_tokens=max_tokens, n_threads=n_threads, limit_bytes=limit,
                                  timeout_s=stock_timeout_s)
            except Exception as exc:  # a server that cannot start is a result
                stock = {"failed": f"{type(exc).__name__}: {exc}"[:500]}
            log_progress(progress, f"  llama-server: {json.dumps(stock, default=str)[:300]}")
        out[name] = {"limit_bytes": limit, "ours": ours, "ours_cache_aware": aware, "stock": stock}
    return out
