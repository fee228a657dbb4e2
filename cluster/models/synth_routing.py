"""The decode routing a synthetic config implies, read from its embeddings and routers without running llama.cpp.

A synthetic model's residual stream stays near the token embedding (see `cluster.models.synth`), so a layer's
top-k for a decoded token is, up to the few percent attention and experts add, the top-k of that layer's router
applied to the rms-normalised embedding of the token fed in; and greedy decoding walks a topic's words
cyclically, in the order the topic lists them. `decode_traces` builds requests' routing traces from that alone,
so the statistics `cluster.bench.regimes` measures on a running model can be computed from a config in about a
second (the test of a routing calibration does), and a file of 18 GB need not be written to know them.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from cluster.engine.cache import TRACE_ACCESS, RoutingTrace
from cluster.models.synth_config import SynthConfig, named_rng
from cluster.models.synth_weights import Plan

__all__ = ["decode_selections", "decode_traces"]


def decode_selections(plan: Plan) -> np.ndarray:
    """Each layer's top-k for each word token of `plan`'s vocabulary fed in alone: int array
    [n_layers, n_real_tokens, n_experts_used] (logits in decreasing order)."""
    config = plan.config
    x = plan.embd / np.linalg.norm(plan.embd, axis=1, keepdims=True) * math.sqrt(config.n_embd)  # rmsnorm, weight 1
    k = config.n_experts_used
    return np.stack([np.argsort(-(x @ plan._router(layer).T), axis=1, kind="stable")[:, :k]
                     for layer in range(config.n_layers)])


def decode_traces(config: SynthConfig, topics: Sequence[int], max_tokens: int) -> list[RoutingTrace]:
    """Routing traces of one request per entry of `topics`, each decoding `max_tokens` tokens of that topic.

    A request starts at a word of its topic drawn from the config's "decode_traces" stream and walks the
    topic's words from there; each decoded token is one step of single-row accesses, layer by layer, as the
    engine records them (without STEP events: steps follow from the layer order).

    Raises:
        ValueError: a dense config, or a topic out of range.
    """
    if config.n_experts == 0 or any(not 0 <= t < config.n_topics for t in topics):
        raise ValueError(f"topics={list(topics)}, n_experts={config.n_experts}: expected an MoE config and topics "
                         f"in 0..{config.n_topics - 1}")
    plan = Plan(config)
    selections = decode_selections(plan)  # [n_layers, n_real, k]
    n_layers, k = config.n_layers, config.n_experts_used
    rng = named_rng(config.seed, "decode_traces")
    traces = []
    for topic in topics:
        words = np.asarray(plan.vocab.topic_ids[topic])
        start = int(rng.integers(len(words)))
        tokens = words[(start + np.arange(max_tokens)) % len(words)]
        n_events = max_tokens * n_layers
        ids = selections[:, tokens, :].transpose(1, 0, 2)  # [token, layer, k]: the engine's event order
        traces.append(RoutingTrace(kind=np.full(n_events, TRACE_ACCESS, dtype=np.uint8),
                                   layer=np.tile(np.arange(n_layers, dtype=np.int32), max_tokens),
                                   n_tokens=np.ones(n_events, dtype=np.int32),
                                   n_ids=np.full(n_events, k, dtype=np.int32),
                                   ids=np.ascontiguousarray(ids, dtype=np.int32).ravel()))
    return traces
