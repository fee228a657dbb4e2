"""``python -m cluster bench simulate``: routing policies on a simulated cluster of many nodes.

No llama.cpp runs during the simulation. Routing traces are recorded once from a small model
(``record_traces``: an MoEEngine serves each turn of a workload's conversations from an empty
context, so every trace covers the whole prompt); then each policy serves the same workload
on N simulated nodes, each with the real policy core of the expert cache
(``cluster.engine.cache.CachePolicy``) at the same budget, routed by the real ``RouterCore`` and
policy. Per request:
  1. the router ranks the nodes (``RouterCore.choose``) from the NodeViews it built out of the
     nodes' last reports (warmth encoded with ``cluster.engine.warmth_report``, as a live node sends it);
  2. the chosen node queues the request (one at a time, first come first served). When it
     starts, it reuses KV state exactly as ``NodeServer`` and ``MoEEngine`` do — a saved
     session of the conversation, else the longest common prefix with its context — and its
     CachePolicy replays the turn's trace without the reused prompt tokens (``trim_prefill``);
  3. at completion the node reports (warmth, held prefixes, the request's
     ``RoutingTraceSummary`` from ``RoutingTrace.summary``) to the router.

Service-time model (``ServiceModel``): a request occupies its node for
``n_prefilled * prefill_s_per_token + n_generated * decode_s_per_token + bytes_read /
read_bytes_per_s`` seconds — compute per token, plus the expert bytes the cache read for it
at a disk's bandwidth. The router counts load as the actor does (requests routed to a node
and not finished); simulated nodes heartbeat every ``HEARTBEAT_S`` seconds of simulated time,
busy or not, so none times out. A node keeps at most ``max_sessions`` saved conversations
(least recently used out; the real node bounds them by bytes).
"""

from __future__ import annotations

import heapq
import json
import os
import random
import time
from collections import Counter, deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from cluster.bench import command_line, log_progress, out_flag, percentile
from cluster.bench.workload import Turn, Workload, conversation_prompt, for_model, poisson_arrivals
from cluster.engine.cache import TRACE_ACCESS, TRACE_PREDICT, TRACE_STEP, CacheConfig, CachePolicy, RoutingTrace, discover_layout
from cluster.errors import OverloadedError
from cluster.engine.kv_slots import KvSlots, SavedState, Slot
from cluster.distributed.protocol import NodeReport, node_name
from cluster.distributed.router import RouterCore
from cluster.distributed.status import RouterStatus
from cluster.routing.base import RouteRequest, RoutingTraceSummary
from cluster.engine.prefix import held_prefixes
from cluster.engine.warmth_report import encode as encode_warmth

HEARTBEAT_S = 1.0
RETRY_S = 0.05
TRACE_FORMAT_VERSION = 1



@dataclass(frozen=True)
class ServiceModel:
    """How long a simulated node is busy with one request (see the module docstring).

    Attributes:
        prefill_s_per_token: seconds per prompt token prefilled (>= 0).
        decode_s_per_token: seconds per generated token (>= 0).
        read_bytes_per_s: disk bandwidth for the expert bytes the cache reads (> 0).
    """

    prefill_s_per_token: float = 0.002
    decode_s_per_token: float = 0.02
    read_bytes_per_s: float = 1e9

    def service_s(self, n_prefilled: int, n_generated: int, bytes_read: int) -> float:
        return (n_prefilled * self.prefill_s_per_token + n_generated * self.decode_s_per_token
                + bytes_read / self.read_bytes_per_s)


# -- recorded traces -----------------------------------------------------------------------

@dataclass(frozen=True)
class RecordedTurn:
    """One turn as served from an empty context.

    Attributes:
        turn: the workload's turn.
        tokens: the whole prompt sent (conversation so far + this turn's text), BOS included.
        context_tokens: what the context holds afterwards (prompt and answer).
        n_generated: tokens generated.
        trace: the routing trace (every prompt token prefilled, then the decode).
    """

    turn: Turn
    tokens: tuple[int, ...]
    context_tokens: tuple[int, ...]
    n_generated: int
    trace: RoutingTrace


