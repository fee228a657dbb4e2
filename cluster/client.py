"""Client handles: ``Client.connect()`` then ``generate`` / ``chat`` / ``stream`` / ``tokenize`` / ``status`` (sync and async)."""

from __future__ import annotations

import asyncio
import uuid
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Iterator, Sequence, Union

from cluster.chat import ChatMessage, ChatPrompt
from cluster.errors import InvalidParameterError, SniperError
from cluster.node import NAMESPACE, ROUTER_NAME, NodeFailedError, NoNodesError, OverloadedError
from cluster.sampling import SamplingParams, TokenLogprob


@dataclass(frozen=True)
class Choice:
    """One of a request's ``n`` answers.

    Attributes:
        index: 0..n-1.
        text: its text.
        finish_reason: ``stop`` or ``length``.
        logprobs: per token, with ``SamplingParams.logprobs`` (else empty).
    """

    index: int
    text: str
    finish_reason: str
    logprobs: tuple[TokenLogprob, ...] = ()


@dataclass(frozen=True)
class Completion:
    """A finished request: text (of the first choice), every choice, token usage and which node served it.

    ``chat_template`` is set for a chat request: ``model``, ``override`` or ``none`` (plain rendering).
    """

    text: str
    node: str
    finish_reason: str
    usage: dict[str, int]
    choices: tuple[Choice, ...] = ()
    timing: dict[str, float] = field(default_factory=dict)
    cache: dict[str, float] = field(default_factory=dict)
    routing: dict[str, Any] = field(default_factory=dict)
    chat_template: str | None = None


Prompt = Union[str, ChatPrompt]
"""A prompt: text, or a conversation the deployment renders with the model's chat template."""


