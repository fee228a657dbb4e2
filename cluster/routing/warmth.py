"""``warmth`` (default): send a request where its experts and its prefix are already warm.

Procedure, per request:
  0. Session: a request that names its conversation (``session_id``) goes back to the node its
     previous turn was routed to, when that node is a candidate (step 4): it holds the whole
     conversation's KV state, answers included, which the prefix hashes of step 1 (prompts only)
     and the node's next report may not show yet (the next turn is often sent the moment the
     answer ends). The last ``SESSION_MEMORY`` conversations are remembered.
  1. Prefix: the request's tokens are cut into blocks of ``PREFIX_BLOCK`` tokens with a
     cumulative hash; each node reports the block hashes of the KV states it holds (its
     current context and stored sessions). The longest match gives the tokens that node
     would NOT have to prefill (a conversation's history, a shared system prompt).
  2. Demand: a token → expert affinity learned online from the nodes' routing traces gives,
     for each prompt token, how often each (layer, expert) was selected when that token was
     prefilled. The tokens a node must prefill select expert e of layer l with probability
     ``1 - prod_t (1 - a_t[l, e])``; decoding (``expected_decode_tokens`` steps) is expected
     to use the experts of the prompt's last ``DECODE_CONTEXT`` tokens (``cluster.engine.token_affinity``).
  3. Cost per node, in expert loads: expected prefill misses + expected decode misses
     (demand on experts not resident there) + ``prefill_token_cost`` per token to prefill.
  4. Balance: the candidates are the nodes whose load is within ``load_slack`` of the
     least-loaded live node and, with ``batch_affinity``, every node with a free sequence slot
     (load below its ``slots``: the request starts at once, in the node's batch); there a
     node's running requests count as warm: the experts predicted for them (their union) are in
     use, so a request that needs them adds no loads (requests that need the same experts
     decode together). A busier node stays a candidate only where it holds a prefix of the
     request (the request starts at once and skips that prefill: a conversation stays with its
     KV state) or where that union is warm for the request as step 5 defines warm (its share of
     the request's demand above chance — the union's share of all experts — plus
     ``warm_margin`` of the rest): on learned routing, whose requests spread over most experts,
     a few running requests' union covers nearly everything, tells nothing, and would pile
     requests onto busy nodes (issue 27: twice the p50 latency of round_robin on single-shot
     requests to a trained MoE). Decided per request; the cheapest wins, ties (within 1 %) go
     to the RNG. The default slack is 0: waiting behind one request costs more than the expert loads and the
     prefill a warmer node would save (the docs/simulation.md command with ``--warmth-knob
     load_slack=1``: 1.64x the p99 latency of least_loaded and 0.150 MiB read per token, where a
     slack of 0 gives 0.99x and 0.154 MiB).
  5. Spread: when no candidate holds a prefix of the request and none is warm for it — the share
     of its expected demand resident there (times the share of its tokens the affinity knows)
     is below chance (the node's resident share f) + ``warm_margin`` * (1 - f) everywhere — the
     candidate routed to least lately takes it (then the cheapest, then the RNG). Sending it to
     the node warm for *other* work would evict that work's experts while an idler node could
     become the request's home; without this rule a few nodes end up holding every topic while
     others stay cold (compare ``bench simulate`` with ``--warmth-knob warm_margin=0``).
  6. Knowing nothing (no affinity for any prompt token, no prefix match, no warmth report):
     the least-loaded node, the one routed to least lately among equals, explicitly.
  7. Self-weighing: whether warmth pays depends on the model. When a request reports the
     experts it used, the decision audit (``cluster.routing.decision_audit``) gives each candidate's
     coverage of them at decision time; the policy keeps a running mean (over
     ``separation_memory`` audits) of the coverage on the candidate it expected warmest (fewest
     expected misses, whatever it chose) minus the candidates' mean. The expected misses of
     step 3 count with weight ``separation / separation_full`` in [0, 1] (1 until ``min_audits``
     audits): full where warmth finds the experts (designed topics: tens of points above an
     average node), none where it does not (a trained MoE whose requests spread over most
     experts: about zero), leaving the prefix held, the prefill and load to decide there. It
     is measured whatever the weight, so a change of traffic moves it back.
  8. Prefix first, where warmth does not fully separate nodes (weight below 1): where a candidate
     holds at least ``prefix_threshold`` of the request's tokens (a conversation's earlier
     turns), the candidates holding the longest such prefix are the only ones left, warmth
     choosing among them (SGLang's cache-aware router has the same threshold rule). Where
     warmth separates fully, step 3's costs (which count the prefill a held prefix saves)
     decide as before: on the synthetic demo (``docs/routing.md``'s command), prefix first at
     every weight read 0.82x round_robin's expert bytes per token (at commit 8130123), this rule
     0.79x (``docs/routing.md``). On the trained model's conversations the expert-miss
     estimates otherwise outweighed prefills of hundreds of tokens (``prefill_token_cost`` is in
     expert loads, calibrated on synthetic models whose prompts are short): warmth reused
     23.6 % of prompt tokens where a round_robin that happened to keep conversations in place
     reused 54.2 % (``docs/routing-trained`` before this rule; with it, 50.8 %).

Knobs: load_slack (requests, >= 0, default 0), expected_decode_tokens (>= 0, 32),
prefill_token_cost (expert loads per prefilled token, >= 0, 0.05), max_tokens_tracked
(affinity table size, 8192; the table's bytes are capped too, and its eviction keeps the frequent
tokens: ``cluster.engine.token_affinity``), max_demand_tokens (>= 1, 32): the demand of a long prompt is
estimated from an even sample of at most this many of its distinct known tokens, their counts
scaled to stand for all (this bounds the cost of a decision); warm_margin ([0, 1], 0.25; 0 turns
spreading off), recent_half_life_s (> 0, 30): how fast "routed lately" forgets, batch_affinity
(bool, True), separation_full (coverage share, > 0, 0.10): the separation at which warmth counts
fully, separation_memory (audits, >= 1, 64), min_audits (>= 0, 16), prefix_threshold (share of
the request's tokens, (0, 1], 0.3): a second turn holds about 40 % of its prompt (its first turn
and answer, in whole blocks of PREFIX_BLOCK tokens).
"""