@dataclass(frozen=True)
class TraceSet:
    """Recorded turns (arrival order) and the model's shape."""

    model: str
    n_layers: int
    n_experts: int
    n_experts_used: int
    unit_bytes: np.ndarray  # uint64 [L, E]
    turns: tuple[RecordedTurn, ...]
    workload: dict[str, Any]

    def save(self, path: str | os.PathLike[str]) -> None:
        """Writes an ``.npz`` that ``TraceSet.load`` reads back."""
        def flat(seqs: Sequence[Sequence[int]], dtype: Any) -> tuple[np.ndarray, np.ndarray]:
            lengths = np.array([len(s) for s in seqs], dtype=np.int64)
            values = np.concatenate([np.asarray(s, dtype=dtype) for s in seqs]) if seqs else np.zeros(0, dtype)
            return values, lengths

        meta = {"version": TRACE_FORMAT_VERSION, "model": self.model, "n_layers": self.n_layers,
                "n_experts": self.n_experts, "n_experts_used": self.n_experts_used, "workload": self.workload,
                "turns": [{"conversation": r.turn.conversation, "index": r.turn.index, "prompt": r.turn.prompt,
                           "arrival_s": r.turn.arrival_s, "domain": r.turn.domain, "n_generated": r.n_generated,
                           "n_dropped": r.trace.n_dropped} for r in self.turns]}
        arrays: dict[str, np.ndarray] = {"meta": np.frombuffer(json.dumps(meta).encode("utf-8"), dtype=np.uint8),
                                         "unit_bytes": np.asarray(self.unit_bytes, dtype=np.uint64)}
        arrays["tokens"], arrays["tokens_len"] = flat([r.tokens for r in self.turns], np.int32)
        arrays["context"], arrays["context_len"] = flat([r.context_tokens for r in self.turns], np.int32)
        for name, dtype in (("kind", np.uint8), ("layer", np.int32), ("n_tokens", np.int32), ("n_ids", np.int32),
                            ("ids", np.int32)):
            arrays[f"trace_{name}"], arrays[f"trace_{name}_len"] = flat([getattr(r.trace, name) for r in self.turns],
                                                                        dtype)
        with open(path, "wb") as f:
            np.savez_compressed(f, **arrays)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> "TraceSet":
        """Reads a file written by ``save``.

        Raises:
            ValueError: missing file, or not a trace set of this version.
        """
        if not os.path.isfile(path):
            raise ValueError(f"trace file not found: '{path}'")
        try:
            with np.load(path, allow_pickle=False) as data:
                arrays = {k: data[k] for k in data.files}
            meta = json.loads(arrays["meta"].tobytes().decode("utf-8"))
        except Exception as exc:  # zip, npy and JSON errors all mean "not a trace set"
            raise ValueError(f"'{path}' is not a trace set written by --save-traces: "
                             f"{type(exc).__name__}: {exc}") from None
        if meta.get("version") != TRACE_FORMAT_VERSION:
            raise ValueError(f"'{path}': trace set version {meta.get('version')!r}, expected {TRACE_FORMAT_VERSION}")

        def split(name: str) -> list[np.ndarray]:
            bounds = np.cumsum(arrays[f"{name}_len"])[:-1]
            return np.split(arrays[name], bounds) if len(arrays[f"{name}_len"]) else []

        tokens, context = split("tokens"), split("context")
        parts = {name: split(f"trace_{name}") for name in ("kind", "layer", "n_tokens", "n_ids", "ids")}
        turns = []
        for i, t in enumerate(meta["turns"]):
            trace = RoutingTrace(**{name: parts[name][i] for name in parts}, n_dropped=t["n_dropped"])
            turn = Turn(t["conversation"], t["index"], t["prompt"], t["arrival_s"], t["domain"])
            turns.append(RecordedTurn(turn, tuple(int(x) for x in tokens[i]), tuple(int(x) for x in context[i]),
                                      t["n_generated"], trace))
        return cls(meta["model"], meta["n_layers"], meta["n_experts"], meta["n_experts_used"], arrays["unit_bytes"],
                   tuple(turns), meta["workload"])

    def head(self, n_requests: int) -> "TraceSet":
        return TraceSet(self.model, self.n_layers, self.n_experts, self.n_experts_used, self.unit_bytes,
                        self.turns[:n_requests], self.workload)


