"""The caller's side of a request: ask the router for a node, stream from that node, retry elsewhere.

One helper for the Python client and the HTTP gateway: ``request_events`` renders and tokenizes
the request in this process (``cluster.distributed.edge``: the router receives token ids and only
decides), then yields ``cluster.distributed.protocol`` items — ``Routed`` at each dispatch, the
node's ``Piece`` items, then ``Finished`` (with the router's ``routing`` and the edge's
``chat_template`` filled in) — and handles what can go wrong between the three processes:

* the node refuses (``OverloadedError``) or dies before it sent text: the router is told
  (``failed``) and asked again without that node;
* the node dies after it sent text: the router is asked for another node, which continues the
  same answer (``sequence.Resume``: the prompt, then the tokens the pieces carried so far, the
  same parameters, the rest of the token budget): the caller sees one answer, no piece repeated
  or missing, usage counting each token once, a greedy answer identical to an undisturbed one.
  While no node can take it the caller waits (up to ``ROUTER_WAIT_S``: the lost node may be
  restarting). Only an answer of several choices cannot be continued: it starts again elsewhere
  if ``restartable`` (a ``Restarted`` item voids the text so far), else ``NodeFailedError``;
* every failure reaches the caller in our words, naming the node and what happened; Ray's
  exception text and actor ids go to this process's log;
* the router does not answer (restarting, or gone): the ask is repeated for up to
  ``ROUTER_WAIT_S``, then ``RouterUnavailableError``; a stream already under way does not need
  the router and goes on;
* the caller stops reading (closes or cancels the iteration): the node is told to cancel.

Errors raised in the router or a node arrive wrapped by Ray; they are unwrapped by type
(``unwrap``), never matched by their text.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from typing import Any, AsyncIterator, Callable

from cluster.errors import NodeFailedError, NoNodesError, OverloadedError, RouterUnavailableError, SniperError
from cluster.distributed.edge import Edge, PreparedRequest, PromptRequest
from cluster.distributed.protocol import ROUTER_NAME, Finished, Piece, Restarted, Route, RouteAsk, Routed, StreamItem
from cluster.distributed.status import RouterStatus
from cluster.engine.sequence import Resume

log = logging.getLogger(__name__)

ROUTER_WAIT_S = 30.0  # how long an ask waits for a router that does not answer (a restart takes seconds)
ROUTER_RETRY_S = 0.25


def unwrap(exc: BaseException) -> BaseException:
    """The error a router or node raised on purpose (``SniperError``, ``ValueError``), from Ray's wrapper."""
    cause = getattr(exc, "cause", None)
    return cause if isinstance(cause, (SniperError, ValueError)) else exc


def _actor_gone(exc: BaseException) -> bool:
    """The actor died, is restarting, or cannot be found (Ray's errors for each)."""
    import ray

    return isinstance(exc, (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError))


