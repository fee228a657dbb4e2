"""Node: one per Ray node, hosting an MoEEngine with the expert cache, serving callers directly.

``NodeServer`` is a plain class (tests drive it without Ray); ``NodeActor`` is its Ray shell,
whose reports go to the named router actor. A node:
  * decodes up to ``n_slots`` sequences together on its engine (continuous batching), with a
    bounded number of requests running or waiting (``max_queue``); a request beyond that is
    refused at once with ``OverloadedError``; a request's ``n`` choices are sequences of the
    same batch (later ones copy the prompt's KV state), its pieces tagged with their ``index``;
  * takes the prompt as token ids (tokenized once, where the request entered: ``cluster.distributed.edge``);
  * keeps conversations' KV state in the engine's slots and, when a slot goes to another
    conversation, saved within ``session_bytes`` (``cluster.engine.kv_slots``), so a conversation's
    next turn prefills only its new tokens; any request reuses the longest prefix held;
  * streams text pieces to its caller (``cluster.distributed.protocol`` items) as the engine's step loop
    makes them: decoding never waits for the transport; after the first piece, the pieces of
    each window (``coalesce_window``: longer while more requests stream, so that the node's
    messages per second do not grow with them), or all that piled up behind a slower reader, go
    as one; it stops a request's sequences when the caller cancels or goes away;
  * reports load, health, its warmth report (msgpack), the prefixes it holds and each
    request's routing trace to the router after every request (that settles the router's
    in-flight count, however the request ended) and on a heartbeat;
  * keeps the routing traces of its recent requests (``RECENT_TRACE_TOKENS`` prefilled tokens)
    and sends them again when asked (``resend_traces``): a restarted router learns its token
    affinity back from them instead of starting from nothing.
"""

from __future__ import annotations

import functools
import os
import threading
import time
from collections import deque
from dataclasses import dataclass, replace
from typing import Any, Iterator

from cluster.distributed.protocol import (
    ROUTER_NAME,
    Cancelled,
    ChoiceEnd,
    Finished,
    NodeReady,
    NodeReport,
    NodeRequest,
    NodeStats,
    Piece,
    RoutingTraceSummary,
    StreamItem,
    Timing,
    Usage,
)
from cluster.engine.expert_selection import EXACT_SELECTION, ExpertSelection
from cluster.engine.generation import selection_counts
from cluster.engine.moe_engine import EngineConfig, Generation, MoEEngine
from cluster.engine.sequence import Cancelled as SequenceCancelled
from cluster.engine.sequence import Piece as SequencePiece
from cluster.engine.startup import Startup, print_phases
from cluster.errors import InvalidParameterError, OverloadedError

RECENT_TRACE_TOKENS = 4096  # prefilled tokens whose routing-trace summaries a node keeps for a restarted router