def record_traces(model_path: str, workload: Workload, *, max_tokens: int, progress: bool = False) -> TraceSet:
    """Serves every turn from an empty context on one engine and keeps its trace.

    The answer each turn got is part of the next turn's prompt (``conversation_prompt``).
    A conversation whose next prompt would not fit the context ends there.
    """
    from cluster.engine.moe_engine import MoEEngine
    from cluster.errors import PromptTooLongError

    layout = discover_layout(model_path)
    histories: dict[str, list[tuple[str, str]]] = {}
    ended: set[str] = set()
    recorded = []
    t0 = time.perf_counter()
    # one thread: a trace does not depend on it, and spinning threads on a busy machine cost more than they give
    with MoEEngine(model_path, int(layout.unit_bytes.sum() * 1.05), n_ctx=2048, n_threads=1, predict="always") as engine:
        for i, turn in enumerate(workload.turns):
            if turn.conversation in ended:
                continue
            history = histories.setdefault(turn.conversation, [])
            prompt = conversation_prompt(history, turn.prompt)
            engine.clear_kv()  # an empty context: the trace covers the whole prompt
            try:
                gen = engine.generate(prompt, max_tokens=max_tokens)
            except PromptTooLongError:
                ended.add(turn.conversation)
                continue
            history.append((turn.prompt, gen.text))
            recorded.append(RecordedTurn(turn, tuple(engine.tokenize(prompt)), engine.context_tokens,
                                         gen.n_generated, gen.trace))
            if progress and (i + 1) % 256 == 0:
                log_progress(progress, f"  recorded {i + 1}/{len(workload.turns)} turns ({time.perf_counter() - t0:.0f} s)")
    return TraceSet(model_path, layout.n_layers, layout.n_experts, layout.n_experts_used,
                    np.asarray(layout.unit_bytes, dtype=np.uint64), tuple(recorded),
                    {**workload.describe(), "max_tokens": max_tokens, "n_recorded": len(recorded)})


def trim_prefill(trace: RoutingTrace, n_prompt: int, n_skip: int) -> RoutingTrace:
    """The trace a node sees when the KV state of the prompt's first ``n_skip`` tokens is reused.

    Prefill steps (``RoutingTrace.steps``) keep only the rows of tokens at positions >= n_skip (a
    layer that kept fewer rows, as llama.cpp's last layer does, keeps its last rows); a prefill
    step left with no token is dropped with its predictions; decode steps are unchanged.
    """
    if n_skip <= 0:
        return trace
    steps = trace.steps()
    if not len(steps.rows):
        return trace
    offsets = trace.offsets()
    starts = steps.starts
    keep_rows = np.asarray(trace.n_tokens, dtype=np.int64).copy()
    for i in range(len(trace)):
        start, end = int(starts[steps.index[i]]), int(starts[steps.index[i] + 1])
        if start >= n_prompt:
            continue  # decode steps are unchanged
        if trace.kind[i] == TRACE_PREDICT:
            keep_rows[i] = 0 if end <= n_skip else keep_rows[i]  # made inside a step not evaluated any more
        else:  # an access keeps its last rows (the last layer may have fewer); a step counts what is left
            keep_rows[i] = max(0, min(int(trace.n_tokens[i]), end - n_skip))
    kept = keep_rows > 0
    ids = []
    for i in np.flatnonzero(kept):
        chunk = trace.ids[offsets[i]:offsets[i + 1]]
        if trace.kind[i] == TRACE_ACCESS:
            k = int(trace.n_ids[i]) // int(trace.n_tokens[i])
            chunk = chunk[len(chunk) - int(keep_rows[i]) * k:]
        elif trace.kind[i] == TRACE_STEP and keep_rows[i] != trace.n_tokens[i]:
            chunk = np.array([0, keep_rows[i]], dtype=np.int32)  # a prefill step, fewer rows
        ids.append(chunk)
    n_tokens = np.where(trace.kind != TRACE_PREDICT, keep_rows, trace.n_tokens)[kept].astype(np.int32)
    n_ids = np.array([len(c) for c in ids], dtype=np.int32)
    return RoutingTrace(kind=trace.kind[kept], layer=trace.layer[kept], n_tokens=n_tokens, n_ids=n_ids,
                        ids=np.concatenate(ids).astype(np.int32) if ids else np.zeros(0, np.int32),
                        n_dropped=trace.n_dropped)


