"""Prometheus metrics of the HTTP gateway: its own request counters plus the router's view.

The gateway counts what it sees (requests by endpoint and status, latency, time to first
token, tokens); at each scrape the router's status — per-node queue depth, expert hit rate,
bytes read, warmth, routing decisions by policy and outcome, prediction quality, decisions
checked against the nodes' warmth — is
exposed alongside, read fresh, so a scrape always shows the cluster as it is.
"""

from __future__ import annotations

from typing import Any, Iterator, Sequence

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from cluster.distributed.status import NodeStatus, RouterStatus

LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)


class GatewayMetrics:
    """The gateway's registry; ``exposition(status)`` renders it with the router's status."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter("sniper_http_requests", "HTTP requests by endpoint and status code",
                                ["endpoint", "status"], registry=r)
        self.latency = Histogram("sniper_request_duration_seconds", "Time from request to last byte",
                                 ["endpoint"], buckets=LATENCY_BUCKETS, registry=r)
        self.first_token = Histogram("sniper_time_to_first_token_seconds", "Time from request to the first text piece",
                                     ["endpoint"], buckets=LATENCY_BUCKETS, registry=r)
        self.prompt_tokens = Counter("sniper_prompt_tokens", "Prompt tokens of completed requests", registry=r)
        self.generated_tokens = Counter("sniper_generated_tokens", "Tokens generated for completed requests", registry=r)
        self.in_progress = Gauge("sniper_http_requests_in_progress", "Generation requests being served", registry=r)
        self._status: RouterStatus | None = None
        r.register(_RouterStatusCollector(lambda: self._status))

    def exposition(self, status: RouterStatus | None) -> bytes:
        """Prometheus text format; ``status`` is the router's (None when it cannot be reached)."""
        self._status = status
        try:
            return generate_latest(self.registry)
        finally:
            self._status = None


class _RouterStatusCollector:
    """Turns one router status into metric families (nothing when there is no status)."""

    def __init__(self, status: Any) -> None:
        self._status = status

    def describe(self) -> list[Metric]:
        return []  # families depend on the status; never registered twice

    def collect(self) -> Iterator[Metric]:
        status = self._status()
        up = GaugeMetricFamily("sniper_router_up", "1 when the router answered this scrape")
        up.add_metric([], 0.0 if status is None else 1.0)
        yield up
        if status is None:
            return
        yield from _node_families(status.nodes)
        decisions = CounterMetricFamily("sniper_routing_decisions", "Routing decisions by policy and outcome",
                                        labels=["policy", "outcome"])
        for (policy, outcome), count in sorted(status.decisions.items()):
            decisions.add_metric([policy, outcome], float(count))
        yield decisions
        for section, name, metric, help_ in _ROUTER_GAUGES:
            family = GaugeMetricFamily(metric, help_)
            value = getattr(getattr(status, section), name)
            if value is not None:
                family.add_metric([], float(value))
            yield family


_ROUTER_GAUGES = (  # (status section, field, metric, help); unknown values are left out
    ("prediction", "precision", "sniper_routing_prediction_precision",
     "Mean precision of predicted vs actual experts per request"),
    ("prediction", "recall", "sniper_routing_prediction_recall", "Mean recall of predicted vs actual experts per request"),
    ("decision_audit", "served_coverage", "sniper_routing_audit_served_coverage",
     "Mean share of a request's expert selections resident on the node that served it when the router decided"),
    ("decision_audit", "best_coverage", "sniper_routing_audit_best_coverage", "The same on the warmest candidate node"),
    ("decision_audit", "warmest_share", "sniper_routing_audit_warmest_share",
     "Share of decisions that chose the warmest candidate node"),
    ("policy_state", "warmth_weight", "sniper_routing_warmth_weight",
     "Weight of expected expert misses in the warmth policy's choice (0: warmth does not separate nodes here, 1: full)"),
    ("policy_state", "warmth_separation", "sniper_routing_warmth_separation",
     "Coverage on the node warmth expected warmest minus the candidates' mean, running mean over audited requests"),
)


_NODE_GAUGES = {  # status field -> (metric, help)
    "alive": ("sniper_node_alive", "1 while the node reports"),
    "load": ("sniper_node_queue_depth", "Requests running or queued on the node"),
    "capacity": ("sniper_node_queue_capacity", "Requests the node accepts at once"),
    "hit_rate": ("sniper_node_expert_hit_rate", "Expert-cache hit rate since the router first heard from the node"),
    "decode_hit_rate": ("sniper_node_expert_decode_hit_rate", "Decode-step hit rate of the node's current process"),
    "warm_fraction": ("sniper_node_warm_fraction", "Fraction of all experts resident in the node's cache"),
    "resident_bytes": ("sniper_node_resident_bytes", "Expert bytes resident in the cache"),
    "budget_bytes": ("sniper_node_budget_bytes", "Expert-cache budget"),
    "sessions": ("sniper_node_sessions", "Conversation KV states kept"),
    "slots": ("sniper_node_slots", "Sequences the node decodes together at most"),
    "slots_busy": ("sniper_node_slots_busy", "Sequence slots in use at the node's last report"),
    "decode_batch": ("sniper_node_decode_batch", "Mean decoding sequences per step since the node started"),
    "step_ms": ("sniper_node_step_ms", "Mean step (one llama_decode and its sampling) time since the node started"),
    "experts_per_step": ("sniper_node_experts_per_step",
                         "Mean expert units a step selected (the union of its sequences', summed over layers)"),
}
_NODE_COUNTERS = {
    "served": ("sniper_node_requests", "Requests served by the node"),
    "bytes_read": ("sniper_node_expert_bytes_read", "Expert bytes read from storage"),
    "generated_tokens": ("sniper_node_generated_tokens", "Tokens generated by the node"),
    "restarts": ("sniper_node_restarts", "New node processes after one died"),
}


def _node_families(nodes: Sequence[NodeStatus]) -> Iterator[Metric]:
    for fields, family_type in ((_NODE_GAUGES, GaugeMetricFamily), (_NODE_COUNTERS, CounterMetricFamily)):
        for key, (name, help_text) in fields.items():
            family = family_type(name, help_text, labels=["node"])
            for node in nodes:
                value = getattr(node, key)
                if value is not None and value == value:
                    family.add_metric([node.name], float(value))
            yield family
