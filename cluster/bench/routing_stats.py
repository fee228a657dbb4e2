"""Routing statistics of a model, measured by running it: next-token expert reuse and skew."""

from __future__ import annotations

import sys
from typing import Any

import numpy as np

from cluster.engine.cache import RoutingTrace, discover_layout, reuse_rate


def hot_set_coverage(trace: RoutingTrace, n_layers: int, n_experts: int, fraction: float) -> float:
    """Fraction of decode selections that fall into the ``fraction`` most-selected experts of each layer."""
    counts = np.zeros((n_layers, n_experts), dtype=np.int64)
    for step in trace.decode_steps():
        for layer, ids in step.items():
            np.add.at(counts[layer], ids.ravel(), 1)
    keep = max(1, int(round(fraction * n_experts)))
    top = np.sort(counts, axis=1)[:, ::-1][:, :keep].sum()
    total = counts.sum()
    return float(top / total) if total else float("nan")


def measure_reuse(model_path: str, *, n_words: int = 48, max_tokens: int = 64, progress: bool = False) -> dict[str, Any]:
    """Runs one topic prompt per topic (or one plain prompt) and reports routing statistics.

    Returns reuse_rate (mean |S_t ∩ S_t-1| / k over layers and consecutive decode tokens),
    chance_reuse (k / E) and top40_coverage (share of decode selections in each layer's
    hottest 40 % of experts, per conversation, averaged).
    """
    from cluster.models import synth
    from cluster.engine.moe_engine import MoEEngine

    layout = discover_layout(model_path)
    try:
        topics = synth.read_topics(model_path)
        prompts = [synth.topic_prompt(topics, t, n_words, seed=t) for t in range(min(len(topics), 4))]
    except ValueError:
        prompts = ["The quick brown fox jumps over the lazy dog. " * 4]
    reuse, coverage = [], []
    with MoEEngine(model_path, int(layout.unit_bytes.sum()), n_ctx=1024) as engine:
        for prompt in prompts:
            gen = engine.generate(prompt, max_tokens=max_tokens)
            reuse.append(reuse_rate(gen.trace))
            coverage.append(hot_set_coverage(gen.trace, layout.n_layers, layout.n_experts, 0.4))
            if progress:
                print(f"  measured routing on a {gen.n_prompt_tokens}-token prompt", file=sys.stderr, flush=True)
    return {
        "reuse_rate": float(np.nanmean(reuse)),
        "chance_reuse": layout.n_experts_used / layout.n_experts,
        "top40_coverage": float(np.nanmean(coverage)),
    }
