"""Router actor: picks a node per request with a routing policy and proxies its stream.

It also renders chat requests with the model's chat template (``ChatRenderer``): the router
holds the model's vocabulary already (it tokenizes every prompt to route it), so the prompt
text it sends on is tokenized by the same rule here and on the node, special tokens parsed.

``RouterCore`` (plain class) holds what the router knows — live nodes, their last reports,
the requests it has in flight per node — and asks the policy to rank nodes. ``RouterActor``
(named, detached ``sniper-router``, restartable) is the async Ray shell that dispatches
to node actors, retries elsewhere when a node dies before sending any text, ends a stream that
had started with ``NodeFailedError`` naming the node and the cause, refuses at once with
``OverloadedError`` when every live node is at capacity, and rebuilds its state from the nodes'
reports after a restart.
"""

from __future__ import annotations

import asyncio
import os
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, AsyncIterator

import numpy as np

from cluster.chat import ChatPrompt, ChatRenderer
from cluster.decision_audit import DecisionAudit
from cluster.errors import InvalidParameterError, PromptTooLongError
from cluster.node import NodeFailedError, NodeReport, NoNodesError, OverloadedError
from cluster.routing import NodeView, RouteRequest, make_policy
from cluster.sampling import SamplingParams
from cluster.warmth import Warmth, WarmthFormatError
from cluster.warmth import decode as decode_warmth

NODE_TIMEOUT_S = 5.0
CUMULATIVE_STATS = ("hits", "misses", "bytes_read", "generated_tokens")  # counters kept across a node's restarts
SWEEP_INTERVAL_S = 0.25  # how often silent nodes are looked for (timeouts are seconds long)
CRASH_LOOP_RESTARTS = 3  # a node whose process was replaced this many times ...
CRASH_LOOP_WINDOW_S = 120.0  # ... within this many seconds is crash-looping (reported; /health says 503 if all are)


