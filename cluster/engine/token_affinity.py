"""The token → expert affinity: per token id, how often each (layer, expert) was selected when
the token was prefilled, learned online from routing-trace summaries, and the expert demand it
predicts for a prompt (``csrc/demand.h``). The router's warmth policy prices a request on each
node with it (``cluster.routing.warmth``); an engine under memory pressure tells with it which
waiting sequences need the same experts (``cluster.engine.batch_admission``).

Memory is bounded: the tables hold at most ``max_tokens`` tokens and at most ``max_table_bytes``
(default ``AFFINITY_TABLE_BYTES``, 64 MiB: about 2,730 tokens at 48 layers x 128 experts, where a
row costs 4 bytes per (layer, expert)), whichever is fewer; the token id → row lookup adds 8 bytes
per id up to the largest id seen, and a learn briefly holds a second copy of the two code tables.

Eviction (frequency with ageing): every token has a weight, its occurrences in learned prompts,
halved every ``WEIGHT_HALF_LIFE_SUMMARIES`` learned summaries. When a summary brings tokens the
table does not know and no row is free, its tokens take the rows of the lowest-weighted tokens
(ties: the least recently seen) not seen in that summary, most frequent newcomer first, each only
from a token that weighs less than the newcomer's occurrences in the summary; the newcomers left
are not learned. A few rare tokens never push out the common ones, and a token unseen for long
decays until any newcomer takes its row.

Learning and deciding may run on different threads (the router learns in a worker thread so that
routing decisions go on meanwhile): what decisions read (``AffinityTable``) is replaced whole by
each learn, never changed in place, and a decision reads one table from start to end
(``TokenAffinity.table``); learns are serialised by a lock.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from cluster._routing import affinity_encode, request_demand
from cluster.engine.trace_summary import RoutingTraceSummary

DECODE_CONTEXT = 16
"""Trailing prompt tokens whose experts decoding is expected to use."""
AFFINITY_TABLE_BYTES = 64 * 2**20
"""Default cap on the bytes of the affinity's rows (selection counts and the two code tables)."""
WEIGHT_HALF_LIFE_SUMMARIES = 64.0
"""Learned summaries after which a token's eviction weight has halved."""
COUNT_LIMIT = int(np.iinfo(np.uint16).max)
"""Most prefills of one token counted (uint16 counts); past it a token's counts are scaled down,
keeping its probabilities."""
BLOCK_ROWS = 256
"""Rows a learn counts, clears or encodes per call that holds the GIL (fancy indexing, the native
encoder): a router's event loop gets the GIL between them."""
_ROW_OVERHEAD_BYTES = 4 + 4 + 8 + 8  # seen (float32), weight (float32), last seen (int64), token id (int64)


@dataclass(frozen=True)
class Demand:
    """What a prompt would make a node's cache load (``TokenAffinity.demand``).

    Attributes:
        prefill: float32 ``[starts, L*E]`` P(expert selected while prefilling the prompt from each start).
        known: int64 ``[starts]`` distinct tokens of each suffix the affinity knows.
        decode: float32 ``[L*E]`` mean selection probability of the prompt's last tokens (0 if none is known).
    """

    prefill: np.ndarray
    known: np.ndarray
    decode: np.ndarray


