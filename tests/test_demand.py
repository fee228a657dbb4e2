"""The router's native demand arithmetic (csrc/demand.h) against a plain numpy statement of it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from cluster._routing import (
    AFFINITY_CODE_MAX,
    AFFINITY_LOG_MISS_RANGE,
    AFFINITY_MAX_PROB,
    affinity_encode,
    expected_loads,
    request_demand,
)


def decoded(codes: np.ndarray, value_range: float) -> np.ndarray:
    return value_range * (codes.astype(np.float64) / AFFINITY_CODE_MAX) ** 2


def reference_demand(log_miss: np.ndarray, prob: np.ndarray, rows: np.ndarray, start: int, max_sampled: int,
                     decode_context: int) -> tuple[np.ndarray, int, np.ndarray]:
    """demand.h steps 1 and 2, written the obvious way."""
    known = rows[start:][rows[start:] >= 0]
    distinct, times = np.unique(known, return_counts=True)
    n_known = distinct.size
    times = times.astype(np.float64)
    if distinct.size > max_sampled:
        pick = (np.arange(max_sampled) * (distinct.size / max_sampled)).astype(np.int64)
        distinct, times = distinct[pick], times[pick] * (known.size / times[pick].sum())
    prefill = 1.0 - np.exp(-(times[:, None] * decoded(log_miss, AFFINITY_LOG_MISS_RANGE)[distinct]).sum(axis=0))
    tail = rows[max(0, rows.size - decode_context):]
    tail = np.unique(tail[tail >= 0])
    decode = decoded(prob, 1.0)[tail].mean(axis=0) if tail.size else np.zeros(log_miss.shape[1])
    return prefill, n_known, decode


def random_tables(n_rows: int, width: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(log_miss codes, prob codes)."""
    rng = np.random.default_rng(seed)
    p = np.where(rng.random((n_rows, width)) < 0.2, rng.uniform(0.0, 1.0, (n_rows, width)), 0.0).astype(np.float32)
    prob, log_miss = affinity_encode(p)
    return log_miss, prob


def test_affinity_codes_keep_small_probabilities_fine_and_clip_the_rest() -> None:
    p = np.array([0.0, 0.005, 0.01, 0.1, 0.5, 0.99, 1.0, -0.2, np.nan], dtype=np.float32)
    prob, log_miss = affinity_encode(p)
    assert prob.dtype == log_miss.dtype == np.uint8
    clipped = np.nan_to_num(np.clip(p, 0.0, AFFINITY_MAX_PROB))
    np.testing.assert_allclose(decoded(prob, 1.0)[1:6], clipped[1:6], rtol=0.1)
    np.testing.assert_allclose(1 - np.exp(-decoded(log_miss, AFFINITY_LOG_MISS_RANGE))[1:6], clipped[1:6], rtol=0.1)
    assert abs(decoded(prob, 1.0)[4] - 0.5) < 0.005  # mid-range within 1 %
    assert prob[0] == log_miss[0] == 0 and prob[7] == prob[8] == 0  # zero, negative and NaN: never selected
    assert prob[5] == prob[6] and log_miss[5] == log_miss[6] > 0  # 1.0 is clipped like AFFINITY_MAX_PROB


def test_affinity_codes_are_the_rounded_companded_values() -> None:
    p = np.concatenate([np.random.default_rng(2).random(200_000), np.linspace(0, 1, 10_001)]).astype(np.float32)
    prob, log_miss = affinity_encode(p)
    clipped = np.clip(p.astype(np.float64), 0.0, AFFINITY_MAX_PROB)
    exact_prob = AFFINITY_CODE_MAX * np.sqrt(clipped)
    exact_miss = AFFINITY_CODE_MAX * np.sqrt(-np.log1p(-clipped) / AFFINITY_LOG_MISS_RANGE)
    for codes, exact in ((prob, exact_prob), (log_miss, exact_miss)):
        off = np.abs(codes.astype(np.float64) - np.round(exact))
        assert off.max() <= 1  # the vectorised log and sqrt round differently only at a half-way point
        assert np.all(np.abs(exact[off > 0] % 1.0 - 0.5) < 1e-3)


@pytest.mark.parametrize("seed", range(4))
def test_request_demand_matches_the_numpy_statement(seed: int) -> None:
    rng = np.random.default_rng(seed)
    log_miss, prob = random_tables(300, 6 * 40 + 3, seed)  # a width that is not a multiple of the vector length
    rows = np.where(rng.random(500) < 0.15, -1, rng.integers(0, 300, 500))  # unknown tokens among them
    starts = np.array([0, 7, 480, 500])
    prefill, known, decode, n_decode_known = request_demand(log_miss, prob, rows, starts, 32, 16)
    assert prefill.shape == (4, log_miss.shape[1]) and decode.shape == (log_miss.shape[1],)
    for g, start in enumerate(starts):
        want, want_known, want_decode = reference_demand(log_miss, prob, rows, int(start), 32, 16)
        np.testing.assert_allclose(prefill[g], want, atol=2e-6)
        assert known[g] == want_known
    np.testing.assert_allclose(decode, want_decode, atol=1e-6)
    assert n_decode_known == np.unique(rows[-16:][rows[-16:] >= 0]).size
    assert known[-1] == 0 and not prefill[-1].any()  # nothing left to prefill: no demand


