"""``warmth`` (default): send a request where its experts and its prefix are already warm.

Procedure, per request:
  1. Prefix: the request's tokens are cut into blocks of ``PREFIX_BLOCK`` tokens with a
     cumulative hash; each node reports the block hashes of the KV states it holds (its
     current context and stored sessions). The longest match gives the tokens that node
     would NOT have to prefill (a conversation's history, a shared system prompt).
  2. Demand: a token → expert affinity learned online from the nodes' routing traces gives,
     for each prompt token, how often each (layer, expert) was selected when that token was
     prefilled. The tokens a node must prefill select expert e of layer l with probability
     ``1 - prod_t (1 - a_t[l, e])``; decoding (``expected_decode_tokens`` steps) is expected
     to use the experts of the prompt's last ``DECODE_CONTEXT`` tokens.
  3. Cost per node, in expert loads: expected prefill misses + expected decode misses
     (demand on experts not resident there) + ``prefill_token_cost`` per token to prefill.
  4. Balance: only nodes whose load is within ``load_slack`` of the least-loaded live node are
     candidates (decided per request); the cheapest wins, ties (within 1 %) go to the RNG.
  5. Knowing nothing (no affinity for any prompt token, no prefix match, no warmth report):
     least loaded, explicitly.

Knobs: load_slack (requests, >= 0, default 1), expected_decode_tokens (>= 0, 32),
prefill_token_cost (expert loads per prefilled token, >= 0, 0.05), max_tokens_tracked
(affinity table size, LRU, 8192). The demand of a long prompt is estimated from an even
sample of at most 32 of its distinct known tokens, their counts scaled to stand for all (this
bounds the cost of a decision).
"""

from __future__ import annotations

import hashlib
from collections import Counter, OrderedDict
from typing import Any, Sequence

import numpy as np

from cluster.routing.base import NodeView, RouteRequest, RoutingPolicy, RoutingTraceSummary

PREFIX_BLOCK = 32
DECODE_CONTEXT = 16


