"""The routing-policy contract: ``choose`` ranks nodes; hooks learn from what happened.

A policy only decides. The router actor owns the plumbing (node handles, retries, load
accounting, metrics) and calls the hooks; the policy never imports ray or asyncio, and its
clock and random generator are injected so tests replay decisions synchronously.
"""

from __future__ import annotations

import random
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np

from cluster.engine.trace_summary import RoutingTraceSummary


@dataclass(frozen=True)
class PolicyState:
    """What a policy has learned, in numbers (for ``status``, the status table and /metrics); a policy
    that learns nothing leaves every field None.

    Attributes:
        affinity_tokens: tokens whose experts the token affinity knows.
        prefixes_held: prompt prefixes known to be held in some node's KV state.
        warmth_weight: weight of expected expert misses in the choice (0: warmth does not separate nodes, 1: full).
        warmth_separation: coverage on the node expected warmest minus the candidates' mean (running mean).
        warmth_audits: audited requests behind that mean.
    """

    affinity_tokens: int | None = None
    prefixes_held: int | None = None
    warmth_weight: float | None = None
    warmth_separation: float | None = None
    warmth_audits: int | None = None


@dataclass(frozen=True)
class RouteRequest:
    """What the router knows about a request before dispatch.

    Attributes:
        request_id: unique id.
        tokens: the prompt's token ids (the conversation so far for a session's turn).
        session_id: the conversation, if the caller named one.
    """

    request_id: str
    tokens: tuple[int, ...]
    session_id: str | None = None


@dataclass(frozen=True)
class NodeView:
    """A node as the policy sees it (read-only).

    Attributes:
        node_id: the node actor's name (``sniper-node-<i>``).
        load: requests queued or running there, as the router counts them.
        capacity: the most requests the node accepts at once (queue included).
        slots: sequences the node decodes together (a request below that runs at once).
        resident: ``[L, E]`` true (nonzero) where the expert is resident in its cache (None before its first report).
        sessions: conversations whose KV state the node holds.
    """

    node_id: str
    load: int
    capacity: int
    slots: int = 1
    resident: np.ndarray | None = None
    sessions: frozenset[str] = field(default_factory=frozenset)



class RoutingPolicy(ABC):
    """Ranks nodes for a request. Subclasses set ``name`` and implement ``choose``.

    Args:
        rng: random generator for tie-breaking (injected for reproducible tests).
        clock: seconds, monotonic (injected for tests).
    """

    name: str = "base"

    def __init__(self, *, rng: random.Random | None = None, clock: Callable[[], float] = time.monotonic) -> None:
        self.rng = rng or random.Random()
        self.clock = clock
        self._last: dict[str, object] = {}  # what the last ``choose`` found; {"fallback": ...} when it fell back

    @abstractmethod
    def choose(self, request: RouteRequest, nodes: Sequence[NodeView]) -> list[str]:
        """Node ids best first, at least one; ``nodes`` holds only live nodes with room (never empty).

        The router dispatches to the first; if that node dies or refuses before sending text, it
        asks again without it, so a policy may stop after its choice instead of ranking every node.
        """

    def explain(self) -> dict[str, object]:
        """Why the last ``choose`` decided as it did (for the routing trace); {} if nothing to say."""
        return dict(self._last)

    def state(self) -> PolicyState:
        """What the policy has learned, in numbers (for ``status``)."""
        return PolicyState()

    def fell_back(self) -> bool:
        """Whether the last ``choose`` fell back to a default order for lack of knowledge."""
        return "fallback" in self._last

    def decision_kind(self) -> str:
        """How the last ``choose`` decided, as the router counts decisions: "fallback" or "ranked"."""
        return "fallback" if self.fell_back() else "ranked"

    # Hooks: no-ops unless a policy needs them.
    def on_routed(self, request: RouteRequest, node_id: str) -> None:
        """The request was dispatched to ``node_id``."""

    def on_report(self, node_id: str, summary: RoutingTraceSummary) -> None:
        """``node_id`` finished a request; ``summary`` says which experts it used.

        The router actor calls it on a worker thread while its event loop goes on calling the
        other methods: whatever it changes that they read must be replaced whole, never changed
        in place (``TokenAffinity.learn`` publishes a new table), and calls of it may overlap."""

    def on_ended(self, request_id: str) -> None:
        """The request ended on its node (however), as the router counts it."""

    def on_node_added(self, node_id: str) -> None:
        """A node joined."""

    def on_node_removed(self, node_id: str) -> None:
        """A node died or left."""

    def on_prefixes(self, node_id: str, hashes: Sequence[int]) -> None:
        """``node_id`` now holds the KV state of these prefixes (``prefix_hashes`` of its contexts)."""

    def on_audited(self, request_id: str, coverage: dict[str, float]) -> None:
        """The request reported which experts it used: ``coverage`` is, per candidate of its
        decision, the share of them that were resident there when the router decided
        (``cluster.routing.decision_audit``)."""

    def pop_prediction(self, request_id: str) -> np.ndarray | None:
        """The bool ``[L, E]`` experts this policy predicted for the request, if it predicted any."""
        return None

    def _shuffled(self, node_ids: Sequence[str]) -> list[str]:
        """A random order that depends on the RNG only (not on the order given: same seed, same order)."""
        out = sorted(node_ids)
        self.rng.shuffle(out)
        return out

    def least_loaded(self, nodes: Sequence[NodeView]) -> list[str]:
        """Nodes by load, ties broken by the RNG (never by list position)."""
        shuffled = self._shuffled([n.node_id for n in nodes])
        load = {n.node_id: n.load for n in nodes}
        return sorted(shuffled, key=lambda node_id: load[node_id])
