"""Messages between the processes of a deployment: frozen dataclasses, one definition each.

A request's course (DESIGN.md, "How data flows"): the caller asks the router (``RouteAsk``); the
router renders and tokenizes it once, chooses a node and answers with a ``Route`` carrying the
``NodeRequest`` that node serves; the caller streams that from the node directly (``Piece`` items,
then ``Finished``), so the router's work is per request, not per token, and a stream outlives the
router. The caller's side announces each dispatch with ``Routed`` and voids text with
``Restarted`` when a whole answer starts again elsewhere. Nodes tell the router what they hold
and did (``NodeReport``, with each request's ``RoutingTraceSummary``); a report naming a request
also settles the router's count of requests in flight, whatever the caller did.

Errors cross processes as the types in ``cluster.errors``. Nothing here imports Ray or llama.cpp.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Union


from cluster.engine.chat import ChatPrompt
from cluster.engine.sampling import SamplingParams, TokenLogprob
from cluster.engine.sequence import Resume
from cluster.engine.trace_summary import RoutingTraceSummary

NAMESPACE = "sniper"  # the default Ray namespace of a deployment
ROUTER_NAME = "sniper-router"


def node_name(index: int) -> str:
    """The name of node actor ``index`` (``sniper-node-<index>``)."""
    return f"sniper-node-{index}"


# -- caller -> router -> caller ---------------------------------------------------------------

@dataclass(frozen=True)
class RouteAsk:
    """What a caller wants generated.

    Attributes:
        request_id: unique id (the node's report settles the router's accounting by it).
        params: validated sampling parameters.
        prompt: the prompt text, or None for a chat request.
        chat: a conversation the router renders with the deployment's chat template.
        session_id: the conversation this turn belongs to (its KV state may be held by a node).
        max_prompt_tokens: refuse longer prompts (``PromptTooLongError``); None: the node's context decides.
        ended: requests this caller saw end since its last call: the router counts them ended
            before it chooses (so a conversation's next turn finds its node as it left it), at no
            round trip of their own.
    """

    request_id: str
    params: SamplingParams
    prompt: str | None = None
    chat: ChatPrompt | None = None
    session_id: str | None = None
    max_prompt_tokens: int | None = None
    ended: tuple[str, ...] = ()


@dataclass(frozen=True)
class NodeRequest:
    """What a node serves: the prompt tokenized once, by the router; ``resume``: the answer so
    far, when a node died while streaming it and this one continues it (one choice only)."""

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
    """The router's answer: serve ``request`` on ``node_id``.

    Attributes:
        node_id: the node actor's name.
        namespace: the Ray namespace of the deployment (where that name is looked up).
        request: what to send it.
        routing: how it was chosen (``policy``, ``attempts`` and the policy's reasons), for the answer.
        chat_template: a chat request's template origin (``model``, ``override`` or ``none``).
    """

    node_id: str
    request: NodeRequest
    namespace: str = NAMESPACE
    routing: dict[str, Any] = field(default_factory=dict)
    chat_template: str | None = None


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
class Finished:
    """The last item of a request's stream.

    Attributes:
        node: the node that served it.
        choices: every choice's end, in index order.
        usage: ``prompt_tokens``, ``completion_tokens`` (all choices), ``reused_prompt_tokens``.
        timing: ``prefill_s``, ``decode_s``.
        cache: the request's own cache counters (empty without a cache).
        routing: how the router chose the node (filled in by the caller's side).
        chat_template: a chat request's template origin (filled in by the caller's side).
    """

    node: str
    choices: tuple[ChoiceEnd, ...]
    usage: dict[str, int]
    timing: dict[str, float] = field(default_factory=dict)
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
    """The caller's side sent the request to ``node`` (announced before that node's items)."""

    node: str
    attempt: int
    chat_template: str | None = None


@dataclass(frozen=True)
class Restarted:
    """``node`` died during a whole answer: it starts again on another node; the text so far is void."""

    node: str
    reason: str


StreamItem = Union[Piece, Finished, Cancelled, Routed, Restarted]


# -- node -> router ------------------------------------------------------------------------------

@dataclass(frozen=True)
class NodeReport:
    """What a node tells the router: after every request (``request_id`` set: that request ended,
    however) and on every heartbeat.

    Attributes:
        node_id, load, capacity, healthy: who, how busy, how many it takes at once, alive.
        warmth: the msgpack warmth report (``cluster.engine.warmth_report``); None: unchanged since the last one.
        prefixes: prefix hashes of the KV states it holds; None: unchanged.
        sessions: conversations whose KV state it holds.
        stats: cumulative counters (empty in a light report).
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
    stats: dict[str, float]
    sent_at: float
    request_id: str | None = None
    summary: RoutingTraceSummary | None = None
    started_at: float = 0.0