class Deployment:
    """The caller's view of a deployment: the router's handle and the node actors' handles,
    looked up by name once (off the event loop: a lookup is a round trip to Ray's GCS)."""

    def __init__(self, namespace: str | None = None, router: Any = None, router_wait_s: float = ROUTER_WAIT_S,
                 model_path: str | None = None) -> None:
        self._namespace = namespace  # None: the namespace this process joined Ray with
        self._router = router
        self.router_wait_s = router_wait_s
        self._model_path = model_path  # a local copy of the deployment's model file (None: its own path)
        self._edge: Edge | None = None
        self._nodes: dict[str, Any] = {}
        self._ended: list[str] = []  # requests seen to end, not told to the router yet

    @property
    def namespace(self) -> str:
        import ray

        return self._namespace or ray.get_runtime_context().namespace

    async def _lookup(self, name: str, namespace: str | None = None) -> Any:
        import ray

        return await asyncio.to_thread(ray.get_actor, name, namespace=namespace or self.namespace)

    async def router(self, refresh: bool = False) -> Any:
        if self._router is None or refresh:
            self._router = await self._lookup(ROUTER_NAME)
            self._edge = None  # a router deployed anew may serve another model: asked again at the next request
        return self._router

    async def node(self, node_id: str, namespace: str) -> Any:
        """The handle of node actor ``node_id`` of the deployment in ``namespace`` (the router's
        answer names it: a caller given only the router's handle need not know it, and learns it
        for looking the router up again after a restart)."""
        self._namespace = self._namespace or namespace
        handle = self._nodes.get(node_id)
        if handle is None:
            handle = self._nodes[node_id] = await self._lookup(node_id, namespace)
        return handle

    async def edge(self) -> Edge:
        """The deployment's vocabulary and chat renderer in this process, loaded when first needed
        from what the router names (``cluster.distributed.edge``)."""
        if self._edge is None:
            source = await self.call_router(lambda router: router.model_source.remote(), "model_source")
            self._edge = await asyncio.to_thread(Edge.load, source, self._model_path)  # a file read: off the loop
        return self._edge

    async def prepare(self, request: PromptRequest) -> PreparedRequest:
        """``request`` rendered and tokenized here, on a tokenizing thread (the router only decides)."""
        edge = await self.edge()
        return await edge.run(edge.prepare, request)

    def forget_node(self, node_id: str) -> None:
        self._nodes.pop(node_id, None)

    def tell_failed(self, request_id: str, node_id: str, dead: bool) -> None:
        """Tells the router that ``node_id`` failed the request: it died (``dead``) or refused it."""
        self._tell(lambda router: router.failed.remote(request_id, node_id, dead))

    def note_ended(self, request_id: str) -> None:
        """The request ended: the router hears it with this caller's next call, before that call
        (Ray does not order a fire-and-forget call to an async actor before the caller's next
        one, and waiting for one would hold the finished stream up). Until then, and for a caller
        that calls no more, the node's end-of-request report settles it."""
        self._ended.append(request_id)

    def take_ended(self) -> tuple[str, ...]:
        """The requests noted ended and not told yet (a route ask carries them: ``RouteAsk.ended``)."""
        ended, self._ended = tuple(self._ended), []
        return ended

    async def _tell_ended(self, router: Any) -> None:
        """Before any other call: the requests noted ended, told first (at most 1 s)."""
        ended = self.take_ended()
        if not ended:
            return
        try:
            await asyncio.wait_for(router.ended.remote(ended), 1.0)
        except Exception:  # noqa: BLE001  (restarting or gone: the nodes' reports settle them)
            pass

    def _tell(self, call: Callable[[Any], Any]) -> None:
        """A router call (``call(router)`` invokes one of its methods), fire and forget (the router
        may be restarting: its nodes' reports settle the same accounts later)."""
        if self._router is None:
            return
        try:
            call(self._router)
        except Exception:  # noqa: BLE001
            pass

    async def status(self) -> RouterStatus:
        """The router's status (``RouterActor.status``)."""
        return await self.call_router(lambda router: router.status.remote(), "status")

    async def heat(self) -> dict[str, Any]:
        """Each live node's expert heat (``RouterActor.heat``)."""
        return await self.call_router(lambda router: router.heat.remote(), "heat")

    async def call_router(self, call: Callable[[Any], Any], method: str) -> Any:
        """Calls a router method: ``call(router)`` invokes it, ``method`` names it in errors and the
        log. While the router does not answer (restarting, or its handle is stale after a restart)
        the call is repeated for up to ROUTER_WAIT_S."""
        import ray

        deadline = time.monotonic() + self.router_wait_s
        refresh = False
        while True:
            try:
                router = await self.router(refresh)
                await self._tell_ended(router)
                return await call(router)
            except ray.exceptions.RayTaskError as exc:
                cause = unwrap(exc)
                if cause is exc:  # not an error the router raised on purpose: its text stays in the log
                    log.error("the router failed a %s call: %s", method, exc)
                    raise RouterUnavailableError(f"the router '{ROUTER_NAME}' failed the request with an internal "
                                                 "error (in the caller's log)") from None
                raise cause from None
            except ValueError as exc:  # no actor of that name (yet): killed without restart, or not deployed
                failure: BaseException = exc
            except Exception as exc:  # noqa: BLE001
                if not _actor_gone(exc):
                    raise
                failure = exc
            if time.monotonic() > deadline:
                raise RouterUnavailableError(
                    f"the router '{ROUTER_NAME}' in namespace '{self.namespace}' did not answer within "
                    f"{self.router_wait_s:g} s ({type(failure).__name__}); if it is gone, deploy again with: "
                    f"python -m cluster serve") from None
            refresh = True
            await asyncio.sleep(ROUTER_RETRY_S)


