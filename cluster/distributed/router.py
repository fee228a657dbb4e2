"""Router actor: picks a node per request with a routing policy, then steps aside.

It decides and does nothing else: requests arrive as token ids, rendered and tokenized in the
caller's process (``cluster.distributed.edge``, issue 26 item 5: work that grows with a prompt's
text is done where requests enter, which scales out, not in the one router), and it never loads
the model's vocabulary. It names the model, the operator's chat template and the nodes' context
to the callers (``model_source``).

``RouterCore`` (plain class) holds what the router knows — live nodes, their last reports,
the requests in flight on each (by request id) — and asks the policy to choose a node.
``RouterActor`` (named, detached ``sniper-router``, restartable) is its async Ray shell:
``route`` chooses a node for a request's tokens (refusing at once with ``OverloadedError`` when
every live node is at capacity) and returns the ``Route``; the caller sends the request to that
node and streams from it itself (``cluster.distributed.dispatch``), so the router's work is per
request and a stream outlives the router. A request leaves the router's in-flight count when its node reports
its end (however it ended), when the caller gives up on that node (``failed``), or when the node
dies. After a restart the router rebuilds its state from the nodes' reports. What the policy
learns from a finished request's routing summary is learned on a worker thread, so decisions
go on meanwhile (``RoutingPolicy.on_report`` states what that asks of a policy).
"""

from __future__ import annotations

import asyncio
import os
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from cluster.routing.decision_audit import DecisionAudit
from cluster.errors import InvalidParameterError, NoNodesError, OverloadedError
from cluster.distributed.protocol import ModelSource, NodeReport, NodeStats, Route, RouteAsk
from cluster.distributed.status import NodeStatus, PredictionScore, RouterStatus
from cluster.routing import NodeView, RouteRequest, make_policy
from cluster.engine.warmth_report import Warmth, WarmthFormatError
from cluster.engine.warmth_report import decode as decode_warmth

NODE_TIMEOUT_S = 5.0
CUMULATIVE_STATS = ("hits", "misses", "bytes_read", "generated_tokens")  # counters kept across a node's restarts
SWEEP_INTERVAL_S = 0.25  # how often silent nodes are looked for (timeouts are seconds long)
STARTUP_GRACE_S = 5.0  # a router just (re)started waits this long for the nodes' first reports before NoNodesError
CRASH_LOOP_RESTARTS = 3  # a node whose process was replaced this many times ...
CRASH_LOOP_WINDOW_S = 120.0  # ... within this many seconds is crash-looping (reported; /health says 503 if all are)


@dataclass
class NodeState:
    node_id: str
    capacity: int
    last_report: NodeReport | None = None
    warmth: Warmth | None = None
    warmth_bytes: bytes | None = None  # the report ``warmth`` was decoded from
    in_flight: int = 0  # requests routed here that have not ended (RouterCore.acquire / release)
    alive: bool = True
    last_seen: float = field(default_factory=time.monotonic)
    served: int = 0
    started_at: float = 0.0  # the node process's start time, from its reports
    restarts: int = 0  # new node processes seen since this router first heard from the node
    restart_times: list[float] = field(default_factory=list)  # when (router clock) the latest ones were seen
    resident: np.ndarray | None = None  # bool [L, E] from the last warmth report
    sessions: frozenset[str] = frozenset()  # from the last report
    stats: NodeStats = NodeStats()  # from the last full report
    carried: dict[str, float] = field(default_factory=dict)  # CUMULATIVE_STATS of the node's earlier processes

    def total(self, key: str) -> float | None:
        """A CUMULATIVE_STATS counter over every process this node has had (None: never reported)."""
        now = getattr(self.stats, key)
        return None if now is None and key not in self.carried else (now or 0) + self.carried.get(key, 0)

    def hit_rate(self) -> float | None:
        """Expert-cache hit rate over every process this node has had."""
        hits, misses = self.total("hits"), self.total("misses")
        return hits / (hits + misses) if hits is not None and misses is not None and hits + misses else None


