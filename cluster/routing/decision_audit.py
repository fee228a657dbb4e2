"""Checks each routing decision against the nodes' warmth, in hindsight.

At a decision the router keeps the resident-expert map each candidate node last reported.
When the serving node reports which experts the request then selected (its routing-trace
summary: prefill and decode), the audit scores every candidate by *coverage*: the share of
those selections whose expert was resident there when the router decided, i.e. the hit rate
the request would have started with on that node. Comparing the node that served with the
best candidate shows whether the router sent the request where the experts it needed were
warm, for any policy, with the nodes' own reports as the ground truth.

Coverage ignores what a node would have done differently had it served the request (a node
holding the conversation prefills only the new turn; a cache adapts during the request), so a
policy may rightly trade a little coverage for a held session or a lighter load.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from cluster.routing.base import NodeView, RoutingTraceSummary

MAX_PENDING = 4096  # decisions waiting for their report; the oldest are dropped (requests that never reported)
MAX_SCORED = 1000  # scored decisions kept for the averages
WARMEST_TOLERANCE = 0.05  # a served coverage this close to the best counts as the warmest choice (many nodes can be
# warm for the same work, their coverages a point or two apart)


@dataclass(frozen=True)
class AuditedDecision:
    """One request's coverage on the node that served it and on the other candidates.

    Attributes:
        served: coverage on the node that served the request.
        best: the highest coverage among the candidates.
        mean: the mean coverage over the candidates (what a blind choice gets on average).
        n_candidates: nodes with room and a warmth report when the router decided.
        coverage: each of those candidates' coverage, by node id.
    """

    served: float
    best: float
    mean: float
    n_candidates: int
    coverage: dict[str, float]

    @property
    def warmest(self) -> bool:
        """The served node's coverage was within WARMEST_TOLERANCE of the best candidate's."""
        return self.served >= self.best - WARMEST_TOLERANCE


@dataclass(frozen=True)
class AuditSummary:
    """Averages over the last MAX_SCORED scored decisions (None: none scored).

    Attributes:
        n: scored decisions.
        served_coverage, best_coverage, mean_coverage: mean coverage on the serving node, on the best
            candidate, over the candidates.
        n_choices: scored decisions with more than one candidate.
        warmest_share: share of those that chose a node within WARMEST_TOLERANCE of the best.
    """

    n: int = 0
    served_coverage: float | None = None
    best_coverage: float | None = None
    mean_coverage: float | None = None
    n_choices: int = 0
    warmest_share: float | None = None


class DecisionAudit:
    """Keeps each decision's candidates and scores them when the request reports what it selected."""

    def __init__(self) -> None:
        self._pending: OrderedDict[str, Sequence[NodeView]] = OrderedDict()
        self.scored: list[AuditedDecision] = []

    def on_decision(self, request_id: str, candidates: Sequence[NodeView]) -> None:
        """The router chose among ``candidates`` (a retry replaces the earlier decision).

        Only the sequence is kept (views are frozen, and a report replaces a node's resident
        map rather than changing it), so a decision costs no copy."""
        self._pending.pop(request_id, None)
        self._pending[request_id] = candidates
        if len(self._pending) > MAX_PENDING:
            self._pending.popitem(last=False)

    def on_report(self, request_id: str, node_id: str, summary: RoutingTraceSummary) -> AuditedDecision | None:
        """``node_id`` served the request; scores the decision if one is pending and it was a candidate
        with a resident map."""
        views = self._pending.pop(request_id, None)
        candidates = {v.node_id: v.resident for v in views or () if v.resident is not None}
        if node_id not in candidates:
            return None
        counts = summary.selections(candidates[node_id].shape)
        total = counts.sum()
        if total == 0:
            return None
        coverage = {n: float(counts[r.astype(bool)].sum() / total) for n, r in candidates.items() if r.shape == counts.shape}
        values = list(coverage.values())
        scored = AuditedDecision(served=coverage[node_id], best=max(values), mean=float(np.mean(values)),
                                 n_candidates=len(values), coverage=coverage)
        self.scored.append(scored)
        del self.scored[:-MAX_SCORED]
        return scored

    def summary(self) -> AuditSummary:
        """Averages over the last MAX_SCORED scored decisions; ``warmest_share`` counts only decisions
        with a choice to make."""
        scored = self.scored
        choices = [d for d in scored if d.n_candidates > 1]

        def mean(values: list[float]) -> float | None:
            return float(np.mean(values)) if values else None

        return AuditSummary(n=len(scored), served_coverage=mean([d.served for d in scored]),
                            best_coverage=mean([d.best for d in scored]), mean_coverage=mean([d.mean for d in scored]),
                            n_choices=len(choices), warmest_share=mean([float(d.warmest) for d in choices]))
