"""``least_loaded``: the node with the fewest queued and running requests; random among equals."""

from __future__ import annotations

from typing import Sequence

from cluster.routing.base import NodeView, RouteRequest, RoutingPolicy


class LeastLoadedPolicy(RoutingPolicy):
    name = "least_loaded"

    def choose(self, request: RouteRequest, nodes: Sequence[NodeView]) -> list[str]:
        return self.least_loaded(nodes)
