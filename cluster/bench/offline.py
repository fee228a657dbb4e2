"""Offline reference points for a recorded routing trace: Belady's MIN and the best static set.

Both know the whole trace, so no online eviction policy can do better than MIN (it evicts the
resident expert whose next use is farthest away; for units of equal size it reads the fewest
bytes), and the best static set shows what pinning the most-used experts would give. They replay
the same accesses the policy core sees: each layer's selection for one evaluated ubatch, whose
units must all be resident while the layer computes (a selection larger than the budget is
admitted and trimmed by the next access, as the core does).
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass

import numpy as np

from cluster.engine.cache import RoutingTrace


@dataclass(frozen=True)
class Access:
    """One layer's selection for one ubatch: its unique units (layer * n_experts + expert)."""

    units: np.ndarray  # int64, unique
    decode: bool  # a ubatch of one token


def accesses(trace: RoutingTrace, n_experts: int, *, decode_only: bool = False) -> list[Access]:
    """The trace's ACCESS events in order (``decode_only``: the single-token ubatches alone, as if
    the prompts had been prefilled elsewhere)."""
    out: list[Access] = []
    for ubatch in trace.ubatches():
        decode = ubatch[0][1].shape[0] == 1
        if decode_only and not decode:
            continue
        for layer, ids in ubatch:
            out.append(Access(np.unique(ids.ravel().astype(np.int64)) + layer * n_experts, decode))
    return out


def _result(hits: int, misses: int, decode_hits: int, decode_misses: int, decode_bytes: int,
            n_decode_tokens: int) -> dict[str, float]:
    return {"hit_rate": hits / max(1, hits + misses),
            "decode_hit_rate": decode_hits / (decode_hits + decode_misses) if decode_hits + decode_misses else float("nan"),
            "decode_bytes_read_per_token": decode_bytes / max(1, n_decode_tokens)}


def belady_min(sequence: list[Access], unit_bytes: np.ndarray, budget: int, n_layers: int) -> dict[str, float]:
    """Belady's MIN over the sequence: hits, decode hit rate and decode bytes read per decoded token."""
    sizes = np.asarray(unit_bytes, dtype=np.int64).ravel()
    n = len(sequence)
    # next_use[i][j]: position of the next access after i that selects sequence[i].units[j]
    next_use: list[np.ndarray] = [np.empty(0, dtype=np.int64)] * n
    upcoming: dict[int, int] = {}
    for i in range(n - 1, -1, -1):
        units = sequence[i].units
        next_use[i] = np.array([upcoming.get(int(u), n + 1) for u in units], dtype=np.int64)
        for u in units:
            upcoming[int(u)] = i
    resident: dict[int, int] = {}  # unit -> its next use
    heap: list[tuple[int, int]] = []  # (-next use, unit), stale entries skipped
    used = 0
    hits = misses = d_hits = d_misses = d_bytes = 0
    n_decode_tokens = sum(1 for a in sequence if a.decode) // max(1, n_layers)
    for i, access in enumerate(sequence):
        current = set(int(u) for u in access.units)
        missing = [u for u in current if u not in resident]
        n_hit = len(current) - len(missing)
        hits += n_hit
        misses += len(missing)
        if access.decode:
            d_hits += n_hit
            d_misses += len(missing)
            d_bytes += int(sizes[missing].sum()) if missing else 0
        need = int(sizes[missing].sum()) if missing else 0
        kept: list[tuple[int, int]] = []
        while used + need > budget and heap:
            neg_next, u = heapq.heappop(heap)
            if resident.get(u) != -neg_next:
                continue  # stale
            if u in current:
                kept.append((neg_next, u))
                continue
            del resident[u]
            used -= int(sizes[u])
        for entry in kept:
            heapq.heappush(heap, entry)
        for u, nxt in zip(access.units, next_use[i]):
            u = int(u)
            if u not in resident:
                used += int(sizes[u])
            resident[u] = int(nxt)
            heapq.heappush(heap, (-int(nxt), u))
    return _result(hits, misses, d_hits, d_misses, d_bytes, n_decode_tokens)


def static_best(sequence: list[Access], unit_bytes: np.ndarray, budget: int, n_layers: int) -> dict[str, float]:
    """The best static set for ``budget``: the most-selected units of the decode accesses, chosen
    knowing the whole trace, never changing (prefill selections are read and dropped again)."""
    sizes = np.asarray(unit_bytes, dtype=np.int64).ravel()
    counts = np.zeros(sizes.shape, dtype=np.int64)
    for access in sequence:
        if access.decode:
            counts[access.units] += 1
    chosen = np.zeros(sizes.shape, dtype=bool)
    used = 0
    for u in np.argsort(-counts, kind="stable"):
        if counts[u] == 0 or used + sizes[u] > budget:
            continue
        chosen[u] = True
        used += int(sizes[u])
    hits = misses = d_hits = d_misses = d_bytes = 0
    for access in sequence:
        held = chosen[access.units]
        n_hit = int(held.sum())
        hits += n_hit
        misses += held.size - n_hit
        if access.decode:
            d_hits += n_hit
            d_misses += held.size - n_hit
            d_bytes += int(sizes[access.units[~held]].sum())
    n_decode_tokens = sum(1 for a in sequence if a.decode) // max(1, n_layers)
    return _result(hits, misses, d_hits, d_misses, d_bytes, n_decode_tokens)
