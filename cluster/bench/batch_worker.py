"""``bench batch`` child: one engine with ``slots`` sequence slots, ``clients`` closed-loop clients.

Run as ``python -m cluster.bench.batch_worker SPEC.json`` (in a memory cgroup for the limited
runs); prints one JSON line. Each client first sends one warm-up request; once all have (or the
warm-up time is up), every client sends requests back to back until the window ends, and what
arrived within the window is measured: tokens as they come (a request cut by the window counts
what it had), each whole request's time to first token and time per output token, the cache's
counters and the bytes this process made the kernel read (``/proc/self/io``) over the window.
"""

from __future__ import annotations

import json
import sys
import threading
import time
from typing import Any

from cluster.bench.worker import _read_bytes


def _client(engine: Any, prompts: list[str], offset: int, max_tokens: int, start: threading.Barrier,
            window: dict[str, float], out: list[dict[str, Any]]) -> None:
    from cluster.engine import Generation
    from cluster.sequence import Piece

    def one(prompt: str, deadline: float | None) -> dict[str, Any] | None:
        sent = time.perf_counter()
        seq = engine.submit(prompt, _params(max_tokens))
        first = None
        while True:
            remaining = None if deadline is None else deadline - time.perf_counter()
            if remaining is not None and remaining <= 0:
                seq.cancel()
                return {"tokens": len(seq.generated), "complete": False}
            try:
                item = seq.outbox.get(timeout=remaining)
            except Exception:  # noqa: BLE001  (queue.Empty: the window ended)
                continue
            if isinstance(item, Piece):
                first = first or time.perf_counter()
            elif isinstance(item, Generation):
                end = time.perf_counter()
                first = first or end
                return {"tokens": item.n_generated, "complete": True, "ttft_s": first - sent,
                        "tpot_s": (end - first) / (item.n_generated - 1) if item.n_generated > 1 else None,
                        "sent": sent, "end": end}
            else:
                raise item if isinstance(item, BaseException) else RuntimeError("cancelled")

    one(prompts[offset % len(prompts)], window["warmup_deadline"])
    start.wait()
    i = offset + 1
    while time.perf_counter() < window["end"]:
        result = one(prompts[i % len(prompts)], window["end"])
        if result is not None:
            out.append(result)
        i += 1


def _params(max_tokens: int) -> Any:
    from cluster.sampling import SamplingParams

    return SamplingParams(max_tokens=max_tokens, temperature=0.0)


def main(spec_path: str) -> int:
    from cluster.engine import MoEEngine

    spec = json.loads(open(spec_path).read())
    clients = spec["clients"]
    engine = MoEEngine(spec["model"], spec["cache_bytes"], n_ctx=spec["n_ctx"], n_slots=spec["slots"],
                       n_threads=spec.get("n_threads"), n_batch=max(512, spec["slots"]),
                       adaptive_width=spec.get("adaptive_width", True))
    window: dict[str, float] = {"warmup_deadline": time.perf_counter() + spec["warmup_s"], "end": float("inf")}
    measured: dict[str, Any] = {}

    def begin() -> None:  # the barrier's action: every client has warmed up
        measured["io"] = _read_bytes()
        measured["cache"] = engine.cache_stats() if engine.has_cache else {}
        measured["batch"] = engine.batch_stats()
        measured["t0"] = time.perf_counter()
        window["end"] = measured["t0"] + spec["window_s"]

    barrier = threading.Barrier(clients, action=begin)
    results: list[list[dict[str, Any]]] = [[] for _ in range(clients)]
    threads = [threading.Thread(target=_client, args=(engine, spec["prompts"], c, spec["max_tokens"], barrier, window,
                                                      results[c])) for c in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - measured["t0"]
    io = _read_bytes() - measured["io"]
    after = engine.cache_stats() if engine.has_cache else {}
    batch_after = engine.batch_stats()
    engine.close()
    requests = [r for rs in results for r in rs]
    cache = {k: after[k] - measured["cache"][k] for k in ("bytes_read_decode", "bytes_read_prefill", "n_steps",
                                                           "n_hits_decode", "n_misses_decode", "n_hits_prefill",
                                                           "n_misses_prefill")} if after else {}
    steps = batch_after["steps"] - measured["batch"]["steps"]
    decode_steps = batch_after["decode_steps"] - measured["batch"]["decode_steps"]
    decoding = batch_after["decode_rows"] - measured["batch"]["decode_rows"]
    print(json.dumps({"elapsed_s": elapsed, "requests": requests, "disk_read_bytes": io, "cache": cache,
                      "steps": steps, "decode_batch": decoding / decode_steps if decode_steps else None,
                      "budget_bytes": after.get("budget_bytes"), "width": batch_after["width"]}, default=float))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
