"""The token → expert affinity: per token id, how often each (layer, expert) was selected when
the token was prefilled, learned online from routing-trace summaries, and the expert demand it
predicts for a prompt (``csrc/demand.h``). The router's warmth policy prices a request on each
node with it (``cluster.routing.warmth``); an engine under memory pressure tells with it which
waiting sequences need the same experts (``cluster.engine.batch_admission``)."""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from cluster._routing import affinity_encode, request_demand
from cluster.engine.trace_summary import RoutingTraceSummary

DECODE_CONTEXT = 16
"""Trailing prompt tokens whose experts decoding is expected to use."""


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


class TokenAffinity:
    """Per token id: how often each (layer, expert) was selected when the token was prefilled.

    Rows live in growing tables — the selection probability and -log(1 - p), one byte each,
    square-root companded (``csrc/demand.h``) — and a token id → row lookup array, so a
    request's demand is one vectorised lookup and one native pass over the chosen rows
    (``request_demand``), whatever the number of nodes.
    """

    def __init__(self, max_tokens: int = 8192, max_demand_tokens: int = 32) -> None:
        self.max_tokens = max_tokens
        self.max_demand_tokens = max_demand_tokens
        self.shape: tuple[int, int] | None = None
        self._row: OrderedDict[int, int] = OrderedDict()  # token -> table row, least recently learned first
        self._lookup = np.full(0, -1, dtype=np.int64)  # token id -> table row, -1: unknown
        self._counts = np.zeros((0, 0), dtype=np.float32)  # [rows, L*E] selections
        self._seen = np.zeros(0, dtype=np.float32)  # [rows] times prefilled
        self._prob = np.zeros((0, 0), dtype=np.uint8)  # [rows, L*E] codes of counts / seen
        self._log_miss = np.zeros((0, 0), dtype=np.uint8)  # [rows, L*E] codes of -log(1 - counts / seen)

    def _reset(self, shape: tuple[int, int]) -> None:
        self.shape = shape
        self._row.clear()
        self._lookup[:] = -1
        width = shape[0] * shape[1]
        self._counts = np.zeros((0, width), dtype=np.float32)
        self._seen = np.zeros(0, dtype=np.float32)
        self._prob = np.zeros((0, width), dtype=np.uint8)
        self._log_miss = np.zeros((0, width), dtype=np.uint8)

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
                self._prob = np.vstack([self._prob, np.zeros((grow, width), dtype=np.uint8)])
                self._log_miss = np.vstack([self._log_miss, np.zeros((grow, width), dtype=np.uint8)])
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
        tokens = np.asarray(summary.tokens, dtype=np.int64)
        known = np.flatnonzero(tokens >= 0)
        if known.size == 0:
            return
        token_rows = np.array([self._row_of(int(tokens[i])) for i in known], dtype=np.int64)
        kept = self._lookup[tokens[known]] == token_rows  # a row a later token of this summary took over is its own
        known, token_rows = known[kept], token_rows[kept]
        rows, local = np.unique(token_rows, return_inverse=True)  # the table rows touched; each token's among them
        width = n_layers * n_experts
        chosen = experts[known] + (np.arange(n_layers) * n_experts)[None, :, None]  # [n, L, k] flat (layer, expert)
        picked = experts[known] >= 0
        cells = (local[:, None, None] * width + chosen)[picked]
        self._counts[rows] += np.bincount(cells, minlength=rows.size * width).reshape(rows.size, width)
        self._seen[rows] += np.bincount(local, minlength=rows.size)
        self._prob[rows], self._log_miss[rows] = affinity_encode(self._counts[rows] / self._seen[rows, None])

    def rows_of(self, tokens: Sequence[int]) -> np.ndarray:
        """The table row of every token (-1 where the token is unknown), in order."""
        ids = np.asarray(tokens, dtype=np.int64)
        if self._lookup.size == 0:
            return np.full(ids.size, -1, dtype=np.int64)
        return self._lookup.take(np.minimum(ids, self._lookup.size - 1))  # the last entry is never a row

    def demand(self, rows: np.ndarray, starts: Sequence[int] | np.ndarray = (0,)) -> Demand | None:
        """The expert demand of a prompt whose tokens have these ``rows`` (``rows_of``), for each
        way of serving it: the prefill of ``rows[start:]`` for every start, and the decode that
        follows (``csrc/demand.h``). None until a trace has been learned."""
        if self.shape is None:
            return None
        prefill, known, decode, _ = request_demand(self._log_miss, self._prob, rows, np.asarray(starts, dtype=np.int64),
                                                   self.max_demand_tokens, DECODE_CONTEXT)
        return Demand(prefill, known, decode)

    def __len__(self) -> int:
        return len(self._row)