class RouterCore:
    """Routing state and decisions, without Ray (the actor feeds it reports and outcomes)."""

    def __init__(self, policy: str = "warmth", clock: Any = time.monotonic, **policy_knobs: Any) -> None:
        self.policy = make_policy(policy, clock=clock, **policy_knobs)
        self.clock = clock
        self.nodes: dict[str, NodeState] = {}
        self.decisions: Counter[tuple[str, str]] = Counter()  # (policy, outcome) -> decisions
        self.predictions: list[tuple[float, float]] = []  # (precision, recall) per request
        self.audit = DecisionAudit()  # decisions checked against the candidates' warmth, once the requests report
        self.started_at = time.time()
        self._room: dict[str, NodeView] = {}  # views of the live nodes with room (as of the last decision)
        self._stale: set[str] = set()  # nodes changed since: their entry in _room is redone at the next decision
        self._last_sweep: float | None = None
        self.requests: dict[str, str] = {}  # request id -> the node it is in flight on

    def on_report(self, report: NodeReport, learn: bool = True) -> None:
        """What the node says: its state, the request that ended there, and with ``learn`` what
        the policy learns from that request's summary (``RouterActor.report`` learns on a worker
        thread instead: ``RoutingPolicy.on_report``)."""
        node = self.nodes.get(report.node_id)
        if node is None:
            node = self.nodes[report.node_id] = NodeState(report.node_id, report.capacity, started_at=report.started_at)
            self.policy.on_node_added(report.node_id)
        else:
            if report.started_at != node.started_at:
                self._forget_process(node, report.started_at)
            if not node.alive and report.healthy:  # back: a restarted process, or a silence that ended
                self.policy.on_node_added(report.node_id)
        node.alive = report.healthy
        node.capacity = report.capacity
        node.last_report = report
        node.sessions = frozenset(report.sessions)
        node.last_seen = self.clock()
        self._changed(node)
        if report.stats is not None:
            node.stats = report.stats
        # a busy node's heartbeat carries no warmth, an idle one the same bytes again: keep the decoded one
        if report.warmth is not None and report.warmth != node.warmth_bytes:
            node.warmth_bytes = report.warmth
            try:
                node.warmth = decode_warmth(report.warmth)
                node.resident = node.warmth.resident
            except WarmthFormatError:
                node.warmth = node.resident = None
        if report.prefixes is not None:
            self.policy.on_prefixes(report.node_id, report.prefixes)
        if report.request_id:  # that request ended there (this settles the count whatever the caller did)
            if report.stats is not None and self.requests.get(report.request_id) == report.node_id:
                node.served += 1
            self.release(report.request_id)
        if report.summary is not None:
            if learn:
                self.policy.on_report(report.node_id, report.summary)
            self._score_prediction(report)
            if report.request_id:
                scored = self.audit.on_report(report.request_id, report.node_id, report.summary)
                if scored is not None:
                    self.policy.on_audited(report.request_id, scored.coverage)

    def _score_prediction(self, report: NodeReport) -> None:
        predicted = self.policy.pop_prediction(report.request_id) if report.request_id else None
        if predicted is None or report.summary is None:
            return
        actual = report.summary.selections(predicted.shape, decode=False) > 0
        tp = float((predicted & actual).sum())
        precision = tp / predicted.sum() if predicted.sum() else float("nan")
        recall = tp / actual.sum() if actual.sum() else float("nan")
        self.predictions.append((precision, recall))
        del self.predictions[:-1000]

    def _forget_process(self, node: NodeState, started_at: float) -> None:
        """The node runs a new process: what the old one held (warmth, KV prefixes) is gone, its
        counters are carried so that the node's totals stay cumulative."""
        self.mark_dead(node.node_id)  # its requests in flight died with the old process
        node.restarts += 1
        node.restart_times = [*node.restart_times[-(CRASH_LOOP_RESTARTS - 1):], self.clock()]
        node.started_at = started_at
        node.carried = {key: node.total(key) or 0 for key in CUMULATIVE_STATS}
        node.stats = NodeStats()
        node.warmth = node.warmth_bytes = node.resident = None

    def mark_dead(self, node_id: str) -> None:
        """The node is gone: its requests in flight went with it."""
        node = self.nodes.get(node_id)
        if node is not None and node.alive:
            node.alive = False
            self._changed(node)
            self.policy.on_node_removed(node_id)
        for request_id in [r for r, n in self.requests.items() if n == node_id]:
            self.release(request_id)

    def acquire(self, node_id: str, request_id: str) -> NodeState:
        """Request ``request_id`` was routed to the node."""
        self.release(request_id)  # routed again (its node failed): it counts where it goes now
        node = self.nodes[node_id]
        node.in_flight += 1
        self.requests[request_id] = node_id
        self._changed(node)
        return node

    def release(self, request_id: str) -> None:
        """Request ``request_id`` ended (however); nothing if it is not in flight (any more)."""
        node_id = self.requests.pop(request_id, None)
        node = self.nodes.get(node_id) if node_id is not None else None
        if node_id is not None:
            self.policy.on_ended(request_id)
        if node is not None:
            node.in_flight = max(0, node.in_flight - 1)
            self._changed(node)

    def _changed(self, node: NodeState) -> None:
        self._stale.add(node.node_id)

    def _sweep(self, force: bool = False) -> None:
        now = self.clock()
        if not force and self._last_sweep is not None and now - self._last_sweep < SWEEP_INTERVAL_S:
            return
        self._last_sweep = now
        for node in self.nodes.values():  # a node serving our requests is busy, not silent
            if node.alive and node.in_flight == 0 and now - node.last_seen > NODE_TIMEOUT_S:
                self.mark_dead(node.node_id)

    def live_nodes(self) -> list[NodeState]:
        self._sweep(force=True)
        return [n for n in self.nodes.values() if n.alive]

    def _with_room(self) -> list[NodeView]:
        self._sweep()
        for node_id in self._stale:  # usually the one or two nodes a request started or ended on
            node = self.nodes[node_id]
            if node.alive and node.in_flight < node.capacity:  # a view is rebuilt only when its node changed
                self._room[node_id] = self._build_view(node)
            else:
                self._room.pop(node_id, None)
        self._stale.clear()
        return list(self._room.values())

    def _build_view(self, node: NodeState) -> NodeView:
        return NodeView(node_id=node.node_id, load=node.in_flight, capacity=node.capacity,
                        slots=int(node.stats.slots or 1), resident=node.resident, sessions=node.sessions)

    def choose(self, request: RouteRequest, exclude: set[str]) -> list[str]:
        """Ranked node ids; raises NoNodesError / OverloadedError when nothing can take it."""
        with_room = self._with_room()
        if exclude:
            with_room = [v for v in with_room if v.node_id not in exclude]
        if not with_room:
            live = [n for n in self.live_nodes() if n.node_id not in exclude]
            if not live:
                self.decisions[self.policy.name, "no_nodes"] += 1
                raise NoNodesError("no live node is registered with the router" +
                                   (f" (tried {', '.join(sorted(exclude))})" if exclude else ""))
            self.decisions[self.policy.name, "overloaded"] += 1
            raise OverloadedError(f"all {len(live)} live nodes are at capacity "
                                  f"({', '.join(f'{n.node_id} {n.in_flight}/{n.capacity}' for n in live)}); retry later")
        ranked = self.policy.choose(request, with_room)
        self.audit.on_decision(request.request_id, with_room)
        self.decisions[self.policy.name, self.policy.decision_kind()] += 1
        return ranked

    def status(self, model: str = "", pid: int = 0, n_routes: int = 0, route_s: float = 0.0) -> RouterStatus:
        """The deployment as this core knows it (the actor adds its model, process and routing time)."""
        self.live_nodes()  # a node silent for NODE_TIMEOUT_S shows as dead
        nodes = []
        for node in sorted(self.nodes.values(), key=lambda n: n.node_id):
            stats = node.stats
            nodes.append(NodeStatus(
                name=node.node_id, alive=node.alive, load=node.in_flight, capacity=node.capacity, served=node.served,
                restarts=node.restarts, crash_looping=self._crash_looping(node), hit_rate=node.hit_rate(),
                decode_hit_rate=stats.decode_hit_rate,  # of the current process
                bytes_read=node.total("bytes_read"), generated_tokens=node.total("generated_tokens"),
                warm_fraction=node.warmth.warm_fraction() if node.warmth else None,
                resident_bytes=stats.resident_bytes, budget_bytes=stats.budget_bytes,
                sessions=len(node.last_report.sessions) if node.last_report else 0,
                slots=stats.slots, slots_busy=stats.slots_busy, decode_batch=stats.decode_batch, step_ms=stats.step_ms,
                experts_per_step=stats.experts_per_step))
        precision = [p for p, _ in self.predictions if p == p]
        recall = [r for _, r in self.predictions if r == r]
        return RouterStatus(
            model=model, pid=pid, n_routes=n_routes, route_s=route_s, policy=self.policy.name,
            policy_state=self.policy.state(), started_at=self.started_at, nodes=tuple(nodes),
            decisions=dict(self.decisions),
            prediction=PredictionScore(n=len(self.predictions),
                                       precision=float(np.mean(precision)) if precision else None,
                                       recall=float(np.mean(recall)) if recall else None),
            decision_audit=self.audit.summary())

    def _crash_looping(self, node: NodeState) -> bool:
        recent = [t for t in node.restart_times if self.clock() - t <= CRASH_LOOP_WINDOW_S]
        return len(recent) >= CRASH_LOOP_RESTARTS