def test_a_prompt_of_unknown_tokens_has_no_demand() -> None:
    log_miss, prob = random_tables(10, 8, 0)
    prefill, known, decode, n_decode_known = request_demand(log_miss, prob, np.full(5, -1), np.array([0]), 32, 16)
    assert known.tolist() == [0] and n_decode_known == 0
    assert not prefill.any() and not decode.any()


def test_selection_probability_saturates_without_overflow() -> None:
    prob, log_miss = affinity_encode(np.full((1, 4), 0.99, dtype=np.float32))
    prefill, *_ = request_demand(log_miss, prob, np.zeros(10000, dtype=np.int64), np.array([0]), 32, 16)
    assert np.all(prefill == 1.0)


def test_expected_loads_are_the_demand_on_experts_not_resident() -> None:
    rng = np.random.default_rng(1)
    width = 131
    residency = rng.random((5, width)) < 0.4
    prefill = rng.random((2, width)).astype(np.float32)
    decode = rng.random(width).astype(np.float32)
    node_rows, node_groups = np.array([4, 0, 2, 2]), np.array([0, 1, 1, 0])
    bits = np.packbits(residency, axis=1, bitorder="little")
    got, totals = expected_loads(bits, node_rows, node_groups, prefill, decode, 32.0)
    w = prefill[node_groups] + 32.0 * decode
    np.testing.assert_allclose(got, (w * (1 - residency[node_rows])).sum(axis=1), rtol=1e-5)
    np.testing.assert_allclose(totals, (prefill + 32.0 * decode).sum(axis=1), rtol=1e-5)


def test_out_of_range_inputs_are_refused_with_the_reason() -> None:
    log_miss, prob = random_tables(10, 8, 0)
    with pytest.raises(IndexError, match="token row 10 is outside the table of 10 rows"):
        request_demand(log_miss, prob, np.array([1, 10]), np.array([0]), 32, 16)
    with pytest.raises(ValueError, match="of one shape"):
        request_demand(log_miss, prob[:, :4], np.array([1]), np.array([0]), 32, 16)
    bits = np.zeros((2, 1), dtype=np.uint8)  # 8 experts a row
    prefill, decode = np.zeros((1, 8), dtype=np.float32), np.zeros(8, dtype=np.float32)
    with pytest.raises(IndexError, match="node 0: row or group out of range"):
        expected_loads(bits, np.array([2]), np.array([0]), prefill, decode, 1.0)
    with pytest.raises(ValueError, match="residency bits"):
        expected_loads(bits, np.array([0]), np.array([0]), np.zeros((1, 9), dtype=np.float32), decode, 1.0)


def test_counts_too_large_for_16_bit_multipliers_are_split_not_wrapped() -> None:
    log_miss, prob = random_tables(20, 64, 5)
    rows = np.concatenate([np.full(70000, 3), np.arange(20), np.full(40000, 7)])  # a prompt of two tokens, mostly
    prefill, known, *_ = request_demand(log_miss, prob, rows, np.array([0]), 32, 16)
    want, want_known, _ = reference_demand(log_miss, prob, rows, 0, 32, 16)
    assert known[0] == want_known == 20
    np.testing.assert_allclose(prefill[0], want, atol=2e-6)


def test_portable_loops_give_the_same_answers_as_the_vector_ones(tmp_path: Path) -> None:
    """SNIPER_NO_AVX2 makes the native core take its plain loops; both must agree."""
    rng = np.random.default_rng(9)
    log_miss, prob = random_tables(200, 5 * 37, 9)  # widths that leave tails for every loop
    rows = np.where(rng.random(300) < 0.1, -1, rng.integers(0, 200, 300))
    bits = np.packbits(rng.random((6, log_miss.shape[1])) < 0.5, axis=1, bitorder="little")
    np.savez(tmp_path / "inputs.npz", log_miss=log_miss, prob=prob, rows=rows, bits=bits)
    script = f"""
import numpy as np
from cluster._routing import expected_loads, request_demand
z = np.load({str(tmp_path / "inputs.npz")!r})
prefill, known, decode, _ = request_demand(z["log_miss"], z["prob"], z["rows"], np.array([0, 150]), 32, 16)
loads, _ = expected_loads(z["bits"], np.array([0, 5, 2]), np.array([1, 0, 1]), prefill, decode, 32.0)
np.savez({str(tmp_path / "out")!r} + "-" + __import__("sys").argv[1], prefill=prefill, decode=decode, loads=loads)
"""
    for variant, env in (("vector", {}), ("portable", {"SNIPER_NO_AVX2": "1"})):
        subprocess.run([sys.executable, "-c", script, variant], check=True, env={**os.environ, **env})
    vector, portable = (np.load(tmp_path / f"out-{v}.npz") for v in ("vector", "portable"))
    np.testing.assert_array_equal(vector["prefill"], portable["prefill"])  # integer row sums: exactly equal
    np.testing.assert_array_equal(vector["decode"], portable["decode"])
    np.testing.assert_allclose(vector["loads"], portable["loads"], rtol=1e-5)  # float sums in another order
