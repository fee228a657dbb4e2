"""Node actor: one per Ray node, hosting an MoEEngine with the expert cache.

``NodeServer`` is a plain class (tests drive it without Ray); ``NodeActor`` is its Ray shell.
A node:
  * serves one request at a time on its engine, with a bounded number waiting (``max_queue``);
    a request beyond that is refused at once with ``OverloadedError``; a request's ``n``
    choices are generated one after the other (each reuses the prompt's KV state), its pieces
    tagged with their choice's ``index``;
  * tokenizes the prompt as the router did: a chat rendering (``special``) with its special
    tokens parsed;
  * keeps the KV state of recent conversations (``session_bytes``, least recently used out), so
    a conversation's next turn prefills only its new tokens; any request also reuses the
    longest common prefix with what the context holds;
  * streams text pieces, and stops generating when the caller cancels;
  * reports load, health, its warmth report (msgpack), the prefixes it holds and each
    request's routing trace to the router after every request and on a heartbeat;
  * keeps the routing traces of its recent requests (``RECENT_TRACE_TOKENS`` prefilled tokens)
    and sends them again when asked (``resend_traces``): a restarted router learns its token
    affinity back from them instead of starting from nothing.
"""

from __future__ import annotations

import os
import sys
import threading
import time
import uuid
from collections import OrderedDict, deque
from dataclasses import dataclass
from typing import Any, Iterator

from cluster.engine import MoEEngine
from cluster.errors import InvalidParameterError, SniperError
from cluster.routing.base import RoutingTraceSummary
from cluster.routing.warmth import prefix_hashes
from cluster.sampling import SamplingParams

NAMESPACE = "sniper"
RECENT_TRACE_TOKENS = 4096  # prefilled tokens whose routing-trace summaries a node keeps for a restarted router
ROUTER_NAME = "sniper-router"


def node_name(index: int) -> str:
    return f"sniper-node-{index}"


class OverloadedError(SniperError, RuntimeError):
    """Every queue that could take the request is full; retry later."""


class NodeFailedError(SniperError, RuntimeError):
    """The node serving a stream died after it had sent text."""


class NoNodesError(SniperError, RuntimeError):
    """No live node is registered with the router."""


@dataclass(frozen=True)
class NodeConfig:
    """One node's settings.

    Attributes:
        model_path: GGUF MoE model (every node of a deployment serves the same one).
        cache_bytes: expert-cache budget in bytes, ``"auto"`` (derived from the node's memory once
            the model is loaded) or None (plain llama.cpp).
        n_ctx: context window.
        n_threads: compute threads (default: the cores Ray gives the node's process).
        max_queue: requests running or waiting at once.
        session_bytes: bytes of saved conversation KV states kept.
        heartbeat_s: seconds between reports when idle.
        memory_limit_bytes: if set, the node puts its own process under a cgroup memory limit
            of this size before loading (emulates a RAM-limited machine; needs root).
        memory_share: with an ``"auto"`` budget and no cgroup limit, the fraction of the
            machine's available memory this node plans for (node actors sharing a machine).
    """

    model_path: str
    cache_bytes: int | str | None = None
    n_ctx: int = 2048
    n_threads: int | None = None
    max_queue: int = 8
    session_bytes: int = 64 << 20
    heartbeat_s: float = 1.0
    memory_limit_bytes: int | None = None
    memory_share: float = 1.0

    def validate(self) -> None:
        if not isinstance(self.max_queue, int) or self.max_queue < 1:
            raise InvalidParameterError(f"max_queue must be an integer >= 1, got {self.max_queue!r}")
        if self.session_bytes < 0:
            raise InvalidParameterError(f"session_bytes must be >= 0, got {self.session_bytes}")
        if not self.heartbeat_s > 0:
            raise InvalidParameterError(f"heartbeat_s must be > 0, got {self.heartbeat_s}")


