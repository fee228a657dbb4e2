"""Where a request enters: the caller's process renders and tokenizes it, so the router only decides.

Rendering a conversation and tokenizing a prompt cost time in proportion to its text. They happen
here, in the process the request entered — the Python client's, or one of the gateway's replicas,
which scale out — never in the one router actor, which receives token ids (``RouteAsk``) and
returns a decision (``Route``); issue 26, item 5.

``Edge`` holds what that takes, loaded once per process and deployment from the ``ModelSource``
the router names (``RouterActor.model_source``): the model's vocabulary (``Tokenizer.load``:
vocabulary only, no weights) and its chat renderer (the operator's template, else the model's).
``Edge.prepare`` turns a ``PromptRequest`` into the router's ``RouteAsk``:

1. the params (valid once made) are checked against the vocabulary; a conversation is rendered
   (``ChatTemplateError`` when the template refuses it) and its params stop on the template's
   end of turn and write its format's markers as their text (``ChatRenderer.chat_params``:
   ``stop_token_ids``, ``preserved_token_ids``; the engine knows of chat formats no more than
   these token ids);
2. the prompt's size is bounded before it is tokenized: no token of the model covers more than
   ``longest_token_bytes`` bytes of text, so a prompt of more than ``token limit × that`` UTF-8
   bytes cannot fit, and is refused at once (``PromptTooLongError``). The limit is derived, not a
   knob: the token limit is a node's context less one (``ModelSource.n_ctx``, the deployment's
   ``NodeConfig.n_ctx``, 2048 by default) or the endpoint's ``max_prompt_tokens`` if lower (the
   gateway's ``Limits.max_prompt_tokens``, ``serve --max-prompt-tokens``); over HTTP the body
   limit (``Limits.max_body_bytes``, 1 MiB by default) refuses larger bodies before that. The
   demo model: 2047 tokens × 7 bytes = 14,329 bytes;
3. the text is tokenized, on one of ``TOKENIZE_THREADS`` threads of this process (llama.cpp's
   tokenizer releases the GIL: the caller's event loop keeps serving meanwhile), so the time it
   takes is bounded by the size bound of step 2;
4. a prompt of more tokens than the endpoint accepts, or than a node's context holds (at least
   one more is needed to generate: the engine's own rule, which the node applies again), is
   refused (``PromptTooLongError``) before the router hears of it.

The gateway's ``/tokenize``, ``/detokenize`` and the client's ``render`` are answered here too.

A process that cannot read the model file (a client on a machine without it) gets
``ModelFileError`` naming the file and the two ways out: run the client where the file is (a
machine of the deployment), or give it a copy of the same file (``Client.connect(...,
model_path=...)``). Rendering and tokenizing are not asked of a node in its place.

Importing this module loads neither Ray nor llama.cpp (the vocabulary loads when first needed).
"""

from __future__ import annotations

import asyncio
import functools
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable, TypeVar

from cluster.distributed.protocol import ModelSource, RouteAsk
from cluster.engine.chat import ChatPrompt, ChatRenderer
from cluster.engine.sampling import SamplingParams
from cluster.errors import InvalidParameterError, ModelFileError, PromptTooLongError

TOKENIZE_THREADS = 4  # threads of a process that render and tokenize its requests (step 3)

T = TypeVar("T")


