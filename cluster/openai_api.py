"""The OpenAI wire format: request bodies in, response bodies and stream chunks out, errors.

Pure functions and dataclasses, no Ray and no web framework, so the gateway stays a thin
shell and every rule here is tested directly. ``parse_completion`` / ``parse_chat`` turn a
decoded JSON body into a ``Generation`` (the router's request plus what the response needs)
or raise ``APIError`` carrying the HTTP status and an OpenAI-style error body.
"""

from __future__ import annotations

import math
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from cluster.errors import InvalidParameterError, PromptTooLongError
from cluster.node import NodeFailedError, NoNodesError, OverloadedError

CHAT_ROLES = ("system", "user", "assistant")


@dataclass(frozen=True)
class Limits:
    """What one HTTP request may ask for.

    Attributes:
        max_body_bytes: request bodies larger than this get 413.
        max_prompt_tokens: prompts longer than this (in the model's tokens) get 400; the node's
            context is a second, hard limit.
        max_tokens: the largest ``max_tokens`` a request may ask for (400 above it).
        default_max_tokens: used when a request gives no ``max_tokens`` (default: 16, or
            ``max_tokens`` if that is lower).
    """

    max_body_bytes: int = 1 << 20
    max_prompt_tokens: int = 1536
    max_tokens: int = 512
    default_max_tokens: int | None = None

    def __post_init__(self) -> None:
        if self.default_max_tokens is None and isinstance(self.max_tokens, int):
            object.__setattr__(self, "default_max_tokens", min(16, self.max_tokens))
        for name in ("max_body_bytes", "max_prompt_tokens", "max_tokens", "default_max_tokens"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise InvalidParameterError(f"{name} must be an integer >= 1, got {value!r}")
        if self.default_max_tokens > self.max_tokens:
            raise InvalidParameterError(f"default_max_tokens ({self.default_max_tokens}) exceeds max_tokens ({self.max_tokens})")


class APIError(Exception):
    """An error the client sees as ``{"error": {"message", "type", "param", "code"}}`` with ``status``."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def error_from_exception(exc: BaseException) -> APIError:
    """The HTTP face of an error raised by the router, a node or the client handle."""
    if isinstance(exc, APIError):
        return exc
    message = str(exc) or type(exc).__name__
    if isinstance(exc, PromptTooLongError):
        return APIError(400, message, param="prompt", code="context_length_exceeded")
    if isinstance(exc, (InvalidParameterError, ValueError)):
        return APIError(400, message)
    if isinstance(exc, OverloadedError):
        return APIError(429, message, type="rate_limit_error", code="overloaded")
    if isinstance(exc, NoNodesError):
        return APIError(503, message, type="service_unavailable", code="no_nodes")
    if isinstance(exc, NodeFailedError):
        return APIError(503, message, type="service_unavailable", code="node_failed")
    return APIError(500, f"internal error: {type(exc).__name__}: {message[:300]}", type="server_error")


@dataclass(frozen=True)
class Generation:
    """One parsed request: what goes to the router and what the response must echo."""

    kind: str  # "completion" or "chat"
    model: str
    prompt: str
    max_tokens: int
    temperature: float
    top_p: float
    seed: int
    stop: tuple[str, ...]
    stream: bool
    include_usage: bool
    session_id: str | None
    echo: bool = False
    id: str = field(default_factory=lambda: uuid.uuid4().hex)
    created: int = field(default_factory=lambda: int(time.time()))

    def client_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of ``Client.generate`` / ``Client.aevents``."""
        return {"max_tokens": self.max_tokens, "temperature": self.temperature, "top_p": self.top_p,
                "seed": self.seed, "session_id": self.session_id, "stop": self.stop}


# -- parsing -------------------------------------------------------------------------------

_COMMON = {"model", "max_tokens", "temperature", "top_p", "seed", "stop", "stream", "stream_options", "n",
           "user", "session_id", "presence_penalty", "frequency_penalty", "logit_bias"}
_COMPLETION_FIELDS = _COMMON | {"prompt", "echo", "best_of", "logprobs", "suffix"}
_CHAT_FIELDS = _COMMON | {"messages", "max_completion_tokens", "logprobs", "top_logprobs", "response_format"}


def parse_completion(body: Any, limits: Limits, model: str) -> Generation:
    """``POST /v1/completions``: ``prompt`` is a string (or a list holding one string)."""
    body = _object(body, _COMPLETION_FIELDS)
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if not isinstance(prompt, str) or not prompt:
        raise APIError(400, "'prompt' must be a non-empty string (one prompt per request)", param="prompt")
    _unsupported(body, {"best_of": 1, "logprobs": None, "suffix": None})
    echo = body.get("echo", False)
    if not isinstance(echo, bool):
        raise APIError(400, f"'echo' must be a boolean, got {echo!r}", param="echo")
    return _generation("completion", body, prompt, limits, model, echo=echo)


def parse_chat(body: Any, limits: Limits, model: str) -> Generation:
    """``POST /v1/chat/completions``: the messages are rendered with ``chat_prompt``."""
    body = _object(body, _CHAT_FIELDS)
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise APIError(400, "'messages' must be a non-empty list of {role, content} objects", param="messages")
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or message.get("role") not in CHAT_ROLES:
            raise APIError(400, f"messages[{i}].role must be one of {', '.join(CHAT_ROLES)}", param=f"messages[{i}].role")
        content = message.get("content")
        if isinstance(content, list):  # [{"type": "text", "text": ...}, ...]
            if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str) for p in content):
                raise APIError(400, f"messages[{i}].content: only text parts are supported", param=f"messages[{i}].content")
        elif not isinstance(content, str):
            raise APIError(400, f"messages[{i}].content must be a string or a list of text parts",
                           param=f"messages[{i}].content")
    _unsupported(body, {"logprobs": False, "top_logprobs": None, "response_format": None})
    if "max_completion_tokens" in body:
        if "max_tokens" in body:
            raise APIError(400, "give 'max_tokens' or 'max_completion_tokens', not both", param="max_completion_tokens")
        body = {**body, "max_tokens": body["max_completion_tokens"]}
    return _generation("chat", body, chat_prompt(messages), limits, model)


