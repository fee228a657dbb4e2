"""Client handles: ``Client.connect()`` then ``generate`` / ``stream`` / ``status`` (sync and async)."""

from __future__ import annotations

import asyncio
import math
import uuid
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Iterator

from cluster.errors import InvalidParameterError, SniperError
from cluster.node import NAMESPACE, ROUTER_NAME, NodeFailedError, NoNodesError, OverloadedError


@dataclass(frozen=True)
class Completion:
    """A finished request: text, token usage and which node served it."""

    text: str
    node: str
    finish_reason: str
    usage: dict[str, int]
    timing: dict[str, float] = field(default_factory=dict)
    cache: dict[str, float] = field(default_factory=dict)
    routing: dict[str, Any] = field(default_factory=dict)


def _request(prompt: str, max_tokens: int, temperature: float, top_p: float, seed: int,
             session_id: str | None, stop: tuple[str, ...], max_prompt_tokens: int | None = None) -> dict[str, Any]:
    if not isinstance(prompt, str) or not prompt:
        raise InvalidParameterError(f"prompt must be a non-empty string, got {prompt!r}")
    if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 1:
        raise InvalidParameterError(f"max_tokens must be an integer >= 1, got {max_tokens!r}")
    if not isinstance(temperature, (int, float)) or not math.isfinite(temperature) or temperature < 0:
        raise InvalidParameterError(f"temperature must be a finite number >= 0, got {temperature!r}")
    if not isinstance(top_p, (int, float)) or not 0 < top_p <= 1:
        raise InvalidParameterError(f"top_p must be in (0, 1], got {top_p!r}")
    if not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed < 2**32:
        raise InvalidParameterError(f"seed must be an integer in [0, 2**32), got {seed!r}")
    if session_id is not None and (not isinstance(session_id, str) or not session_id):
        raise InvalidParameterError(f"session_id must be a non-empty string or None, got {session_id!r}")
    if max_prompt_tokens is not None and (not isinstance(max_prompt_tokens, int) or max_prompt_tokens < 1):
        raise InvalidParameterError(f"max_prompt_tokens must be an integer >= 1 or None, got {max_prompt_tokens!r}")
    request = {"request_id": uuid.uuid4().hex, "prompt": prompt, "max_tokens": max_tokens, "temperature": float(temperature),
               "top_p": float(top_p), "seed": seed, "session_id": session_id, "stop": tuple(stop)}
    if max_prompt_tokens is not None:
        request["max_prompt_tokens"] = max_prompt_tokens
    return request


def _unwrap(exc: BaseException) -> BaseException:
    """The router's own error (overloaded, node failed, no nodes, bad input) from Ray's wrapper."""
    cause = getattr(exc, "cause", None)
    if isinstance(cause, (OverloadedError, NodeFailedError, NoNodesError, SniperError, ValueError)):
        return cause
    return exc


def _completion(result: dict[str, Any]) -> Completion:
    return Completion(text=result["text"], node=result["node"], finish_reason=result["finish_reason"],
                      usage=result["usage"], timing=result.get("timing", {}), cache=result.get("cache", {}),
                      routing=result.get("routing", {}))


class Client:
    """A handle on a running deployment (the router actor)."""

    def __init__(self, router: Any) -> None:
        self._router = router

    @classmethod
    def connect(cls, address: str | None = None, namespace: str = NAMESPACE) -> "Client":
        """Joins the Ray cluster at ``address`` (default: the local one) and finds the router."""
        import ray

        from cluster.deploy import connect

        connect(address, namespace)
        try:
            router = ray.get_actor(ROUTER_NAME, namespace=namespace)
        except ValueError:
            raise NoNodesError(f"no deployment in namespace '{namespace}' (start one with: python -m cluster serve)") from None
        return cls(router)

    # -- sync ------------------------------------------------------------------------------

    def generate(self, prompt: str, max_tokens: int = 64, temperature: float = 0.0, top_p: float = 1.0,
                 seed: int = 0, session_id: str | None = None, stop: tuple[str, ...] = ()) -> Completion:
        import ray

        request = _request(prompt, max_tokens, temperature, top_p, seed, session_id, stop)
        try:
            return _completion(ray.get(self._router.generate.remote(request)))
        except ray.exceptions.RayTaskError as exc:
            raise _unwrap(exc) from None

    def stream(self, prompt: str, max_tokens: int = 64, temperature: float = 0.0, top_p: float = 1.0,
               seed: int = 0, session_id: str | None = None, stop: tuple[str, ...] = ()) -> Iterator[str]:
        """Yields text pieces as the node produces them; closing the iterator cancels the request."""
        import ray

        request = _request(prompt, max_tokens, temperature, top_p, seed, session_id, stop)
        gen = self._router.stream.options(num_returns="streaming").remote(request)
        finished = False
        try:
            for ref in gen:
                item = ray.get(ref)
                finished = bool(item.get("done"))
                if "text" in item:
                    yield item["text"]
        except ray.exceptions.RayTaskError as exc:
            finished = True
            raise _unwrap(exc) from None
        finally:
            if not finished:
                ray.cancel(gen)

    def status(self) -> dict[str, Any]:
        import ray

        return ray.get(self._router.status.remote())

    def heat(self) -> dict[str, Any]:
        import ray

        return ray.get(self._router.heat.remote())

    # -- async -----------------------------------------------------------------------------

    async def agenerate(self, prompt: str, max_tokens: int = 64, temperature: float = 0.0, top_p: float = 1.0,
                        seed: int = 0, session_id: str | None = None, stop: tuple[str, ...] = ()) -> Completion:
        import ray

        request = _request(prompt, max_tokens, temperature, top_p, seed, session_id, stop)
        try:
            return _completion(await self._router.generate.remote(request))
        except ray.exceptions.RayTaskError as exc:
            raise _unwrap(exc) from None

    async def astream(self, prompt: str, max_tokens: int = 64, temperature: float = 0.0, top_p: float = 1.0,
                      seed: int = 0, session_id: str | None = None, stop: tuple[str, ...] = ()) -> AsyncIterator[str]:
        async for item in self.aevents(prompt, max_tokens, temperature, top_p, seed, session_id, stop):
            if "text" in item:
                yield item["text"]

    async def aevents(self, prompt: str, max_tokens: int = 64, temperature: float = 0.0, top_p: float = 1.0,
                      seed: int = 0, session_id: str | None = None, stop: tuple[str, ...] = (),
                      max_prompt_tokens: int | None = None, restartable: bool = False) -> AsyncIterator[dict[str, Any]]:
        """The router's stream: ``{"text"}`` pieces, then ``{"done": True, "node", "usage", "finish_reason", ...}``.

        ``restartable``: the caller shows nothing before the end, so a node that dies mid-way has
        the request started again on another node; a ``{"restart": node}`` item then voids the
        text received so far. Closing or cancelling the iteration cancels the request on its node.
        """
        import ray

        request = _request(prompt, max_tokens, temperature, top_p, seed, session_id, stop, max_prompt_tokens)
        request["restartable"] = restartable
        gen = self._router.stream.options(num_returns="streaming").remote(request)
        finished = False
        try:
            async for ref in gen:
                item = await ref
                finished = bool(item.get("done"))
                yield item
        except ray.exceptions.RayTaskError as exc:
            finished = True
            raise _unwrap(exc) from None
        finally:
            if not finished:  # the caller went away (or was cancelled) before the end
                ray.cancel(gen)
                await asyncio.sleep(0)

    async def astatus(self) -> dict[str, Any]:
        return await self._router.status.remote()