@dataclass(frozen=True)
class PromptRequest:
    """A request as its caller gave it, its form checked (``Client``), not rendered or tokenized yet.

    Attributes:
        request_id: unique id.
        prompt: the prompt text, or a conversation to render with the deployment's chat template.
        params: validated sampling parameters.
        session_id: the conversation this turn belongs to.
        max_prompt_tokens: the endpoint's limit (``PromptTooLongError`` above it); None: a node's
            context alone decides.
    """

    request_id: str
    prompt: str | ChatPrompt
    params: SamplingParams
    session_id: str | None = None
    max_prompt_tokens: int | None = None

    def __post_init__(self) -> None:
        """Checks what a caller can get wrong without the model, before anything is sent."""
        if not isinstance(self.params, SamplingParams):
            raise InvalidParameterError(f"params must be SamplingParams, got {type(self.params).__name__}", param="params")
        if self.session_id is not None and (not isinstance(self.session_id, str) or not self.session_id):
            raise InvalidParameterError(f"session_id must be a non-empty string or None, got {self.session_id!r}",
                                        param="session_id")
        limit = self.max_prompt_tokens
        if limit is not None and (not isinstance(limit, int) or isinstance(limit, bool) or limit < 1):
            raise InvalidParameterError(f"max_prompt_tokens must be an integer >= 1 or None, got {limit!r}",
                                        param="max_prompt_tokens")
        if isinstance(self.prompt, ChatPrompt):
            if not self.prompt.messages:
                raise InvalidParameterError("a chat prompt needs at least one message", param="messages")
        elif not isinstance(self.prompt, str) or not self.prompt:
            got = "an empty string" if self.prompt == "" else type(self.prompt).__name__
            raise InvalidParameterError(f"prompt must be a non-empty string or a ChatPrompt, got {got}", param="prompt")


@dataclass(frozen=True)
class PreparedRequest:
    """A request ready for the router: its ``RouteAsk`` and, for a chat, which template rendered
    it (``model``, ``override`` or ``none``), which the caller's answer reports, and the template's
    output format with whether the prompt opened a thought (``RenderedChat``), by which the
    gateway takes the answer apart."""

    ask: RouteAsk
    chat_template: str | None = None
    chat_format: str | None = None
    thinking_open: bool = False


