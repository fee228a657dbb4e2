"""Which waiting sequences an engine starts, and when, once its expert cache cannot hold the model.

Under a budget below the model's experts, sequences share expert loads only when they need the
same experts: a batch of unrelated sequences reads about the sum of their working sets, each
evicting what the others need next, while a batch of related ones reads one working set for all
of them. (docs/batching-bench-2topics, ``bench`` at a 50 % limit, eight clients, prompts of two
topics: every slot decoding, the kinds mixed, reads 0.76x the expert bytes per generated token of
one sequence at a time and runs 1.2x as fast; batches of one kind, 0.43x and 2.4x.) So
``ExpertAdmission`` forms batches of one kind, one after another:

* a prompt's kind is its expected expert selections (``expected``: the prefill of its tokens
  plus ``decode_steps`` steps of decoding), predicted by ``cluster.engine.token_affinity`` (the
  router's predictor), learned here from the experts each prompt this engine prefilled
  selected (as soon as its prefill ends, so a kind is known early);
* with nothing running, the waiting sequence expected to load least starts (its expected
  selections of experts not resident now);
* while a batch runs, a sequence joins it only if at least ``1 - fit`` of its expected
  selections are expected of the batch's oldest sequence too (the batch's kind), the cheapest
  such one first; the others wait for the batch to end, and the next batch is of their kind.

Nobody waits for ever: once a sequence has seen later ones start before it ``max_passes`` times
(the engine makes that its slot count: one batch's worth), nothing more starts until the running
batch has ended, and then it starts, whatever it costs. A prompt whose kind is not known (the
affinity knows fewer than ``min_known`` of its tokens, or nothing yet) runs alone, in its turn:
it starts only when nothing runs and is the oldest waiting, and nothing joins it; so before the
affinity has learned anything, sequences run one at a time, first come, first served. How many
of one kind run together is ``cluster.engine.batch_width``'s to say. Pure logic: the engine hands it
the waiting sequences, the resident experts and the running batch's oldest prompt, and each
prefilled prompt's routing-trace summary.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from itertools import islice
from typing import Protocol, Sequence

import numpy as np

from cluster.engine.trace_summary import RoutingTraceSummary
from cluster.engine.token_affinity import TokenAffinity


class Waiting(Protocol):
    """A waiting sequence as admission sees it (``cluster.engine.sequence.Sequence``)."""

    prompt: Sequence[int]
    passed_over: int  # times a later sequence started before it


@dataclass
class ExpertAdmission:
    """Picks the waiting sequence to start next, if any (see the module docstring)."""

    window: int = 16
    max_passes: int = 8
    decode_steps: float = 32.0
    fit: float = 0.5
    min_known: float = 0.5
    affinity: TokenAffinity = field(default_factory=TokenAffinity)
    reordered: int = 0  # starts that were not of the oldest waiting sequence
    held: int = 0  # times a free slot stayed free: no waiting sequence fitted the running batch

    def learn(self, summary: RoutingTraceSummary) -> None:
        self.affinity.learn(summary)

    def expected(self, tokens: Sequence[int]) -> np.ndarray | None:
        """A prompt's expected selections of each expert ([L*E]): the prefill of its tokens plus
        ``decode_steps`` steps of decoding; None if the affinity knows fewer than ``min_known``
        of its tokens (a few common tokens predict nothing about its kind)."""
        rows = self.affinity.rows_of(tokens)
        if not rows.size or np.mean(rows >= 0) < self.min_known:
            return None
        demand = self.affinity.demand(rows)
        if demand is None:
            return None
        return demand.prefill[0] + self.decode_steps * demand.decode

    def pick(self, waiting: Sequence[Waiting], resident: np.ndarray, batch: Sequence[int] | None) -> int | None:
        """The index (in ``waiting``, oldest first) of the sequence to start now, or None when
        none fits the running ``batch`` (the prompt of its oldest sequence; None: nothing runs);
        the ones before the chosen one count as passed over."""
        overdue = next((i for i, w in enumerate(waiting) if w.passed_over >= self.max_passes), None)
        if overdue is not None:
            choice = overdue if batch is None else None  # the batch drains, then it starts
        else:
            choice = self._cheapest_fitting(waiting, resident, batch)
        if choice is None:
            self.held += 1
            return None
        for w in islice(waiting, choice):
            w.passed_over += 1
        self.reordered += choice > 0
        return choice

    def _cheapest_fitting(self, waiting: Sequence[Waiting], resident: np.ndarray,
                          batch: Sequence[int] | None) -> int | None:
        """Among the first ``window`` waiting sequences, up to the first of unknown kind, the one
        of the batch's kind expected to load least; the one of unknown kind if it is the oldest
        and nothing runs."""
        kind = None
        if batch is not None:
            kind = self.expected(batch)
            if kind is None:  # a batch of unknown kind runs alone
                return None
        not_resident = 1.0 - np.asarray(resident, dtype=np.float32).ravel()
        choice, best = None, float("inf")
        for i, w in enumerate(islice(waiting, self.window)):  # a deque slices only this way
            expected = self.expected(w.prompt)
            if expected is None:  # a kind not known: alone, in its turn
                return i if choice is None and batch is None else choice
            if kind is not None and np.minimum(expected, kind).sum() < (1.0 - self.fit) * expected.sum():
                continue
            new = float(expected @ not_resident)
            if new < best:
                choice, best = i, new
        return choice
