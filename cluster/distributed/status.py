"""What the router says of a deployment (``RouterActor.status``): typed, frozen, one definition each.

Every reader (the gateway's /health and /metrics, deploy, the status table, the benchmarks) reads
fields, never keys; ``RouterStatus.as_json`` is the one place the status becomes JSON (``status
--json``, the benchmarks' raw files). Routing decisions are counted by ``(policy, outcome)``.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any, Mapping

from cluster.routing.base import PolicyState
from cluster.routing.decision_audit import AuditSummary


@dataclass(frozen=True)
class NodeStatus:
    """One node as the router knows it from its reports and its own accounting.

    Attributes:
        name: the node actor's name.
        alive: it reported within the router's timeout.
        load, capacity: requests routed there and not ended; how many it takes at once.
        served: requests it served (router's count); restarts: new processes seen.
        crash_looping: its process was replaced repeatedly within minutes.
        hit_rate: expert-cache hit rate over every process it has had; decode_hit_rate: the current process's, decode steps.
        bytes_read, generated_tokens: over every process it has had.
        warm_fraction: share of all experts resident (last warmth report).
        resident_bytes, budget_bytes: the cache's footprint and budget.
        sessions: conversation KV states it holds.
        slots, slots_busy, decode_batch, step_ms, experts_per_step: its batching, from its last full report.
    None: not reported (yet), or the node runs without a cache.
    """

    name: str
    alive: bool
    load: int
    capacity: int
    served: int = 0
    restarts: int = 0
    crash_looping: bool = False
    hit_rate: float | None = None
    decode_hit_rate: float | None = None
    bytes_read: float | None = None
    generated_tokens: float | None = None
    warm_fraction: float | None = None
    resident_bytes: float | None = None
    budget_bytes: float | None = None
    sessions: int = 0
    slots: float | None = None
    slots_busy: float | None = None
    decode_batch: float | None = None
    step_ms: float | None = None
    experts_per_step: float | None = None


@dataclass(frozen=True)
class PredictionScore:
    """How the router's expert-demand predictions compared with what requests selected."""

    n: int = 0
    precision: float | None = None
    recall: float | None = None


@dataclass(frozen=True)
class RouterStatus:
    """The router's view of the deployment.

    Attributes:
        model: the model's name (its file name without .gguf); pid: the router's process.
        n_routes, route_s: routing calls answered and the seconds they took in all.
        policy: the routing policy's name; policy_state: what it has learned.
        started_at: when this router process started (a new value: it was restarted).
        nodes: every node it has heard from, by name.
        decisions: routing decisions by (policy, outcome).
        prediction: expert-demand prediction quality; decision_audit: decisions against warmth.
    """

    model: str
    pid: int
    n_routes: int
    route_s: float
    policy: str
    policy_state: PolicyState
    started_at: float
    nodes: tuple[NodeStatus, ...]
    decisions: Mapping[tuple[str, str], int] = field(default_factory=dict)
    prediction: PredictionScore = PredictionScore()
    decision_audit: AuditSummary = AuditSummary()

    def node(self, name: str) -> NodeStatus | None:
        """The node called ``name`` (None: the router has not heard of it)."""
        return next((n for n in self.nodes if n.name == name), None)

    def live_nodes(self) -> list[NodeStatus]:
        return [n for n in self.nodes if n.alive]

    def as_json(self) -> dict[str, Any]:
        """The status as JSON values: decisions as ``{policy: {outcome: count}}``, NaN as null."""
        out = asdict(self)
        decisions: dict[str, dict[str, int]] = {}
        for (policy, outcome), count in sorted(self.decisions.items()):
            decisions.setdefault(policy, {})[outcome] = count
        out["decisions"] = decisions
        return jsonable(out)


def jsonable(obj: Any) -> Any:
    """``obj`` with tuples as lists and NaN as None, for json.dumps (the status, the command line's results)."""
    if isinstance(obj, dict):
        return {k: jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, float) and math.isnan(obj):
        return None
    return obj