async def request_events(deployment: Deployment, request: PromptRequest, *,
                         restartable: bool = False) -> AsyncIterator[StreamItem]:
    """The stream of one request (see the module docstring)."""
    exclude: list[str] = []
    answer = _AnswerSoFar()
    prepared = await deployment.prepare(request)  # rendered and tokenized here, once
    ask, template = prepared.ask, prepared.chat_template
    while True:
        ask = dataclasses.replace(ask, ended=deployment.take_ended())  # told to the router with this ask
        route: Route = await _route(deployment, ask, exclude, answer)
        yield Routed(route.node_id, len(exclude) + 1, template, prepared.chat_format, prepared.thinking_open)
        node_request = ask.node_request(answer.resume)
        sent = 0
        handle = None
        try:
            handle = await deployment.node(route.node_id, route.namespace)
            stream = handle.stream.options(num_returns="streaming").remote(node_request)
            ended = False
            try:
                async for ref in stream:
                    item = await ref
                    if isinstance(item, Piece):
                        sent += 1
                        answer.note(item)
                    elif isinstance(item, Finished):
                        item = dataclasses.replace(item, routing=route.routing, chat_template=template)
                        ended = True  # told with the caller's next call: it finds the node free
                        deployment.note_ended(ask.request_id)
                    yield item
            except (asyncio.CancelledError, GeneratorExit):
                if not ended:
                    handle.cancel.remote(ask.request_id)  # the caller went away: the node stops at its next token
                    deployment.note_ended(ask.request_id)
                raise
            if not ended:
                deployment.note_ended(ask.request_id)
            return
        except Exception as exc:  # noqa: BLE001
            dead = _node_failure(exc, route.node_id, sent)
        if dead:
            deployment.forget_node(route.node_id)
            if sent or answer.resume is not None:  # the caller has text of this answer
                loss = f"{route.node_id} {dead} after streaming {sent} pieces"
                if sent:
                    answer.losses.append(loss)  # named if no node can continue it
                if ask.params.n == 1:  # the next node continues the answer where the caller has it
                    answer.take_over()
                elif restartable:
                    yield Restarted(route.node_id, loss)
                else:
                    deployment.tell_failed(ask.request_id, route.node_id, True)
                    raise NodeFailedError(f"{loss}; an answer of {ask.params.n} choices cannot be continued on "
                                          "another node: ask again") from None
        deployment.tell_failed(ask.request_id, route.node_id, bool(dead))
        exclude.append(route.node_id)


class _AnswerSoFar:
    """What the caller has received of a one-choice answer: the tokens and characters its pieces
    carried, and the ``Resume`` a next node continues from once a node died while streaming it."""

    def __init__(self) -> None:
        self.tokens: list[int] = []
        self.chars = 0
        self.resume: Resume | None = None
        self.losses: list[str] = []  # each node lost while it streamed, in our words

    def note(self, piece: Piece) -> None:
        if piece.index == 0:
            self.tokens.extend(piece.tokens)
            self.chars += len(piece.text)

    def take_over(self) -> None:
        self.resume = Resume(tuple(self.tokens), self.chars)


async def _route(deployment: Deployment, ask: RouteAsk, exclude: list[str], answer: _AnswerSoFar) -> Route:
    """The router's choice. While an answer is being continued, no node free or left is a wait
    (the lost node may be coming back, a busy one may free up) for up to the router's wait, then
    ``NodeFailedError`` naming what was lost; otherwise those errors go to the caller."""
    deadline = time.monotonic() + deployment.router_wait_s
    while True:
        try:
            return await deployment.call_router(lambda router: router.route.remote(ask, tuple(exclude)), "route")
        except (NoNodesError, OverloadedError) as exc:
            if answer.resume is None:
                raise
            if time.monotonic() > deadline:
                raise NodeFailedError(f"{'; '.join(answer.losses)}; no node could continue the answer within "
                                      f"{deployment.router_wait_s:g} s ({exc})") from None
            exclude.clear()  # a lost node restarted by Ray is a new process: it may take it
            await asyncio.sleep(ROUTER_RETRY_S * 4)


def _node_failure(exc: BaseException, node_id: str, sent: int) -> str:
    """How a node failed a request, in our words: what it became ("died", "became unreachable"),
    or "" when it refused it before any text (``OverloadedError``) and another may take it. An
    error a node raised on purpose is re-raised; anything else is logged with Ray's own text
    and re-raised as ``NodeFailedError`` (no Ray exception name or actor id reaches a caller)."""
    import ray

    if isinstance(exc, ray.exceptions.RayTaskError):
        cause = unwrap(exc)
        if isinstance(cause, OverloadedError) and not sent:
            return ""
        if isinstance(cause, (SniperError, ValueError)):
            raise cause from None
        log.error("node %s failed a request: %s", node_id, exc)
        raise NodeFailedError(f"{node_id} failed the request with an internal error (in the caller's log)") from None
    if isinstance(exc, ray.exceptions.ActorUnavailableError):
        log.warning("node %s unreachable: %s", node_id, exc)
        return "became unreachable"
    if isinstance(exc, (ray.exceptions.RayActorError, ValueError)):  # ValueError: no actor of that name
        log.warning("node %s lost: %s", node_id, exc)
        return "died"
    raise exc
