"""The policy core alone (cluster.engine.cache.CachePolicy): counting, budget, scan resistance, replay, prediction."""

from __future__ import annotations

import numpy as np
import pytest

from cluster.engine.cache import (
    TRACE_ACCESS,
    TRACE_PREDICT,
    TRACE_STEP,
    CacheConfig,
    CachePolicy,
    RoutingTrace,
)
from cluster.errors import InvalidParameterError

UNIT = 1000  # bytes of one unit in the hand-made policies


def make_policy(n_layers: int = 4, n_experts: int = 16, *, budget_units: float = 8, k: int = 2,
                eviction: str = "scan_resistant", unit_bytes: np.ndarray | None = None, **knobs: object) -> CachePolicy:
    if unit_bytes is None:
        unit_bytes = np.full((n_layers, n_experts), UNIT, dtype=np.uint64)
    config = CacheConfig(budget_bytes=int(budget_units * UNIT), eviction=eviction, **knobs)  # type: ignore[arg-type]
    return CachePolicy(n_layers, n_experts, unit_bytes, config, min_units_resident=k)


def decode_step(policy: CachePolicy, per_layer: list[list[int]]) -> None:
    """One single-token ubatch: layer l selects per_layer[l]."""
    for layer, ids in enumerate(per_layer):
        policy.access(layer, np.array([ids], dtype=np.int32))


def resident_set(policy: CachePolicy) -> set[tuple[int, int]]:
    return {(l, e) for l in range(policy.n_layers) for e in range(policy.n_experts) if policy.is_resident(l, e)}


# -- counting ------------------------------------------------------------------------------


def test_hits_misses_and_expert_counts_follow_hand_made_accesses() -> None:
    policy = make_policy(budget_units=64)
    policy.access(0, [[0, 1]])  # decode step 1: two misses
    policy.access(0, [[0, 1]])  # layer index did not increase: decode step 2, two hits
    policy.access(0, [[0, 2], [0, 3], [2, 3]])  # prefill step: 0 hit, 2 and 3 miss (unique units)
    policy.access(1, [[5, 6], [5, 7], [6, 7]])  # same prefill step, next layer: three misses
    policy.settle()
    c = policy.counters()
    assert (c["n_hits_decode"], c["n_misses_decode"]) == (2, 2)
    assert (c["n_hits_prefill"], c["n_misses_prefill"]) == (1, 5)
    assert c["n_steps"] == 3
    assert (c["n_tokens_decode"], c["n_tokens_prefill"]) == (2, 3)
    assert c["bytes_read_decode"] == 2 * UNIT and c["bytes_read_prefill"] == 5 * UNIT
    counts = policy.expert_counts()
    assert counts.shape == (4, 16)
    expected = np.zeros((4, 16), dtype=np.uint64)
    expected[0, [0, 1, 2, 3]] = [4, 2, 2, 2]  # every selection of every token, not unique units
    expected[1, [5, 6, 7]] = [2, 2, 2]
    np.testing.assert_array_equal(counts, expected)
    assert policy.resident_bytes == 7 * UNIT  # units 0-3 of layer 0, 5-7 of layer 1


def test_out_of_range_ids_are_counted_as_invalid_and_ignored() -> None:
    policy = make_policy(budget_units=64)
    policy.access(0, [[0, 99, -1, 3]])
    policy.access(7, [[1, 2]])  # no layer 7: the whole access is invalid
    policy.settle()
    c = policy.counters()
    assert c["n_invalid_ids"] == 2 + 2
    assert c["n_misses_decode"] == 2
    counts = policy.expert_counts()
    assert counts.sum() == 2 and counts[0, 0] == 1 and counts[0, 3] == 1
    assert resident_set(policy) == {(0, 0), (0, 3)}


# -- budget --------------------------------------------------------------------------------