def chat_prompt(messages: list[dict[str, Any]]) -> str:
    """Renders a conversation as plain text: ``role: content`` lines, then ``assistant:``.

    The same history always renders to the same prefix, so a conversation's next turn reuses
    the KV state its node kept (and the router sees the shared prefix).
    """
    lines = []
    for message in messages:
        content = message["content"]
        if isinstance(content, list):
            content = "".join(part["text"] for part in content)
        lines.append(f"{message['role']}: {content}\n")
    return "".join(lines) + "assistant:"


def _object(body: Any, allowed: set[str]) -> dict[str, Any]:
    if not isinstance(body, dict):
        raise APIError(400, "the request body must be a JSON object")
    unknown = sorted(set(body) - allowed)
    if unknown:
        raise APIError(400, f"unrecognized request argument: {unknown[0]}", param=unknown[0])
    return body


def _unsupported(body: dict[str, Any], neutral: dict[str, Any]) -> None:
    """Fields we accept only at their no-op value (rather than silently ignoring them)."""
    for name, value in neutral.items():
        if name in body and body[name] != value and not (value is None and body[name] is None):
            raise APIError(400, f"'{name}' is not supported by this server (only {value!r})", param=name)


def _generation(kind: str, body: dict[str, Any], prompt: str, limits: Limits, model: str, echo: bool = False) -> Generation:
    requested = body.get("model")
    if not isinstance(requested, str) or not requested:
        raise APIError(400, "'model' is required (see GET /v1/models)", param="model")
    if requested != model:
        raise APIError(404, f"the model '{requested}' does not exist; this server serves '{model}'",
                       param="model", code="model_not_found")
    n = body.get("n", 1)
    if n != 1 or isinstance(n, bool):
        raise APIError(400, f"'n' must be 1 (one choice per request), got {n!r}", param="n")
    for name in ("presence_penalty", "frequency_penalty"):
        if body.get(name) not in (None, 0, 0.0):
            raise APIError(400, f"'{name}' is not supported by this server (only 0)", param=name)
    if body.get("logit_bias") not in (None, {}):
        raise APIError(400, "'logit_bias' is not supported by this server", param="logit_bias")
    max_tokens = body.get("max_tokens")
    if max_tokens is None:
        max_tokens = limits.default_max_tokens
    if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or not 1 <= max_tokens <= limits.max_tokens:
        raise APIError(400, f"'max_tokens' must be an integer in [1, {limits.max_tokens}], got {max_tokens!r}",
                       param="max_tokens")
    temperature = _number(body, "temperature", 1.0, 0.0, 2.0)
    top_p = _number(body, "top_p", 1.0, 0.0, 1.0)
    if top_p == 0:
        raise APIError(400, "'top_p' must be in (0, 1]", param="top_p")
    seed = body.get("seed")
    if seed is None:
        seed = uuid.uuid4().int % (1 << 32)
    elif not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed < 1 << 32:
        raise APIError(400, f"'seed' must be an integer in [0, 2**32), got {seed!r}", param="seed")
    stop = body.get("stop")
    stop = () if stop is None else (stop,) if isinstance(stop, str) else stop
    if not isinstance(stop, (list, tuple)) or len(stop) > 4 or not all(isinstance(s, str) and s for s in stop):
        raise APIError(400, "'stop' must be a non-empty string or a list of at most 4 of them", param="stop")
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise APIError(400, f"'stream' must be a boolean, got {stream!r}", param="stream")
    options = body.get("stream_options")
    if options is not None and (not stream or not isinstance(options, dict) or set(options) - {"include_usage"}):
        raise APIError(400, "'stream_options' is {include_usage: bool} and only with stream: true", param="stream_options")
    session_id = body.get("session_id", body.get("user"))
    if session_id is not None and (not isinstance(session_id, str) or not session_id or len(session_id) > 256):
        raise APIError(400, "'session_id' / 'user' must be a non-empty string of at most 256 characters", param="session_id")
    return Generation(kind=kind, model=model, prompt=prompt, max_tokens=max_tokens, temperature=temperature,
                      top_p=top_p, seed=seed, stop=tuple(stop), stream=stream,
                      include_usage=bool((options or {}).get("include_usage", False)), session_id=session_id, echo=echo)


