"""``round_robin``: nodes in turn, in name order, skipping none; the baseline for bytes read."""

from __future__ import annotations

from typing import Sequence

from cluster.routing.base import NodeView, RouteRequest, RoutingPolicy


class RoundRobinPolicy(RoutingPolicy):
    name = "round_robin"

    def __init__(self, **kwargs: object) -> None:
        super().__init__(**kwargs)  # type: ignore[arg-type]
        self._next = 0

    def choose(self, request: RouteRequest, nodes: Sequence[NodeView]) -> list[str]:
        ids = sorted(n.node_id for n in nodes)
        start = self._next % len(ids)
        self._next += 1
        return ids[start:] + ids[:start]
