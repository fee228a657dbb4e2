"""The token affinity at full model size: its memory cap and eviction rule, the compact expert ids
nodes send it, and the router learning a summary on a worker thread while it goes on routing."""

from __future__ import annotations

import asyncio
import pickle
import threading
import time

import numpy as np
import pytest

from cluster.distributed.protocol import NodeReport, RouteAsk
from cluster.distributed.router import RouterActor
from cluster.engine.cache import TRACE_ACCESS, TRACE_STEP, RoutingTrace
from cluster.engine.sampling import SamplingParams
from cluster.engine.token_affinity import AFFINITY_TABLE_BYTES, TokenAffinity
from cluster.engine.trace_summary import RoutingTraceSummary, expert_id_dtype

QWEN3_LAYERS, QWEN3_EXPERTS, QWEN3_TOP_K, QWEN3_VOCAB = 48, 128, 8, 151_936


def random_summary(tokens: np.ndarray, rng: np.random.Generator, n_layers: int = QWEN3_LAYERS,
                   n_experts: int = QWEN3_EXPERTS, k: int = QWEN3_TOP_K) -> RoutingTraceSummary:
    """Each token's top-k: k distinct random experts per layer, as compact ids."""
    experts = np.argsort(rng.random((tokens.size, n_layers, n_experts)), axis=2)[:, :, :k]
    return RoutingTraceSummary(tokens=tuple(int(t) for t in tokens), prompt_experts=experts.astype(expert_id_dtype(n_experts)),
                               decode_counts=np.zeros((n_layers, n_experts), dtype=np.int64))


def repeated_summary(counts: dict[int, int]) -> RoutingTraceSummary:
    """Token t prefilled counts[t] times on a 1-layer, 4-expert model, always choosing expert t % 4."""
    tokens = [t for t, n in counts.items() for _ in range(n)]
    experts = np.array([[[t % 4]] for t in tokens], dtype=np.int8)
    return RoutingTraceSummary(tuple(tokens), experts, np.zeros((1, 4), dtype=np.int64))


def prefill_trace(experts: np.ndarray) -> RoutingTrace:
    """One prefill step of ``experts`` (``[n, L, k]``), layer by layer, as llama.cpp records it."""
    n, n_layers, k = experts.shape
    kinds, layers, n_tokens, n_ids, ids = [TRACE_STEP], [-1], [n], [2], [np.array([0, n], dtype=np.int32)]
    for layer in range(n_layers):
        kinds.append(TRACE_ACCESS), layers.append(layer), n_tokens.append(n), n_ids.append(n * k)
        ids.append(experts[:, layer, :].astype(np.int32).ravel())
    return RoutingTrace(np.array(kinds, dtype=np.uint8), np.array(layers, dtype=np.int32),
                        np.array(n_tokens, dtype=np.int32), np.array(n_ids, dtype=np.int32), np.concatenate(ids))


def test_expert_ids_travel_in_the_smallest_signed_type_that_holds_them_and_minus_one():
    assert [expert_id_dtype(n) for n in (8, 128, 129, 256, 32_768, 32_769)] == \
        [np.int8, np.int8, np.int16, np.int16, np.int16, np.int32]
    rng = np.random.default_rng(0)
    experts = np.argsort(rng.random((1_700, QWEN3_LAYERS, QWEN3_EXPERTS)), axis=2)[:, :, :QWEN3_TOP_K]
    summary = prefill_trace(experts).summary(list(range(1_700)), QWEN3_LAYERS, QWEN3_EXPERTS)
    assert summary.prompt_experts.dtype == np.int8
    np.testing.assert_array_equal(summary.prompt_experts, experts)  # ids up to 127 survive
    report = NodeReport("sniper-node-0", 0, 4, True, None, None, (), None, 0.0, "r1", summary)
    assert len(pickle.dumps(report)) < 1_700 * QWEN3_LAYERS * QWEN3_TOP_K + 100_000  # int32 ids alone took 4x that
    wide = prefill_trace(np.full((3, 2, 2), 255)).summary([1, 2, 3], 2, 256)
    assert wide.prompt_experts.dtype == np.int16 and (wide.prompt_experts == 255).all()


def test_compact_and_int32_ids_teach_the_same_table_and_the_same_selections():
    rng = np.random.default_rng(1)
    compact = random_summary(rng.integers(0, 500, 300), rng)
    wide = RoutingTraceSummary(compact.tokens, compact.prompt_experts.astype(np.int32), compact.decode_counts)
    a, b = TokenAffinity(), TokenAffinity()
    a.learn(compact)
    b.learn(wide)
    np.testing.assert_array_equal(a.table.prob, b.table.prob)
    np.testing.assert_array_equal(a.table.lookup, b.table.lookup)
    shape = (QWEN3_LAYERS, QWEN3_EXPERTS)
    np.testing.assert_array_equal(compact.selections(shape), wide.selections(shape))
    assert compact.selections(shape).sum() == 300 * QWEN3_LAYERS * QWEN3_TOP_K  # no id wrapped past int8