class RouterActor:
    """Async Ray actor around RouterCore. Create with ``ray.remote(RouterActor).options(...)``."""

    def __init__(self, model_path: str, policy: str = "warmth", namespace: str = "sniper",
                 chat_template: str | None = None, *, n_ctx: int) -> None:
        """``model_path``, ``chat_template`` (the operator's, or None) and ``n_ctx`` (a node's
        context, in tokens) are named to callers (``model_source``), never read here."""
        self.core = RouterCore(policy)
        self.model_path = model_path
        self.source = ModelSource(model_path, chat_template, n_ctx)
        self.namespace = namespace
        self.n_routes = 0  # route calls answered (a request's cost here does not grow with its tokens)
        self.route_s = 0.0  # time spent answering them
        self._started = time.monotonic()

    async def report(self, report: NodeReport) -> None:
        first = report.node_id not in self.core.nodes
        core = self.core
        core.on_report(report, learn=False)
        if report.summary is not None:  # tens of ms at full model size: decisions go on meanwhile
            await asyncio.to_thread(core.policy.on_report, report.node_id, report.summary)
        if first:  # after a restart this router knows no affinity: the node sends what it served recently
            import ray

            try:  # the actor lookup blocks (a GCS round trip): not on the event loop
                handle = await asyncio.to_thread(ray.get_actor, report.node_id, namespace=self.namespace)
                handle.resend_traces.remote()
            except Exception:  # gone again: there is nothing to learn from it
                pass

    async def route(self, ask: RouteAsk, exclude: tuple[str, ...] = ()) -> Route:
        """Chooses a node for the request's tokens among the live ones with room, not in
        ``exclude`` (nodes that failed it), counts it in flight there and returns the ``Route``.
        The tokens and params were checked where the request entered (``cluster.distributed.edge``):
        the work here does not grow with the prompt's text. Raises ``NoNodesError``,
        ``OverloadedError``, ``InvalidParameterError`` (not a ``RouteAsk`` of token ids)."""
        self.n_routes += 1
        if not isinstance(ask, RouteAsk):
            raise InvalidParameterError(f"route takes a RouteAsk, got {type(ask).__name__}", param="request")
        if not isinstance(ask.tokens, tuple) or not ask.tokens:
            raise InvalidParameterError("a RouteAsk carries the prompt as a non-empty tuple of token ids "
                                        "(rendered and tokenized by the caller: cluster.distributed.edge)",
                                        param="tokens")
        for request_id in ask.ended:
            self.core.release(request_id)
        while not self.core.live_nodes() and time.monotonic() - self._started < STARTUP_GRACE_S:
            await asyncio.sleep(0.1)  # just (re)started: the nodes report within a heartbeat
        started = time.perf_counter()
        route = RouteRequest(request_id=ask.request_id, tokens=ask.tokens, session_id=ask.session_id)
        node_id = self.core.choose(route, set(exclude))[0]
        why = {k: v for k, v in self.core.policy.explain().items() if k in ("fallback", "matched_tokens")}
        self.core.acquire(node_id, ask.request_id)
        self.core.policy.on_routed(route, node_id)
        self.route_s += time.perf_counter() - started
        return Route(node_id=node_id, namespace=self.namespace,
                     routing={"policy": self.core.policy.name, "attempts": len(exclude) + 1, **why})

    async def model_source(self) -> ModelSource:
        """The model file, the operator's chat template and a node's context: what a caller's
        process loads to render and tokenize requests itself (``cluster.distributed.edge``)."""
        return self.source

    async def failed(self, request_id: str, node_id: str, dead: bool) -> None:
        """The caller gave up on ``node_id`` for this request: the node died (``dead``) or refused it."""
        if dead:
            self.core.mark_dead(node_id)
        elif self.core.requests.get(request_id) == node_id:
            self.core.release(request_id)

    async def ended(self, request_ids: tuple[str, ...]) -> None:
        """The caller saw these requests end: their nodes' counts drop now (the nodes' reports
        settle them too, later). A caller's next ``route`` carries the ones it saw instead
        (``RouteAsk.ended``); this is for its other calls and for requests cut short."""
        for request_id in request_ids:
            self.core.release(request_id)

    async def status(self) -> RouterStatus:
        return self.core.status(model=os.path.basename(self.model_path).removesuffix(".gguf"), pid=os.getpid(),
                                n_routes=self.n_routes, route_s=self.route_s)

    async def heat(self, timeout_s: float = 10.0) -> dict[str, np.ndarray]:
        """Each live node's expert heat, asked of the nodes now (the reports they send on their own
        carry none: no policy reads it); a node that does not answer within ``timeout_s`` is left out."""
        import ray

        names = [n.node_id for n in self.core.nodes.values() if n.alive]

        async def one(name: str) -> tuple[str, np.ndarray | None]:
            try:
                node = await asyncio.to_thread(ray.get_actor, name, namespace=self.namespace)
                return name, decode_warmth(await asyncio.wait_for(node.warmth.remote(heat=True), timeout_s)).heat
            except Exception:  # noqa: BLE001  (gone, restarting or without a cache: no panel for it)
                return name, None

        answers = await asyncio.gather(*(one(name) for name in names))
        return {name: heat for name, heat in answers if heat is not None}

    async def set_policy(self, policy: str) -> str:
        old_nodes = list(self.core.nodes.values())
        self.core = RouterCore(policy)
        for node in old_nodes:
            if node.last_report is not None:
                self.core.on_report(node.last_report)
        return self.core.policy.name

    async def ping(self) -> str:
        return "ok"
