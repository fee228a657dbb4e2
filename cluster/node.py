"""Node: one per Ray node, hosting an MoEEngine with the expert cache, serving callers directly.

``NodeServer`` is a plain class (tests drive it without Ray); ``NodeActor`` is its Ray shell,
whose reports go to the named router actor. A node:
  * serves one request at a time on its engine, with a bounded number waiting (``max_queue``);
    a request beyond that is refused at once with ``OverloadedError``; a request's ``n``
    choices are generated one after the other (each reuses the prompt's KV state), its pieces
    tagged with their choice's ``index``;
  * takes the prompt as token ids (the router tokenized it, once);
  * keeps the KV state of recent conversations (``session_bytes``, least recently used out), so
    a conversation's next turn prefills only its new tokens; any request also reuses the
    longest common prefix with what the context holds;
  * streams text pieces to its caller (``cluster.protocol`` items) from a generation thread of
    its own: decoding never waits for the transport; after the first piece, the pieces of each
    ``COALESCE_S`` window (or all that piled up behind a slower reader) go as one; it stops
    generating when the caller cancels or goes away;
  * reports load, health, its warmth report (msgpack), the prefixes it holds and each
    request's routing trace to the router after every request (that settles the router's
    in-flight count, however the request ended) and on a heartbeat;
  * keeps the routing traces of its recent requests (``RECENT_TRACE_TOKENS`` prefilled tokens)
    and sends them again when asked (``resend_traces``): a restarted router learns its token
    affinity back from them instead of starting from nothing.
"""

from __future__ import annotations

import os
import queue
import sys
import threading
import time
from collections import OrderedDict, deque
from dataclasses import dataclass
from typing import Any, Iterator

from cluster.engine import MoEEngine
from cluster.errors import InvalidParameterError, OverloadedError
from cluster.protocol import (
    ROUTER_NAME,
    Cancelled,
    ChoiceEnd,
    Finished,
    NodeReport,
    NodeRequest,
    Piece,
    RoutingTraceSummary,
    StreamItem,
)
from cluster.routing.warmth import prefix_hashes

RECENT_TRACE_TOKENS = 4096  # prefilled tokens whose routing-trace summaries a node keeps for a restarted router


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


@dataclass
class _Session:
    tokens: tuple[int, ...]
    state: bytes
    prefixes: frozenset[int]  # prefix_hashes(tokens), reported with every report


_ADDITIVE_CACHE_STATS = ("hits", "misses", "bytes_read", "bytes_read_prefill", "bytes_read_decode", "n_tokens_prefill",
                         "n_tokens_decode")
_RATE_CACHE_STATS = ("decode_hit_rate", "prefetch_precision", "prefetch_recall")


_END = object()  # the generation thread is done
# After a request's first piece (sent at once), the pieces that come within this long go as one
# message: a Ray message costs both processes CPU that a small machine takes from decoding, and a
# reader does not see 20 ms. The generation thread never waits for it.
COALESCE_S = 0.02


def _last_of_a_stream(item: Any) -> bool:
    return item is _END or isinstance(item, (Finished, Cancelled, BaseException))


def _merged(batch: list[Any]) -> Iterator[Any]:
    """The items of ``batch`` with each run of pieces of one choice joined into one piece."""
    run: list[Piece] = []
    for item in batch:
        if isinstance(item, Piece) and run and run[-1].index == item.index:
            run.append(item)
            continue
        if run:
            yield _join(run)
        run = [item] if isinstance(item, Piece) else []
        if not isinstance(item, Piece):
            yield item
    if run:
        yield _join(run)