class Edge:
    """One deployment's vocabulary and chat renderer in this process (build with ``Edge.load``)."""

    def __init__(self, source: ModelSource, tokenizer: Any, renderer: ChatRenderer) -> None:
        self.source = source
        self.tokenizer = tokenizer
        self.renderer = renderer
        # no token covers more bytes of text than its piece (control tokens: their written form)
        self.longest_token_bytes = max((len(tokenizer.piece(t, special=True)) for t in range(tokenizer.n_vocab)),
                                       default=1)

    @classmethod
    def load(cls, source: ModelSource, model_path: str | None = None) -> "Edge":
        """The edge of the deployment ``source`` names, loaded once per process (later calls get
        the same one). ``model_path``: a local copy of the deployment's model file, read instead
        of ``source.model_path``.

        Raises:
            ModelFileError: this process cannot read the model file (see the module docstring).
            ChatTemplateError: the operator's template does not compile.
        """
        if not isinstance(source, ModelSource):
            raise InvalidParameterError(f"the router named no model (got {type(source).__name__})", param="model")
        key = (source, model_path)
        with _LOADED_LOCK:
            edge = _LOADED.get(key)
            if edge is None:
                edge = _LOADED[key] = cls._read(source, model_path or source.model_path)
            return edge

    @classmethod
    def _read(cls, source: ModelSource, path: str) -> "Edge":
        from cluster.engine.tokenizer import Tokenizer

        try:
            tokenizer = Tokenizer.load(path)
        except ModelFileError as exc:
            raise ModelFileError(
                f"this process cannot read the deployment's model file '{path}' ({exc}): requests are rendered and "
                f"tokenized where they enter, so the caller needs the model's vocabulary; run it on a machine of the "
                f"deployment, or give it a copy of the same file (Client.connect(..., model_path=PATH))") from None
        return cls(source, tokenizer, ChatRenderer(tokenizer, source.chat_template))

    async def run(self, call: Callable[..., T], *args: Any) -> T:
        """``call(*args)`` on one of this process's tokenizing threads (step 3 of the module docstring)."""
        return await asyncio.get_running_loop().run_in_executor(_pool(), functools.partial(call, *args))

    # -- requests --------------------------------------------------------------------------------

    def prepare(self, request: PromptRequest) -> PreparedRequest:
        """The router's ask for ``request`` (steps 1 to 4 of the module docstring; its form was
        checked when it was made).

        Raises:
            InvalidParameterError: token ids in the params outside the vocabulary; a conversation the
                template refuses (``ChatTemplateError``).
            PromptTooLongError: the prompt cannot fit (by its size, or by its tokens).
        """
        params = request.params
        params.check_vocabulary(self.tokenizer.n_vocab)
        template, rendered = None, None
        if isinstance(request.prompt, ChatPrompt):
            rendered = self.renderer.render(request.prompt)
            text, special, template = rendered.text, rendered.special, rendered.origin
            params = self.renderer.chat_params(params)
        else:
            text, special = request.prompt, False
        limit, why = self._token_limit(request.max_prompt_tokens)
        most = limit * self.longest_token_bytes
        # a character is one UTF-8 byte or more: a text of more characters is refused without encoding it
        size = f"at least {len(text)}" if len(text) > most else None
        if size is None and len(text.encode("utf-8")) > most:
            size = str(len(text.encode("utf-8")))
        if size is not None:
            raise PromptTooLongError(
                f"the prompt is {size} bytes: {why} and no token of this model covers more than "
                f"{self.longest_token_bytes} bytes, so at most {most} bytes can fit (refused before tokenizing)")
        tokens = tuple(self.tokenizer.tokenize(text, special=special))
        if len(tokens) > limit:
            raise PromptTooLongError(f"the prompt is {len(tokens)} tokens: {why}")
        ask = RouteAsk(request.request_id, tokens, params, request.session_id)
        if rendered is None:
            return PreparedRequest(ask, template)
        return PreparedRequest(ask, template, rendered.chat_format, rendered.thinking_open)

    def _token_limit(self, max_prompt_tokens: int | None) -> tuple[int, str]:
        """The most prompt tokens a request may have, and why, in words."""
        fits = self.source.n_ctx - 1
        if max_prompt_tokens is not None and max_prompt_tokens < fits:
            return max_prompt_tokens, f"this endpoint accepts at most {max_prompt_tokens} tokens"
        return fits, (f"a node's context holds {self.source.n_ctx} tokens, at most {fits} of them prompt "
                      f"(at least one more is needed to generate)")

    # -- the tokenizer's endpoints -----------------------------------------------------------------

    def render(self, chat: ChatPrompt) -> dict[str, Any]:
        """A conversation's prompt as the nodes evaluate it: its text, token ids and template origin."""
        rendered = self.renderer.render(chat)
        return {"text": rendered.text, "origin": rendered.origin,
                "tokens": self.tokenizer.tokenize(rendered.text, special=rendered.special)}

    def tokenize(self, text: str, add_special: bool = False, parse_special: bool = True,
                 with_pieces: bool = False) -> list[Any]:
        """Token ids of ``text`` (with ``with_pieces``: ``{"id", "piece"}`` per token, the piece a
        string, or its bytes as a list when they are not whole UTF-8 characters)."""
        if not isinstance(text, str):
            raise InvalidParameterError(f"content must be a string, got {type(text).__name__}", param="content")
        tokens = self.tokenizer.tokenize(text, special=parse_special, add_special=add_special)
        if not with_pieces:
            return tokens
        out = []
        for token in tokens:
            piece = self.tokenizer.piece(token, special=True)
            try:
                out.append({"id": token, "piece": piece.decode("utf-8")})
            except UnicodeDecodeError:
                out.append({"id": token, "piece": list(piece)})
        return out

    def detokenize(self, tokens: list[int]) -> str:
        """The text of token ids (control tokens written out); ids outside the vocabulary are an error."""
        if not isinstance(tokens, (list, tuple)):
            raise InvalidParameterError(f"tokens must be a list of token ids, got {type(tokens).__name__}",
                                        param="tokens")
        return self.tokenizer.detokenize(list(tokens), special=True)


_LOADED: dict[tuple[ModelSource, str | None], Edge] = {}  # this process's edges (Edge.load)
_LOADED_LOCK = threading.Lock()
_POOL: ThreadPoolExecutor | None = None
_POOL_LOCK = threading.Lock()


def _pool() -> ThreadPoolExecutor:
    global _POOL
    with _POOL_LOCK:
        if _POOL is None:
            _POOL = ThreadPoolExecutor(TOKENIZE_THREADS, thread_name_prefix="sniper-edge")
        return _POOL