@dataclass(frozen=True)
class AffinityTable:
    """What decisions read of the affinity, as one learn left it (never changed afterwards).

    Attributes:
        shape: ``(L, E)`` of the model learned; None before the first learn.
        lookup: int64 ``[max token id + 2]`` token id → table row, -1 where unknown (the last entry always).
        prob: uint8 ``[capacity, L*E]`` codes of the selection probability (``csrc/demand.h``).
        log_miss: uint8 ``[capacity, L*E]`` codes of -log(1 - probability).
        n_tokens: tokens known.
        max_demand_tokens: distinct known tokens a prompt's demand is estimated from.
    """

    shape: tuple[int, int] | None
    lookup: np.ndarray
    prob: np.ndarray
    log_miss: np.ndarray
    n_tokens: int
    max_demand_tokens: int

    def rows_of(self, tokens: Sequence[int]) -> np.ndarray:
        """The table row of every token (-1 where the token is unknown), in order."""
        ids = np.asarray(tokens, dtype=np.int64)
        if self.lookup.size == 0:
            return np.full(ids.size, -1, dtype=np.int64)
        return self.lookup.take(np.clip(ids, -1, self.lookup.size - 1))  # the last entry is never a row

    def demand(self, rows: np.ndarray, starts: Sequence[int] | np.ndarray = (0,)) -> Demand | None:
        """The expert demand of a prompt whose tokens have these ``rows`` (``rows_of`` of this
        table), for each way of serving it: the prefill of ``rows[start:]`` for every start, and
        the decode that follows (``csrc/demand.h``). None until a trace has been learned."""
        if self.shape is None:
            return None
        prefill, known, decode, _ = request_demand(self.log_miss, self.prob, rows, np.asarray(starts, dtype=np.int64),
                                                   self.max_demand_tokens, DECODE_CONTEXT)
        return Demand(prefill, known, decode)

    @property
    def nbytes(self) -> int:
        """Bytes of its arrays."""
        return self.lookup.nbytes + self.prob.nbytes + self.log_miss.nbytes