@dataclass(frozen=True)
class NodeConfig:
    """One node's settings: the engine it runs and the node's own.

    Attributes:
        engine: the engine (model, cache budget, context, slots, threads, saved sessions, expert
            selection); build both with ``NodeConfig.create``, which applies a node's rules to its engine.
        max_queue: requests running or waiting at once (at least the engine's ``n_slots`` is useful).
        heartbeat_s: seconds between reports when idle.
        memory_limit_bytes: if set, the node puts its own process under a cgroup memory limit
            of this size before loading (emulates a RAM-limited machine; needs root).
    """

    engine: EngineConfig
    max_queue: int = 8
    heartbeat_s: float = 1.0
    memory_limit_bytes: int | None = None

    @classmethod
    def create(cls, model_path: str, *, cache_bytes: int | str | None = None, n_ctx: int = 2048, n_slots: int = 4,
               n_threads: int | None = None, session_bytes: int = 64 << 20, memory_share: float = 1.0,
               max_queue: int = 8, heartbeat_s: float = 1.0, memory_limit_bytes: int | None = None,
               expert_selection: ExpertSelection = EXACT_SELECTION) -> NodeConfig:
        """A node's config. Its engine batches at least 512 tokens a step and room for every slot's,
        and an ``"auto"`` budget leaves room for the saved conversation states (``session_bytes``);
        ``memory_share``: with ``"auto"`` and no cgroup limit, the fraction of the machine's memory
        this node plans for (node actors sharing a machine); ``expert_selection``: how the engine
        picks each token's experts (exact, or cache-aware within bounds: needs a cache). Nothing is
        checked here: ``validate``."""
        engine = EngineConfig(model_path=model_path, cache_bytes=cache_bytes, n_ctx=n_ctx, n_threads=n_threads,
                              n_slots=n_slots, n_batch=max(512, n_slots) if isinstance(n_slots, int) else 512,
                              session_bytes=session_bytes, memory_share=memory_share, memory_reserve=session_bytes,
                              expert_selection=expert_selection)
        return cls(engine, max_queue=max_queue, heartbeat_s=heartbeat_s, memory_limit_bytes=memory_limit_bytes)

    def with_engine(self, **changes: Any) -> NodeConfig:
        """This config with some engine fields changed (a node's own model file, its memory share)."""
        return replace(self, engine=replace(self.engine, **changes))

    def validate(self) -> None:
        """Checks the node's own settings and the engine's (``EngineConfig.validate``); no file is opened."""
        self.engine.validate()
        if not isinstance(self.max_queue, int) or isinstance(self.max_queue, bool) or self.max_queue < 1:
            raise InvalidParameterError(f"max_queue must be an integer >= 1, got {self.max_queue!r}", param="max_queue")
        if not isinstance(self.heartbeat_s, (int, float)) or not self.heartbeat_s > 0:
            raise InvalidParameterError(f"heartbeat_s must be > 0, got {self.heartbeat_s!r}", param="heartbeat_s")
        if self.memory_limit_bytes is not None and (not isinstance(self.memory_limit_bytes, int)
                                                    or isinstance(self.memory_limit_bytes, bool)
                                                    or self.memory_limit_bytes < 1):
            raise InvalidParameterError(f"memory_limit_bytes must be an integer >= 1 or None, "
                                        f"got {self.memory_limit_bytes!r}", param="memory_limit_bytes")


_ADDITIVE_CACHE_STATS = ("hits", "misses", "bytes_read", "bytes_read_prefill", "bytes_read_decode", "n_tokens_prefill",
                         "n_tokens_decode")
_RATE_CACHE_STATS = ("decode_hit_rate", "prefetch_precision", "prefetch_recall")


# After a request's first piece (sent at once), the pieces that come within a window go as one
# message: a Ray message costs the node, the caller and (over HTTP) the gateway CPU that a small
# machine takes from decoding. The window is COALESCE_S for each request on the node, so that the
# node sends about 1 / COALESCE_S messages a second however many requests stream (not one per
# token per request), and at most COALESCE_MAX_S, the slowest pace at which a reader sees the text
# come. The engine never waits for it; a choice's end is sent at once.
COALESCE_S = 0.02
COALESCE_MAX_S = 0.1


def coalesce_window(n_requests: int) -> float:
    """Seconds a stream gathers pieces for one message while ``n_requests`` requests are on the node."""
    return min(COALESCE_MAX_S, COALESCE_S * max(1, n_requests))


@dataclass(frozen=True)
class _ChoiceDone:
    """A choice's sequence ended: its Generation, the exception that failed it, or a cancel."""

    index: int
    outcome: Any


class _Outbox:
    """A request's items, from the engine's thread to the node's stream. The stream is woken for
    the first item it waits for and for a choice's end, not for every piece: pieces that come
    within its window wait for it (a wake-up per token would take CPU from decoding)."""

    def __init__(self) -> None:
        self._items: list[Any] = []
        self._cv = threading.Condition()
        self._waiting = False  # the stream waits for its first item

    def put(self, item: Any) -> None:
        with self._cv:
            self._items.append(item)
            if self._waiting or isinstance(item, _ChoiceDone):
                self._cv.notify()

    def take(self, window: float) -> list[Any]:
        """Waits for an item, then up to ``window`` seconds more (less if a choice ends), and
        returns every item that came."""
        with self._cv:
            self._waiting = True
            while not self._items:
                self._cv.wait()
            self._waiting = False
            deadline = time.monotonic() + window
            while not any(isinstance(i, _ChoiceDone) for i in self._items):
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                self._cv.wait(remaining)
            items, self._items = self._items, []
            return items


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
    return Piece("".join(p.text for p in run), run[0].index, tuple(lp for p in run for lp in p.logprobs),
                 tuple(t for p in run for t in p.tokens))