@dataclass
class NodeState:
    node_id: str
    capacity: int
    last_report: NodeReport | None = None
    warmth: Warmth | None = None
    warmth_bytes: bytes | None = None  # the report ``warmth`` was decoded from
    in_flight: int = 0  # change only through RouterCore.acquire / release (they mark the view stale)
    alive: bool = True
    last_seen: float = field(default_factory=time.monotonic)
    served: int = 0
    started_at: float = 0.0  # the node process's start time, from its reports
    restarts: int = 0  # new node processes seen since this router first heard from the node
    restart_times: list[float] = field(default_factory=list)  # when (router clock) the latest ones were seen
    resident: np.ndarray | None = None  # bool [L, E] from the last warmth report
    sessions: frozenset[str] = frozenset()  # from the last report
    stats: dict[str, float] = field(default_factory=dict)  # from the last full report
    carried: dict[str, float] = field(default_factory=dict)  # CUMULATIVE_STATS of the node's earlier processes

    def total(self, key: str) -> float | None:
        """A CUMULATIVE_STATS counter over every process this node has had (None: never reported)."""
        now = self.stats.get(key)
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
        self.decisions: Counter[str] = Counter()
        self.predictions: list[tuple[float, float]] = []  # (precision, recall) per request
        self.audit = DecisionAudit()  # decisions checked against the candidates' warmth, once the requests report
        self.started_at = time.time()
        self._room: dict[str, NodeView] = {}  # views of the live nodes with room (as of the last decision)
        self._stale: set[str] = set()  # nodes changed since: their entry in _room is redone at the next decision
        self._last_sweep: float | None = None

    def on_report(self, report: NodeReport) -> None:
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
        if report.stats:
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
        if report.summary is not None:
            self.policy.on_report(report.node_id, report.summary)
            self._score_prediction(report)
            if report.request_id:
                self.audit.on_report(report.request_id, report.node_id, report.summary)

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
        self.mark_dead(node.node_id)
        node.restarts += 1
        node.restart_times = [*node.restart_times[-(CRASH_LOOP_RESTARTS - 1):], self.clock()]
        node.started_at = started_at
        node.carried = {key: node.total(key) or 0 for key in CUMULATIVE_STATS}
        node.stats = {}
        node.warmth = node.warmth_bytes = node.resident = None

    def mark_dead(self, node_id: str) -> None:
        node = self.nodes.get(node_id)
        if node is not None and node.alive:
            node.alive = False
            self._changed(node)
            self.policy.on_node_removed(node_id)

    def acquire(self, node_id: str) -> NodeState:
        """A request was dispatched to the node."""
        node = self.nodes[node_id]
        node.in_flight += 1
        self._changed(node)
        return node

    def release(self, node_id: str) -> None:
        """A request dispatched to the node ended (however)."""
        node = self.nodes[node_id]
        node.in_flight -= 1
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
                        resident=node.resident,
                        heat=node.warmth.heat if node.warmth else None,
                        sessions=node.sessions)

    def choose(self, request: RouteRequest, exclude: set[str]) -> list[str]:
        """Ranked node ids; raises NoNodesError / OverloadedError when nothing can take it."""
        with_room = self._with_room()
        if exclude:
            with_room = [v for v in with_room if v.node_id not in exclude]
        if not with_room:
            live = [n for n in self.live_nodes() if n.node_id not in exclude]
            if not live:
                self.decisions[f"{self.policy.name}:no_nodes"] += 1
                raise NoNodesError("no live node is registered with the router" +
                                   (f" (tried {', '.join(sorted(exclude))})" if exclude else ""))
            self.decisions[f"{self.policy.name}:overloaded"] += 1
            raise OverloadedError(f"all {len(live)} live nodes are at capacity "
                                  f"({', '.join(f'{n.node_id} {n.in_flight}/{n.capacity}' for n in live)}); retry later")
        ranked = self.policy.choose(request, with_room)
        self.audit.on_decision(request.request_id, with_room)
        self.decisions[f"{self.policy.name}:{self.policy.decision_kind()}"] += 1
        return ranked

    def status(self) -> dict[str, Any]:
        self.live_nodes()  # a node silent for NODE_TIMEOUT_S shows as dead
        nodes = []
        for node in sorted(self.nodes.values(), key=lambda n: n.node_id):
            stats = node.stats
            nodes.append({
                "name": node.node_id,
                "alive": node.alive,
                "load": node.in_flight,
                "capacity": node.capacity,
                "served": node.served,
                "restarts": node.restarts,
                "crash_looping": self._crash_looping(node),
                "hit_rate": node.hit_rate(),
                "decode_hit_rate": stats.get("decode_hit_rate"),  # of the current process
                "bytes_read": node.total("bytes_read"),
                "generated_tokens": node.total("generated_tokens"),
                "warm_fraction": node.warmth.warm_fraction() if node.warmth else None,
                "resident_bytes": stats.get("resident_bytes"),
                "budget_bytes": stats.get("budget_bytes"),
                "sessions": len(node.last_report.sessions) if node.last_report else 0,
            })
        precision = [p for p, _ in self.predictions if p == p]
        recall = [r for _, r in self.predictions if r == r]
        return {
            "policy": self.policy.name,
            "policy_state": self.policy.state(),
            "started_at": self.started_at,
            "nodes": nodes,
            "decisions": dict(self.decisions),
            "prediction": {"n": len(self.predictions),
                           "precision": float(np.mean(precision)) if precision else None,
                           "recall": float(np.mean(recall)) if recall else None},
            "decision_audit": self.audit.summary(),
        }

    def _crash_looping(self, node: NodeState) -> bool:
        recent = [t for t in node.restart_times if self.clock() - t <= CRASH_LOOP_WINDOW_S]
        return len(recent) >= CRASH_LOOP_RESTARTS

    def heat(self) -> dict[str, np.ndarray]:
        return {n.node_id: n.warmth.heat for n in self.nodes.values() if n.warmth is not None}


