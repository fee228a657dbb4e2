"""Sliding-window routing and the decode routing computed from a config (`cluster.models.synth_routing`).

The calibration of `SLIDING_WINDOW_ROUTING` is checked where it is cheap: the published statistics'
measures of `bench regimes` over decode routing computed from the qwen3-30b-a3b preset's routers (four of its
layers, full widths), which must fall in the published ranges while the topic-group routing of the same shape
does not. That the computed routing is llama.cpp's is checked on a tiny model with the same kind of routing.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from cluster.bench.regimes import PUBLISHED_QWEN3, published_statistics
from cluster.engine.cache import discover_layout
from cluster.engine.moe_engine import MoEEngine
from cluster.models import synth
from cluster.models.synth_config import SLIDING_WINDOW_ROUTING, preset_of, topic_windows
from cluster.models.synth_routing import decode_selections, decode_traces
from cluster.models.synth_weights import Plan

QWEN3_4L = dataclasses.replace(synth.PRESETS["qwen3-30b-a3b"], n_layers=4)
# bench regimes' synthetic chat workload (cluster.bench.engine_bench.workloads, 8 requests): the first half
# of the requests on topic 0, the second on topic 1, 64 tokens each
CHAT_TOPICS, CHAT_TOKENS = [0, 0, 0, 0, 1, 1, 1, 1], 64
COVERAGE_BAND = (0.4, 0.6)  # "about half of each layer's experts"
TINY_WINDOWS = dataclasses.replace(synth.PRESETS["tiny"], expert_window=6, window_ring=16, specialization=3.0)


def _published(config: synth.SynthConfig) -> dict[str, float]:
    traces = decode_traces(config, CHAT_TOPICS, CHAT_TOKENS)
    unit_bytes = np.ones((config.n_layers, config.n_experts), dtype=np.int64)
    return published_statistics(traces, unit_bytes, config.n_experts_used)


def test_the_qwen3_preset_routes_inside_the_published_ranges() -> None:
    stats = _published(QWEN3_4L)
    low, high = PUBLISHED_QWEN3["lru_at_40"]
    assert low <= stats["lru_at_40"] <= high, stats
    assert COVERAGE_BAND[0] <= stats["experts_covering_90"] <= COVERAGE_BAND[1], stats
    assert stats["median_reuse_distance"] == PUBLISHED_QWEN3["median_reuse_distance"], stats


def test_topic_group_routing_of_the_same_shape_is_outside_them() -> None:
    """What the preset had before the calibration: routing too concentrated for the published figures."""
    grouped = dataclasses.replace(QWEN3_4L, expert_window=0, window_ring=0,
                                  specialization=synth.REALISTIC_SPECIALIZATION)
    stats = _published(grouped)
    low, _ = PUBLISHED_QWEN3["lru_at_40"]
    assert stats["lru_at_40"] < low and stats["experts_covering_90"] < COVERAGE_BAND[0], stats


def test_windows_slide_along_each_topic_ring_and_one_cycle_visits_the_ring() -> None:
    c = QWEN3_4L
    windows = topic_windows(c, layer=2)
    assert windows.shape == (c.n_topics, c.words_per_topic, c.expert_window)
    step = c.window_ring / c.words_per_topic
    for topic in windows:
        ring = set(topic.ravel().tolist())
        assert len(ring) == c.window_ring
        for word, after in zip(topic, topic[1:]):
            assert len(set(word.tolist())) == c.expert_window
            shared = len(set(word.tolist()) & set(after.tolist()))
            assert c.expert_window - np.ceil(step) <= shared < c.expert_window
    rings = [set(t.ravel().tolist()) for t in windows]
    assert any(rings[0] != r for r in rings[1:])
    assert set(windows[0].ravel().tolist()) != set(topic_windows(c, layer=3)[0].ravel().tolist())
    with pytest.raises(ValueError, match="expert_window"):
        topic_windows(synth.PRESETS["bench"], layer=0)


def test_a_word_selects_mostly_inside_its_window() -> None:
    plan = Plan(QWEN3_4L)
    selections = decode_selections(plan)
    inside, total = 0, 0
    for layer in range(QWEN3_4L.n_layers):
        for ids, windows in zip(plan.vocab.topic_ids, topic_windows(QWEN3_4L, layer)):
            for v, window in zip(ids, windows):
                inside += len(set(selections[layer, v].tolist()) & set(window.tolist()))
                total += QWEN3_4L.n_experts_used
    assert inside / total > 0.8, inside / total


@pytest.mark.parametrize(("changes", "field"), [
    ({"window_ring": 16}, "window_ring"),
    ({"expert_window": 20, "window_ring": 10}, "window_ring"),
    ({"expert_window": 20, "window_ring": 200}, "window_ring"),
    ({"expert_window": -1}, "expert_window"),
])
def test_invalid_window_settings_name_the_field(changes: dict[str, int], field: str) -> None:
    with pytest.raises(ValueError, match=f"SynthConfig.{field}="):
        dataclasses.replace(synth.PRESETS["tiny"], **changes).validate()


def test_only_the_qwen3_preset_uses_sliding_windows_and_older_configs_keep_their_json() -> None:
    for name, preset in synth.PRESETS.items():
        assert (preset.expert_window > 0) == (name == "qwen3-30b-a3b"), name
    assert "expert_window" not in synth.PRESETS["bench"].to_json()
    text = synth.PRESETS["qwen3-30b-a3b"].to_json()
    assert synth.SynthConfig.from_json(text) == synth.PRESETS["qwen3-30b-a3b"]
    assert {k: getattr(synth.PRESETS["qwen3-30b-a3b"], k) for k in SLIDING_WINDOW_ROUTING} == SLIDING_WINDOW_ROUTING


def test_preset_of_names_a_layer_truncated_preset_and_nothing_else() -> None:
    assert preset_of(QWEN3_4L) == ("qwen3-30b-a3b", 48)
    assert preset_of(synth.PRESETS["demo"]) == ("demo", 8)
    assert preset_of(dataclasses.replace(synth.PRESETS["demo"], n_embd=128)) is None
    assert preset_of(dataclasses.replace(synth.PRESETS["tiny"], n_layers=5)) is None  # more layers than tiny's 4


def test_computed_decode_routing_is_what_llama_cpp_selects(tmp_path_factory: pytest.TempPathFactory) -> None:
    path = synth.synthesize(tmp_path_factory.mktemp("windows") / "tiny-windows.gguf", TINY_WINDOWS,
                            progress=False).path
    plan = Plan(TINY_WINDOWS)
    selections = decode_selections(plan)
    topics = synth.read_topics(path)
    with MoEEngine(path, discover_layout(str(path)).expert_bytes, n_ctx=256, n_threads=2) as engine:
        result = engine.generate(synth.topic_prompt(topics, 2, 8, seed=0), max_tokens=16)
    steps = result.trace.decode_steps()
    assert len(steps) == len(result.tokens) - 1
    assert agreement(steps, result.tokens, selections) > 0.9


def agreement(steps: list[dict[int, np.ndarray]], tokens: list[int], selections: np.ndarray) -> float:
    """Share of the experts llama.cpp selected for each decode step and layer that the computed routing
    selects too (decode step i is fed the token sampled i-th); every step must have every layer."""
    n_layers, _, k = selections.shape
    same = 0
    for token, step in zip(tokens, steps):
        assert sorted(step) == list(range(n_layers))
        for layer, ids in step.items():
            same += len(set(ids.ravel().tolist()) & set(selections[layer, token].tolist()))
    return same / (k * n_layers * len(steps))
