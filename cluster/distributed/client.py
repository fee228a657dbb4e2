"""Client handles: ``Client.connect()`` then ``generate`` / ``chat`` / ``stream`` / ``tokenize`` / ``status`` (sync and async).

Requests are rendered and tokenized in this process (``cluster.distributed.edge``): it reads the
deployment's model file (vocabulary only) when it first needs it, and the router only decides.
Importing this module loads neither Ray nor llama.cpp (Ray is imported when connecting, the
vocabulary when first needed).
"""

from __future__ import annotations

import asyncio
import threading
import uuid
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Iterator, Sequence, Union

from cluster.engine.chat import ChatMessage, ChatPrompt, chat_messages
from cluster.distributed.dispatch import ROUTER_WAIT_S, Deployment, request_events
from cluster.distributed.edge import PromptRequest
from cluster.errors import InvalidParameterError, NodeFailedError, NoNodesError
from cluster.distributed.protocol import NAMESPACE, ROUTER_NAME, Cancelled, Finished, Piece, Restarted, StreamItem, Timing, Usage
from cluster.distributed.status import RouterStatus
from cluster.engine.sampling import SamplingParams, TokenLogprob


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
    usage: Usage
    choices: tuple[Choice, ...] = ()
    timing: Timing = Timing()
    cache: dict[str, float] = field(default_factory=dict)
    routing: dict[str, Any] = field(default_factory=dict)
    chat_template: str | None = None


Prompt = Union[str, ChatPrompt]
"""A prompt: text, or a conversation the deployment renders with the model's chat template."""
Messages = Sequence[Union[ChatMessage, dict[str, Any]]]
"""A conversation: ``ChatMessage`` objects or OpenAI-style dicts (``{"role": "user", "content": "hi"}``)."""


def _chat(messages: Messages | ChatPrompt) -> ChatPrompt:
    """The conversation as the edge renders it; dicts become ``ChatMessage`` here, and anything
    else is refused here (``InvalidParameterError`` naming ``messages[i]``), before any remote call."""
    return messages if isinstance(messages, ChatPrompt) else ChatPrompt(chat_messages(messages))


def _ask(prompt: Prompt, params: SamplingParams | None, fields: dict[str, Any], session_id: str | None,
         max_prompt_tokens: int | None = None) -> PromptRequest:
    """The request: the prompt (text or a chat), params with ``fields`` over them, session, its
    form checked here (``PromptRequest``), before anything is sent."""
    params = params or SamplingParams()
    if not isinstance(params, SamplingParams):
        raise InvalidParameterError(f"params must be SamplingParams or None, got {type(params).__name__}", param="params")
    params = params.updated(**fields) if fields else params
    return PromptRequest(uuid.uuid4().hex, prompt, params, session_id, max_prompt_tokens)


async def completion(events: AsyncIterator[StreamItem]) -> Completion:
    """A whole answer from a request's events (a ``Restarted`` item voids the text so far)."""
    texts: dict[int, list[str]] = {}
    logprobs: dict[int, list[TokenLogprob]] = {}
    async for item in events:
        if isinstance(item, Piece):
            texts.setdefault(item.index, []).append(item.text)
            logprobs.setdefault(item.index, []).extend(item.logprobs)
        elif isinstance(item, Restarted):
            texts.clear()
            logprobs.clear()
        elif isinstance(item, Finished):
            choices = tuple(Choice(c.index, "".join(texts.get(c.index, [])), c.finish_reason,
                                   tuple(logprobs.get(c.index, []))) for c in item.choices)
            return Completion(text=choices[0].text, node=item.node, finish_reason=item.finish_reason, usage=item.usage,
                              choices=choices, timing=item.timing, cache=item.cache, routing=item.routing,
                              chat_template=item.chat_template)
        elif isinstance(item, Cancelled):
            break
    raise NodeFailedError("the stream ended without its final message")