def prefix_hashes(tokens: Sequence[int], block: int = PREFIX_BLOCK, max_blocks: int = 256) -> list[str]:
    """Cumulative hashes of tokens[:block], tokens[:2*block], ... (one rule, used by nodes and router)."""
    out: list[str] = []
    h = hashlib.blake2b(digest_size=8)
    n_full = min(len(tokens) // block, max_blocks)
    arr = np.asarray(tokens[: n_full * block], dtype=np.int64)
    for i in range(n_full):
        h.update(arr[i * block:(i + 1) * block].tobytes())
        out.append(h.copy().hexdigest())
    return out


class TokenAffinity:
    """Per token id: how often each (layer, expert) was selected when the token was prefilled.

    Rows live in two growing tables (selection probability and its log1p(-p)) so a request's
    demand is one gather and one vector-matrix product, whatever the number of nodes.
    """

    def __init__(self, max_tokens: int = 8192, max_demand_tokens: int = 32) -> None:
        self.max_tokens = max_tokens
        self.max_demand_tokens = max_demand_tokens
        self.shape: tuple[int, int] | None = None
        self._row: OrderedDict[int, int] = OrderedDict()  # token -> table row, least recently learned first
        self._counts = np.zeros((0, 0), dtype=np.float32)  # [rows, L*E] selections
        self._seen = np.zeros(0, dtype=np.float32)  # [rows] times prefilled
        self._prob = np.zeros((0, 0), dtype=np.float32)  # [rows, L*E] counts / seen
        self._log_miss = np.zeros((0, 0), dtype=np.float32)  # [rows, L*E] log(1 - prob)

    def _reset(self, shape: tuple[int, int]) -> None:
        self.shape = shape
        self._row.clear()
        width = shape[0] * shape[1]
        self._counts = np.zeros((0, width), dtype=np.float32)
        self._seen = np.zeros(0, dtype=np.float32)
        self._prob = np.zeros((0, width), dtype=np.float32)
        self._log_miss = np.zeros((0, width), dtype=np.float32)

    def _row_of(self, token: int) -> int:
        row = self._row.get(token)
        if row is not None:
            self._row.move_to_end(token)
            return row
        if len(self._row) >= self.max_tokens:  # reuse the least recently learned token's row
            _, row = self._row.popitem(last=False)
            self._counts[row] = 0.0
            self._seen[row] = 0.0
        else:
            row = len(self._row)
            if row >= self._counts.shape[0]:
                grow = max(64, self._counts.shape[0])
                width = self._counts.shape[1]
                self._counts = np.vstack([self._counts, np.zeros((grow, width), dtype=np.float32)])
                self._prob = np.vstack([self._prob, np.zeros((grow, width), dtype=np.float32)])
                self._log_miss = np.vstack([self._log_miss, np.zeros((grow, width), dtype=np.float32)])
                self._seen = np.concatenate([self._seen, np.zeros(grow, dtype=np.float32)])
        self._row[token] = row
        return row

    def learn(self, summary: RoutingTraceSummary) -> None:
        experts = summary.prompt_experts  # [n, L, k]
        if experts.ndim != 3 or experts.shape[0] != len(summary.tokens) or summary.decode_counts.ndim != 2:
            return
        n_layers, n_experts = summary.decode_counts.shape
        if self.shape != (n_layers, n_experts):
            self._reset((n_layers, n_experts))
        flat = np.where(experts >= 0, experts + (np.arange(n_layers) * n_experts)[None, :, None], -1)
        touched = set()
        for token, chosen in zip(summary.tokens, flat):
            row = self._row_of(int(token))
            ids = chosen[chosen >= 0]
            np.add.at(self._counts[row], ids, 1.0)
            self._seen[row] += 1.0
            touched.add(row)
        rows = np.fromiter(touched, dtype=np.int64)
        self._prob[rows] = np.clip(self._counts[rows] / self._seen[rows, None], 0.0, 0.999)
        self._log_miss[rows] = np.log1p(-self._prob[rows])

    def _rows(self, tokens: Sequence[int], max_rows: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Table rows of the known tokens and how often each occurs; with ``max_rows``, an even
        sample of the distinct tokens whose occurrence counts are scaled to stand for all."""
        counts = Counter(tokens)
        known = [(self._row[t], n) for t, n in counts.items() if t in self._row]
        if not known:
            return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.float32)
        total = sum(n for _, n in known)
        if max_rows is not None and len(known) > max_rows:
            step = len(known) / max_rows
            known = [known[int(i * step)] for i in range(max_rows)]
        rows, times = zip(*known)
        times_arr = np.asarray(times, dtype=np.float32)
        return np.asarray(rows, dtype=np.int64), times_arr * (total / times_arr.sum())

    def selection_probability(self, tokens: Sequence[int]) -> tuple[np.ndarray | None, int]:
        """P[(l, e) selected by at least one of tokens] (flat, [L*E]), and how many tokens were known."""
        if self.shape is None:
            return None, 0
        rows, times = self._rows(tokens, self.max_demand_tokens)
        if rows.size == 0:
            return np.zeros(self.shape[0] * self.shape[1], dtype=np.float32), 0
        return 1.0 - np.exp(times @ self._log_miss[rows]), int(rows.size)  # each occurrence is a draw

    def mean_selection(self, tokens: Sequence[int]) -> np.ndarray | None:
        """Average per-token selection probability over the known tokens (flat, [L*E])."""
        if self.shape is None:
            return None
        rows, _ = self._rows(tokens)
        return self._prob[rows].mean(axis=0) if rows.size else None

    def __len__(self) -> int:
        return len(self._row)


class WarmthPolicy(RoutingPolicy):
    name = "warmth"

    def __init__(self, *, load_slack: int = 1, expected_decode_tokens: int = 32, prefill_token_cost: float = 0.05,
                 max_tokens_tracked: int = 8192, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if load_slack < 0 or expected_decode_tokens < 0 or prefill_token_cost < 0:
            raise ValueError("load_slack, expected_decode_tokens and prefill_token_cost must be >= 0")
        self.load_slack = load_slack
        self.expected_decode_tokens = expected_decode_tokens
        self.prefill_token_cost = prefill_token_cost
        self.affinity = TokenAffinity(max_tokens_tracked)
        self.node_prefixes: dict[str, set[str]] = {}
        self.prefix_holders: dict[str, set[str]] = {}  # prefix hash -> nodes holding it
        self._last: dict[str, object] = {}
        self.predicted: dict[str, np.ndarray] = {}  # request_id -> bool [L, E] predicted experts
        self._resident_key: tuple[int, ...] = ()
        self._resident: np.ndarray | None = None

    # -- hooks ---------------------------------------------------------------------------

    def on_report(self, node_id: str, summary: RoutingTraceSummary) -> None:
        self.affinity.learn(summary)

    def on_prefixes(self, node_id: str, hashes: Sequence[str]) -> None:
        new = set(hashes)
        old = self.node_prefixes.get(node_id, set())
        for h in old - new:
            holders = self.prefix_holders.get(h)
            if holders is not None:
                holders.discard(node_id)
                if not holders:
                    del self.prefix_holders[h]
        for h in new - old:
            self.prefix_holders.setdefault(h, set()).add(node_id)
        self.node_prefixes[node_id] = new

    def on_node_removed(self, node_id: str) -> None:
        self.on_prefixes(node_id, ())
        self.node_prefixes.pop(node_id, None)

    # -- decision ------------------------------------------------------------------------

    def pop_prediction(self, request_id: str) -> np.ndarray | None:
        return self.predicted.pop(request_id, None)

    def _matched_tokens(self, hashes: list[str]) -> dict[str, int]:
        """Per node holding any of them, the tokens of the longest prefix it holds (hashes are
        cumulative, so holding block i means holding blocks 0..i)."""
        matched: dict[str, int] = {}
        for i, h in enumerate(hashes):
            for node_id in self.prefix_holders.get(h, ()):
                matched[node_id] = (i + 1) * PREFIX_BLOCK
        return matched

    def choose(self, request: RouteRequest, nodes: Sequence[NodeView]) -> list[str]:
        tokens = list(request.tokens)
        hashes = prefix_hashes(tokens)
        min_load = min(n.load for n in nodes)
        candidates = [n for n in nodes if n.load <= min_load + self.load_slack]
        decode_p = self.affinity.mean_selection(tokens[-DECODE_CONTEXT:])
        demand: dict[int, tuple[np.ndarray | None, int]] = {}  # matched tokens -> (P[selected], known)
        held = self._matched_tokens(hashes)
        matched = [min(held.get(n.node_id, 0), max(0, len(tokens) - 1)) for n in candidates]
        for m in set(matched):  # usually one computation per request, not per node
            demand[m] = self.affinity.selection_probability(tokens[m:])
        knows_anything = any(m > 0 or demand[m][1] > 0 for m in matched)
        costs_arr = self.prefill_token_cost * (len(tokens) - np.asarray(matched, dtype=np.float64))
        resident = self._resident_matrix(candidates)
        for m, (p_prefill, _) in demand.items():
            if p_prefill is None:
                continue
            rows = np.asarray([i for i, mm in enumerate(matched) if mm == m])
            if resident is not None and resident.shape[1] == p_prefill.size:
                expected = float(p_prefill.sum()) - resident @ p_prefill  # expected prefill loads, per node
                if decode_p is not None:
                    expected = expected + self.expected_decode_tokens * (float(decode_p.sum()) - resident @ decode_p)
                costs_arr[rows] += expected[rows]
            else:
                costs_arr[rows] += float(p_prefill.sum())
        costs = {n.node_id: float(c) for n, c in zip(candidates, costs_arr)}
        matched_by_node = {n.node_id: m for n, m in zip(candidates, matched)}
        full = demand.get(0) or self.affinity.selection_probability(tokens)
        if full[0] is not None and full[1] > 0 and self.affinity.shape is not None:
            self.predicted[request.request_id] = (full[0] > 0.5).reshape(self.affinity.shape)
            if len(self.predicted) > 4096:
                self.predicted.pop(next(iter(self.predicted)))
        if not knows_anything:
            self._last = {"fallback": "least_loaded", "reason": "no affinity or prefix known for this prompt"}
            return self.least_loaded(nodes)
        best = min(costs.values())
        tolerance = 0.01 * max(1.0, abs(best))
        top = [node_id for node_id, c in costs.items() if c <= best + tolerance]
        winner = self.rng.choice(sorted(top))
        rest = sorted((n for n in costs if n != winner), key=lambda n: costs[n])
        others = [n for n in self.least_loaded(nodes) if n not in costs] if len(costs) < len(nodes) else []
        self._last = {"costs": costs, "matched_tokens": matched_by_node, "candidates": len(candidates)}
        return [winner, *rest, *others]

    def _resident_matrix(self, nodes: Sequence[NodeView]) -> np.ndarray | None:
        """[nodes, L*E] residency of the candidates, rebuilt only when a report changed it."""
        arrays = [n.resident for n in nodes]
        if any(a is None for a in arrays) or len({a.size for a in arrays}) != 1:  # type: ignore[union-attr]
            return None
        key = tuple(id(a) for a in arrays)
        if key != self._resident_key:
            self._resident_key = key
            self._resident = np.stack([a.reshape(-1) for a in arrays]).astype(np.float32)  # type: ignore[union-attr]
        return self._resident

    def explain(self) -> dict[str, object]:
        return dict(self._last)