def _request_cache_stats(gens: list[Any]) -> dict[str, float]:
    """A request's cache counters over all its choices (rates: of its first choice)."""
    if not gens[0].cache:
        return {}
    stats = {k: sum(g.cache[k] for g in gens) for k in _ADDITIVE_CACHE_STATS if k in gens[0].cache}
    stats.update({k: gens[0].cache[k] for k in _RATE_CACHE_STATS if k in gens[0].cache})
    return stats


_BATCH_STATS = ("slots", "slots_busy", "decode_batch", "step_ms", "experts_per_step")  # NodeStats fields from the engine
_CACHE_STATS = ("hits", "misses", "hit_rate", "decode_hit_rate", "bytes_read", "bytes_read_prefill", "bytes_read_decode",
                "n_tokens_prefill", "n_tokens_decode", "resident_bytes", "budget_bytes", "prefetch_precision",
                "prefetch_recall")  # and from its cache


class NodeServer:
    """The node's logic without Ray. ``report_sink`` receives every NodeReport."""

    def __init__(self, node_id: str, config: NodeConfig, report_sink: Any = None) -> None:
        config.validate()
        self.node_id = node_id
        self.config = config
        self.started_at = time.time()
        startup = Startup(print_phases(node_id))  # a line per phase in the node's log (an auto budget's says how)
        if config.memory_limit_bytes:
            from cluster.distributed.memory_limit import MemoryLimit

            startup.begin("memory_limit")
            self._limit = MemoryLimit(f"sniper-{node_id}", config.memory_limit_bytes)
            self._limit.enter()
            startup.note(f"{config.memory_limit_bytes >> 20} MiB")
        self.engine = MoEEngine.from_config(config.engine, startup)
        self.report_sink = report_sink
        self._admit = threading.Lock()  # guards what follows
        self._n_active = 0
        self._requests: dict[str, list[Any]] = {}  # request id -> its sequences in the engine
        self._served = 0
        self._generated = 0
        self._recent_traces: deque[RoutingTraceSummary] = deque()  # oldest first
        self._recent_tokens = 0
        self._recent_lock = threading.Lock()
        self._stop = threading.Event()
        self._heartbeat = threading.Thread(target=self._heartbeat_loop, name=f"{node_id}-heartbeat", daemon=True)
        self._heartbeat.start()
        startup.ready()
        self.startup_phases = startup.phases

    # -- requests ------------------------------------------------------------------------

    def stream(self, request: NodeRequest) -> Iterator[StreamItem]:
        """Yields ``Piece`` items (of every choice, as they come), then ``Finished`` (or ``Cancelled``).

        The request's choices are sequences of the engine's batch, whose step loop hands their
        pieces over; this generator passes them on — the first piece at once, then what comes
        within its window (``coalesce_window``) or piled up meanwhile as one piece — so neither
        the transport nor a slow reader holds the engine up. Closing it (the caller went away) cancels the request.
        Raises ``OverloadedError`` at once if ``max_queue`` requests are already here.
        """
        if not isinstance(request, NodeRequest):
            raise InvalidParameterError(f"a node serves a NodeRequest, got {type(request).__name__}", param="request")
        if request.resume is not None and request.params.n != 1:
            raise InvalidParameterError(f"a resumed answer has one choice, got n={request.params.n}", param="resume")
        with self._admit:
            if self._n_active >= self.config.max_queue:
                raise OverloadedError(f"{self.node_id} has {self._n_active} requests (max_queue "
                                      f"{self.config.max_queue})")
            self._n_active += 1
        items = _Outbox()
        choices = list(request.params.choices())
        sequences: list[Any] = []
        finished = False
        reported = False  # the end-of-request report went (it settles the router's count)
        try:
            sequences = self.engine.submit_many(  # one step: later choices copy the prompt's KV state
                [(list(request.tokens), choice) for choice in choices],
                sessions=[request.session_id] + [None] * (len(choices) - 1),  # the first continues the conversation
                emits=[functools.partial(self._emit, items, i, bool(request.params.logprobs))
                       for i in range(len(choices))],
                resumes=[request.resume] + [None] * (len(choices) - 1))
            with self._admit:
                self._requests[request.request_id] = sequences
            gens: dict[int, Generation] = {}
            window = 0.0  # no wait for the first piece
            while not finished:
                batch = items.take(window)  # whatever comes within the window goes along
                window = coalesce_window(self._n_active)
                for item in _merged(batch):
                    if not isinstance(item, _ChoiceDone):
                        yield item
                        continue
                    if isinstance(item.outcome, BaseException):
                        raise item.outcome
                    if isinstance(item.outcome, SequenceCancelled):
                        finished = True
                        yield Cancelled(self.node_id)
                        break
                    gens[item.index] = item.outcome
                    if len(gens) == len(choices):
                        finished = reported = True
                        yield self._finished(request, [gens[i] for i in range(len(choices))])
                        break
        finally:
            for sequence in sequences:  # the caller closed the stream, or a choice failed: stop the others
                sequence.cancel()
            with self._admit:
                self._n_active -= 1
                self._requests.pop(request.request_id, None)
            if not reported:  # cancelled or failed: the router still settles its count by this report
                self._send(self._light_report(request_id=request.request_id))

    @staticmethod
    def _emit(items: _Outbox, index: int, logprobs: bool, item: Any) -> None:
        """A sequence's output, on the engine's thread: its pieces tagged with their choice."""
        if isinstance(item, SequencePiece):
            items.put(Piece(item.text, index, item.logprobs if logprobs else (), item.tokens))
        else:
            items.put(_ChoiceDone(index, item))

    def _finished(self, request: NodeRequest, gens: list[Generation]) -> Finished:
        """The request's end: every choice's, its routing-trace summary reported to the router."""
        first = gens[0]
        n_generated = sum(g.n_generated for g in gens)
        n_prompt = first.n_prompt_tokens - first.n_resumed  # a resumed answer's tokens count as generated
        with self._admit:
            self._served += 1
            self._generated += n_generated
        summary = None
        if first.trace is not None:
            layout = self.engine.layout
            summary = first.trace.summary(request.evaluated_tokens[first.n_reused_tokens:first.n_prompt_tokens],
                                          layout.n_layers, layout.n_experts)
            for later in gens[1:]:  # the other choices decoded on the same prompt
                summary = replace(summary, decode_counts=summary.decode_counts + later.trace.split_prefill(
                    later.n_prompt_tokens - later.n_reused_tokens, layout.n_layers, layout.n_experts)[1])
            self._remember_trace(summary)
        self._send_report(request.request_id, summary, reconcile=False)  # the next idle heartbeat reconciles
        changed = skipped = None  # exact selection: nothing to count
        if self.config.engine.expert_selection.cache_aware:
            changed, skipped = selection_counts(gens)
        return Finished(
            node=self.node_id,
            choices=tuple(ChoiceEnd(i, g.finish_reason, g.n_generated) for i, g in enumerate(gens)),
            usage=Usage(prompt_tokens=n_prompt, completion_tokens=n_generated,
                        reused_prompt_tokens=min(first.n_reused_tokens, n_prompt),
                        selections_changed=changed, selections_skipped=skipped),
            timing=Timing(queued_s=first.queued_s, prefill_s=first.prefill_s, decode_s=max(g.decode_s for g in gens)),
            cache=_request_cache_stats(gens))

    def cancel(self, request_id: str) -> None:
        """Stops a running request at the engine's next step (the caller went away)."""
        with self._admit:
            sequences = self._requests.get(request_id, [])
        for sequence in sequences:
            sequence.cancel()

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

    def report(self, request_id: str | None = None, summary: RoutingTraceSummary | None = None,
               reconcile: bool = True) -> NodeReport:
        """Everything the router learns from this node; ``reconcile``: the cache first checks what
        the kernel still holds (``MoEEngine.cache_report``)."""
        engine = self.engine
        prefixes = engine.held_prefixes()  # only what a matching prompt really reuses (the model's memory)
        batch = engine.batch_stats()
        fields: dict[str, Any] = {k: batch[k] for k in _BATCH_STATS if k in batch}
        warmth = None
        if engine.has_cache:
            cache, warmth = engine.cache_report(reconcile)
            fields.update({k: cache[k] for k in _CACHE_STATS})
        stats = NodeStats(served=self._served, generated_tokens=self._generated, session_bytes=engine.saved_bytes,
                          **fields)
        return NodeReport(node_id=self.node_id, load=self._n_active, capacity=self.config.max_queue, healthy=True,
                          warmth=warmth, prefixes=prefixes, sessions=engine.sessions(), stats=stats,
                          sent_at=time.time(), request_id=request_id, summary=summary, started_at=self.started_at)

    def _send_report(self, request_id: str | None = None, summary: RoutingTraceSummary | None = None,
                     reconcile: bool = True) -> None:
        self._send(lambda: self.report(request_id, summary, reconcile))

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
            if self.engine.n_running:
                self._send(self._light_report)  # the engine is busy: load and liveness only
            else:
                self._send_report()

    def _light_report(self, summary: RoutingTraceSummary | None = None, request_id: str | None = None) -> NodeReport:
        """Load and liveness, and a routing-trace summary or an ended request if given; warmth and
        prefixes unchanged."""
        return NodeReport(node_id=self.node_id, load=self._n_active, capacity=self.config.max_queue, healthy=True,
                          warmth=None, prefixes=None, sessions=self.engine.sessions(), stats=None, sent_at=time.time(),
                          request_id=request_id, summary=summary, started_at=self.started_at)

    def ready(self) -> NodeReady:
        layout = self.engine.layout
        budget = self.engine.auto_budget
        return NodeReady(node=self.node_id, pid=os.getpid(), n_layers=layout.n_layers, n_experts=layout.n_experts,
                         cache_budget=budget.explain() if budget is not None else None, startup=self.startup_phases)

    def warmth(self, heat: bool = False) -> bytes:
        """The cache's warmth report now, with each unit's heat if ``heat`` (the router asks for it
        when someone wants the heat map; the reports sent on their own carry none)."""
        return self.engine.warmth(heat=heat)

    def close(self) -> None:
        self._stop.set()
        self.engine.close()