# -- simulated node ------------------------------------------------------------------------

class SimNode:
    """A node without llama.cpp, serving one request at a time: KV reuse by the engine's own rules
    (``cluster.engine.kv_slots``, one slot, at most ``max_sessions`` saved conversations), expert cache as
    CachePolicy."""

    def __init__(self, node_id: str, traces: TraceSet, cache_bytes: int, *, capacity: int, max_sessions: int) -> None:
        self.node_id = node_id
        self.capacity = capacity
        self.max_sessions = max_sessions
        self.cache = CachePolicy(traces.n_layers, traces.n_experts, traces.unit_bytes,
                                 CacheConfig(budget_bytes=int(cache_bytes)), traces.n_experts_used)
        self.n_layers, self.n_experts = traces.n_layers, traces.n_experts
        self.kv = KvSlots(1, session_bytes=max_sessions)  # a saved conversation counts 1 "byte"
        self.queue: deque[tuple[int, str]] = deque()  # (turn index, request id)
        self.busy = False
        self.last_report_s = -1e9
        self._warmth: bytes | None = None
        self._prefixes: tuple[int, ...] | None = None

    def _start(self, tokens: Sequence[int], session: str | None) -> Slot:
        """Where the request starts (as MoEEngine does); returns its slot, with its reused tokens."""
        placement = self.kv.place(tokens, session)
        assert placement is not None, "a simulated node serves one request at a time"
        if placement.save is not None:
            self.kv.store(placement.save, SavedState(tuple(placement.slot.tokens), n_bytes=1))
        self.kv.occupy(placement, tokens, session)
        self._prefixes = None
        return placement.slot

    def serve(self, recorded: RecordedTurn) -> dict[str, Any]:
        """Replays one request; returns its cache counters delta, reuse and summary."""
        session = recorded.turn.conversation
        n_prompt = len(recorded.tokens)
        slot = self._start(recorded.tokens, session)
        reused = len(slot.tokens)
        trace = trim_prefill(recorded.trace, n_prompt, reused)
        before = self.cache.counters()
        self.cache.replay(trace)
        after = self.cache.counters()
        delta = {k: after[k] - before[k] for k in after}
        slot.tokens = list(recorded.context_tokens)
        self.kv.release(slot, keep=True)
        self._warmth = None
        summary = trace.summary(recorded.tokens[reused:], self.n_layers, self.n_experts)
        return {"counters": delta, "reused": reused, "n_prefilled": n_prompt - reused, "summary": summary}

    def report(self, now: float, load: int, request_id: str | None = None,
               summary: RoutingTraceSummary | None = None) -> NodeReport:
        if self._warmth is None:
            resident, _ = self.cache.warmth()
            self._warmth = encode_warmth(resident, resident_bytes=self.cache.resident_bytes)  # as a node sends it
        if self._prefixes is None:
            held = self.kv.held()
            self._prefixes = held_prefixes(held)
        self.last_report_s = now
        return NodeReport(node_id=self.node_id, load=load, capacity=self.capacity, healthy=True, warmth=self._warmth,
                          prefixes=self._prefixes, sessions=self.kv.sessions(), stats=None, sent_at=now,
                          request_id=request_id, summary=summary)


# -- simulation ----------------------------------------------------------------------------

