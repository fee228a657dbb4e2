"""Policies by name: the strings used by the CLI, configs and metrics."""

from __future__ import annotations

from typing import Any

from cluster.errors import InvalidParameterError
from cluster.routing.base import RoutingPolicy
from cluster.routing.least_loaded import LeastLoadedPolicy
from cluster.routing.random_policy import RandomPolicy
from cluster.routing.round_robin import RoundRobinPolicy
from cluster.routing.warmth import WarmthNoBatchPolicy, WarmthPolicy

_POLICIES: dict[str, type[RoutingPolicy]] = {
    cls.name: cls for cls in (WarmthPolicy, LeastLoadedPolicy, RoundRobinPolicy, RandomPolicy, WarmthNoBatchPolicy)
}
POLICY_NAMES: tuple[str, ...] = tuple(_POLICIES)


def make_policy(name: str, **knobs: Any) -> RoutingPolicy:
    """Builds the policy called ``name``; raises InvalidParameterError for an unknown one."""
    try:
        cls = _POLICIES[name]
    except KeyError:
        raise InvalidParameterError(f"unknown routing policy {name!r}; expected one of {', '.join(POLICY_NAMES)}") from None
    return cls(**knobs)
