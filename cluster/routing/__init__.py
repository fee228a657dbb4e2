"""Routing policies: which node serves a request (plain classes, no Ray, injectable clock and RNG)."""

from cluster.routing.base import NodeView, RouteRequest, RoutingPolicy
from cluster.routing.registry import POLICY_NAMES, make_policy

__all__ = ["NodeView", "RouteRequest", "RoutingPolicy", "POLICY_NAMES", "make_policy"]