def simulate(traces: TraceSet, policy: str, *, n_nodes: int, cache_bytes: int, service: ServiceModel = ServiceModel(),
             arrivals: Sequence[float] | None = None, capacity: int = 8, max_sessions: int = 64,
             seed: int = 0, policy_knobs: dict[str, Any] | None = None) -> dict[str, Any]:
    """Serves the recorded turns on ``n_nodes`` simulated nodes routed by ``policy``.

    Args:
        traces: recorded turns (arrival order).
        policy: a routing policy name.
        n_nodes: simulated nodes.
        cache_bytes: each node's expert-cache budget.
        service: the service-time model.
        arrivals: arrival time per turn (default: the recorded ones).
        capacity: requests a node accepts at once (NodeConfig.max_queue).
        max_sessions: saved conversations per node.
        seed: the policy's random generator (ties).
        policy_knobs: keyword arguments of the policy (e.g. ``load_slack`` for warmth).

    Returns:
        The same per-policy metrics as the live benchmark, in simulated time, plus
        ``decision_us_p50/p99`` (wall time of RouterCore.choose).
    """
    if n_nodes < 1:
        raise ValueError(f"n_nodes must be >= 1, got {n_nodes}")
    arrivals = [r.turn.arrival_s for r in traces.turns] if arrivals is None else list(arrivals)
    if len(arrivals) != len(traces.turns):
        raise ValueError(f"{len(arrivals)} arrival times for {len(traces.turns)} turns")
    now = 0.0
    core = RouterCore(policy, clock=lambda: now, rng=random.Random(seed), **(policy_knobs or {}))
    nodes = {node_name(i): SimNode(node_name(i), traces, cache_bytes, capacity=capacity, max_sessions=max_sessions)
             for i in range(n_nodes)}
    for node in nodes.values():
        core.on_report(node.report(now, 0))

    by_conv: dict[str, list[int]] = {}
    for i, r in enumerate(traces.turns):
        by_conv.setdefault(r.turn.conversation, []).append(i)
    next_of = {i: (turns[j + 1] if j + 1 < len(turns) else None)  # a conversation's next turn
               for turns in by_conv.values() for j, i in enumerate(turns)}
    events: list[tuple[float, int, str, Any]] = []
    seq = 0

    def push(t: float, kind: str, payload: Any) -> None:
        nonlocal seq
        heapq.heappush(events, (t, seq, kind, payload))
        seq += 1

    for turns in by_conv.values():
        push(arrivals[turns[0]], "arrive", turns[0])

    outcomes: list[dict[str, Any]] = []
    decision_s: list[float] = []
    sent_at: dict[int, float] = {}
    n_retries = 0

    def start(node: SimNode) -> None:
        index, request_id = node.queue.popleft()
        node.busy = True
        served = node.serve(traces.turns[index])
        c = served["counters"]
        busy_s = service.service_s(served["n_prefilled"], traces.turns[index].n_generated,
                                   c["bytes_read_prefill"] + c["bytes_read_decode"])
        push(now + busy_s, "done", (node.node_id, index, request_id, served))

    while events:
        now, _, kind, payload = heapq.heappop(events)
        if kind == "arrive":
            index = payload
            recorded = traces.turns[index]
            sent_at.setdefault(index, now)
            for node in nodes.values():  # heartbeats (lazily: the router only looks when it chooses)
                if now - node.last_report_s >= HEARTBEAT_S:
                    core.on_report(node.report(now, core.nodes[node.node_id].in_flight))
            request_id = f"r{index}"
            route = RouteRequest(request_id=request_id, tokens=recorded.tokens, session_id=recorded.turn.conversation)
            t0 = time.perf_counter()
            try:
                ranked = core.choose(route, set())
            except OverloadedError:
                n_retries += 1
                push(now + RETRY_S, "arrive", index)
                continue
            decision_s.append(time.perf_counter() - t0)
            node_id = ranked[0]
            core.policy.on_routed(route, node_id)
            core.acquire(node_id, request_id)
            node = nodes[node_id]
            node.queue.append((index, request_id))
            if not node.busy:
                start(node)
        else:
            node_id, index, request_id, served = payload
            node = nodes[node_id]
            core.release(request_id)
            state = core.nodes[node_id]
            state.served += 1
            node.busy = False
            core.on_report(node.report(now, state.in_flight, request_id, served["summary"]))
            recorded = traces.turns[index]
            c = served["counters"]
            outcomes.append({"node": node_id, "latency_s": now - sent_at[index], "done_s": now,
                             "n_generated": recorded.n_generated, "n_prompt": len(recorded.tokens),
                             "reused": served["reused"], **c})
            if node.queue:
                start(node)
            following = next_of[index]
            if following is not None:
                push(max(now, arrivals[following]), "arrive", following)

    status = core.status()
    result = _summarise(outcomes, status)
    result.update({
        "n_nodes": n_nodes,
        "cache_bytes": int(cache_bytes),
        "sim_duration_s": max((o["done_s"] for o in outcomes), default=0.0),
        "overloaded_retries": n_retries,
        "decision_us_p50": 1e6 * percentile(decision_s, 50) if decision_s else None,
        "decision_us_p99": 1e6 * percentile(decision_s, 99) if decision_s else None,
    })
    result["tok_s"] = (sum(o["n_generated"] for o in outcomes) / result["sim_duration_s"]
                       if result["sim_duration_s"] > 0 else None)
    return result


