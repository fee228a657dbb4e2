"""``random``: a uniformly random node."""

from __future__ import annotations

from typing import Sequence

from cluster.routing.base import NodeView, RouteRequest, RoutingPolicy


class RandomPolicy(RoutingPolicy):
    name = "random"

    def choose(self, request: RouteRequest, nodes: Sequence[NodeView]) -> list[str]:
        return self._shuffled([n.node_id for n in nodes])
