"""Messages between the processes of a deployment: frozen dataclasses, one definition each.

A request's course (DESIGN.md, "How data flows"): the caller's process renders and tokenizes it
(``cluster.distributed.edge``, from the ``ModelSource`` the router names) and asks the router with
its token ids (``RouteAsk``); the router only decides, answering with a ``Route`` that names the
node; the caller sends that node the ``NodeRequest`` and streams from it directly (``Piece``
items, then ``Finished``), so the router's work is per request, neither per token nor per byte
of prompt text, and a stream outlives the router. The caller's side announces each dispatch
with ``Routed`` and voids text with ``Restarted`` when a whole answer starts again elsewhere.
Nodes tell the router what they hold and did (``NodeReport``, with each request's
``RoutingTraceSummary``); a report naming a request also settles the router's count of requests
in flight, whatever the caller did.

Errors cross processes as the types in ``cluster.errors``. Nothing here imports Ray or llama.cpp.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Union

from cluster.engine.sampling import SamplingParams, TokenLogprob
from cluster.engine.sequence import Resume
from cluster.engine.startup import StartupPhase
from cluster.engine.trace_summary import RoutingTraceSummary

NAMESPACE = "sniper"  # the default Ray namespace of a deployment
ROUTER_NAME = "sniper-router"


def node_name(index: int) -> str:
    """The name of node actor ``index`` (``sniper-node-<index>``)."""
    return f"sniper-node-{index}"


# -- caller -> router -> caller ---------------------------------------------------------------

@dataclass(frozen=True)
class ModelSource:
    """What a caller's process needs to render and tokenize requests for a deployment
    (``RouterActor.model_source``; ``cluster.distributed.edge`` loads it once per process).

    Attributes:
        model_path: the GGUF file the nodes serve (its vocabulary and chat template are read from it).
        chat_template: the operator's chat template (Jinja text, ``serve --chat-template``); None:
            the model's own.
        n_ctx: the tokens a node's sequence holds: a prompt of ``n_ctx`` tokens or more cannot be
            served, and is refused where it enters.
    """

    model_path: str
    chat_template: str | None
    n_ctx: int


@dataclass(frozen=True)
class RouteAsk:
    """What a caller wants generated, rendered and tokenized where it entered.

    Attributes:
        request_id: unique id (the node's report settles the router's accounting by it).
        tokens: the prompt's token ids (checked against the vocabulary and the context there).
        params: sampling parameters, validated and checked against the vocabulary there (with a
            chat template's end-of-turn stop).
        session_id: the conversation this turn belongs to (its KV state may be held by a node).
        ended: requests this caller saw end since its last call: the router counts them ended
            before it chooses (so a conversation's next turn finds its node as it left it), at no
            round trip of their own.
    """

    request_id: str
    tokens: tuple[int, ...]
    params: SamplingParams
    session_id: str | None = None
    ended: tuple[str, ...] = ()

    def node_request(self, resume: Resume | None = None) -> NodeRequest:
        """What the chosen node serves (``resume``: the answer so far, continued there)."""
        return NodeRequest(self.request_id, self.tokens, self.params, self.session_id, resume)


@dataclass(frozen=True)
class NodeRequest:
    """What a node serves: the prompt as token ids (tokenized once, where the request entered);
    ``resume``: the answer so far, when a node died while streaming it and this one continues it
    (one choice only)."""

    request_id: str
    tokens: tuple[int, ...]
    params: SamplingParams
    session_id: str | None = None
    resume: Resume | None = None

    @property
    def evaluated_tokens(self) -> tuple[int, ...]:
        """What the node evaluates before it decodes: the prompt, then a resumed answer's tokens."""
        return self.tokens + (self.resume.tokens if self.resume else ())


@dataclass(frozen=True)
class Route:
    """The router's decision: serve the request on ``node_id`` (the caller sends it there).

    Attributes:
        node_id: the node actor's name.
        namespace: the Ray namespace of the deployment (where that name is looked up).
        routing: how it was chosen (``policy``, ``attempts`` and the policy's reasons), for the answer.
    """

    node_id: str
    namespace: str = NAMESPACE
    routing: dict[str, Any] = field(default_factory=dict)


# -- node -> caller -----------------------------------------------------------------------------

@dataclass(frozen=True)
class Piece:
    """Generated text of choice ``index`` (several tokens' worth when the caller reads slower than
    the node decodes), the tokens it made final (what a caller keeps to have the answer continued
    elsewhere: ``sequence.Resume``) and their log-probabilities when asked for."""

    text: str
    index: int = 0
    logprobs: tuple[TokenLogprob, ...] = ()
    tokens: tuple[int, ...] = ()


@dataclass(frozen=True)
class ChoiceEnd:
    """How one of a request's choices ended."""

    index: int
    finish_reason: str  # "stop" or "length"
    completion_tokens: int


@dataclass(frozen=True)
class Usage:
    """Tokens a request counted: its prompt (less a continued answer's tokens, which count as
    generated), what all its choices generated, and how much of the prompt a held KV state served;
    on a node running cache-aware expert selection (``cluster.engine.expert_selection``), how many
    of the request's expert selections (one per token, layer and top-k slot, over all its choices)
    that selection changed, replaced or skipped, and how many of those it skipped. Both are None
    on a node running exact selection (llama.cpp's own: nothing is ever changed)."""

    prompt_tokens: int
    completion_tokens: int
    reused_prompt_tokens: int = 0
    selections_changed: int | None = None
    selections_skipped: int | None = None

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@dataclass(frozen=True)
class Timing:
    """Seconds a request spent waiting for a slot, prefilling and decoding (the slowest choice's)."""

    queued_s: float = 0.0
    prefill_s: float = 0.0
    decode_s: float = 0.0


@dataclass(frozen=True)
class Finished:
    """The last item of a request's stream.

    Attributes:
        node: the node that served it.
        choices: every choice's end, in index order.
        usage: the tokens it counted.
        timing: where its time went.
        cache: the request's own cache counters (empty without a cache).
        routing: how the router chose the node (filled in by the caller's side).
        chat_template: a chat request's template origin (filled in by the caller's side).
    """

    node: str
    choices: tuple[ChoiceEnd, ...]
    usage: Usage
    timing: Timing = Timing()
    cache: dict[str, float] = field(default_factory=dict)
    routing: dict[str, Any] = field(default_factory=dict)
    chat_template: str | None = None

    @property
    def finish_reason(self) -> str:
        return self.choices[0].finish_reason


@dataclass(frozen=True)
class Cancelled:
    """The node stopped the request because its caller cancelled it."""

    node: str


@dataclass(frozen=True)
class Routed:
    """The caller's side sent the request to ``node`` (announced before that node's items); a chat
    request's template origin, output format and whether its prompt opened a thought
    (``cluster.distributed.edge.PreparedRequest``)."""

    node: str
    attempt: int
    chat_template: str | None = None
    chat_format: str | None = None
    thinking_open: bool = False


@dataclass(frozen=True)
class Restarted:
    """``node`` died during a whole answer: it starts again on another node; the text so far is void."""

    node: str
    reason: str


StreamItem = Union[Piece, Finished, Cancelled, Routed, Restarted]


# -- node -> router ------------------------------------------------------------------------------

@dataclass(frozen=True)
class NodeReady:
    """A node actor's answer once its model is loaded (``NodeActor.ready``).

    Attributes:
        node: the node actor's name; pid: its process.
        n_layers, n_experts: the model's MoE layers and experts per layer.
        cache_budget: how the node got its expert-cache budget (``AutoBudget.explain``), if ``"auto"``.
        ray_node_id: the Ray node it runs on.
        startup: each phase of its start-up, with its seconds (``cluster.engine.startup``), ``ready`` last.
    """

    node: str
    pid: int
    n_layers: int
    n_experts: int
    cache_budget: str | None = None
    ray_node_id: str | None = None
    startup: tuple[StartupPhase, ...] = ()


@dataclass(frozen=True)
class NodeStats:
    """A node's counters in a full report: since its process started, except where said.

    Attributes:
        served, generated_tokens: requests served and tokens generated.
        session_bytes: bytes of saved conversation KV states held now.
        slots, slots_busy, decode_batch, step_ms, experts_per_step: its batching (``MoEEngine.batch_stats``).
        hits ... prefetch_recall: its expert cache (``cache.derived_stats`` and the counters of
            csrc/telemetry.h); None without a cache.
    """

    served: int = 0
    generated_tokens: int = 0
    session_bytes: int = 0
    slots: float | None = None
    slots_busy: float | None = None
    decode_batch: float | None = None
    step_ms: float | None = None
    experts_per_step: float | None = None
    hits: float | None = None
    misses: float | None = None
    hit_rate: float | None = None
    decode_hit_rate: float | None = None
    bytes_read: float | None = None
    bytes_read_prefill: float | None = None
    bytes_read_decode: float | None = None
    n_tokens_prefill: float | None = None
    n_tokens_decode: float | None = None
    resident_bytes: float | None = None
    budget_bytes: float | None = None
    prefetch_precision: float | None = None
    prefetch_recall: float | None = None


@dataclass(frozen=True)
class NodeReport:
    """What a node tells the router: after every request (``request_id`` set: that request ended,
    however) and on every heartbeat.

    Attributes:
        node_id, load, capacity, healthy: who, how busy, how many it takes at once, alive.
        warmth: the msgpack warmth report (``cluster.engine.warmth_report``); None: unchanged since the last one.
        prefixes: prefix hashes of the KV states it holds; None: unchanged.
        sessions: conversations whose KV state it holds.
        stats: its counters (None in a light report).
        sent_at: wall clock.
        request_id: the request that ended (None for a heartbeat).
        summary: that request's routing trace summary, if it completed with a cache.
        started_at: when the node process started: a new value means it was restarted.
    """

    node_id: str
    load: int
    capacity: int
    healthy: bool
    warmth: bytes | None
    prefixes: tuple[int, ...] | None
    sessions: tuple[str, ...]
    stats: NodeStats | None
    sent_at: float
    request_id: str | None = None
    summary: RoutingTraceSummary | None = None
    started_at: float = 0.0
