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
import queue
import sys
import time
from typing import Any, Callable

from cluster.bench.closed_loop import closed_loop
from cluster.bench.worker import read_bytes


def _send(engine: Any, max_tokens: int) -> Callable[[str, float], dict[str, Any]]:
    """One request to the engine, measured; cancelled at its deadline (it counts what it had)."""
    from cluster.engine.moe_engine import Generation
    from cluster.engine.sequence import Piece

    def one(prompt: str, deadline: float) -> dict[str, Any]:
        sent = time.perf_counter()
        seq = engine.submit(prompt, _params(max_tokens))
        first = None
        while True:
            remaining = deadline - time.perf_counter()
            if remaining <= 0:
                seq.cancel()
                return {"tokens": len(seq.generated), "complete": False}
            try:
                item = seq.outbox.get(timeout=min(remaining, 3600.0))
            except queue.Empty:  # the deadline came
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

    return one


def _params(max_tokens: int) -> Any:
    from cluster.engine.sampling import SamplingParams

    return SamplingParams(max_tokens=max_tokens, temperature=0.0)


def main(spec_path: str) -> int:
    from cluster.engine.moe_engine import MoEEngine

    spec = json.loads(open(spec_path).read())
    engine = MoEEngine(spec["model"], spec["cache_bytes"], n_ctx=spec["n_ctx"], n_slots=spec["slots"],
                       n_threads=spec.get("n_threads"), n_batch=max(512, spec["slots"]), **spec.get("knobs", {}))
    measured: dict[str, Any] = {}

    def begin() -> None:  # every client has warmed up
        measured["io"] = read_bytes()
        measured["cache"] = engine.cache_stats() if engine.has_cache else {}
        measured["batch"] = engine.batch_stats()

    elapsed, requests = closed_loop(spec["clients"], spec["prompts"], _send(engine, spec["max_tokens"]),
                                    warmup_s=spec["warmup_s"], window_s=spec["window_s"], begin=begin)
    io = read_bytes() - measured["io"]
    after = engine.cache_stats() if engine.has_cache else {}
    batch_after = engine.batch_stats()
    engine.close()
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