class RouterActor:
    """Async Ray actor around RouterCore. Create with ``ray.remote(RouterActor).options(...)``."""

    def __init__(self, model_path: str, policy: str = "warmth", namespace: str = "sniper",
                 chat_template: str | None = None) -> None:
        from cluster.tokenizer import Tokenizer

        self.core = RouterCore(policy)
        self.model_path = model_path
        self.tokenizer = Tokenizer.load(model_path)
        self.chat = ChatRenderer(self.tokenizer, chat_template)
        self.namespace = namespace
        self.handles: dict[str, Any] = {}

    async def report(self, report: NodeReport) -> None:
        first = report.node_id not in self.core.nodes
        self.core.on_report(report)
        if first:  # after a restart this router knows no affinity: the node sends what it served recently
            try:
                self._handle(report.node_id).resend_traces.remote()
            except Exception:  # gone again: there is nothing to learn from it
                self.handles.pop(report.node_id, None)

    def _handle(self, node_id: str) -> Any:
        import ray

        handle = self.handles.get(node_id)
        if handle is None:
            handle = self.handles[node_id] = ray.get_actor(node_id, namespace=self.namespace)
        return handle

    async def stream(self, request: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
        """Routes and streams one request: ``{"text", "index"}`` items, then ``{"done", "node", ...}``.

        A chat request (``chat``: a ``ChatPrompt``) is rendered here with the deployment's chat
        template and sent on as prompt text flagged ``special``; its stream starts with
        ``{"chat_template": origin}``.

        A node that dies before sending text has the request sent to another node. One that dies
        after sending text ends the stream with ``NodeFailedError``, unless the request is
        ``restartable`` (its caller shows nothing before the end: ``generate``, the HTTP
        gateway's non-streaming answers): then it starts again on another node, announced by a
        ``{"restart": node, "reason"}`` item after which the text so far is void.
        """
        from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError

        request = dict(request)
        request.setdefault("request_id", uuid.uuid4().hex)
        restartable = bool(request.pop("restartable", False))
        template = self._prepare(request)
        tokens = tuple(self.tokenizer.tokenize(request["prompt"], special=bool(request.get("special"))))
        limit = request.pop("max_prompt_tokens", None)
        if limit is not None and len(tokens) > limit:
            raise PromptTooLongError(f"the prompt is {len(tokens)} tokens; this endpoint accepts at most {limit}")
        route = RouteRequest(request_id=request["request_id"], tokens=tokens, session_id=request.get("session_id"))
        if template is not None:  # announced first: an HTTP answer's headers say which template rendered it
            yield {"chat_template": template}
        tried: set[str] = set()
        while True:
            ranked = self.core.choose(route, tried)
            why = {k: v for k, v in self.core.policy.explain().items() if k in ("fallback", "matched_tokens")}
            node_id = ranked[0]
            node = self.core.acquire(node_id)
            self.core.policy.on_routed(route, node_id)
            sent, restart = 0, None
            try:
                handle = self._handle(node_id)
                gen = handle.stream.options(num_returns="streaming").remote(request)
                try:
                    async for ref in gen:
                        item = await ref
                        if "text" in item:
                            sent += 1
                        if item.get("done"):
                            node.served += 1
                            item["routing"] = {"policy": self.core.policy.name, "attempts": len(tried) + 1, **why}
                            if template is not None:
                                item["chat_template"] = template
                        yield item
                except (asyncio.CancelledError, GeneratorExit):
                    handle.cancel.remote(request["request_id"])
                    raise
                return
            except (ActorDiedError, ActorUnavailableError, RayActorError, ValueError) as exc:
                if isinstance(exc, ValueError) and "Failed to look up actor" not in str(exc):
                    raise
                self.core.mark_dead(node_id)
                self.handles.pop(node_id, None)
                tried.add(node_id)
                if sent:
                    reason = (f"{node_id} died after streaming {sent} pieces: "
                              f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}")
                    if not restartable:
                        raise NodeFailedError(reason) from None
                    restart = {"restart": node_id, "reason": reason}
            except Exception as exc:  # the node refused (overloaded) or failed before text
                if _is_overloaded(exc) and not sent:
                    tried.add(node_id)
                    continue
                raise
            finally:
                self.core.release(node_id)
            if restart is not None:
                yield restart

    def _prepare(self, request: dict[str, Any]) -> str | None:
        """Checks the sampling params against the vocabulary and renders a chat request
        (``chat``: a ``ChatPrompt``) into its prompt text, flagged ``special`` so node and router
        tokenize it with special tokens parsed. Returns the template's origin for a chat request."""
        params = request.get("params") or SamplingParams()
        if not isinstance(params, SamplingParams):
            raise InvalidParameterError(f"params must be SamplingParams, got {type(params).__name__}", param="params")
        params.validate()
        params.check_vocabulary(self.tokenizer.n_vocab)
        chat = request.pop("chat", None)
        if chat is None:
            request["params"] = params
            return None
        rendered = self.chat.render(chat)
        request["prompt"] = rendered.text
        request["special"] = rendered.special
        request["params"] = self.chat.with_end_of_turn(params)
        return rendered.origin

    async def generate(self, request: dict[str, Any]) -> dict[str, Any]:
        """The whole answer at once; a node that dies mid-way costs a restart elsewhere, not an error.

        ``text`` is the first choice's; ``choices`` has every choice's text, finish reason and
        (with ``logprobs``) token log-probabilities.
        """
        texts: dict[int, list[str]] = {}
        logprobs: dict[int, list[Any]] = {}
        async for item in self.stream({**request, "restartable": True}):
            if "text" in item:
                index = item.get("index", 0)
                texts.setdefault(index, []).append(item["text"])
                logprobs.setdefault(index, []).extend(item.get("logprobs", ()))
            elif "restart" in item:
                texts.clear()
                logprobs.clear()
            elif item.get("done"):
                choices = [{**c, "text": "".join(texts.get(c["index"], [])),
                            "logprobs": tuple(logprobs.get(c["index"], ()))} for c in item["choices"]]
                return {"text": choices[0]["text"], **{k: v for k, v in item.items() if k not in ("done", "choices")},
                        "choices": choices}
        raise NodeFailedError("the stream ended without a final message")

    async def render(self, chat: ChatPrompt) -> dict[str, Any]:
        """A conversation's prompt as the nodes would evaluate it: its text, token ids and template origin."""
        rendered = self.chat.render(chat)
        return {"text": rendered.text, "origin": rendered.origin,
                "tokens": self.tokenizer.tokenize(rendered.text, special=rendered.special)}

    async def tokenize(self, text: str, add_special: bool = False, parse_special: bool = True,
                       with_pieces: bool = False) -> list[Any]:
        """Token ids of ``text`` (with ``with_pieces``: ``{"id", "piece"}`` per token, the piece a
        string, or its bytes as a list when they are not whole UTF-8 characters)."""
        if not isinstance(text, str):
            raise InvalidParameterError(f"content must be a string, got {type(text).__name__}", param="content")
        tokens = self.tokenizer.tokenize(text, special=parse_special, add_special=add_special)
        if not with_pieces:
            return tokens
        out = []
        for token in tokens:
            piece = self.tokenizer.piece(token, special=True)
            try:
                out.append({"id": token, "piece": piece.decode("utf-8")})
            except UnicodeDecodeError:
                out.append({"id": token, "piece": list(piece)})
        return out

    async def detokenize(self, tokens: list[int]) -> str:
        """The text of token ids (control tokens written out); ids outside the vocabulary are an error."""
        return self.tokenizer.detokenize(tokens, special=True)

    async def status(self) -> dict[str, Any]:
        return {"model": os.path.basename(self.model_path).removesuffix(".gguf"), "chat_template": self.chat.origin,
                "chat_tools": self.chat.supports_tools, **self.core.status()}

    async def heat(self) -> dict[str, np.ndarray]:
        return self.core.heat()

    async def set_policy(self, policy: str) -> str:
        old_nodes = list(self.core.nodes.values())
        self.core = RouterCore(policy)
        for node in old_nodes:
            if node.last_report is not None:
                self.core.on_report(node.last_report)
        return self.core.policy.name

    async def ping(self) -> str:
        return "ok"


def _is_overloaded(exc: BaseException) -> bool:
    cause = getattr(exc, "cause", None)
    return isinstance(exc, OverloadedError) or isinstance(cause, OverloadedError) or "OverloadedError" in str(exc)[:300]
