"""Which waiting sequence an engine starts next when its expert cache cannot hold the model.

Under a budget below the model's experts only a few sequences run at once
(``cluster.batch_width``), and whichever starts next decides what the cache must read: one whose
experts are resident already reads little, one of another kind evicts what the running ones
use. ``ExpertAdmission`` therefore starts, among the first ``window`` waiting sequences (oldest
first), the one expected to add the fewest expert loads — its predicted demand
(``cluster.token_affinity``, the router's predictor, learned here from the sequences this engine
served: the prefill of its prompt plus ``decode_steps`` steps of decoding) on experts not
resident now. Sequences that need the same experts then run together and one after another,
which is how they share expert loads: a batch of unrelated sequences reads nearly the sum of
their experts.

Nobody waits for ever: a sequence passed over ``max_passes`` times starts next (the oldest such
first), and while nothing is predicted — the affinity has learned nothing yet, or knows none of
the oldest prompt's tokens — the order is first come, first served. Pure logic: the engine hands
it the waiting sequences and the resident experts, and each finished sequence's routing-trace
summary.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from itertools import islice
from typing import Protocol, Sequence

import numpy as np

from cluster.protocol import RoutingTraceSummary
from cluster.token_affinity import TokenAffinity


class Waiting(Protocol):
    """A waiting sequence as admission sees it (``cluster.sequence.Sequence``)."""

    prompt: Sequence[int]
    passed_over: int  # times a later sequence started before it


@dataclass
class ExpertAdmission:
    """Picks the waiting sequence to start next (see the module docstring)."""

    window: int = 16
    max_passes: int = 8
    decode_steps: float = 32.0
    affinity: TokenAffinity = field(default_factory=TokenAffinity)
    reordered: int = 0  # starts that were not of the oldest waiting sequence

    def learn(self, summary: RoutingTraceSummary) -> None:
        self.affinity.learn(summary)

    def expected_loads(self, tokens: Sequence[int], resident: np.ndarray) -> float | None:
        """Expert loads a sequence is expected to add given the ``resident`` flags ([L*E]); None if
        the affinity knows none of its tokens."""
        rows = self.affinity.rows_of(tokens)
        demand = self.affinity.demand(rows)
        if demand is None or demand.known[0] == 0:
            return None
        weight = demand.prefill[0] + self.decode_steps * demand.decode
        return float(weight @ (1.0 - resident))

    def pick(self, waiting: Sequence[Waiting], resident: np.ndarray) -> int:
        """The index (in ``waiting``, oldest first) of the sequence to start; the ones before it
        count as passed over."""
        candidates = list(islice(waiting, self.window))  # a deque slices only this way
        overdue = next((i for i, w in enumerate(waiting) if w.passed_over >= self.max_passes), None)
        if overdue is not None or len(candidates) < 2:
            choice = overdue or 0
        else:
            flags = np.asarray(resident, dtype=np.float32).ravel()
            costs = [self.expected_loads(w.prompt, flags) for w in candidates]
            known = [(cost, i) for i, cost in enumerate(costs) if cost is not None]
            choice = min(known)[1] if known and costs[0] is not None else 0
        for w in islice(waiting, choice):
            w.passed_over += 1
        self.reordered += choice > 0
        return choice