def _request(prompt: Prompt, params: SamplingParams | None, fields: dict[str, Any], session_id: str | None,
             max_prompt_tokens: int | None = None) -> dict[str, Any]:
    """The router's request: the prompt (``prompt`` text or ``chat``), validated params, session."""
    params = params or SamplingParams()
    if not isinstance(params, SamplingParams):
        raise InvalidParameterError(f"params must be SamplingParams or None, got {type(params).__name__}", param="params")
    params = params.updated(**fields) if fields else params
    params.validate()
    request: dict[str, Any] = {"request_id": uuid.uuid4().hex, "params": params, "session_id": session_id}
    if isinstance(prompt, ChatPrompt):
        if not prompt.messages:
            raise InvalidParameterError("a chat prompt needs at least one message", param="messages")
        request["chat"] = prompt
    elif isinstance(prompt, str) and prompt:
        request["prompt"] = prompt
    else:
        raise InvalidParameterError(f"prompt must be a non-empty string or a ChatPrompt, got {prompt!r}", param="prompt")
    if session_id is not None and (not isinstance(session_id, str) or not session_id):
        raise InvalidParameterError(f"session_id must be a non-empty string or None, got {session_id!r}", param="session_id")
    if max_prompt_tokens is not None and (not isinstance(max_prompt_tokens, int) or max_prompt_tokens < 1):
        raise InvalidParameterError(f"max_prompt_tokens must be an integer >= 1 or None, got {max_prompt_tokens!r}")
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
    choices = tuple(Choice(index=c["index"], text=c["text"], finish_reason=c["finish_reason"],
                           logprobs=tuple(c.get("logprobs") or ())) for c in result.get("choices", ()))
    return Completion(text=result["text"], node=result["node"], finish_reason=result["finish_reason"],
                      usage=result["usage"], choices=choices, timing=result.get("timing", {}),
                      cache=result.get("cache", {}), routing=result.get("routing", {}),
                      chat_template=result.get("chat_template"))


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
    #
    # Every generating method takes a prompt (text, or a ChatPrompt the deployment renders with
    # the model's chat template), optional SamplingParams, and SamplingParams fields by name
    # (max_tokens=8, stop="x", logit_bias={15: -100}) that override them.

    def generate(self, prompt: Prompt, params: SamplingParams | None = None, *, session_id: str | None = None,
                 **fields: Any) -> Completion:
        import ray

        request = _request(prompt, params, fields, session_id)
        try:
            return _completion(ray.get(self._router.generate.remote(request)))
        except ray.exceptions.RayTaskError as exc:
            raise _unwrap(exc) from None

    def chat(self, messages: Sequence[ChatMessage], params: SamplingParams | None = None, *,
             session_id: str | None = None, **fields: Any) -> Completion:
        """One assistant turn for ``messages`` (rendered with the model's chat template)."""
        return self.generate(ChatPrompt(tuple(messages)), params, session_id=session_id, **fields)

    def stream(self, prompt: Prompt, params: SamplingParams | None = None, *, session_id: str | None = None,
               **fields: Any) -> Iterator[str]:
        """Yields text pieces (of every choice, in order) as the node produces them; closing the
        iterator cancels the request."""
        import ray

        request = _request(prompt, params, fields, session_id)
        gen = self._router.stream.options(num_returns="streaming").remote(request)
        finished = False
        try:
            for ref in gen:
                item = ray.get(ref)
                finished = bool(item.get("done"))
                if item.get("text"):
                    yield item["text"]
        except ray.exceptions.RayTaskError as exc:
            finished = True
            raise _unwrap(exc) from None
        finally:
            if not finished:
                ray.cancel(gen)

    def tokenize(self, text: str, add_special: bool = False, parse_special: bool = True,
                 with_pieces: bool = False) -> list[Any]:
        """Token ids of ``text`` as the deployment's model tokenizes it (see RouterActor.tokenize)."""
        import ray

        try:
            return ray.get(self._router.tokenize.remote(text, add_special, parse_special, with_pieces))
        except ray.exceptions.RayTaskError as exc:
            raise _unwrap(exc) from None

    def detokenize(self, tokens: list[int]) -> str:
        import ray

        try:
            return ray.get(self._router.detokenize.remote(tokens))
        except ray.exceptions.RayTaskError as exc:
            raise _unwrap(exc) from None

    def render(self, messages: Sequence[ChatMessage] | ChatPrompt) -> dict[str, Any]:
        """The prompt a conversation renders to: ``{"text", "tokens", "origin"}``."""
        import ray

        chat = messages if isinstance(messages, ChatPrompt) else ChatPrompt(tuple(messages))
        try:
            return ray.get(self._router.render.remote(chat))
        except ray.exceptions.RayTaskError as exc:
            raise _unwrap(exc) from None

    def status(self) -> dict[str, Any]:
        import ray

        return ray.get(self._router.status.remote())

    def heat(self) -> dict[str, Any]:
        import ray

        return ray.get(self._router.heat.remote())

    # -- async -----------------------------------------------------------------------------

    async def agenerate(self, prompt: Prompt, params: SamplingParams | None = None, *,
                        session_id: str | None = None, **fields: Any) -> Completion:
        import ray

        request = _request(prompt, params, fields, session_id)
        try:
            return _completion(await self._router.generate.remote(request))
        except ray.exceptions.RayTaskError as exc:
            raise _unwrap(exc) from None

    async def astream(self, prompt: Prompt, params: SamplingParams | None = None, *,
                      session_id: str | None = None, **fields: Any) -> AsyncIterator[str]:
        async for item in self.aevents(prompt, params, session_id=session_id, **fields):
            if item.get("text"):
                yield item["text"]

    async def aevents(self, prompt: Prompt, params: SamplingParams | None = None, *, session_id: str | None = None,
                      max_prompt_tokens: int | None = None, restartable: bool = False,
                      **fields: Any) -> AsyncIterator[dict[str, Any]]:
        """The router's stream: ``{"text", "index", "logprobs"?}`` pieces, then ``{"done": True,
        "node", "usage", "finish_reason", "choices", ...}``.

        ``restartable``: the caller shows nothing before the end, so a node that dies mid-way has
        the request started again on another node; a ``{"restart": node}`` item then voids the
        text received so far. Closing or cancelling the iteration cancels the request on its node.
        """
        import ray

        request = _request(prompt, params, fields, session_id, max_prompt_tokens)
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

    async def atokenize(self, text: str, add_special: bool = False, parse_special: bool = True,
                        with_pieces: bool = False) -> list[Any]:
        import ray

        try:
            return await self._router.tokenize.remote(text, add_special, parse_special, with_pieces)
        except ray.exceptions.RayTaskError as exc:
            raise _unwrap(exc) from None

    async def adetokenize(self, tokens: list[int]) -> str:
        import ray

        try:
            return await self._router.detokenize.remote(tokens)
        except ray.exceptions.RayTaskError as exc:
            raise _unwrap(exc) from None

    async def astatus(self) -> dict[str, Any]:
        return await self._router.status.remote()
