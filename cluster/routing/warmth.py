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
     candidates (decided per request); the cheapest wins, ties (within 1 %) go to the RNG. The
     default slack is 0: waiting behind one request costs more than the expert loads and the
     prefill a warmer node would save (docs/simulation.md: at 256 nodes a slack of 1 gave 1.7x
     the p99 latency of least_loaded, a slack of 0 about 1x, with fewer bytes read).
  5. Knowing nothing (no affinity for any prompt token, no prefix match, no warmth report):
     least loaded, explicitly.

Knobs: load_slack (requests, >= 0, default 0), expected_decode_tokens (>= 0, 32),
prefill_token_cost (expert loads per prefilled token, >= 0, 0.05), max_tokens_tracked
(affinity table size, LRU, 8192). The demand of a long prompt is estimated from an even
sample of at most 32 of its distinct known tokens, their counts scaled to stand for all (this
bounds the cost of a decision).
"""

from __future__ import annotations

import hashlib
import operator
from collections import OrderedDict
from typing import Any, Sequence

import numpy as np

from cluster._native import to_bf16, weighted_row_sum_bf16
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

    Rows live in growing tables — the selection probability and its log1p(-p), stored as
    bfloat16 — and a token id → row lookup array, so a request's demand is one vectorised
    lookup and one native pass over the chosen rows (``weighted_row_sum_bf16``), whatever the
    number of nodes.
    """

    def __init__(self, max_tokens: int = 8192, max_demand_tokens: int = 32) -> None:
        self.max_tokens = max_tokens
        self.max_demand_tokens = max_demand_tokens
        self.shape: tuple[int, int] | None = None
        self._row: OrderedDict[int, int] = OrderedDict()  # token -> table row, least recently learned first
        self._lookup = np.full(0, -1, dtype=np.int64)  # token id -> table row, -1: unknown
        self._counts = np.zeros((0, 0), dtype=np.float32)  # [rows, L*E] selections
        self._seen = np.zeros(0, dtype=np.float32)  # [rows] times prefilled
        self._prob = np.zeros((0, 0), dtype=np.uint16)  # [rows, L*E] counts / seen, bfloat16
        self._log_miss = np.zeros((0, 0), dtype=np.uint16)  # [rows, L*E] log(1 - prob), bfloat16

    def _reset(self, shape: tuple[int, int]) -> None:
        self.shape = shape
        self._row.clear()
        self._lookup[:] = -1
        width = shape[0] * shape[1]
        self._counts = np.zeros((0, width), dtype=np.float32)
        self._seen = np.zeros(0, dtype=np.float32)
        self._prob = np.zeros((0, width), dtype=np.uint16)
        self._log_miss = np.zeros((0, width), dtype=np.uint16)

    def _row_of(self, token: int) -> int:
        row = self._row.get(token)
        if row is not None:
            self._row.move_to_end(token)
            return row
        if len(self._row) >= self.max_tokens:  # reuse the least recently learned token's row
            old, row = self._row.popitem(last=False)
            self._lookup[old] = -1
            self._counts[row] = 0.0
            self._seen[row] = 0.0
        else:
            row = len(self._row)
            if row >= self._counts.shape[0]:
                grow = max(64, self._counts.shape[0])
                width = self._counts.shape[1]
                self._counts = np.vstack([self._counts, np.zeros((grow, width), dtype=np.float32)])
                self._prob = np.vstack([self._prob, np.zeros((grow, width), dtype=np.uint16)])
                self._log_miss = np.vstack([self._log_miss, np.zeros((grow, width), dtype=np.uint16)])
                self._seen = np.concatenate([self._seen, np.zeros(grow, dtype=np.float32)])
        if token + 1 >= self._lookup.size:  # the last entry stays -1 (rows_of clips unknown ids to it)
            grown = np.full(max(token + 2, 2 * self._lookup.size, 1024), -1, dtype=np.int64)
            grown[: self._lookup.size] = self._lookup
            self._lookup = grown
        self._row[token] = row
        self._lookup[token] = row
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
            if token < 0:
                continue
            row = self._row_of(int(token))
            ids = chosen[chosen >= 0]
            np.add.at(self._counts[row], ids, 1.0)
            self._seen[row] += 1.0
            touched.add(row)
        if not touched:
            return
        rows = np.fromiter(touched, dtype=np.int64)
        prob = np.clip(self._counts[rows] / self._seen[rows, None], 0.0, 0.999)
        self._prob[rows] = to_bf16(prob)
        self._log_miss[rows] = to_bf16(np.log1p(-prob))

    def rows_of(self, tokens: Sequence[int]) -> np.ndarray:
        """The table row of every token (-1 where the token is unknown), in order."""
        ids = np.asarray(tokens, dtype=np.int64)
        if self._lookup.size == 0:
            return np.full(ids.size, -1, dtype=np.int64)
        return self._lookup.take(np.minimum(ids, self._lookup.size - 1))  # the last entry is never a row

    def _distinct(self, rows: np.ndarray, max_rows: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """The distinct known rows and how often each occurs; with ``max_rows``, an even sample of
        them whose occurrence counts are scaled to stand for all."""
        rows = rows[rows >= 0]
        if rows.size == 0:
            return rows, np.zeros(0, dtype=np.float32)
        counts = np.bincount(rows)
        distinct = np.flatnonzero(counts)
        times = counts[distinct].astype(np.float32)
        if max_rows is not None and distinct.size > max_rows:
            pick = (np.arange(max_rows) * (distinct.size / max_rows)).astype(np.int64)
            distinct, kept = distinct[pick], times[pick]
            return distinct, kept * np.float32(rows.size / kept.sum())
        return distinct, times

    def selection_probability(self, tokens: Sequence[int] | None = None, *,
                              rows: np.ndarray | None = None) -> tuple[np.ndarray | None, int]:
        """P[(l, e) selected by at least one of the tokens] (flat, [L*E]), and how many distinct
        tokens were known. Give ``tokens``, or their ``rows`` (``rows_of``)."""
        if self.shape is None:
            return None, 0
        distinct, times = self._distinct(self.rows_of(tokens) if rows is None else rows, self.max_demand_tokens)
        if distinct.size == 0:
            return np.zeros(self.shape[0] * self.shape[1], dtype=np.float32), 0
        log_miss = weighted_row_sum_bf16(self._log_miss, distinct, times)  # each occurrence is a draw
        return 1.0 - np.exp(log_miss), int(distinct.size)

    def mean_selection(self, tokens: Sequence[int] | None = None, *, rows: np.ndarray | None = None) -> np.ndarray | None:
        """Average per-token selection probability over the distinct known tokens (flat, [L*E])."""
        if self.shape is None:
            return None
        distinct, _ = self._distinct(self.rows_of(tokens) if rows is None else rows)
        if distinct.size == 0:
            return None
        return weighted_row_sum_bf16(self._prob, distinct, np.full(distinct.size, 1.0 / distinct.size, dtype=np.float32))

    def __len__(self) -> int:
        return len(self._row)


class WarmthPolicy(RoutingPolicy):
    name = "warmth"

    def __init__(self, *, load_slack: int = 0, expected_decode_tokens: int = 32, prefill_token_cost: float = 0.05,
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
        self.predicted: dict[str, np.ndarray] = {}  # request_id -> bool [L, E] predicted experts
        self._matrix = np.zeros((0, 0), dtype=np.float32)  # residency rows of the nodes seen
        self._node_row: dict[str, int] = {}
        self._row_source: list[np.ndarray | None] = []  # the array each row was copied from
        self._rows_arrays: list[np.ndarray | None] = []  # the last call's arrays, and its answer
        self._rows_value: tuple[np.ndarray, np.ndarray] | None = None

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
        tokens = request.tokens
        n_tokens = len(tokens)
        loads = [n.load for n in nodes]
        least = min(loads)
        matched = np.zeros(len(nodes), dtype=np.int64)  # prompt tokens each node holds the KV state of
        held = self._matched_tokens(prefix_hashes(tokens))
        if held:
            index = {n.node_id: i for i, n in enumerate(nodes)}
            for node_id, m in held.items():
                if node_id in index:
                    matched[index[node_id]] = min(m, max(0, n_tokens - 1))
        ceiling = least + self.load_slack
        candidates = [i for i, load in enumerate(loads) if load <= ceiling]
        groups: dict[int, list[int]] = {0: candidates}  # matched tokens -> candidates; usually one group
        if held:
            groups = {}
            for i in candidates:
                groups.setdefault(int(matched[i]), []).append(i)
        rows = self.affinity.rows_of(tokens)  # one lookup serves every estimate below
        decode_p = self.affinity.mean_selection(rows=rows[-DECODE_CONTEXT:])
        demand = {m: self.affinity.selection_probability(rows=rows[m:]) for m in groups}
        knows_anything = any(m > 0 or known > 0 for m, (_, known) in demand.items())
        costs = self.prefill_token_cost * (n_tokens - matched).astype(np.float64)
        residency = self._resident_rows(nodes)
        for m, (p_prefill, _) in demand.items():
            if p_prefill is None:
                continue
            members = groups[m]
            if residency is None or residency[0].shape[1] != p_prefill.size:
                costs[members] += float(p_prefill.sum())
                continue
            # expected loads = sum(w) - resident . w, with w the prefill plus the decode demand
            matrix, node_rows = residency
            w = p_prefill if decode_p is None else p_prefill + np.float32(self.expected_decode_tokens) * decode_p
            if 4 * len(members) >= len(nodes):
                costs[members] += float(w.sum()) - (matrix @ w)[node_rows[members]]
            else:
                costs[members] += float(w.sum()) - matrix[node_rows[members]] @ w
        full = demand[0] if 0 in demand else self.affinity.selection_probability(rows=rows)
        if full[0] is not None and full[1] > 0 and self.affinity.shape is not None:
            self.predicted[request.request_id] = (full[0] > 0.5).reshape(self.affinity.shape)
            if len(self.predicted) > 4096:
                self.predicted.pop(next(iter(self.predicted)))
        if not knows_anything:
            self._last = {"fallback": "least_loaded", "reason": "no affinity or prefix known for this prompt"}
            return self.least_loaded(nodes)
        cand_costs = costs[candidates]
        cand_ids = [nodes[i].node_id for i in candidates]
        best = float(cand_costs.min())
        top = np.flatnonzero(cand_costs <= best + 0.01 * max(1.0, abs(best))).tolist()
        winner = self.rng.choice(sorted(cand_ids[j] for j in top))
        ranked = [winner] + [cand_ids[j] for j in np.argsort(cand_costs, kind="stable").tolist() if cand_ids[j] != winner]
        if len(candidates) < len(nodes):  # then the busier nodes, least loaded first
            chosen = set(candidates)
            ranked += [nodes[i].node_id for i in sorted(range(len(nodes)), key=loads.__getitem__) if i not in chosen]
        self._last = {"nodes": nodes, "candidates": candidates, "costs": cand_costs, "matched": matched}
        return ranked

    def _resident_rows(self, nodes: Sequence[NodeView]) -> tuple[np.ndarray, np.ndarray] | None:
        """A ``[rows, L*E]`` matrix of the residency of every node seen, and each node's row in it.

        A node's row is copied again only when its view carries a new ``resident`` array (a new
        warmth report), so a decision costs one matrix-vector product, not a matrix build.
        """
        arrays = [n.resident for n in nodes]
        if len(arrays) == len(self._rows_arrays) and all(map(operator.is_, arrays, self._rows_arrays)):
            return self._rows_value  # the same arrays as last time (held here, so never a reused id)
        self._rows_arrays, self._rows_value = arrays, None
        width = None if arrays[0] is None else arrays[0].size
        if width is None or any(a is None or a.size != width for a in arrays):
            return None
        if self._matrix.shape[1] != width:
            self._matrix = np.zeros((0, width), dtype=np.float32)
            self._node_row.clear()
            self._row_source.clear()
        rows = np.empty(len(nodes), dtype=np.int64)
        for i, node in enumerate(nodes):
            row = self._node_row.get(node.node_id)
            if row is None:
                row = self._node_row[node.node_id] = len(self._row_source)
                self._row_source.append(None)
                if row >= self._matrix.shape[0]:
                    self._matrix = np.vstack([self._matrix, np.zeros((max(8, row), width), dtype=np.float32)])
            if self._row_source[row] is not node.resident:
                self._matrix[row] = node.resident.reshape(-1)
                self._row_source[row] = node.resident
            rows[i] = row
        self._rows_value = (self._matrix[: len(self._row_source)], rows)
        return self._rows_value

    def explain(self) -> dict[str, object]:
        last = self._last
        if "costs" not in last:
            return dict(last)
        nodes, candidates = last["nodes"], last["candidates"]
        return {"costs": {nodes[i].node_id: float(c) for i, c in zip(candidates, last["costs"])},
                "matched_tokens": {nodes[i].node_id: int(last["matched"][i]) for i in candidates},
                "candidates": len(candidates)}