def _summarise(outcomes: list[dict[str, Any]], status: RouterStatus) -> dict[str, Any]:
    """Per-policy metrics from per-request cache counters (shared shape with the live benchmark)."""
    def total(key: str) -> int:
        return int(sum(o[key] for o in outcomes))

    hits = total("n_hits_prefill") + total("n_hits_decode")
    misses = total("n_misses_prefill") + total("n_misses_decode")
    decode = total("n_hits_decode") + total("n_misses_decode")
    generated = total("n_generated")
    read_prefill, read_decode = total("bytes_read_prefill"), total("bytes_read_decode")
    latencies = [o["latency_s"] for o in outcomes]
    per_node = Counter(o["node"] for o in outcomes)
    counts = np.array([per_node.get(n.name, 0) for n in status.nodes], dtype=float)
    status_json = status.as_json()
    return {
        "n_requests": len(outcomes),
        "hit_rate": hits / (hits + misses) if hits + misses else None,
        "decode_hit_rate": total("n_hits_decode") / decode if decode else None,
        "bytes_read_per_token": (read_prefill + read_decode) / generated if generated else None,
        "bytes_read_per_token_prefill": read_prefill / total("n_tokens_prefill") if total("n_tokens_prefill") else None,
        "bytes_read_per_token_decode": read_decode / total("n_tokens_decode") if total("n_tokens_decode") else None,
        "bytes_read": read_prefill + read_decode,
        "generated_tokens": generated,
        "reused_prompt_fraction": total("reused") / total("n_prompt") if total("n_prompt") else None,
        "p50_latency_s": percentile(latencies, 50),
        "p99_latency_s": percentile(latencies, 99),
        "requests_per_node": {n.name: per_node[n.name] for n in status.nodes if per_node.get(n.name)},
        "node_spread": {"nodes_used": int((counts > 0).sum()), "max": int(counts.max()) if counts.size else 0,
                        "mean": float(counts.mean()) if counts.size else 0.0,
                        "cv": float(counts.std() / counts.mean()) if counts.size and counts.mean() else None},
        "prediction_precision": status.prediction.precision,
        "prediction_recall": status.prediction.recall,
        "decision_audit": status_json["decision_audit"],
        "decisions": status_json["decisions"],
        "errors": 0,  # a simulated node never fails
    }


def static_oracle_floor(traces: TraceSet, cache_bytes: int) -> dict[str, Any] | None:
    """The decode misses no routing could avoid with caches of ``cache_bytes``, on the best of terms.

    Each domain gets a node of its own whose cache holds, chosen in hindsight, the units its
    decode steps selected most (as many as fit the budget): a static cache that knows the whole
    trace. The share of decode selections outside those units bounds what routing alone can
    achieve with static caches (a cache that adapts within a conversation, with read-ahead counted
    as hits, can go a little below it); None when the turns carry no domain.
    """
    unit_bytes = np.asarray(traces.unit_bytes, dtype=np.int64).reshape(-1)
    by_domain: dict[str, np.ndarray] = {}
    for recorded in traces.turns:
        domain = recorded.turn.domain
        if domain is None:
            return None
        _, decode = recorded.trace.split_prefill(len(recorded.tokens), traces.n_layers, traces.n_experts)
        by_domain[domain] = by_domain.get(domain, 0) + np.asarray(decode, dtype=np.int64).reshape(-1)
    misses: dict[str, float] = {}
    total_missed = total = 0
    for domain, counts in sorted(by_domain.items()):
        order = np.argsort(-counts, kind="stable")
        held = order[np.cumsum(unit_bytes[order]) <= cache_bytes]
        missed = int(counts.sum() - counts[held].sum())
        misses[domain] = missed / counts.sum() if counts.sum() else 0.0
        total_missed += missed
        total += int(counts.sum())
    return {"decode_miss_rate": total_missed / total if total else None, "by_domain": misses,
            "n_domains": len(by_domain)}