class TokenAffinity:
    """Per token id: how often each (layer, expert) was selected when the token was prefilled.

    Rows live in fixed tables — selection counts (uint16) for learning, and for deciding the
    selection probability and -log(1 - p), one byte each, square-root companded
    (``csrc/demand.h``) — and a token id → row lookup array, so a request's demand is one
    vectorised lookup and one native pass over the chosen rows (``request_demand``), whatever
    the number of nodes. The module docstring gives the memory cap, the eviction rule and why
    learning on another thread is safe.

    Args:
        max_tokens: most tokens known (>= 1).
        max_demand_tokens: distinct known tokens a prompt's demand is estimated from (>= 1).
        max_table_bytes: most bytes of rows (>= 1; at least one row is kept whatever the model).
    """

    def __init__(self, max_tokens: int = 8192, max_demand_tokens: int = 32,
                 max_table_bytes: int = AFFINITY_TABLE_BYTES) -> None:
        if max_tokens < 1 or max_demand_tokens < 1 or max_table_bytes < 1:
            raise ValueError(f"max_tokens, max_demand_tokens and max_table_bytes must be >= 1, got {max_tokens}, "
                             f"{max_demand_tokens}, {max_table_bytes}")
        self.max_tokens = max_tokens
        self.max_demand_tokens = max_demand_tokens
        self.max_table_bytes = max_table_bytes
        self._learning = threading.Lock()  # one learn at a time; decisions never take it
        self._n_learned = 0  # summaries learned: the clock of ``_last_seen``
        empty = np.zeros((0, 0), dtype=np.uint8)
        self._table = AffinityTable(None, np.full(0, -1, dtype=np.int64), empty, empty, 0, max_demand_tokens)
        self._allocate(0, 0)

    @property
    def table(self) -> AffinityTable:
        """What decisions read now: one decision keeps the one it took (a learn publishes a new one)."""
        return self._table

    @property
    def shape(self) -> tuple[int, int] | None:
        return self._table.shape

    def capacity(self, width: int) -> int:
        """Rows the caps allow for ``width`` (layers x experts) cells per row."""
        return max(1, min(self.max_tokens, self.max_table_bytes // (4 * width + _ROW_OVERHEAD_BYTES)))

    def _allocate(self, rows: int, width: int) -> None:
        """The learner's own arrays (only a learn, under ``_learning``, touches them)."""
        self._counts = np.zeros((rows, width), dtype=np.uint16)  # [rows, L*E] selections
        self._seen = np.zeros(rows, dtype=np.float32)  # [rows] times prefilled (counts scaled alike)
        self._weight = np.zeros(rows, dtype=np.float32)  # [rows] occurrences, ageing (the eviction rule)
        self._last_seen = np.zeros(rows, dtype=np.int64)  # [rows] ``_n_learned`` when last seen
        self._token = np.full(rows, -1, dtype=np.int64)  # [rows] token id, -1: free

    def _reset(self, shape: tuple[int, int]) -> None:
        width = shape[0] * shape[1]
        rows = self.capacity(width)
        self._allocate(rows, width)
        codes = np.zeros((rows, width), dtype=np.uint8)
        self._table = AffinityTable(shape, np.full(0, -1, dtype=np.int64), codes, codes.copy(), 0,
                                    self.max_demand_tokens)

    def _admit(self, new_tokens: np.ndarray, occurrences: np.ndarray, lookup: np.ndarray) -> np.ndarray:
        """Rows for the tokens of this summary the table does not know (-1: not admitted), by the
        module's eviction rule; the rows taken are cleared and ``lookup`` updated."""
        rows = np.full(new_tokens.size, -1, dtype=np.int64)
        order = np.argsort(-occurrences, kind="stable")  # most frequent newcomer first
        free = np.flatnonzero(self._token < 0)[:order.size]
        rest = order[free.size:]
        victims = np.zeros(0, dtype=np.int64)
        if rest.size:
            used = np.flatnonzero((self._token >= 0) & (self._last_seen != self._n_learned))  # not seen in this summary
            used = used[np.lexsort((self._last_seen[used], self._weight[used]))][:rest.size]  # lightest, then oldest
            victims = used[occurrences[rest[:used.size]] > self._weight[used]]  # both sorted: a prefix of pairs
            lookup[self._token[victims]] = -1
        taken = np.concatenate([free, victims])
        rows[order[:taken.size]] = taken
        for begin in range(0, taken.size, BLOCK_ROWS):
            self._counts[taken[begin:begin + BLOCK_ROWS]] = 0
        self._seen[taken] = 0.0
        self._weight[taken] = 0.0
        return rows

    def learn(self, summary: RoutingTraceSummary) -> None:
        """Counts the experts each prefilled token of ``summary`` chose and publishes the new table
        (safe while decisions read the old one on another thread)."""
        experts = np.asarray(summary.prompt_experts)  # [n, L, k], -1: not seen
        decode_counts = np.asarray(summary.decode_counts)
        if experts.ndim != 3 or experts.shape[0] != len(summary.tokens) or decode_counts.ndim != 2:
            return
        n_layers, n_experts = decode_counts.shape
        tokens = np.asarray(summary.tokens, dtype=np.int64)
        with self._learning:
            if self._table.shape != (n_layers, n_experts):
                self._reset((n_layers, n_experts))
            known = np.flatnonzero(tokens >= 0)
            if known.size == 0:
                return
            self._n_learned += 1
            self._weight *= np.float32(0.5 ** (1.0 / WEIGHT_HALF_LIFE_SUMMARIES))
            unique, position_token, occurrences = np.unique(tokens[known], return_inverse=True, return_counts=True)
            lookup = self._grown_lookup(int(unique[-1]))
            rows = lookup[unique]
            seen_before = rows >= 0
            self._last_seen[rows[seen_before]] = self._n_learned
            new = np.flatnonzero(~seen_before)
            if new.size:
                rows[new] = self._admit(unique[new], occurrences[new], lookup)
            kept = rows >= 0
            lookup[unique[kept]] = rows[kept]
            touched, counted = rows[kept], np.minimum(occurrences[kept], COUNT_LIMIT)
            self._token[touched] = unique[kept]
            self._last_seen[touched] = self._n_learned
            self._weight[touched] += counted
            self._make_room(touched, counted)
            self._count(experts[known], rows[position_token], n_experts)
            self._seen[touched] += counted
            self._publish(lookup, touched)

    def _grown_lookup(self, max_token: int) -> np.ndarray:
        """A copy of the published lookup that holds ``max_token`` (and a last entry of -1)."""
        old = self._table.lookup
        size = old.size if max_token + 1 < old.size else max(max_token + 2, 2 * old.size, 1024)
        lookup = np.full(size, -1, dtype=np.int64)
        lookup[: old.size] = old
        return lookup

    def _make_room(self, rows: np.ndarray, adding: np.ndarray) -> None:
        """Scales down the counts of ``rows`` that would pass COUNT_LIMIT after ``adding`` prefills."""
        over = self._seen[rows] + adding > COUNT_LIMIT
        if over.any():
            rows = rows[over]
            scale = (COUNT_LIMIT - adding[over]) / (2.0 * self._seen[rows])
            self._counts[rows] = np.rint(self._counts[rows] * scale[:, None]).astype(np.uint16)
            self._seen[rows] = np.rint(self._seen[rows] * scale)

    def _count(self, experts: np.ndarray, position_rows: np.ndarray, n_experts: int) -> None:
        """Adds each position's chosen (layer, expert) cells to its row's counts, skipping positions
        without a row. Positions go in rounds (a token's first occurrence, its second, ...) so that
        no round names a row twice and a fancy-indexed add counts a round's block at once."""
        kept = np.flatnonzero(position_rows >= 0)
        position_rows = position_rows[kept]
        experts = experts[kept]
        n_layers = experts.shape[1]
        cells = experts.astype(np.int64) + (np.arange(n_layers, dtype=np.int64) * n_experts)[None, :, None]
        chosen = (experts >= 0) & (experts < n_experts)  # [n, L, k]
        order = np.argsort(position_rows, kind="stable")
        sorted_rows = position_rows[order]
        occurrence = np.empty(order.size, dtype=np.int64)  # which occurrence of its token each position is
        occurrence[order] = np.arange(order.size) - np.searchsorted(sorted_rows, sorted_rows, side="left")
        by_round = np.argsort(occurrence, kind="stable")
        bounds = np.searchsorted(occurrence[by_round], np.arange(min(int(occurrence.max(initial=-1)) + 1,
                                                                     COUNT_LIMIT) + 1))
        blocks = [(start, min(start + BLOCK_ROWS, round_end)) for round_start, round_end in zip(bounds[:-1], bounds[1:])
                  for start in range(round_start, round_end, BLOCK_ROWS)]  # a round's positions, BLOCK_ROWS at a time
        for begin, end in blocks:
            at = by_round[begin:end]
            mask = chosen[at]
            round_rows = np.broadcast_to(position_rows[at][:, None, None], mask.shape)[mask]
            self._counts[round_rows, cells[at][mask]] += 1

    def _publish(self, lookup: np.ndarray, touched: np.ndarray) -> None:
        """Encodes the ``touched`` rows into copies of the code tables and publishes them with ``lookup``."""
        table = self._table
        prob, log_miss = table.prob.copy(), table.log_miss.copy()
        touched = np.sort(touched)
        for begin in range(0, touched.size, BLOCK_ROWS):
            block = touched[begin:begin + BLOCK_ROWS]
            probability = self._counts[block].astype(np.float32) / np.maximum(self._seen[block], 1.0)[:, None]
            prob[block], log_miss[block] = affinity_encode(probability)
        self._table = AffinityTable(table.shape, lookup, prob, log_miss, int(np.count_nonzero(self._token >= 0)),
                                    self.max_demand_tokens)

    def rows_of(self, tokens: Sequence[int]) -> np.ndarray:
        """``AffinityTable.rows_of`` of the current table (one thread; a decision that may run
        beside a learn takes ``table`` once and asks it both this and ``demand``)."""
        return self._table.rows_of(tokens)

    def demand(self, rows: np.ndarray, starts: Sequence[int] | np.ndarray = (0,)) -> Demand | None:
        """``AffinityTable.demand`` of the current table (see ``rows_of``)."""
        return self._table.demand(rows, starts)

    @property
    def nbytes(self) -> int:
        """Bytes of the learner's arrays and the published table."""
        own = (self._counts, self._seen, self._weight, self._last_seen, self._token)
        return sum(a.nbytes for a in own) + self._table.nbytes

    def __len__(self) -> int:
        return self._table.n_tokens