@dataclass(frozen=True)
class NodeReport:
    """What a node tells the router (after every request and on every heartbeat)."""

    node_id: str
    load: int
    capacity: int
    healthy: bool
    warmth: bytes | None  # None: unchanged since the last report (a busy node's heartbeat)
    prefixes: tuple[int, ...] | None  # None: unchanged
    sessions: tuple[str, ...]
    stats: dict[str, float]
    sent_at: float
    request_id: str | None = None
    summary: RoutingTraceSummary | None = None
    started_at: float = 0.0  # when this node process started: a new value means the node was restarted


@dataclass
class _Session:
    tokens: tuple[int, ...]
    state: bytes
    prefixes: frozenset[int]  # prefix_hashes(tokens), reported with every report


_ADDITIVE_CACHE_STATS = ("hits", "misses", "bytes_read", "bytes_read_prefill", "bytes_read_decode", "n_tokens_prefill",
                         "n_tokens_decode")
_RATE_CACHE_STATS = ("decode_hit_rate", "prefetch_precision", "prefetch_recall")


def _request_cache_stats(gens: list[Any]) -> dict[str, float]:
    """A request's cache counters over all its choices (rates: of its first choice)."""
    if not gens[0].cache:
        return {}
    stats = {k: sum(g.cache[k] for g in gens) for k in _ADDITIVE_CACHE_STATS if k in gens[0].cache}
    stats.update({k: gens[0].cache[k] for k in _RATE_CACHE_STATS if k in gens[0].cache})
    return stats


