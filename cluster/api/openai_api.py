"""The OpenAI wire format, requests side: request bodies in, ``APIRequest`` out, errors.

Pure functions and dataclasses, no Ray and no web framework, so the gateway stays a thin
shell and every rule here is tested directly. ``parse_completion`` / ``parse_chat`` turn a
decoded JSON body into an ``APIRequest`` (the prompt or conversation, ``SamplingParams``, and
what the response must echo) or raise ``APIError`` carrying the HTTP status and an
OpenAI-style error body naming the field. Sampling options are bounded in one place,
``cluster.engine.sampling``; this module maps wire fields onto them (``max_completion_tokens`` onto
``max_tokens``, completions' ``logprobs: N`` onto ``logprobs`` + ``top_logprobs``, ...) and
reports their errors under the wire name. ``response_format`` and forced ``tool_choice``
become grammars (``cluster.engine.grammar``). Responses and stream chunks are in
``cluster.api.openai_responses``. ``parse_tokenize`` / ``parse_detokenize`` read llama-server's
``/tokenize`` and ``/detokenize`` bodies.
"""

from __future__ import annotations

import json
import logging
import secrets
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Literal

from cluster.engine.chat import ChatMessage, ChatPrompt, chat_messages
from cluster.errors import (
    InvalidParameterError,
    NodeFailedError,
    NoNodesError,
    OverloadedError,
    PromptTooLongError,
    RouterUnavailableError,
)
from cluster.engine.grammar import json_object_grammar, json_schema_grammar, tool_call_grammar
from cluster.engine.sampling import MAX_SEED, SamplingParamError, SamplingParams
from cluster.api.tool_calls import is_function_name

