"""Benchmark child: loads one engine, serves a workload, prints one JSON line of measurements.

Run as ``python -m cluster.bench.worker SPEC.json``; the spec gives model, cache budget
(bytes, "auto", or null: plain llama.cpp), optionally the expert selection (``ExpertSelection``'s
fields) and requests. Disk reads come from /proc/self/io (``read_bytes``:
bytes this process made the kernel fetch from storage, page faults of the mapping included).
"""

from __future__ import annotations

import json
import sys
import time


def read_bytes(pid: int | str = "self") -> int:
    """Bytes process ``pid`` has made the kernel fetch from storage (``/proc/PID/io``, ``read_bytes``)."""
    with open(f"/proc/{pid}/io") as f:
        for line in f:
            if line.startswith("read_bytes:"):
                return int(line.split()[1])
    return 0


def _rss_anon() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
    return 0


def main(spec_path: str) -> int:
    from cluster.engine.expert_selection import ExpertSelection
    from cluster.engine.moe_engine import MoEEngine

    spec = json.loads(open(spec_path).read())
    t0 = time.perf_counter()
    selection = ExpertSelection(**spec["expert_selection"]) if spec.get("expert_selection") else ExpertSelection()
    engine = MoEEngine(spec["model"], spec["cache_bytes"], n_ctx=spec.get("n_ctx", 1024),
                       n_threads=spec.get("n_threads"), expert_selection=selection)
    load = {"load_s": time.perf_counter() - t0}
    requests = []
    for req in spec["requests"]:
        io_a = read_bytes()
        pieces = engine.stream(req["prompt"], max_tokens=req["max_tokens"])
        # prefill ends when the first piece arrives; disk reads split there
        io_b = None
        try:
            while True:
                next(pieces)
                if io_b is None:
                    io_b = read_bytes()
        except StopIteration as done:
            gen = done.value
        io_c = read_bytes()
        requests.append({
            "n_prompt_tokens": gen.n_prompt_tokens,
            "n_generated": gen.n_generated,
            "prefill_s": gen.prefill_s,
            "decode_s": gen.decode_s,
            "prefill_read_bytes": (io_b if io_b is not None else io_c) - io_a,
            "decode_read_bytes": io_c - (io_b if io_b is not None else io_c),
            "text": gen.text,
        })
    result = {**load, "requests": requests, "rss_anon_bytes": _rss_anon(),
              "cache_stats": engine.cache_stats() if engine.has_cache else None,
              "auto_budget": engine.auto_budget.explain() if engine.auto_budget is not None else None}
    engine.close()
    print(json.dumps(result, default=float))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