@pytest.mark.parametrize("eviction", ["scan_resistant", "lru"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_budget_is_never_exceeded_after_settle(eviction: str, seed: int) -> None:
    rng = np.random.default_rng(seed)
    n_layers, n_experts, k = 6, 24, 4
    unit_bytes = rng.integers(1, 40, size=(n_layers, n_experts)).astype(np.uint64) * 4096
    budget = int(np.sort(unit_bytes, axis=1)[:, -k:].sum(axis=1).max()) * 3
    policy = CachePolicy(n_layers, n_experts, unit_bytes, CacheConfig(budget_bytes=budget, eviction=eviction), k)
    for step in range(60):
        n_tokens = 1 if rng.random() < 0.7 else int(rng.integers(2, 40))
        for layer in range(n_layers):
            ids = np.stack([rng.choice(n_experts, size=k, replace=False) for _ in range(n_tokens)]).astype(np.int32)
            policy.access(layer, ids)
            if layer + 1 < n_layers and rng.random() < 0.5:
                policy.predict(layer + 1, rng.choice(n_experts, size=k, replace=False))
        policy.settle()
        assert policy.resident_bytes <= budget, f"step {step}: {policy.resident_bytes} > {budget}"
        held = sum(int(unit_bytes[l, e]) for l, e in resident_set(policy))
        assert held == policy.resident_bytes


def test_constructor_rejects_budget_below_one_layers_top_k() -> None:
    with pytest.raises(InvalidParameterError, match="budget_bytes") as info:
        make_policy(budget_units=3.5, k=4)  # four units of 1000 bytes do not fit in 3500
    assert "3500" in str(info.value)
    make_policy(budget_units=4, k=4)  # exactly the top-k: accepted


@pytest.mark.parametrize(("knob", "value"), [
    ("probation_fraction", 0.0),
    ("heat_half_life_steps", 0.0),
    ("eviction", "fifo"),
])
def test_config_validation_errors_name_the_field(knob: str, value: object) -> None:
    with pytest.raises(InvalidParameterError, match=knob):
        make_policy(**{knob: value})
    with pytest.raises(InvalidParameterError, match=knob):
        CacheConfig(budget_bytes=10**6, **{knob: value}).to_native()  # type: ignore[arg-type]


# -- scan resistance -----------------------------------------------------------------------


def _decode_hits_after_prefill_scan(eviction: str) -> tuple[int, int, int]:
    """Decode working set, one prefill scan, the same decode steps again.

    Returns (decode hits in the first pass after the scan, selections in that pass, units of the
    decode working set still resident right after the scan).
    """
    n_layers, n_experts, k = 8, 32, 4
    budget_units = n_layers * n_experts // 4  # 25 % of all experts
    policy = make_policy(n_layers, n_experts, budget_units=budget_units, k=k, eviction=eviction)
    rng = np.random.default_rng(7)
    hot = [rng.choice(n_experts, size=6, replace=False) for _ in range(n_layers)]  # 6 of 32 per layer
    patterns = [[0, 1, 2, 3], [2, 3, 4, 5], [0, 1, 4, 5]]  # three tokens cover the 6 hot experts
    steps = [[hot[l][p].tolist() for l in range(n_layers)] for p in patterns]

    for _ in range(20):
        for step in steps:
            decode_step(policy, step)
    policy.settle()
    assert all(policy.is_resident(l, int(e)) for l in range(n_layers) for e in hot[l])

    # One prompt: 48 tokens touch 24 of every layer's 32 experts (75 %), hot ones included.
    for layer in range(n_layers):
        others = np.setdiff1d(np.arange(n_experts), hot[layer])
        touched = np.concatenate([hot[layer], rng.choice(others, size=18, replace=False)])
        ids = np.stack([rng.choice(touched, size=k, replace=False) for _ in range(48)])
        ids[: len(touched) // k] = touched.reshape(-1, k)  # every touched expert selected at least once
        policy.access(layer, ids.astype(np.int32))
    policy.settle()
    kept = sum(policy.is_resident(l, int(e)) for l in range(n_layers) for e in hot[l])

    before = policy.counters()
    for step in steps:
        decode_step(policy, step)
    after = policy.counters()
    hits = after["n_hits_decode"] - before["n_hits_decode"]
    total = hits + after["n_misses_decode"] - before["n_misses_decode"]
    return hits, total, kept


def test_scan_resistant_policy_keeps_decode_set_through_prefill_scan() -> None:
    sr_hits, total, sr_kept = _decode_hits_after_prefill_scan("scan_resistant")
    lru_hits, _, lru_kept = _decode_hits_after_prefill_scan("lru")
    n_hot = 8 * 6
    assert sr_kept >= 0.9 * n_hot, f"scan_resistant kept {sr_kept} of {n_hot} decode units through the scan"
    assert sr_hits >= 0.9 * total, f"scan_resistant: {sr_hits} decode hits of {total} after the scan"
    assert sr_hits > lru_hits, f"scan_resistant {sr_hits} vs lru {lru_hits} decode hits after the scan"
    assert lru_kept < sr_kept


# -- replay --------------------------------------------------------------------------------


def _hand_made_trace(n_layers: int, n_experts: int, k: int, seed: int) -> RoutingTrace:
    rng = np.random.default_rng(seed)
    kind, layer, n_tokens, n_ids, ids = [], [], [], [], []
    for step in range(30):
        tokens = 12 if step % 10 == 0 else 1
        for il in range(n_layers):
            sel = np.stack([rng.choice(n_experts, size=k, replace=False) for _ in range(tokens)]).ravel()
            kind.append(TRACE_ACCESS), layer.append(il), n_tokens.append(tokens), n_ids.append(sel.size)
            ids.extend(sel.tolist())
            if il + 1 < n_layers:
                pred = rng.choice(n_experts, size=k, replace=False)
                kind.append(TRACE_PREDICT), layer.append(il + 1), n_tokens.append(1), n_ids.append(k)
                ids.extend(pred.tolist())
    return RoutingTrace(kind=np.array(kind, dtype=np.uint8), layer=np.array(layer, dtype=np.int32),
                        n_tokens=np.array(n_tokens, dtype=np.int32), n_ids=np.array(n_ids, dtype=np.int32),
                        ids=np.array(ids, dtype=np.int32))


@pytest.mark.parametrize("eviction", ["adaptive", "lfu", "scan_resistant", "lru"])
def test_replaying_a_trace_matches_feeding_its_events_one_by_one(eviction: str) -> None:
    n_layers, n_experts, k = 4, 16, 2
    trace = _hand_made_trace(n_layers, n_experts, k, seed=3)
    replayed = make_policy(n_layers, n_experts, budget_units=12, k=k, eviction=eviction)
    replayed.replay(trace)
    stepped = make_policy(n_layers, n_experts, budget_units=12, k=k, eviction=eviction)
    for kind, layer, ids in trace.events():
        if kind == TRACE_ACCESS:
            stepped.access(layer, ids)
        else:
            stepped.predict(layer, ids)
    stepped.settle()
    assert replayed.counters() == stepped.counters()
    assert replayed.counters()["n_evictions"] > 0 and replayed.counters()["n_predicted"] > 0
    np.testing.assert_array_equal(replayed.expert_counts(), stepped.expert_counts())
    np.testing.assert_array_equal(replayed.expert_counts(), trace.expert_counts(n_layers, n_experts))
    r_res, r_heat = replayed.warmth()
    s_res, s_heat = stepped.warmth()
    np.testing.assert_array_equal(r_res, s_res)
    np.testing.assert_array_equal(r_heat, s_heat)
    assert replayed.resident_bytes == stepped.resident_bytes


# -- prediction ----------------------------------------------------------------------------


def test_prediction_is_scored_against_the_next_access_of_its_layer() -> None:
    policy = make_policy(budget_units=64)
    plan = policy.predict(1, [0, 1, 2])
    assert sorted(plan.load.tolist()) == [16 + 0, 16 + 1, 16 + 2]  # unit ids: layer * n_experts + expert
    policy.access(0, [[8, 9]])  # another layer: does not consume the prediction of layer 1
    assert policy.counters()["n_predicted"] == 0
    policy.access(1, [[0, 3], [0, 4]])  # selects {0, 3, 4}: one of three predictions was right
    c = policy.counters()
    assert (c["n_predicted"], c["n_predicted_correct"], c["n_selected_predicted"]) == (3, 1, 3)
    assert (c["n_prefetch_issued"], c["n_prefetch_used"]) == (3, 1)
    # the ubatch's phase is set by its first access (one token at layer 0): all of it is decode
    assert c["n_hits_decode"] == 1 and c["n_misses_decode"] == 2 + 2  # layer 0's two, layer 1's {3, 4}
    policy.access(1, [[0, 3]])  # no prediction pending for this access: nothing scored
    c2 = policy.counters()
    assert (c2["n_predicted"], c2["n_predicted_correct"], c2["n_selected_predicted"]) == (3, 1, 3)


def test_predictions_are_scored_but_not_loaded_when_prefetch_is_off() -> None:
    policy = make_policy(budget_units=64, prefetch=False)
    assert policy.predict(2, [4, 5]).load.size == 0
    policy.access(2, [[4, 6]])
    c = policy.counters()
    assert (c["n_predicted"], c["n_predicted_correct"], c["n_selected_predicted"]) == (2, 1, 2)
    assert c["n_prefetch_issued"] == 0 and not policy.is_resident(2, 5)


def _reads_two_layers_ahead(min_precision: float) -> tuple[list[int], int]:
    """40 decode steps in which the prediction made one layer ahead is right and the one made
    two layers ahead is wrong (experts 4..11 of layer 2, never selected); returns how many units
    each two-ahead prediction read, and how many read-ahead units were used."""
    policy = make_policy(n_layers=4, n_experts=16, budget_units=10, prefetch_min_use=min_precision)
    reads = []
    for step in range(40):
        policy.access(0, [[0, 1]])
        policy.predict(1, [2, 3], distance=1)
        reads.append(len(policy.predict(2, [4 + step % 8, 4 + (step + 1) % 8], distance=2).load))
        policy.access(1, [[2, 3]])
        policy.access(2, [[12, 13]] if step % 2 else [[14, 15]])
        policy.access(3, [[0, 1]])
    return reads, policy.counters()["n_prefetch_used"]


def test_predictions_far_ahead_stop_being_read_once_they_prove_wrong_and_the_next_layer_keeps_its_reads() -> None:
    """The next layer's prediction is always read ahead; one made two layers ahead only while
    the reads made that far ahead get used (prefetch_min_use)."""
    reads, used = _reads_two_layers_ahead(0.5)
    assert reads[0] > 0, "optimistic at first"
    assert sum(reads[-20:]) == 0, f"still reading two layers ahead after repeated misses: {reads}"
    assert used > 0  # what was predicted for the next layer was read ahead and used
    always, _ = _reads_two_layers_ahead(0.0)  # the same run, acted on whatever the precision
    assert sum(always[-20:]) > 0, "it is the use rule, not residency, that stops the reads"


def _next_layer_reads(right: bool, min_precision: float) -> list[int]:
    """Reads ahead for layer 1 predicted from layer 0, step after step; the prediction is the experts layer 1 then
    selects (``right``) or two it never selects."""
    policy = make_policy(n_layers=2, n_experts=32, budget_units=8, k=2, prefetch_min_precision=min_precision)
    reads = []
    for step in range(30):  # layer 1 walks through 28 experts: there is room to read each step's new one
        chosen = [2 + step % 28, 3 + step % 28]
        policy.access(0, [[0, 1]])
        reads.append(len(policy.predict(1, chosen if right else [30, 31]).load))
        policy.access(1, [chosen])
    return reads


def test_the_next_layer_is_read_ahead_only_while_its_predictions_are_selected() -> None:
    """A wrong read ahead costs its bytes: below prefetch_min_precision the next layer's predictions are scored,
    not read (a trained model's 63 % precision read 1.6x the bytes of reading on demand)."""
    wrong = _next_layer_reads(right=False, min_precision=0.8)
    assert wrong[0] > 0 and sum(wrong[10:]) == 0, wrong
    assert min(_next_layer_reads(right=True, min_precision=0.8)[1:]) > 0  # right predictions keep being read
    assert sum(_next_layer_reads(right=False, min_precision=0.0)[10:]) > 0  # the rule, not residency, stops them


def test_prefetch_storm_only_evicts_probation_units() -> None:
    policy = make_policy(n_layers=2, n_experts=16, budget_units=6, k=2)
    for _ in range(3):
        decode_step(policy, [[0, 1], [2, 3]])  # four protected, hot units
    policy.settle()
    hot = {(0, 0), (0, 1), (1, 2), (1, 3)}
    assert resident_set(policy) == hot
    for round_ in range(20):
        for layer in (0, 1):
            experts = np.arange(16)[(np.arange(16) + round_) % 3 == 0]
            plan = policy.predict(layer, experts)
            evicted = {(int(u) // 16, int(u) % 16) for u in plan.evict}
            assert not evicted & hot, f"prefetch evicted hot units {evicted & hot}"
            assert policy.resident_bytes <= 6 * UNIT
    assert hot <= resident_set(policy)
    assert policy.counters()["n_prefetch_issued"] > 2  # the storm did cycle through PROBATION


# -- explicit steps ----------------------------------------------------------------------------


def _trace(events: list[tuple[int, int, int, list[int]]]) -> RoutingTrace:
    """(kind, layer, n_tokens, ids) events."""
    return RoutingTrace(kind=np.array([e[0] for e in events], np.uint8), layer=np.array([e[1] for e in events], np.int32),
                        n_tokens=np.array([e[2] for e in events], np.int32),
                        n_ids=np.array([len(e[3]) for e in events], np.int32),
                        ids=np.array([i for e in events for i in e[3]], np.int32))


def test_step_events_say_where_steps_begin_and_which_rows_decode():
    # one step: a decoding sequence's row (experts 0, 1) first, then a prompt chunk of 3 rows
    # (experts 2, 3), at layers 0 and 1; then a decode step that revisits layer 0 only
    mixed = [(TRACE_STEP, -1, 4, [1, 3]),
             (TRACE_ACCESS, 0, 4, [0, 1, 2, 3, 2, 3, 2, 3]), (TRACE_ACCESS, 1, 4, [0, 1, 2, 3, 2, 3, 2, 3]),
             (TRACE_STEP, -1, 1, [1, 0]), (TRACE_ACCESS, 0, 1, [4, 5])]
    policy = make_policy(budget_units=16)
    policy.replay(_trace(mixed))
    c = policy.counters()
    assert c["n_steps"] == 2 and c["n_tokens_decode"] == 2 and c["n_tokens_prefill"] == 3
    assert c["n_misses_decode"] == 2 * 2 + 2 and c["n_misses_prefill"] == 2 * 2, c
    steps = _trace(mixed).steps()
    assert steps.index.tolist() == [0, 0, 0, 1, 1] and steps.decode.tolist() == [False, True]
    assert steps.rows.tolist() == [4, 1]
    assert len(_trace(mixed).select(decode_only=True)) == 2

    # without step events the layer order decides: layer 0 after layer 1 begins a step, and a
    # step of several rows is all prefill
    plain = make_policy(budget_units=16)
    plain.replay(_trace([e for e in mixed if e[0] != TRACE_STEP]))
    p = plain.counters()
    assert p["n_steps"] == 2 and p["n_misses_prefill"] == 4 * 2 and p["n_misses_decode"] == 2


def test_a_step_event_with_a_wrong_number_of_ids_is_refused():
    with pytest.raises(ValueError, match="step has 2 ids"):
        make_policy().replay(_trace([(TRACE_STEP, -1, 1, [1]), (TRACE_ACCESS, 0, 1, [0, 1])]))


# -- the binding's types -----------------------------------------------------------------------


def test_a_trace_crosses_the_binding_as_typed_arrays_and_comes_back_unchanged():
    trace = _trace([(TRACE_STEP, -1, 2, [0, 2]), (TRACE_ACCESS, 0, 2, [3, 1, 4, 1]), (TRACE_PREDICT, 1, 1, [5, 9])])
    trace = RoutingTrace(trace.kind, trace.layer, trace.n_tokens, trace.n_ids, trace.ids, n_dropped=7)
    native = trace.to_native()
    assert (native.kind.dtype, native.layer.dtype, native.ids.dtype) == (np.uint8, np.int32, np.int32)
    back = RoutingTrace.from_native(native)
    for name in ("kind", "layer", "n_tokens", "n_ids", "ids"):
        assert np.array_equal(getattr(back, name), getattr(trace, name)), name
    assert back.n_dropped == 7


def test_a_plan_names_the_units_to_drop_and_to_read_as_int32_arrays():
    policy = make_policy(n_layers=2, n_experts=16, budget_units=2, k=2)
    first = policy.access(0, [[3, 4]])
    assert first.load.dtype == np.int32 and sorted(first.load.tolist()) == [3, 4] and first.evict.size == 0
    second = policy.access(1, [[5, 6]])  # the next layer of the same step: layer 0's units are no longer pinned
    assert sorted(second.load.tolist()) == [16 + 5, 16 + 6] and sorted(second.evict.tolist()) == [3, 4]


def _bytes_per_step(eviction: str, pattern: str, steps: int = 600) -> tuple[float, int]:
    """Decode bytes per step of one layer of 64 experts, 16 resident, top-2: ``sliding`` walks a window of 8 experts
    along the 64 (recency wins), ``hot`` mixes a hot set of 12 with one-off experts (frequency wins)."""
    policy = make_policy(n_layers=1, n_experts=64, budget_units=16, k=2, eviction=eviction)
    rng = np.random.default_rng(0)
    for step in range(steps):
        if pattern == "sliding":
            start = step // 4
            ids = [(start + int(rng.integers(8))) % 64, (start + 8 + int(rng.integers(8))) % 64]
        else:
            ids = [int(rng.integers(12)), 12 + int(rng.integers(52)) if step % 2 else int(rng.integers(12))]
        if ids[0] == ids[1]:
            ids[1] = (ids[1] + 1) % 64
        policy.access(0, [ids])
    c = policy.counters()
    return c["bytes_read_decode"] / steps, c["n_policy_switches"]


def test_adaptive_eviction_takes_the_rule_its_own_accesses_favour() -> None:
    """Per node, from its own accesses: recency where the working set slides, frequency where a hot set recurs."""
    lfu, _ = _bytes_per_step("lfu", "sliding")
    lru, _ = _bytes_per_step("lru", "sliding")
    adaptive, switches = _bytes_per_step("adaptive", "sliding")
    assert lru < lfu and switches > 0 and adaptive < lfu, (lru, lfu, adaptive, switches)
    lfu, _ = _bytes_per_step("lfu", "hot")
    lru, _ = _bytes_per_step("lru", "hot")
    adaptive, _ = _bytes_per_step("adaptive", "hot")
    assert lfu < lru and adaptive <= 1.02 * lfu, (lru, lfu, adaptive)