log = logging.getLogger(__name__)


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
        body_timeout_s: a request body not received whole within this many seconds gets 408
            (a client that sends less than its Content-Length does not hold a connection).
    """

    max_body_bytes: int = 1 << 20
    max_prompt_tokens: int = 1536
    max_tokens: int = 512
    default_max_tokens: int | None = None
    body_timeout_s: float = 30.0

    def __post_init__(self) -> None:
        if self.default_max_tokens is None and isinstance(self.max_tokens, int):
            object.__setattr__(self, "default_max_tokens", min(16, self.max_tokens))
        for name in ("max_body_bytes", "max_prompt_tokens", "max_tokens", "default_max_tokens"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise InvalidParameterError(f"{name} must be an integer >= 1, got {value!r}")
        if not isinstance(self.body_timeout_s, (int, float)) or not 0 < self.body_timeout_s <= 3600:
            raise InvalidParameterError(f"body_timeout_s must be a number in (0, 3600], got {self.body_timeout_s!r}")
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
    if isinstance(exc, InvalidParameterError):
        return APIError(400, message, param=exc.param)
    if isinstance(exc, ValueError):
        return APIError(400, message)
    if isinstance(exc, OverloadedError):
        return APIError(429, message, type="rate_limit_error", code="overloaded")
    if isinstance(exc, NoNodesError):
        return APIError(503, message, type="service_unavailable", code="no_nodes")
    if isinstance(exc, NodeFailedError):
        return APIError(503, message, type="service_unavailable", code="node_failed")
    if isinstance(exc, RouterUnavailableError):
        return APIError(503, message, type="service_unavailable", code="router_unavailable")
    error_id = uuid.uuid4().hex[:12]  # a caller quotes it; the log has the rest (a Ray error's text holds ids)
    log.error("internal error %s: %s: %s", error_id, type(exc).__name__, message)
    return APIError(500, f"internal error {error_id} (details in the gateway's log)", type="server_error")


@dataclass(frozen=True)
class APIRequest:
    """One parsed request: what goes to the router and what the response must echo.

    Attributes:
        kind: ``completion`` or ``chat``.
        model: the served model's name.
        prompt: the completion prompt, or the conversation (rendered where the request enters:
            ``cluster.distributed.edge``).
        params: the decoding options, validated.
        stream: answer with server-sent events.
        include_usage: ``stream_options.include_usage``.
        session_id: keeps a conversation's turns on one node (``session_id`` or ``user``).
        echo: completions: the prompt is prepended to each choice's text.
        parse_tools: chat with tools: calls in the answer (in the template's format) become ``tool_calls``.
        reasoning: chat: the model's thought is returned apart, as ``reasoning_content``
            (``reasoning_format``: ``auto`` / ``deepseek``, the default; ``none``: left in the text).
    """

    kind: Literal["completion", "chat"]
    model: str
    prompt: str | ChatPrompt
    params: SamplingParams
    stream: bool
    include_usage: bool
    session_id: str | None
    echo: bool = False
    parse_tools: bool = False
    reasoning: bool = True
    id: str = field(default_factory=lambda: uuid.uuid4().hex)
    created: int = field(default_factory=lambda: int(time.time()))


# -- parsing -------------------------------------------------------------------------------

_EXTENSIONS = {"top_k": "top_k", "min_p": "min_p", "repeat_penalty": "repeat_penalty",
               "repetition_penalty": "repeat_penalty", "repeat_last_n": "penalty_last_n", "grammar": "grammar",
               "stop_token_ids": "stop_token_ids"}
"""Fields outside OpenAI's API that llama-server or vLLM accept, and the SamplingParams field each sets."""
_COMMON = {"model", "max_tokens", "temperature", "top_p", "seed", "stop", "stream", "stream_options", "n", "user",
           "session_id", "presence_penalty", "frequency_penalty", "logit_bias", *_EXTENSIONS}
_COMPLETION_FIELDS = _COMMON | {"prompt", "echo", "best_of", "logprobs", "suffix"}
_CHAT_FIELDS = _COMMON | {"messages", "max_completion_tokens", "logprobs", "top_logprobs", "response_format", "tools",
                          "tool_choice", "parallel_tool_calls", "store", "service_tier", "reasoning_format"}


def parse_completion(body: Any, limits: Limits, model: str) -> APIRequest:
    """``POST /v1/completions``: ``prompt`` is a string (or a list holding one string)."""
    body = _object(body, _COMPLETION_FIELDS)
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if not isinstance(prompt, str) or not prompt:
        raise APIError(400, "'prompt' must be a non-empty string (one prompt per request)", param="prompt")
    _unsupported(body, {"best_of": 1, "suffix": None})
    echo = body.get("echo", False)
    if not isinstance(echo, bool):
        raise APIError(400, f"'echo' must be a boolean, got {echo!r}", param="echo")
    sampling: dict[str, tuple[str, Any]] = {}  # SamplingParams field -> (wire name, value)
    logprobs = body.get("logprobs")
    if logprobs is not None:
        if not isinstance(logprobs, int) or isinstance(logprobs, bool):
            raise APIError(400, f"'logprobs' must be an integer (alternatives per token) or null, got {logprobs!r}",
                           param="logprobs")
        if echo:
            raise APIError(400, "'logprobs' with 'echo' (log-probabilities of the prompt) is not supported", param="echo")
        sampling["logprobs"] = ("logprobs", True)
        sampling["top_logprobs"] = ("logprobs", logprobs)
    return _request("completion", body, prompt, sampling, limits, model, echo=echo)


def parse_chat(body: Any, limits: Limits, model: str) -> APIRequest:
    """``POST /v1/chat/completions``: the conversation goes to the router, which renders it with
    the model's chat template; ``tools``, ``tool_choice`` and ``response_format`` are read here."""
    body = _object(body, _CHAT_FIELDS)
    messages = _messages(body.get("messages"))
    tools = _tools(body.get("tools"))
    choice = _tool_choice(body.get("tool_choice"), tools)
    if body.get("parallel_tool_calls") is not None and not isinstance(body["parallel_tool_calls"], bool):
        raise APIError(400, "'parallel_tool_calls' must be a boolean", param="parallel_tool_calls")
    _unsupported(body, {"store": False})
    reasoning_format = body.get("reasoning_format", "auto")
    if reasoning_format not in ("auto", "deepseek", "none"):
        raise APIError(400, "'reasoning_format' must be 'auto' or 'deepseek' (the thought apart, as reasoning_content) "
                       "or 'none' (left in the answer)", param="reasoning_format")
    if body.get("service_tier") not in (None, "auto", "default"):
        raise APIError(400, "'service_tier' must be 'auto' or 'default' (one tier here)", param="service_tier")
    sampling: dict[str, tuple[str, Any]] = {}
    if "max_completion_tokens" in body:
        if "max_tokens" in body:
            raise APIError(400, "give 'max_tokens' or 'max_completion_tokens', not both", param="max_completion_tokens")
        sampling["max_tokens"] = ("max_completion_tokens", body["max_completion_tokens"])
    logprobs = body.get("logprobs")
    if logprobs is not None:
        sampling["logprobs"] = ("logprobs", logprobs)
    if body.get("top_logprobs") is not None:
        if logprobs is not True:
            raise APIError(400, "'top_logprobs' needs 'logprobs': true", param="top_logprobs")
        sampling["top_logprobs"] = ("top_logprobs", body["top_logprobs"])
    grammar = _response_format(body.get("response_format"))
    if choice not in ("none", "auto"):
        if grammar is not None:
            raise APIError(400, "'response_format' and a forced 'tool_choice' exclude each other", param="tool_choice")
        named = [t for t in tools if choice == "required" or t["function"]["name"] == choice]
        grammar = ("tool_choice", _grammar(lambda: tool_call_grammar(named), "tool_choice"))
    if grammar is not None:
        sampling["grammar"] = grammar
    rendered_tools = tools if choice != "none" else []
    prompt = ChatPrompt(messages, tools=tuple(json.dumps(t, ensure_ascii=False) for t in rendered_tools),
                        forced_tool_choice=choice not in ("none", "auto"))
    return _request("chat", body, prompt, sampling, limits, model, parse_tools=bool(rendered_tools),
                    reasoning=reasoning_format != "none")


def _messages(raw: Any) -> tuple[ChatMessage, ...]:
    try:
        return chat_messages(raw)
    except InvalidParameterError as exc:
        raise APIError(400, str(exc), param=exc.param) from None


def _tools(raw: Any) -> list[dict[str, Any]]:
    if raw is None:
        return []
    if not isinstance(raw, list) or not raw:
        raise APIError(400, "'tools' must be a non-empty list of function tools", param="tools")
    tools, names = [], set()
    for i, tool in enumerate(raw):
        function = tool.get("function") if isinstance(tool, dict) else None
        if not isinstance(tool, dict) or tool.get("type") != "function" or not isinstance(function, dict):
            raise APIError(400, f"tools[{i}] must be {{type: 'function', function: {{name, description?, parameters?}}}}",
                           param=f"tools[{i}]")
        name = function.get("name")
        if not is_function_name(name):
            raise APIError(400, f"tools[{i}].function.name must match ^[a-zA-Z0-9_-]{{1,64}}$ (letters, digits, '_' "
                           f"and '-', at most 64), got {json.dumps(name)[:80]}", param=f"tools[{i}].function.name")
        if name in names:
            raise APIError(400, f"tools[{i}].function.name '{name}' is given twice: names must be unique among the tools",
                           param=f"tools[{i}].function.name")
        parameters = function.get("parameters", {"type": "object", "properties": {}})
        if not isinstance(parameters, dict):
            raise APIError(400, f"tools[{i}].function.parameters must be a JSON schema object",
                           param=f"tools[{i}].function.parameters")
        description = function.get("description")
        if description is not None and not isinstance(description, str):
            raise APIError(400, f"tools[{i}].function.description must be a string", param=f"tools[{i}].function.description")
        names.add(name)
        entry = {"name": name, **({"description": description} if description else {}), "parameters": parameters}
        tools.append({"type": "function", "function": entry})
    return tools


def _tool_choice(raw: Any, tools: list[dict[str, Any]]) -> str:
    """``none``, ``auto``, ``required`` or the name of the function that must be called."""
    if raw is None:
        return "auto" if tools else "none"
    if not tools and raw != "none":
        raise APIError(400, "'tool_choice' needs 'tools'", param="tool_choice")
    if raw in ("none", "auto", "required"):
        return raw
    function = raw.get("function") if isinstance(raw, dict) else None
    name = function.get("name") if isinstance(function, dict) else None
    if not isinstance(raw, dict) or raw.get("type") != "function" or not isinstance(name, str):
        raise APIError(400, "'tool_choice' must be 'none', 'auto', 'required' or {type: 'function', function: {name}}",
                       param="tool_choice")
    if name not in {t["function"]["name"] for t in tools}:
        raise APIError(400, f"'tool_choice' names the function '{name}', which is not among 'tools'", param="tool_choice")
    return name


def _response_format(raw: Any) -> tuple[str, str] | None:
    """The grammar a ``response_format`` asks for (None for text), as (wire name, GBNF)."""
    if raw is None:
        return None
    kind = raw.get("type") if isinstance(raw, dict) else None
    if kind == "text":
        return None
    if kind == "json_object":
        return "response_format", json_object_grammar()
    if kind == "json_schema":
        spec = raw.get("json_schema")
        schema = spec.get("schema") if isinstance(spec, dict) else None
        if not isinstance(spec, dict) or not isinstance(spec.get("name"), str) or not isinstance(schema, dict):
            raise APIError(400, "'response_format' json_schema must be {name, schema: {...}, strict?}",
                           param="response_format")
        return "response_format", _grammar(lambda: json_schema_grammar(schema), "response_format")
    raise APIError(400, "'response_format' type must be 'text', 'json_object' or 'json_schema'", param="response_format")


def _grammar(build: Any, param: str) -> str:
    try:
        return build()
    except InvalidParameterError as exc:
        raise APIError(400, str(exc), param=param) from None


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


def _request(kind: Literal["completion", "chat"], body: dict[str, Any], prompt: str | ChatPrompt,
             sampling: dict[str, tuple[str, Any]], limits: Limits, model: str, echo: bool = False,
             parse_tools: bool = False, reasoning: bool = True) -> APIRequest:
    requested = body.get("model")
    if not isinstance(requested, str) or not requested:
        raise APIError(400, "'model' is required (see GET /v1/models)", param="model")
    if requested != model:
        raise APIError(404, f"the model '{requested}' does not exist; this server serves '{model}'",
                       param="model", code="model_not_found")
    for wire in ("max_tokens", "temperature", "top_p", "seed", "stop", "n", "presence_penalty", "frequency_penalty"):
        if body.get(wire) is not None:
            sampling[wire] = (wire, body[wire])
    for wire, name in _EXTENSIONS.items():
        if body.get(wire) is not None:
            if name in sampling:
                raise APIError(400, f"'{wire}' and '{sampling[name][0]}' exclude each other", param=wire)
            sampling[name] = (wire, body[wire])
    if body.get("logit_bias") is not None:
        sampling["logit_bias"] = ("logit_bias", _logit_bias(body["logit_bias"]))
    sampling.setdefault("max_tokens", ("max_tokens", limits.default_max_tokens))
    sampling.setdefault("temperature", ("temperature", 1.0))  # OpenAI's default: sampled
    sampling.setdefault("seed", ("seed", secrets.randbelow(MAX_SEED + 1)))
    params = sampling_params(sampling)
    wire, max_tokens = sampling["max_tokens"]
    if max_tokens > limits.max_tokens:
        raise APIError(400, f"'{wire}' must be an integer in [1, {limits.max_tokens}], got {max_tokens!r}", param=wire)
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise APIError(400, f"'stream' must be a boolean, got {stream!r}", param="stream")
    options = body.get("stream_options")
    if options is not None and (not stream or not isinstance(options, dict) or set(options) - {"include_usage"}):
        raise APIError(400, "'stream_options' is {include_usage: bool} and only with stream: true", param="stream_options")
    session_id = body.get("session_id", body.get("user"))
    if session_id is not None and (not isinstance(session_id, str) or not session_id or len(session_id) > 256):
        raise APIError(400, "'session_id' / 'user' must be a non-empty string of at most 256 characters", param="session_id")
    return APIRequest(kind=kind, model=model, prompt=prompt, params=params, stream=stream,
                      include_usage=bool((options or {}).get("include_usage", False)), session_id=session_id,
                      echo=echo, parse_tools=parse_tools, reasoning=reasoning)


def sampling_params(sampling: dict[str, tuple[str, Any]]) -> SamplingParams:
    """SamplingParams from (wire name, value) per field; a bad value is a 400 naming the wire field."""
    try:
        return SamplingParams.create(**{name: value for name, (_, value) in sampling.items()})
    except SamplingParamError as exc:
        wire = sampling.get(exc.field, (exc.field, None))[0]
        raise APIError(400, f"'{wire}' must be {exc.expected}, got {exc.value!r}", param=wire) from None
    except TypeError as exc:  # a value of a type the params cannot even hold
        raise APIError(400, f"bad sampling parameter: {exc}") from None


def _logit_bias(raw: Any) -> dict[int, Any]:
    """OpenAI's ``{"token id": bias}`` with the ids as integers (their range is checked by the router)."""
    if not isinstance(raw, dict):
        raise APIError(400, f"'logit_bias' must be an object mapping token ids to biases, got {raw!r}", param="logit_bias")
    bias = {}
    for key, value in raw.items():
        try:
            token = int(key)
        except ValueError:
            raise APIError(400, f"'logit_bias' keys must be token ids (integers), got {key!r}", param="logit_bias") from None
        bias[token] = value
    return bias


# -- tokenizer endpoints (llama-server's) ---------------------------------------------------------

@dataclass(frozen=True)
class TokenizeRequest:
    """``POST /tokenize``: ``content``, ``add_special`` (BOS, default false), ``parse_special``
    (special-token texts become tokens, default true), ``with_pieces`` (default false)."""

    content: str
    add_special: bool = False
    parse_special: bool = True
    with_pieces: bool = False


def parse_tokenize(body: Any) -> TokenizeRequest:
    body = _object(body, {"content", "add_special", "parse_special", "with_pieces"})
    if not isinstance(body.get("content"), str):
        raise APIError(400, "'content' must be a string", param="content")
    for name in ("add_special", "parse_special", "with_pieces"):
        if name in body and not isinstance(body[name], bool):
            raise APIError(400, f"'{name}' must be a boolean, got {body[name]!r}", param=name)
    return TokenizeRequest(**body)


def parse_detokenize(body: Any) -> list[int]:
    """``POST /detokenize``: ``tokens``, a list of token ids."""
    body = _object(body, {"tokens"})
    tokens = body.get("tokens")
    if not isinstance(tokens, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in tokens):
        raise APIError(400, "'tokens' must be a list of token ids (integers)", param="tokens")
    return tokens


def models_list(model: str, created: int) -> dict[str, Any]:
    return {"object": "list", "data": [{"id": model, "object": "model", "created": created, "owned_by": "expert-sniper"}]}