def test_the_default_cap_holds_tens_of_megabytes_at_full_model_size_after_more_tokens_than_it_takes():
    affinity = TokenAffinity()
    capacity = affinity.capacity(QWEN3_LAYERS * QWEN3_EXPERTS)
    assert 2_000 <= capacity < 8_192
    rng = np.random.default_rng(2)
    distinct = rng.permutation(QWEN3_VOCAB)[: capacity + 2_000]
    for chunk in np.array_split(distinct, 3):
        affinity.learn(random_summary(chunk, rng))
    assert len(affinity) == capacity
    lookup_bytes = affinity.table.lookup.nbytes  # 8 bytes per id up to the largest seen
    assert lookup_bytes <= 8 * (QWEN3_VOCAB + 2) * 2
    assert affinity.nbytes - lookup_bytes <= AFFINITY_TABLE_BYTES <= 64 * 2**20
    assert affinity.table.prob.dtype == np.uint8 and affinity.table.prob.shape[0] == capacity


def test_a_token_cap_holds_too_and_every_known_token_maps_to_its_own_row():
    rng = np.random.default_rng(3)
    affinity = TokenAffinity(max_tokens=100)
    for _ in range(4):
        affinity.learn(random_summary(rng.integers(0, QWEN3_VOCAB, 400), rng, n_layers=2, n_experts=8, k=2))
    rows = affinity.table.lookup[affinity.table.lookup >= 0]
    assert len(affinity) == rows.size == 100 and np.unique(rows).size == 100


def test_eviction_keeps_frequent_tokens_until_they_age():
    affinity = TokenAffinity(max_tokens=3)
    affinity.learn(repeated_summary({1: 3, 2: 3, 3: 2}))
    affinity.learn(repeated_summary({10: 1, 11: 1}))  # rarer than everything held: not learned
    assert (affinity.rows_of([1, 2, 3, 10, 11]) >= 0).tolist() == [True, True, True, False, False]
    affinity.learn(repeated_summary({1: 1, 12: 3}))  # more frequent than 3 (2, aged) and not beside it: replaces it
    assert (affinity.rows_of([1, 2, 3, 12]) >= 0).tolist() == [True, True, False, True]
    for _ in range(200):  # 2 and 12 are not seen for a few half-lives: any newcomer outweighs them
        affinity.learn(repeated_summary({1: 1}))
    affinity.learn(repeated_summary({20: 1, 21: 1}))
    assert (affinity.rows_of([1, 2, 12, 20, 21]) >= 0).tolist() == [True, False, False, True, True]
    demand = affinity.demand(affinity.rows_of([20]))
    np.testing.assert_allclose(demand.prefill[0], [0.99, 0.0, 0.0, 0.0], atol=0.01)  # a reused row forgot 2's experts


def test_a_learn_publishes_a_new_table_and_never_changes_the_one_decisions_hold():
    rng = np.random.default_rng(4)
    affinity = TokenAffinity(max_tokens=64)
    affinity.learn(random_summary(rng.integers(0, 1_000, 200), rng, n_layers=4, n_experts=16, k=2))
    held = affinity.table
    before = (held.lookup.copy(), held.prob.copy(), held.log_miss.copy())
    affinity.learn(random_summary(rng.integers(1_000, 2_000, 200), rng, n_layers=4, n_experts=16, k=2))
    assert affinity.table is not held
    for array, copy in zip((held.lookup, held.prob, held.log_miss), before):
        np.testing.assert_array_equal(array, copy)


def test_the_router_goes_on_routing_while_it_learns_a_full_size_summary():
    """The summary's learning runs on a worker thread (held there until the routes are answered):
    decisions are answered meanwhile, and the summary is learned afterwards."""
    actor = RouterActor("/nowhere/model.gguf", n_ctx=4096)
    actor.core.on_report(NodeReport("sniper-node-0", 0, 64, True, None, None, (), None, time.time()))
    affinity = actor.core.policy.affinity
    learning, release = threading.Event(), threading.Event()
    real_learn = affinity.learn

    def held_learn(summary: RoutingTraceSummary) -> None:
        learning.set()
        release.wait(timeout=30)
        real_learn(summary)

    affinity.learn = held_learn
    rng = np.random.default_rng(5)
    summary = random_summary(rng.permutation(QWEN3_VOCAB)[:2_000], rng)
    report = NodeReport("sniper-node-0", 0, 64, True, None, None, (), None, time.time(), None, summary)

    async def scenario() -> list[str]:
        task = asyncio.create_task(actor.report(report))
        while not learning.is_set():
            await asyncio.sleep(0.001)
        routed = [(await actor.route(RouteAsk(f"r{i}", summary.tokens[:64], SamplingParams()))).node_id
                  for i in range(5)]
        assert not task.done()
        release.set()
        await task
        return routed

    assert asyncio.run(scenario()) == ["sniper-node-0"] * 5
    assert len(affinity) == 2_000 and affinity.shape == (QWEN3_LAYERS, QWEN3_EXPERTS)


@pytest.mark.parametrize("bad", [{"max_tokens": 0}, {"max_table_bytes": 0}, {"max_demand_tokens": 0}])
def test_caps_below_one_are_refused(bad: dict[str, int]):
    with pytest.raises(ValueError, match="must be >= 1"):
        TokenAffinity(**bad)
