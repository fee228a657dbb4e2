"""The caller's side of a request: ask the router for a node, stream from that node, retry elsewhere.

One helper for the Python client and the HTTP gateway: ``request_events`` yields
``cluster.protocol`` items — ``Routed`` at each dispatch, the node's ``Piece`` items, then
``Finished`` (with the router's ``routing`` and ``chat_template`` filled in) — and handles what
can go wrong between the three processes:

* the node refuses (``OverloadedError``) or dies before it sent text: the router is told
  (``failed``) and asked again without that node;
* the node dies after it sent text: ``NodeFailedError`` naming the node and the cause, unless the
  request is ``restartable`` (its caller shows nothing before the end: whole answers): then a
  ``Restarted`` item voids the text so far and it starts again on another node;
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
import time
from typing import Any, AsyncIterator

from cluster.errors import NodeFailedError, OverloadedError, RouterUnavailableError, SniperError
from cluster.protocol import ROUTER_NAME, Finished, Piece, Restarted, Route, RouteAsk, Routed, StreamItem

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

    def __init__(self, namespace: str | None = None, router: Any = None, router_wait_s: float = ROUTER_WAIT_S) -> None:
        self._namespace = namespace  # None: the namespace this process joined Ray with
        self._router = router
        self.router_wait_s = router_wait_s
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

    def forget_node(self, node_id: str) -> None:
        self._nodes.pop(node_id, None)

    def tell_failed(self, request_id: str, node_id: str, dead: bool) -> None:
        """Tells the router that ``node_id`` failed the request: it died (``dead``) or refused it."""
        self._tell("failed", request_id, node_id, dead)

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

    def _tell(self, method: str, *args: Any) -> None:
        """A router call, fire and forget (the router may be restarting: its nodes' reports settle
        the same accounts later)."""
        if self._router is None:
            return
        try:
            getattr(self._router, method).remote(*args)
        except Exception:  # noqa: BLE001
            pass

    async def call_router(self, method: str, *args: Any) -> Any:
        """Calls a router method; while the router does not answer (restarting, or its handle is
        stale after a restart) the call is repeated for up to ROUTER_WAIT_S."""
        import ray

        deadline = time.monotonic() + self.router_wait_s
        refresh = False
        while True:
            try:
                router = await self.router(refresh)
                await self._tell_ended(router)
                return await getattr(router, method).remote(*args)
            except ray.exceptions.RayTaskError as exc:
                raise unwrap(exc) from None
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


async def request_events(deployment: Deployment, ask: RouteAsk, *, restartable: bool = False) -> AsyncIterator[StreamItem]:
    """The stream of one request (see the module docstring)."""
    import ray

    exclude: list[str] = []
    while True:
        ask = dataclasses.replace(ask, ended=deployment.take_ended())  # told to the router with this ask
        route: Route = await deployment.call_router("route", ask, tuple(exclude))
        yield Routed(route.node_id, len(exclude) + 1, route.chat_template)
        sent = 0
        handle = None
        try:
            handle = await deployment.node(route.node_id, route.namespace)
            stream = handle.stream.options(num_returns="streaming").remote(route.request)
            ended = False
            try:
                async for ref in stream:
                    item = await ref
                    if isinstance(item, Piece):
                        sent += 1
                    elif isinstance(item, Finished):
                        item = dataclasses.replace(item, routing=route.routing, chat_template=route.chat_template)
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
        except ray.exceptions.RayTaskError as exc:
            cause = unwrap(exc)
            if not (isinstance(cause, OverloadedError) and not sent):
                raise cause from None
            dead = False  # the node refused it: ask for another one
        except Exception as exc:  # noqa: BLE001
            if not (_actor_gone(exc) or isinstance(exc, ValueError)):
                raise
            dead = True
            deployment.forget_node(route.node_id)
            if sent:
                reason = (f"{route.node_id} died after streaming {sent} pieces: {type(exc).__name__}: "
                          f"{str(exc).splitlines()[0][:200] if str(exc) else ''}")
                if not restartable:
                    deployment.tell_failed(ask.request_id, route.node_id, dead)
                    raise NodeFailedError(reason) from None
                yield Restarted(route.node_id, reason)
        deployment.tell_failed(ask.request_id, route.node_id, dead)
        exclude.append(route.node_id)
