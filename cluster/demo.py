"""The quick-start job: a generated MoE model served on this node with the expert cache.

Generates the default ``demo`` model on first use, then serves a mixed-topic batch of
requests with a cache budget well below the model's expert bytes, printing each answer and
the cache's behaviour, so the whole path (synth → llama.cpp → cache) runs for real.
"""

from __future__ import annotations

import sys
import time

from cluster import synth
from cluster.cache import discover_layout
from cluster.cli import MIB, default_model
from cluster.engine import MoEEngine


def run_demo(model: str | None = None, cache_mb: int | None = None, n_requests: int = 6) -> int:
    path = model or str(default_model("demo"))
    layout = discover_layout(path)
    footprint = int(layout.unit_bytes.sum())
    budget = cache_mb * MIB if cache_mb else int(0.4 * footprint)
    try:
        topics = synth.read_topics(path)
        prompts = [synth.topic_prompt(topics, i % len(topics), 24, seed=i) for i in range(n_requests)]
    except ValueError:
        prompts = [f"Request {i}: tell me about mixtures of experts." for i in range(n_requests)]

    print(f"model {path}: {layout.arch}, {layout.n_layers} layers x {layout.n_experts} experts "
          f"(top-{layout.n_experts_used}), experts {footprint / MIB:.0f} MiB, cache budget {budget / MIB:.0f} MiB")
    t0 = time.perf_counter()
    with MoEEngine(path, budget, n_ctx=1024) as engine:
        print(f"loaded in {time.perf_counter() - t0:.1f} s\n")
        for i, prompt in enumerate(prompts):
            gen = engine.generate(prompt, max_tokens=32)
            c = gen.cache
            print(f"[{i}] prompt: {prompt.strip()[:60]}...")
            print(f"    answer: {gen.text.strip()[:100]}")
            print(f"    {gen.n_generated} tokens at {gen.decode_tok_s:.1f} tok/s | decode hit rate "
                  f"{100 * c['decode_hit_rate']:.0f} % | read {c['bytes_read'] / MIB:.1f} MiB | "
                  f"prefetch precision {100 * c['prefetch_precision']:.0f} % recall {100 * c['prefetch_recall']:.0f} %")
        stats = engine.cache_stats()
        measured = engine.measured_resident_bytes()
    print(f"\ncache totals: {stats['hits']} hits, {stats['misses']} misses (hit rate {100 * stats['hit_rate']:.1f} %), "
          f"{stats['bytes_read'] / MIB:.0f} MiB read, {stats['n_evictions']} evictions")
    print(f"resident experts: {stats['resident_bytes'] / MIB:.1f} MiB held, {measured / MIB:.1f} MiB measured "
          f"in memory (mincore), budget {stats['budget_bytes'] / MIB:.1f} MiB")
    if measured > stats["budget_bytes"]:
        print("error: resident expert bytes exceed the budget", file=sys.stderr)
        return 1
    return 0