from __future__ import annotations

import operator
from collections import OrderedDict
from typing import Any, Sequence

import numpy as np

from cluster._routing import expected_loads
from cluster.routing.base import NodeView, PolicyState, RouteRequest, RoutingPolicy, RoutingTraceSummary
from cluster.engine.prefix import PREFIX_BLOCK, prefix_hashes, reusable_tokens
from cluster.engine.token_affinity import TokenAffinity

SESSION_MEMORY = 65536  # conversations whose last node step 0 remembers


class WarmthPolicy(RoutingPolicy):
    name = "warmth"

    def __init__(self, *, load_slack: int = 0, expected_decode_tokens: int = 32, prefill_token_cost: float = 0.05,
                 max_tokens_tracked: int = 8192, max_demand_tokens: int = 32, warm_margin: float = 0.25,
                 recent_half_life_s: float = 30.0, batch_affinity: bool = True, separation_full: float = 0.10,
                 separation_memory: int = 64, min_audits: int = 16, prefix_threshold: float = 0.3,
                 **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if not 0 < prefix_threshold <= 1:
            raise ValueError(f"prefix_threshold must be in (0, 1], got {prefix_threshold}")
        self.prefix_threshold = prefix_threshold
        if not separation_full > 0 or separation_memory < 1 or min_audits < 0:
            raise ValueError(f"separation_full must be > 0, separation_memory >= 1 and min_audits >= 0, got "
                             f"{separation_full}, {separation_memory}, {min_audits}")
        self.separation_full = separation_full
        self.separation_memory = separation_memory
        self.min_audits = min_audits
        self.separation = 0.0  # running mean of (coverage where warmth looked warmest - mean coverage)
        self.n_audits = 0
        self._guess: dict[str, str] = {}  # request id -> the candidate warmth expected warmest for it
        if load_slack < 0 or expected_decode_tokens < 0 or prefill_token_cost < 0:
            raise ValueError("load_slack, expected_decode_tokens and prefill_token_cost must be >= 0")
        if max_demand_tokens < 1:
            raise ValueError(f"max_demand_tokens must be >= 1, got {max_demand_tokens}")
        if not 0 <= warm_margin <= 1 or recent_half_life_s <= 0:
            raise ValueError(f"warm_margin must be in [0, 1] and recent_half_life_s > 0, got {warm_margin}, "
                             f"{recent_half_life_s}")
        self.load_slack = load_slack
        self.batch_affinity = bool(batch_affinity)
        self.running: dict[str, dict[str, np.ndarray]] = {}  # node -> request id -> its predicted experts (packed)
        self._running_node: dict[str, str] = {}  # request id -> node
        self.warm_margin = warm_margin
        self.recent_half_life_s = recent_half_life_s
        self._recent: dict[str, tuple[float, float]] = {}  # node -> (recent use, when last updated)
        self.expected_decode_tokens = expected_decode_tokens
        self.prefill_token_cost = prefill_token_cost
        self.affinity = TokenAffinity(max_tokens_tracked, max_demand_tokens)
        self.node_prefixes: dict[str, set[int]] = {}
        self.prefix_holders: dict[int, set[str]] = {}  # prefix hash -> nodes holding it
        self._chosen_hashes: tuple[str | None, list[int]] = (None, [])  # the last choice's request and prefix hashes
        self.session_nodes: OrderedDict[str, str] = OrderedDict()  # session id -> node of its last turn (step 0)
        self.predicted: dict[str, np.ndarray] = {}  # request_id -> packed bits of the [L*E] experts predicted
        self._matrix = np.zeros((0, 0), dtype=np.uint8)  # residency bits of the nodes seen, a row each
        self._width = 0  # experts per residency row
        self._node_row: dict[str, int] = {}
        self._row_source: list[np.ndarray | None] = []  # the array each row was copied from
        self._row_fill = np.zeros(0, dtype=np.float64)  # share of the experts resident, per row
        self._rows_arrays: list[np.ndarray | None] = []  # the last call's arrays, and its answer
        self._rows_value: tuple[np.ndarray, np.ndarray] | None = None

    # -- hooks ---------------------------------------------------------------------------

    def on_report(self, node_id: str, summary: RoutingTraceSummary) -> None:
        self.affinity.learn(summary)  # publishes a new table: safe beside ``choose`` on another thread

    def on_prefixes(self, node_id: str, hashes: Sequence[int]) -> None:
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
        for session in [s for s, n in self.session_nodes.items() if n == node_id]:
            del self.session_nodes[session]
        self.on_prefixes(node_id, ())
        self.node_prefixes.pop(node_id, None)
        self._recent.pop(node_id, None)
        for request_id in self.running.pop(node_id, {}):
            self._running_node.pop(request_id, None)

    def on_ended(self, request_id: str) -> None:
        node_id = self._running_node.pop(request_id, None)
        if node_id is not None:
            self.running.get(node_id, {}).pop(request_id, None)

    # -- decision ------------------------------------------------------------------------

    def pop_prediction(self, request_id: str) -> np.ndarray | None:
        bits = self.predicted.pop(request_id, None)
        shape = self.affinity.shape
        if bits is None or shape is None:
            return None
        n_layers, n_experts = shape
        return np.unpackbits(bits, count=n_layers * n_experts, bitorder="little").astype(bool).reshape(n_layers, n_experts)

    def on_routed(self, request: RouteRequest, node_id: str) -> None:
        # the node will hold this prompt's KV state once it serves it: a conversation's next turn
        # finds it there even if it is routed before the node's report says so (that report, the
        # node's full account of what it holds, replaces these)
        if request.session_id:
            self.session_nodes[request.session_id] = node_id
            self.session_nodes.move_to_end(request.session_id)
            if len(self.session_nodes) > SESSION_MEMORY:
                self.session_nodes.popitem(last=False)
        chosen_id, hashes = self._chosen_hashes
        if chosen_id != request.request_id:  # routed without this policy's choice (a restarted router's replay)
            hashes = prefix_hashes(request.tokens)
        self.on_prefixes(node_id, self.node_prefixes.get(node_id, set()) | set(hashes))
        now = self.clock()
        self._recent[node_id] = (self._recent_use(node_id, now) + 1.0, now)
        bits = self.predicted.get(request.request_id)
        if self.batch_affinity and bits is not None:
            self.running.setdefault(node_id, {})[request.request_id] = bits
            self._running_node[request.request_id] = node_id
            if len(self._running_node) > 4096:  # an end never heard of (a router that missed it)
                self.on_ended(next(iter(self._running_node)))

    def _recent_use(self, node_id: str, now: float) -> float:
        """Requests routed to the node lately, each weighing 2^-(age / recent_half_life_s)."""
        count, at = self._recent.get(node_id, (0.0, now))
        return count * 2.0 ** (-(now - at) / self.recent_half_life_s)

    def choose(self, request: RouteRequest, nodes: Sequence[NodeView]) -> list[str]:
        tokens = np.asarray(request.tokens, dtype=np.int64)
        n_tokens = tokens.size
        loads = [n.load for n in nodes]
        ceiling = min(loads) + self.load_slack
        candidates = np.array([i for i, n in enumerate(nodes)
                               if n.load <= ceiling or (self.batch_affinity and n.load < n.slots)], dtype=np.int64)
        hashes = prefix_hashes(tokens)
        self._chosen_hashes = (request.request_id, hashes)  # on_routed registers them where it went
        sticky = self.session_nodes.get(request.session_id) if request.session_id else None
        if sticky is not None and any(nodes[i].node_id == sticky for i in candidates.tolist()):  # step 0
            self._last = {"session": request.session_id, "node": sticky}
            return [sticky]
        matched = self._matched_tokens(hashes, nodes, candidates, n_tokens)
        if matched is None:  # nobody holds a prefix of it: every candidate would prefill all of it
            starts, group_of = [0], np.zeros(candidates.size, dtype=np.int64)
            matched = group_of
        else:  # candidates that hold the same prefix prefill the same suffix
            starts = sorted(set(matched.tolist()))
            group_of = np.searchsorted(starts, matched)
        affinity = self.affinity.table  # one table for the whole decision (a learn may publish another meanwhile)
        rows = affinity.rows_of(tokens)
        demand = affinity.demand(rows, starts)
        costs = self.prefill_token_cost * (n_tokens - matched).astype(np.float64)
        coverage, cold = None, False
        batching = np.array([nodes[i].load > ceiling for i in candidates.tolist()], dtype=bool)  # there by step 4 only
        keep = ~batching | (matched > 0)  # a busier node stays where it holds a prefix of the request, or
        residency = self._resident_rows(nodes) if demand is not None else None
        misses = None
        if residency is not None and self._width == demand.prefill.shape[1]:
            matrix, node_rows, fill = self._with_running(nodes, candidates, *residency)
            misses, totals = expected_loads(matrix, node_rows[candidates], group_of, demand.prefill, demand.decode,
                                            float(self.expected_decode_tokens))
            if batching.any():  # ... where its batch is warm for it (strictly: never where it holds every expert)
                known = np.count_nonzero(rows >= 0) / max(1, rows.size)
                share = np.clip(1.0 - misses / np.maximum(totals[group_of], 1e-9), 0.0, 1.0) * known
                keep |= batching & (share > self._warm_threshold(fill[node_rows[candidates]]))
            if np.ptp(misses) > 0:  # what the audit checks: did warmth know where the experts were?
                self._note_guess(request.request_id, nodes[int(candidates[int(np.argmin(misses))])].node_id)
            misses = misses[keep]
        candidates, group_of, matched, costs = (a[keep] for a in (candidates, group_of, matched, costs))
        if misses is not None:
            costs += self.warmth_weight * misses
            if starts[-1] == 0 and self.warm_margin > 0:  # one suffix for all: is any node warm for it?
                coverage, cold = self._coverage(float(totals[0]), rows, misses, node_rows[candidates])
        elif demand is not None:  # no warmth known: the prefill's expected loads, as if nothing were resident
            costs += demand.prefill.sum(axis=1, dtype=np.float64)[group_of]
        if starts[-1] == 0 and (demand is None or demand.known[0] == 0):
            self._last = {"fallback": "least_loaded", "reason": "no affinity or prefix known for this prompt"}
            least = candidates[np.array(loads)[candidates] == min(loads)]
            return [nodes[int(least[self._least_used(nodes, least, np.zeros(least.size))])].node_id]
        held = int(matched.max()) if matched.size else 0
        if held and held >= self.prefix_threshold * n_tokens and self.warmth_weight < 1.0:  # step 8
            costs = np.where(matched == held, costs, np.inf)
            cold = False
        if cold:  # warm nowhere: claim the node used least lately rather than crowd one warm for other work
            j_winner = self._least_used(nodes, candidates, costs)
        else:
            best = costs.min()
            top = np.flatnonzero(costs <= best + 0.01 * max(1.0, abs(best))).tolist()
            j_winner = top[0] if len(top) == 1 else self._pick(nodes, candidates, top)
        if demand is not None and demand.known[group_of[j_winner]] > 0:  # the experts the winner's prefill needs
            self.predicted[request.request_id] = np.packbits(demand.prefill[group_of[j_winner]] > 0.5,
                                                             bitorder="little")  # the residency rows' order
            if len(self.predicted) > 4096:
                self.predicted.pop(next(iter(self.predicted)))
        self._last = {"nodes": nodes, "candidates": candidates, "costs": costs, "matched": matched,
                      "coverage": coverage, "spread": cold}
        return [nodes[int(candidates[j_winner])].node_id]

    @property
    def warmth_weight(self) -> float:
        """How much expected expert misses count against a node's prefill and load (step 7)."""
        if self.n_audits < self.min_audits:
            return 1.0
        return float(np.clip(self.separation / self.separation_full, 0.0, 1.0))

    def _note_guess(self, request_id: str, node_id: str) -> None:
        self._guess[request_id] = node_id
        if len(self._guess) > 4096:  # a request that never reported
            self._guess.pop(next(iter(self._guess)))

    def on_audited(self, request_id: str, coverage: dict[str, float]) -> None:
        guess = self._guess.pop(request_id, None)
        if guess is None or guess not in coverage or len(coverage) < 2:
            return
        gain = coverage[guess] - float(np.mean(list(coverage.values())))
        self.n_audits += 1
        self.separation += (gain - self.separation) / min(self.n_audits, self.separation_memory)

    def _with_running(self, nodes: Sequence[NodeView], candidates: np.ndarray, matrix: np.ndarray,
                      node_rows: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The residency rows with each candidate's running requests' predicted experts added (batch
        affinity: experts in use there cost a new request nothing), and each row's share of the
        experts set (what a request would find there by chance)."""
        busy = [i for i in candidates.tolist()
                if nodes[i].load > 0 and self.running.get(nodes[i].node_id)] if self.batch_affinity else []
        fill = self._row_fill[: matrix.shape[0]]
        if not busy:
            return matrix, node_rows, fill
        matrix, fill = matrix.copy(), fill.copy()
        for i in busy:
            row = matrix[node_rows[i]]
            for bits in self.running[nodes[i].node_id].values():
                if bits.size == row.size:
                    row |= bits
            fill[node_rows[i]] = np.unpackbits(row, count=self._width, bitorder="little").mean()
        return matrix, node_rows, fill

    def _coverage(self, total: float, rows: np.ndarray, misses: np.ndarray,
                  node_rows: np.ndarray) -> tuple[np.ndarray | None, bool]:
        """Whether no candidate is warm for the request, and then each one's coverage (else None).

        Coverage: the share of the request's expected demand (``total`` loads, with nothing
        resident) that is resident on the node, scaled by the share of its tokens the affinity
        knows (a token never seen is warm nowhere). Warm: coverage at least chance (the node's
        resident share f) + ``warm_margin`` * (1 - f). The node with the fewest expected misses
        is checked first; usually it is warm and nothing else is computed.
        """
        if total <= 0:
            return None, False
        known = np.count_nonzero(rows >= 0) / max(1, rows.size)
        j = int(np.argmin(misses))
        chance = float(self._row_fill[node_rows[j]])
        if (1.0 - float(misses[j]) / total) * known >= self._warm_threshold(chance):
            return None, False
        coverage = (1.0 - misses / total) * known
        chance = self._row_fill[node_rows]
        cold = not bool(np.any(coverage >= self._warm_threshold(chance)))
        return coverage, cold

    def _warm_threshold(self, chance: float | np.ndarray) -> float | np.ndarray:
        """The coverage at which a node is warm for a request (steps 4 and 5): chance (the share of
        all experts it holds) plus ``warm_margin`` of the rest."""
        return chance + self.warm_margin * (1.0 - chance)

    def _least_used(self, nodes: Sequence[NodeView], candidates: np.ndarray, costs: np.ndarray) -> int:
        """Index into candidates of the one routed to least lately (within half a request), then the
        cheapest, then the RNG's pick."""
        now = self.clock()
        recent = np.array([self._recent_use(nodes[i].node_id, now) for i in candidates.tolist()])
        pool = np.flatnonzero(recent <= recent.min() + 0.5)
        if pool.size > 1 and np.ptp(costs[pool]) == 0:
            return self._pick(nodes, candidates, pool.tolist())
        return int(pool[np.argmin(costs[pool])])

    def _pick(self, nodes: Sequence[NodeView], candidates: np.ndarray, tied: list[int]) -> int:
        """The RNG's pick among tied candidates, in node-name order (so a seed decides, not list order)."""
        return int(self.rng.choice(sorted(tied, key=lambda j: nodes[candidates[j]].node_id)))

    def _matched_tokens(self, hashes: list[int], nodes: Sequence[NodeView], candidates: np.ndarray,
                        n_tokens: int) -> np.ndarray | None:
        """Per candidate, the prompt tokens whose KV state it holds: the longest prefix it holds
        (hashes are cumulative, so holding block i means holding blocks 0..i), less the last
        token, which is always prefilled. None when no node holds any."""
        held: dict[str, int] = {}
        for i, h in enumerate(hashes):
            for node_id in self.prefix_holders.get(h, ()):
                held[node_id] = (i + 1) * PREFIX_BLOCK
        if not held:
            return None
        index = {nodes[i].node_id: j for j, i in enumerate(candidates.tolist())}
        matched = np.zeros(candidates.size, dtype=np.int64)
        for node_id, m in held.items():
            if node_id in index:
                matched[index[node_id]] = min(m, reusable_tokens(n_tokens))
        return matched

    def _resident_rows(self, nodes: Sequence[NodeView]) -> tuple[np.ndarray, np.ndarray] | None:
        """The residency of every node seen, one row of bits each (``csrc/demand.h``), and each
        node's row; None unless every node has reported a residency of one width.

        A node's row is packed again only when its view carries a new ``resident`` array (a new
        warmth report), so a decision reads the matrix, it does not build it.
        """
        arrays = [n.resident for n in nodes]
        if len(arrays) == len(self._rows_arrays) and all(map(operator.is_, arrays, self._rows_arrays)):
            return self._rows_value  # the same arrays as last time (held here, so never a reused id)
        self._rows_arrays, self._rows_value = arrays, None
        width = None if arrays[0] is None else arrays[0].size
        if width is None or any(a is None or a.size != width for a in arrays):
            return None
        if self._width != width:
            self._width = width
            self._matrix = np.zeros((0, (width + 7) // 8), dtype=np.uint8)
            self._node_row.clear()
            self._row_source.clear()
            self._row_fill = np.zeros(0, dtype=np.float64)
        rows = np.empty(len(nodes), dtype=np.int64)
        for i, node in enumerate(nodes):
            row = self._node_row.get(node.node_id)
            if row is None:
                row = self._node_row[node.node_id] = len(self._row_source)
                self._row_source.append(None)
                if row >= self._matrix.shape[0]:
                    self._matrix = np.vstack([self._matrix, np.zeros((max(8, row), self._matrix.shape[1]), np.uint8)])
                    self._row_fill = np.concatenate([self._row_fill, np.zeros(self._matrix.shape[0] - self._row_fill.size)])
            if self._row_source[row] is not node.resident:
                flags = node.resident.reshape(-1) != 0
                self._matrix[row] = np.packbits(flags, bitorder="little")
                self._row_fill[row] = np.count_nonzero(flags) / width
                self._row_source[row] = node.resident
            rows[i] = row
        self._rows_value = (self._matrix[: len(self._row_source)], rows)
        return self._rows_value

    def state(self) -> PolicyState:
        return PolicyState(affinity_tokens=len(self.affinity), prefixes_held=len(self.prefix_holders),
                           warmth_weight=round(self.warmth_weight, 3), warmth_separation=round(self.separation, 4),
                           warmth_audits=self.n_audits)

    def decision_kind(self) -> str:
        """"spread" when no node was warm for the request and the least used one took it."""
        return "spread" if self._last.get("spread") else super().decision_kind()

    def explain(self) -> dict[str, object]:
        last = self._last
        if "costs" not in last:
            return dict(last)
        nodes, candidates = last["nodes"], last["candidates"]
        return {"costs": {nodes[i].node_id: float(c) for i, c in zip(candidates, last["costs"])},
                "warmth_weight": round(self.warmth_weight, 3),
                "matched_tokens": {nodes[i].node_id: int(m) for i, m in zip(candidates, last["matched"])},
                "candidates": len(candidates),
                **({"coverage": {nodes[i].node_id: float(c) for i, c in zip(candidates, last["coverage"])}}
                   if last["coverage"] is not None else {}),
                **({"spread": True} if last["spread"] else {})}


class WarmthNoBatchPolicy(WarmthPolicy):
    """``warmth`` without batch affinity (step 4: the least-loaded nodes only, running requests not
    counted as warm), kept to measure what batch affinity does (``bench routing``)."""

    name = "warmth_nobatch"

    def __init__(self, **knobs: Any) -> None:
        super().__init__(**{**knobs, "batch_affinity": False})