class _Loop:
    """A private event loop on a thread of its own: the sync methods run the async ones on it."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="sniper-client", daemon=True)
        self._thread.start()

    def run(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result()

    def iterate(self, events: AsyncIterator[Any]) -> Iterator[Any]:
        try:
            while True:
                try:
                    yield self.run(events.__anext__())
                except StopAsyncIteration:
                    return
        finally:  # closing the iteration early cancels the request on its node
            self.run(events.aclose())


class Client:
    """A handle on a running deployment: asks its router for a node per request and streams from
    that node directly (``cluster.distributed.dispatch``); async methods, and sync ones that run them."""

    def __init__(self, router: Any = None, *, namespace: str | None = None, router_wait_s: float = ROUTER_WAIT_S,
                 model_path: str | None = None) -> None:
        """``router``: the router actor's handle (looked up by name when None); ``namespace``: the
        deployment's (default: the namespace this process joined Ray with); ``router_wait_s``: how
        long a request waits for a router that does not answer before ``RouterUnavailableError``;
        ``model_path``: a copy of the deployment's model file, for a process that cannot read the
        deployment's own path (requests are rendered and tokenized here: ``cluster.distributed.edge``)."""
        self._deployment = Deployment(namespace, router, router_wait_s, model_path)
        self._loop: _Loop | None = None

    @classmethod
    def connect(cls, address: str | None = None, namespace: str = NAMESPACE, *,
                model_path: str | None = None) -> "Client":
        """Joins the Ray cluster at ``address`` (default: the local one) and finds the router;
        ``model_path``: a copy of the deployment's model file (see ``__init__``)."""
        import ray

        from cluster.distributed.connection import connect

        connect(address, namespace)
        try:
            router = ray.get_actor(ROUTER_NAME, namespace=namespace)
        except ValueError:
            raise NoNodesError(f"no deployment in namespace '{namespace}' (start one with: python -m cluster serve)") from None
        return cls(router, namespace=namespace, model_path=model_path)

    def _sync(self) -> _Loop:
        if self._loop is None:
            self._loop = _Loop()
        return self._loop

    # -- async -----------------------------------------------------------------------------
    #
    # Every generating method takes a prompt (text, or a ChatPrompt the deployment renders with
    # the model's chat template), optional SamplingParams, and SamplingParams fields by name
    # (max_tokens=8, stop="x", logit_bias={15: -100}) that override them.

    def aevents(self, prompt: Prompt, params: SamplingParams | None = None, *, session_id: str | None = None,
                max_prompt_tokens: int | None = None, restartable: bool = False,
                **fields: Any) -> AsyncIterator[StreamItem]:
        """The request's events (``cluster.distributed.protocol``): ``Routed``, ``Piece`` items, then ``Finished``.

        ``restartable``: the caller shows nothing before the end, so a node that dies mid-way has
        the request started again on another node; a ``Restarted`` item then voids the text
        received so far. Closing or cancelling the iteration cancels the request on its node.
        Parameters are checked here, before anything is sent.
        """
        return request_events(self._deployment, _ask(prompt, params, fields, session_id, max_prompt_tokens),
                              restartable=restartable)

    async def agenerate(self, prompt: Prompt, params: SamplingParams | None = None, *,
                        session_id: str | None = None, **fields: Any) -> Completion:
        """The whole answer; a node that dies mid-way costs a restart elsewhere, not an error."""
        return await completion(self.aevents(prompt, params, session_id=session_id, restartable=True, **fields))

    async def achat(self, messages: Messages, params: SamplingParams | None = None, *,
                    session_id: str | None = None, **fields: Any) -> Completion:
        """One assistant turn for ``messages`` (``ChatMessage`` objects or OpenAI-style dicts)."""
        return await self.agenerate(_chat(messages), params, session_id=session_id, **fields)

    async def astream(self, prompt: Prompt, params: SamplingParams | None = None, *,
                      session_id: str | None = None, **fields: Any) -> AsyncIterator[str]:
        """Text pieces (of every choice, in order) as the node produces them."""
        events = self.aevents(prompt, params, session_id=session_id, **fields)
        try:
            async for item in events:
                if isinstance(item, Piece) and item.text:
                    yield item.text
        finally:
            await events.aclose()

    async def atokenize(self, text: str, add_special: bool = False, parse_special: bool = True,
                        with_pieces: bool = False) -> list[Any]:
        """Token ids of ``text`` as the deployment's model tokenizes it, here (``Edge.tokenize``)."""
        edge = await self._deployment.edge()
        return await edge.run(edge.tokenize, text, add_special, parse_special, with_pieces)

    async def adetokenize(self, tokens: list[int]) -> str:
        """The text of token ids, here (``Edge.detokenize``)."""
        edge = await self._deployment.edge()
        return await edge.run(edge.detokenize, tokens)

    async def arender(self, messages: Messages | ChatPrompt) -> dict[str, Any]:
        """The prompt a conversation renders to: ``{"text", "tokens", "origin"}`` (here: ``Edge.render``)."""
        chat = _chat(messages)  # a malformed message is refused before anything is loaded
        edge = await self._deployment.edge()
        return await edge.run(edge.render, chat)

    async def astatus(self) -> RouterStatus:
        return await self._deployment.status()

    async def aheat(self) -> dict[str, Any]:
        return await self._deployment.heat()

    # -- sync ------------------------------------------------------------------------------

    def generate(self, prompt: Prompt, params: SamplingParams | None = None, *, session_id: str | None = None,
                 **fields: Any) -> Completion:
        return self._sync().run(self.agenerate(prompt, params, session_id=session_id, **fields))

    def chat(self, messages: Messages, params: SamplingParams | None = None, *,
             session_id: str | None = None, **fields: Any) -> Completion:
        """One assistant turn for ``messages`` (``ChatMessage`` objects or OpenAI-style dicts,
        rendered with the model's chat template); a malformed message is refused here."""
        return self.generate(_chat(messages), params, session_id=session_id, **fields)

    def stream(self, prompt: Prompt, params: SamplingParams | None = None, *, session_id: str | None = None,
               **fields: Any) -> Iterator[str]:
        """Yields text pieces (of every choice, in order) as the node produces them; closing the
        iterator cancels the request."""
        for item in self.events(prompt, params, session_id=session_id, **fields):
            if isinstance(item, Piece) and item.text:
                yield item.text

    def events(self, prompt: Prompt, params: SamplingParams | None = None, *, session_id: str | None = None,
               **fields: Any) -> Iterator[StreamItem]:
        """The request's events as ``aevents`` gives them; closing the iterator cancels the request."""
        events = self.aevents(prompt, params, session_id=session_id, **fields)
        yield from self._sync().iterate(events)

    def tokenize(self, text: str, add_special: bool = False, parse_special: bool = True,
                 with_pieces: bool = False) -> list[Any]:
        return self._sync().run(self.atokenize(text, add_special, parse_special, with_pieces))

    def detokenize(self, tokens: list[int]) -> str:
        return self._sync().run(self.adetokenize(tokens))

    def render(self, messages: Messages | ChatPrompt) -> dict[str, Any]:
        return self._sync().run(self.arender(_chat(messages)))

    def status(self) -> RouterStatus:
        return self._sync().run(self.astatus())

    def heat(self) -> dict[str, Any]:
        return self._sync().run(self.aheat())