def _number(body: dict[str, Any], name: str, default: float, low: float, high: float) -> float:
    value = body.get(name)
    if value is None:
        return default
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value) or not low <= value <= high:
        raise APIError(400, f"'{name}' must be a number in [{low:g}, {high:g}], got {value!r}", param=name)
    return float(value)


# -- responses -----------------------------------------------------------------------------

def _usage(usage: dict[str, int]) -> dict[str, int]:
    prompt, completion = int(usage.get("prompt_tokens", 0)), int(usage.get("completion_tokens", 0))
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _object_name(gen: Generation, chunk: bool) -> str:
    if gen.kind == "chat":
        return "chat.completion.chunk" if chunk else "chat.completion"
    return "text_completion"


def _id(gen: Generation) -> str:
    return ("chatcmpl-" if gen.kind == "chat" else "cmpl-") + gen.id


def response(gen: Generation, text: str, finish_reason: str, usage: dict[str, int], node: str) -> dict[str, Any]:
    """The non-streaming body; ``system_fingerprint`` names the node that served it."""
    if gen.kind == "chat":
        choice: dict[str, Any] = {"index": 0, "message": {"role": "assistant", "content": text},
                                  "logprobs": None, "finish_reason": finish_reason}
    else:
        choice = {"index": 0, "text": (gen.prompt + text) if gen.echo else text, "logprobs": None,
                  "finish_reason": finish_reason}
    return {"id": _id(gen), "object": _object_name(gen, chunk=False), "created": gen.created, "model": gen.model,
            "system_fingerprint": node, "choices": [choice], "usage": _usage(usage)}


def chunk(gen: Generation, text: str | None = None, finish_reason: str | None = None, *, first: bool = False,
          usage: dict[str, int] | None = None, node: str | None = None) -> dict[str, Any]:
    """One stream chunk: a text delta, the final one with ``finish_reason``, or the usage-only one."""
    choices: list[dict[str, Any]] = []
    if usage is None:
        if gen.kind == "chat":
            delta: dict[str, Any] = {"role": "assistant", "content": text or ""} if first else \
                ({"content": text} if text else {})
            choices = [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}]
        else:
            choices = [{"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish_reason}]
    body: dict[str, Any] = {"id": _id(gen), "object": _object_name(gen, chunk=True), "created": gen.created,
                            "model": gen.model, "choices": choices}
    if node is not None:
        body["system_fingerprint"] = node
    if usage is not None:
        body["usage"] = _usage(usage)
    return body


def models_list(model: str, created: int) -> dict[str, Any]:
    return {"object": "list", "data": [{"id": model, "object": "model", "created": created, "owned_by": "expert-sniper"}]}