def _join(run: list[Piece]) -> Piece:
    if len(run) == 1:
        return run[0]
    return Piece("".join(p.text for p in run), run[0].index, tuple(lp for p in run for lp in p.logprobs))


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
            from cluster.memory_limit import MemoryLimit

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
        self._sessions_lock = threading.Lock()  # the heartbeat's reports read them while requests change them
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

    def stream(self, request: NodeRequest) -> Iterator[StreamItem]:
        """Yields ``Piece`` items (of every choice, in order), then ``Finished`` (or ``Cancelled``).

        The generation runs on a thread of its own; this generator hands its items on — the first
        piece at once, then what comes within ``COALESCE_S`` (or piled up meanwhile) as one piece —
        so neither the transport nor a slow reader holds the engine up. Closing
        it (the caller went away) cancels the request. Raises ``OverloadedError`` at once if
        ``max_queue`` requests are already here.
        """
        if not isinstance(request, NodeRequest):
            raise InvalidParameterError(f"a node serves a NodeRequest, got {type(request).__name__}", param="request")
        request.params.validate()
        with self._admit:
            if self._n_active >= self.config.max_queue:
                raise OverloadedError(f"{self.node_id} has {self._n_active} requests (max_queue "
                                      f"{self.config.max_queue})")
            self._n_active += 1
        items: queue.SimpleQueue[Any] = queue.SimpleQueue()
        worker = threading.Thread(target=self._produce, args=(request, items), name=f"{self.node_id}-generate",
                                  daemon=True)
        worker.start()
        done, window = False, 0.0  # no wait for the first piece
        try:
            while not done:
                batch = [items.get()]
                deadline = time.monotonic() + window
                while not _last_of_a_stream(batch[-1]):  # whatever else comes within the window goes along
                    try:
                        remaining = deadline - time.monotonic()
                        batch.append(items.get(timeout=remaining) if remaining > 0 else items.get_nowait())
                    except queue.Empty:
                        break
                window = COALESCE_S
                for item in _merged(batch):
                    if item is _END:
                        done = True
                        break
                    if isinstance(item, BaseException):
                        raise item
                    yield item
        finally:
            if not done:  # the caller closed the stream (or a piece failed to send): stop generating
                self.cancel(request.request_id)

    def _produce(self, request: NodeRequest, items: "queue.SimpleQueue[Any]") -> None:
        """The generation thread: serves the request, puts its items, then ``_END`` (or the error)."""
        finished = False
        try:
            with self._serve_lock:  # one request at a time; the threads waiting here are the queue
                for item in self._generate(request):
                    items.put(item)
                    finished = finished or isinstance(item, Finished)
            items.put(_END)
        except BaseException as exc:  # noqa: BLE001  (handed to the caller, whatever it is)
            items.put(exc)
        finally:
            with self._admit:
                self._n_active -= 1
                self._cancelled.discard(request.request_id)
            if not finished:  # cancelled or failed: the router still settles its count by this report
                self._send(self._light_report(request_id=request.request_id))

    def _generate(self, request: NodeRequest) -> Iterator[StreamItem]:
        """The request's ``n`` choices one after the other (each reuses the prompt's KV state):
        ``Piece`` items, then ``Finished`` with every choice's end."""
        params = request.params
        with self._sessions_lock:
            self._switch_session(request.session_id)
        gens = []
        for index, choice in enumerate(params.choices()):
            pieces = self.engine.pieces(list(request.tokens), choice)
            try:
                while True:
                    if request.request_id in self._cancelled:
                        pieces.close()
                        yield Cancelled(self.node_id)
                        return
                    try:
                        piece = next(pieces)
                    except StopIteration as done:
                        gens.append(done.value)
                        break
                    yield Piece(piece.text, index, tuple(piece.logprobs) if params.logprobs else ())
            except BaseException:
                pieces.close()
                raise
        with self._sessions_lock:
            self._current_session = request.session_id
            if request.session_id is not None:
                self._save_session(request.session_id)
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
        self._send_report(request.request_id, summary)
        yield Finished(
            node=self.node_id,
            choices=tuple(ChoiceEnd(i, g.finish_reason, g.n_generated) for i, g in enumerate(gens)),
            usage={"prompt_tokens": first.n_prompt_tokens, "completion_tokens": n_generated,
                   "reused_prompt_tokens": first.n_reused_tokens},
            timing={"prefill_s": first.prefill_s, "decode_s": sum(g.decode_s for g in gens)},
            cache=_request_cache_stats(gens))

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
        for summary in traces:
            self._send(self._light_report(summary))
        return len(traces)

    def report(self, request_id: str | None = None, summary: RoutingTraceSummary | None = None) -> NodeReport:
        engine = self.engine
        with self._sessions_lock:
            held = set().union(*(s.prefixes for s in self._sessions.values()))
            sessions = tuple(self._sessions)
        prefixes = tuple(sorted(set(prefix_hashes(engine.context_tokens)) | held))
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
                          warmth=warmth, prefixes=prefixes, sessions=sessions, stats=stats,
                          sent_at=time.time(), request_id=request_id, summary=summary, started_at=self.started_at)

    def _send_report(self, request_id: str | None = None, summary: RoutingTraceSummary | None = None) -> None:
        self._send(lambda: self.report(request_id, summary))

    def _send(self, report: Any) -> None:
        """Sends a report (or what a callable builds): a failure to build or to send it (the
        router restarting, the engine closing) is left for the next heartbeat, never raised."""
        if self.report_sink is None:
            return
        try:
            self.report_sink(report() if callable(report) else report)
        except Exception:
            pass

    def _heartbeat_loop(self) -> None:
        while not self._stop.wait(self.config.heartbeat_s):
            if self._serve_lock.locked():
                self._send(self._light_report)  # the engine is busy: load and liveness only
            else:
                self._send_report()

    def _light_report(self, summary: RoutingTraceSummary | None = None, request_id: str | None = None) -> NodeReport:
        """Load and liveness, and a routing-trace summary or an ended request if given; warmth and
        prefixes unchanged."""
        with self._sessions_lock:
            sessions = tuple(self._sessions)
        return NodeReport(node_id=self.node_id, load=self._n_active, capacity=self.config.max_queue, healthy=True,
                          warmth=None, prefixes=None, sessions=sessions, stats={}, sent_at=time.time(),
                          request_id=request_id, summary=summary, started_at=self.started_at)

    def ready(self) -> dict[str, Any]:
        layout = self.engine.layout
        budget = self.engine.auto_budget
        return {"node": self.node_id, "pid": os.getpid(), "n_layers": layout.n_layers, "n_experts": layout.n_experts,
                "cache_budget": budget.explain() if budget is not None else None}

    def close(self) -> None:
        self._stop.set()
        self.engine.close()


class NodeActor(NodeServer):
    """Ray shell of NodeServer: reports go to the named router actor; callers call ``stream``
    (``num_returns="streaming"``) and ``cancel`` on it directly."""

    def __init__(self, node_id: str, config: NodeConfig, namespace: str) -> None:
        self._namespace = namespace
        self._router: Any = None
        super().__init__(node_id, config, report_sink=self._to_router)

    def ready(self) -> dict[str, Any]:
        import ray

        return {**super().ready(), "ray_node_id": ray.get_runtime_context().get_node_id()}

    def _to_router(self, report: NodeReport) -> None:
        import ray

        if self._router is None:
            self._router = ray.get_actor(ROUTER_NAME, namespace=self._namespace)
        try:
            self._router.report.remote(report)
        except Exception:
            self._router = None  # looked up again next time (the router may have restarted)
            raise