class NodeServer:
    """The node's logic without Ray. ``report_sink`` receives every NodeReport."""

    def __init__(self, node_id: str, config: NodeConfig, report_sink: Any = None) -> None:
        config.validate()
        self.node_id = node_id
        self.config = config
        self.started_at = time.time()
        if config.memory_limit_bytes:
            from cluster.bench.memlimit import MemoryLimit

            self._limit = MemoryLimit(f"sniper-{node_id}", config.memory_limit_bytes)
            self._limit.enter()
        self.engine = MoEEngine(config.model_path, config.cache_bytes, n_ctx=config.n_ctx, n_threads=config.n_threads,
                                memory_share=config.memory_share, memory_reserve=config.session_bytes)
        if self.engine.auto_budget is not None:
            print(f"{node_id}: {self.engine.auto_budget.explain()}", file=sys.stderr, flush=True)  # the node's log
        self.report_sink = report_sink
        self._admit = threading.Lock()
        self._serve_lock = threading.Lock()
        self._n_active = 0
        self._cancelled: set[str] = set()
        self._sessions: OrderedDict[str, _Session] = OrderedDict()
        self._session_bytes = 0
        self._current_session: str | None = None
        self._served = 0
        self._generated = 0
        self._recent_traces: deque[RoutingTraceSummary] = deque()  # oldest first
        self._recent_tokens = 0
        self._recent_lock = threading.Lock()
        self._stop = threading.Event()
        self._heartbeat = threading.Thread(target=self._heartbeat_loop, name=f"{node_id}-heartbeat", daemon=True)
        self._heartbeat.start()

    # -- requests ------------------------------------------------------------------------

    def stream(self, request: dict[str, Any]) -> Iterator[dict[str, Any]]:
        """Yields ``{"text": piece}`` items, then ``{"done": True, ...usage...}``.

        Raises OverloadedError at once if ``max_queue`` requests are already here.
        """
        with self._admit:
            if self._n_active >= self.config.max_queue:
                raise OverloadedError(f"{self.node_id} has {self._n_active} requests (max_queue "
                                      f"{self.config.max_queue})")
            self._n_active += 1
        request_id = request.get("request_id") or uuid.uuid4().hex
        try:
            yield from self._serve(request_id, request)
        finally:
            with self._admit:
                self._n_active -= 1
                self._cancelled.discard(request_id)

    def _serve(self, request_id: str, request: dict[str, Any]) -> Iterator[dict[str, Any]]:
        session = request.get("session_id")
        params = request.get("params") or SamplingParams()
        if not isinstance(params, SamplingParams):
            raise InvalidParameterError(f"params must be SamplingParams, got {type(params).__name__}", param="params")
        with self._serve_lock:  # one request at a time; the threads waiting here are the queue
            yield from self._generate(request_id, session, request["prompt"], params, bool(request.get("special")))

    def _generate(self, request_id: str, session: str | None, prompt: str, params: SamplingParams,
                  special: bool) -> Iterator[dict[str, Any]]:
        """The request's ``n`` choices one after the other (each reuses the prompt's KV state):
        ``{"text", "index", "logprobs"?}`` items, then the ``done`` item with every choice's end."""
        self._switch_session(session)
        params.validate()
        gens = []
        for index, choice in enumerate(params.choices()):
            pieces = self.engine.pieces(prompt, choice, special=special)
            try:
                while True:
                    if request_id in self._cancelled:
                        pieces.close()
                        yield {"cancelled": True, "node": self.node_id}
                        return
                    try:
                        piece = next(pieces)
                    except StopIteration as done:
                        gens.append(done.value)
                        break
                    item: dict[str, Any] = {"text": piece.text, "index": index}
                    if params.logprobs:
                        item["logprobs"] = piece.logprobs
                    yield item
            except BaseException:
                pieces.close()
                raise
        self._current_session = session
        if session is not None:
            self._save_session(session)
        first = gens[0]
        n_generated = sum(g.n_generated for g in gens)
        self._served += 1
        self._generated += n_generated
        summary = None
        if first.trace is not None:
            layout = self.engine.layout
            n_prefilled = first.n_prompt_tokens - first.n_reused_tokens
            prompt_experts, decode_counts = first.trace.split_prefill(n_prefilled, layout.n_layers, layout.n_experts)
            for later in gens[1:]:  # the other choices decoded on the same prompt
                decode_counts = decode_counts + later.trace.split_prefill(
                    later.n_prompt_tokens - later.n_reused_tokens, layout.n_layers, layout.n_experts)[1]
            tokens = tuple(self.engine.context_tokens[first.n_reused_tokens:first.n_prompt_tokens])
            summary = RoutingTraceSummary(tokens=tokens, prompt_experts=prompt_experts, decode_counts=decode_counts)
            self._remember_trace(summary)
        self._send_report(request_id, summary)
        yield {
            "done": True,
            "node": self.node_id,
            "finish_reason": first.finish_reason,
            "choices": [{"index": i, "finish_reason": g.finish_reason, "completion_tokens": g.n_generated}
                        for i, g in enumerate(gens)],
            "usage": {"prompt_tokens": first.n_prompt_tokens, "completion_tokens": n_generated,
                      "reused_prompt_tokens": first.n_reused_tokens},
            "timing": {"prefill_s": first.prefill_s, "decode_s": sum(g.decode_s for g in gens)},
            "cache": _request_cache_stats(gens),
            "decode_counts": None if summary is None else summary.decode_counts,
            "prompt_experts": None if summary is None else summary.prompt_experts,
        }

    def cancel(self, request_id: str) -> None:
        """Stops a running request at its next token (the caller went away)."""
        with self._admit:
            self._cancelled.add(request_id)

    # -- sessions ------------------------------------------------------------------------

    def _switch_session(self, session: str | None) -> None:
        if session == self._current_session:
            return
        if self._current_session is not None and self._current_session not in self._sessions:
            self._save_session(self._current_session)
        saved = self._sessions.get(session) if session is not None else None
        if saved is not None:
            self._sessions.move_to_end(session)
            self.engine.load_state(saved.tokens, saved.state)
        self._current_session = session

    def _save_session(self, session: str) -> None:
        tokens, state = self.engine.save_state()
        old = self._sessions.pop(session, None)
        if old is not None:
            self._session_bytes -= len(old.state)
        if len(state) > self.config.session_bytes:
            return
        self._sessions[session] = _Session(tokens, state, frozenset(prefix_hashes(tokens)))
        self._session_bytes += len(state)
        while self._session_bytes > self.config.session_bytes:
            _, evicted = self._sessions.popitem(last=False)
            self._session_bytes -= len(evicted.state)

    # -- reports -------------------------------------------------------------------------

    def _remember_trace(self, summary: RoutingTraceSummary) -> None:
        with self._recent_lock:
            self._recent_traces.append(summary)
            self._recent_tokens += len(summary.tokens)
            while self._recent_tokens > RECENT_TRACE_TOKENS and len(self._recent_traces) > 1:
                self._recent_tokens -= len(self._recent_traces.popleft().tokens)

    def resend_traces(self) -> int:
        """Sends the routing-trace summaries of recent requests again, oldest first (the router
        asks when it hears from this node for the first time, which after a restart is how it
        learns its affinity back). Returns how many were sent."""
        with self._recent_lock:
            traces = list(self._recent_traces)
        if self.report_sink is not None:
            for summary in traces:
                self._send(self._light_report(summary))
        return len(traces)

    def report(self, request_id: str | None = None, summary: RoutingTraceSummary | None = None) -> NodeReport:
        engine = self.engine
        prefixes = tuple(sorted(set(prefix_hashes(engine.context_tokens)).union(*(s.prefixes for s in self._sessions.values()))))
        stats: dict[str, float] = {"served": self._served, "generated_tokens": self._generated,
                                   "session_bytes": self._session_bytes}
        warmth = None
        if engine.has_cache:
            cache = engine.cache_stats()
            stats.update({k: cache[k] for k in ("hits", "misses", "hit_rate", "decode_hit_rate", "bytes_read",
                                                  "bytes_read_prefill", "bytes_read_decode", "n_tokens_prefill",
                                                  "n_tokens_decode", "resident_bytes", "budget_bytes",
                                                  "prefetch_precision", "prefetch_recall")})
            warmth = engine.warmth()
        return NodeReport(node_id=self.node_id, load=self._n_active, capacity=self.config.max_queue, healthy=True,
                          warmth=warmth, prefixes=prefixes, sessions=tuple(self._sessions), stats=stats,
                          sent_at=time.time(), request_id=request_id, summary=summary, started_at=self.started_at)

    def _send_report(self, request_id: str | None = None, summary: RoutingTraceSummary | None = None) -> None:
        if self.report_sink is not None:
            self._send(self.report(request_id, summary))

    def _send(self, report: NodeReport) -> None:
        try:
            self.report_sink(report)
        except Exception:  # the router may be restarting; the next heartbeat tries again
            pass

    def _heartbeat_loop(self) -> None:
        while not self._stop.wait(self.config.heartbeat_s):
            if self._serve_lock.locked():
                self._send_busy_report()  # the engine is busy: load and liveness only
            else:
                self._send_report()

    def _send_busy_report(self) -> None:
        if self.report_sink is not None:
            self._send(self._light_report())

    def _light_report(self, summary: RoutingTraceSummary | None = None) -> NodeReport:
        """Load and liveness, and a routing-trace summary if given; warmth and prefixes unchanged."""
        return NodeReport(node_id=self.node_id, load=self._n_active, capacity=self.config.max_queue, healthy=True,
                          warmth=None, prefixes=None, sessions=tuple(self._sessions), stats={}, sent_at=time.time(),
                          summary=summary, started_at=self.started_at)

    def ready(self) -> dict[str, Any]:
        layout = self.engine.layout
        budget = self.engine.auto_budget
        return {"node": self.node_id, "pid": os.getpid(), "n_layers": layout.n_layers, "n_experts": layout.n_experts,
                "cache_budget": budget.explain() if budget is not None else None}

    def close(self) -> None:
        self._stop.set()
        self.engine.close()