def run_simulate_bench(model: str | None, out_dir: Path | None, *, traces_path: str | None = None,
                       save_traces: str | None = None, n_nodes: int = 256, policies: Sequence[str] = (),
                       n_requests: int | None = None, rate: float | None = None, cache_mb: int | None = None,
                       max_tokens: int | None = None, seed: int = 0, quick: bool = False,
                       warmth_knobs: dict[str, Any] | None = None, progress: bool = True) -> dict[str, Any]:
    """Records (or loads) traces, simulates each policy on ``n_nodes`` nodes, writes the report.

    ``warmth_knobs`` are keyword arguments of the warmth policy (the other policies have none).
    """
    from cluster.engine.node_memory import MIB
    from cluster.models.synth import default_model

    policies = list(policies) or ["warmth", "least_loaded", "round_robin"]
    n_requests = n_requests or (256 if quick else 2048)
    max_tokens = max_tokens or 24
    service = ServiceModel()
    if rate is None:  # about a third of the cluster's service capacity
        rate = 0.5 * n_nodes
    if traces_path:
        log_progress(progress, f"loading traces from {traces_path}")
        traces = TraceSet.load(traces_path).head(n_requests)
    else:
        model_path = model or str(default_model("tiny", progress=progress))
        workload = for_model(model_path, None, n_requests, rate=rate, seed=seed, max_open=max(4, n_nodes))
        log_progress(progress, f"recording {len(workload.turns)} turns from {model_path} (llama.cpp, once)")
        t0 = time.perf_counter()
        traces = record_traces(model_path, workload, max_tokens=max_tokens, progress=progress)
        log_progress(progress, f"  recorded in {time.perf_counter() - t0:.0f} s")
        if save_traces:
            traces.save(save_traces)
    arrivals = poisson_arrivals(len(traces.turns), rate, seed)
    unit_bytes = np.asarray(traces.unit_bytes, dtype=np.int64)
    cache_bytes = cache_mb * MIB if cache_mb else int(unit_bytes.sum()) // 3
    recorded = traces_path is None
    command = command_line("simulate", [
        ("--nodes", n_nodes), ("--traces", traces_path), ("--model", model if recorded else None),
        ("--save-traces", save_traces if recorded else None), ("--policies", ",".join(policies)),
        ("--requests", n_requests), ("--rate", f"{rate:g}"), ("--cache-mb", cache_mb or None),
        ("--max-tokens", max_tokens if recorded else None), ("--seed", seed), ("--out", out_flag(out_dir)), ("--quick", quick),
        *(("--warmth-knob", f"{k}={v}") for k, v in (warmth_knobs or {}).items())])
    result: dict[str, Any] = {
        "command": command,
        "started": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
        "model": {"path": traces.model, "n_layers": traces.n_layers, "n_experts": traces.n_experts,
                  "n_experts_used": traces.n_experts_used, "expert_bytes": int(unit_bytes.sum())},
        "workload": {**traces.workload, "rate_per_s": rate, "n_requests": len(traces.turns)},
        "service_model": {"prefill_s_per_token": service.prefill_s_per_token,
                          "decode_s_per_token": service.decode_s_per_token,
                          "read_bytes_per_s": service.read_bytes_per_s},
        "nodes": n_nodes,
        "cache_bytes_per_node": cache_bytes,
        "warmth_knobs": dict(warmth_knobs or {}),
        "policies": {},
        "static_oracle": static_oracle_floor(traces, cache_bytes),
    }
    for policy in policies:
        log_progress(progress, f"simulating {policy} on {n_nodes} nodes")
        t0 = time.perf_counter()
        r = simulate(traces, policy, n_nodes=n_nodes, cache_bytes=cache_bytes, service=service, arrivals=arrivals,
                     seed=seed, policy_knobs=warmth_knobs if policy == "warmth" else None)
        r["wall_s"] = time.perf_counter() - t0
        result["policies"][policy] = r
        log_progress(progress, f"  hit rate {r['hit_rate']:.3f}, {r['bytes_read_per_token'] / MIB:.2f} MiB read/token, "
                       f"p99 latency {r['p99_latency_s']:.2f} s ({r['wall_s']:.0f} s wall)")
    from cluster.bench.routing_report import targets, write_simulate_report

    result["targets"] = targets(result["policies"])
    if out_dir is not None:
        result["report"] = str(write_simulate_report(result, out_dir))
    return result