def take_back_priority() -> int | None:
    """Gives every thread of this process its parent's niceness, if it has more; returns the
    niceness it took, or None where the process may not lower it (no ``CAP_SYS_NICE``).

    Ray's raylet starts worker processes 15 nicer than itself (``RAY_worker_niceness``) so that its
    own daemons come first. A node's compute threads would then give way to every other process
    on the machine (a caller, a gateway, a benchmark's own llama-server), and as ggml's threads
    wait for each other at every operation, one preempted thread holds the whole step up. Linux
    nices threads one by one: each is set, and the threads started later inherit it.
    """
    try:
        target = os.getpriority(os.PRIO_PROCESS, os.getppid())  # the raylet, which started this worker
        threads = [int(tid) for tid in os.listdir("/proc/self/task")]
    except (OSError, AttributeError):  # no /proc, or not Linux
        return None
    for tid in threads:
        try:
            if os.getpriority(os.PRIO_PROCESS, tid) > target:
                os.setpriority(os.PRIO_PROCESS, tid, target)
        except ProcessLookupError:  # the thread ended meanwhile
            continue
        except PermissionError:
            return None
    return target


class NodeActor(NodeServer):
    """Ray shell of NodeServer: reports go to the named router actor; callers call ``stream``
    (``num_returns="streaming"``) and ``cancel`` on it directly. Its process runs at its raylet's
    niceness, not Ray's worker niceness (``take_back_priority``), before the engine starts its threads."""

    def __init__(self, node_id: str, config: NodeConfig, namespace: str) -> None:
        take_back_priority()
        self._namespace = namespace
        self._router: Any = None
        super().__init__(node_id, config, report_sink=self._to_router)

    def ready(self) -> NodeReady:
        import ray

        return replace(super().ready(), ray_node_id=ray.get_runtime_context().get_node_id())

    def _to_router(self, report: NodeReport) -> None:
        import ray

        if self._router is None:
            self._router = ray.get_actor(ROUTER_NAME, namespace=self._namespace)
        try:
            self._router.report.remote(report)
        except Exception:
            self._router = None  # looked up again next time (the router may have restarted)
            raise
