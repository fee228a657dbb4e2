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
(affinity table size, LRU, 8192).
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
    """Per token id: selections per (layer, expert) seen when the token was prefilled."""

    def __init__(self, max_tokens: int = 8192) -> None:
        self.max_tokens = max_tokens
        self.shape: tuple[int, int] | None = None
        self._counts: OrderedDict[int, np.ndarray] = OrderedDict()  # token -> float32 [L, E]
        self._seen: dict[int, int] = {}

    def learn(self, summary: RoutingTraceSummary) -> None:
        experts = summary.prompt_experts  # [n, L, k]
        if experts.ndim != 3 or experts.shape[0] != len(summary.tokens):
            return
        n_layers = experts.shape[1]
        n_experts = summary.decode_counts.shape[1] if summary.decode_counts.ndim == 2 else int(experts.max()) + 1
        if self.shape != (n_layers, n_experts):
            self.shape = (n_layers, n_experts)
            self._counts.clear()
            self._seen.clear()
        layers = np.arange(n_layers)[:, None]
        for token, chosen in zip(summary.tokens, experts):
            counts = self._counts.get(token)
            if counts is None:
                counts = np.zeros(self.shape, dtype=np.float32)
                self._counts[token] = counts
                self._seen[token] = 0
            valid = chosen >= 0
            np.add.at(counts, (np.broadcast_to(layers, chosen.shape)[valid], chosen[valid]), 1.0)
            self._seen[token] += 1
            self._counts.move_to_end(token)
        while len(self._counts) > self.max_tokens:
            token, _ = self._counts.popitem(last=False)
            self._seen.pop(token, None)

    def selection_probability(self, tokens: Sequence[int]) -> tuple[np.ndarray | None, int]:
        """P[(l, e) selected by at least one of tokens], and how many tokens were known."""
        if self.shape is None:
            return None, 0
        log_miss = np.zeros(self.shape, dtype=np.float64)
        known = 0
        for token, times in Counter(tokens).items():
            counts = self._counts.get(token)
            if counts is None:
                continue
            known += 1
            p = np.clip(counts / max(1, self._seen[token]), 0.0, 0.999)
            log_miss += times * np.log1p(-p)  # each occurrence is another draw
        return 1.0 - np.exp(log_miss), known

    def mean_selection(self, tokens: Sequence[int]) -> np.ndarray | None:
        """Average per-token selection probability over the known tokens (the topic's experts)."""
        if self.shape is None:
            return None
        rows = [self._counts[t] / max(1, self._seen[t]) for t in tokens if t in self._counts]
        return np.mean(rows, axis=0) if rows else None

    def __len__(self) -> int:
        return len(self._counts)


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
        self._last: dict[str, object] = {}
        self.predicted: dict[str, np.ndarray] = {}  # request_id -> bool [L, E] predicted experts

    # -- hooks ---------------------------------------------------------------------------

    def on_report(self, node_id: str, summary: RoutingTraceSummary) -> None:
        self.affinity.learn(summary)

    def set_node_prefixes(self, node_id: str, hashes: Sequence[str]) -> None:
        self.node_prefixes[node_id] = set(hashes)

    def on_node_removed(self, node_id: str) -> None:
        self.node_prefixes.pop(node_id, None)

    # -- decision ------------------------------------------------------------------------

    def _matched_tokens(self, node_id: str, hashes: list[str]) -> int:
        held = self.node_prefixes.get(node_id)
        if not held:
            return 0
        matched = 0
        for i, h in enumerate(hashes):
            if h not in held:
                break
            matched = (i + 1) * PREFIX_BLOCK
        return matched

    def choose(self, request: RouteRequest, nodes: Sequence[NodeView]) -> list[str]:
        tokens = list(request.tokens)
        hashes = prefix_hashes(tokens)
        min_load = min(n.load for n in nodes)
        candidates = [n for n in nodes if n.load <= min_load + self.load_slack]
        decode_p = self.affinity.mean_selection(tokens[-DECODE_CONTEXT:])
        costs: dict[str, float] = {}
        matched_by_node: dict[str, int] = {}
        knows_anything = False
        demand_full = None
        for node in candidates:
            matched = min(self._matched_tokens(node.node_id, hashes), max(0, len(tokens) - 1))
            matched_by_node[node.node_id] = matched
            to_prefill = tokens[matched:]
            p_prefill, known = self.affinity.selection_probability(to_prefill)
            if matched == 0:
                demand_full = p_prefill
            resident = node.resident.astype(np.float64) if node.resident is not None else None
            cost = self.prefill_token_cost * len(to_prefill)
            if known or matched:
                knows_anything = True
            if p_prefill is not None and resident is not None and p_prefill.shape == resident.shape:
                cost += float((p_prefill * (1.0 - resident)).sum())
                if decode_p is not None:
                    cost += self.expected_decode_tokens * float((decode_p * (1.0 - resident)).sum())
            elif p_prefill is not None:
                cost += float(p_prefill.sum())
            costs[node.node_id] = cost
        if demand_full is not None:
            self.predicted[request.request_id] = demand_full > 0.5
            if len(self.predicted) > 4096:
                self.predicted.pop(next(iter(self.predicted)))
        if not knows_anything:
            self._last = {"fallback": "least_loaded", "reason": "no affinity, prefix or warmth known"}
            ranked = self.least_loaded(nodes)
            return ranked
        best = min(costs.values())
        tolerance = 0.01 * max(1.0, abs(best))
        top = [node_id for node_id, c in costs.items() if c <= best + tolerance]
        winner = self.rng.choice(sorted(top))
        rest = sorted((n for n in costs if n != winner), key=lambda n: costs[n])
        others = [n for n in self.least_loaded(nodes) if n not in costs]
        self._last = {"costs": costs, "matched_tokens": matched_by_node, "candidates": len(candidates)}
        return [winner, *rest, *others]

    def explain(self) -> dict[str, object]:
        return dict(self._last)
