"""The OpenAI wire format, responses side: answer bodies and server-sent-event chunks.

Pure functions, no Ray and no web framework. ``response`` builds a whole answer from the
choices the router returned; ``StreamChunks`` turns the router's stream (pieces tagged with
their choice ``index``, then the ``done`` item) into OpenAI's chunks, choice by choice:

* text as ``delta.content`` (chat) or ``text`` (completions), the first chat chunk of a choice
  with ``role: assistant``;
* ``logprobs`` in OpenAI's shapes: completions' legacy ``{tokens, token_logprobs,
  top_logprobs, text_offset}``, chat's ``{content: [{token, logprob, bytes, top_logprobs}]}``;
* a chat answer taken apart in its template's format (``cluster.api.formats``; the format comes
  with the request's ``Routed`` item): the model's thought as ``delta.reasoning_content`` (message
  field ``reasoning_content``), unless the request asked ``reasoning_format: none``; with tools,
  calls as ``delta.tool_calls``: a chunk with the call's index, id, type and name, then one with
  its arguments; the choice then finishes with ``finish_reason: tool_calls``. Without a known
  format (a chat of the plain rendering), tools are read in the Hermes ``<tool_call>`` format;
* the last chunk of each choice carries its ``finish_reason`` (and ``system_fingerprint``, the
  node that served it), then the usage chunk when ``stream_options.include_usage`` asked.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

from cluster.api.formats import AnswerStream, Event, ParsedCall, Reasoning, collect
from cluster.api.openai_api import APIRequest
from cluster.distributed.client import Choice
from cluster.distributed.protocol import Finished, Usage
from cluster.engine.chat_format import format_named
from cluster.engine.sampling import TokenLogprob


def usage_body(usage: Usage) -> dict[str, int]:
    """OpenAI's ``usage``; from a node running cache-aware expert selection, also
    ``expert_selections_changed`` and ``expert_selections_skipped`` (``Usage``): an exact
    deployment's keeps OpenAI's shape."""
    body = {"prompt_tokens": usage.prompt_tokens, "completion_tokens": usage.completion_tokens,
            "total_tokens": usage.total_tokens}
    if usage.selections_changed is not None:
        body["expert_selections_changed"] = usage.selections_changed
    if usage.selections_skipped is not None:
        body["expert_selections_skipped"] = usage.selections_skipped
    return body


def _object_name(req: APIRequest, chunk: bool) -> str:
    if req.kind == "chat":
        return "chat.completion.chunk" if chunk else "chat.completion"
    return "text_completion"


def response_id(req: APIRequest) -> str:
    return ("chatcmpl-" if req.kind == "chat" else "cmpl-") + req.id


def logprobs_body(req: APIRequest, entries: Sequence[TokenLogprob]) -> dict[str, Any] | None:
    """Log-probabilities of some tokens in the endpoint's shape; None when not asked for.

    Each token is shown as the text it added to the answer (``TokenLogprob.text``), so the
    tokens put together are the answer's text, as OpenAI and llama-server show them; chat's
    ``bytes`` give each token's (and alternative's) own bytes. The legacy ``top_logprobs`` maps
    text to log-probability: of alternatives with the same text, the likeliest is kept.
    """
    if not req.params.logprobs:
        return None
    if req.kind == "chat":
        return {"content": [{"token": e.text, "logprob": e.logprob, "bytes": list(e.piece),
                             "top_logprobs": [{"token": t.text, "logprob": t.logprob, "bytes": list(t.piece)}
                                              for t in e.top]} for e in entries],
                "refusal": None}
    return {"tokens": [e.text for e in entries],
            "token_logprobs": [e.logprob for e in entries],
            "top_logprobs": [_likeliest_by_text(e) for e in entries] if req.params.top_logprobs else None,
            "text_offset": [e.offset for e in entries]}


def _likeliest_by_text(entry: TokenLogprob) -> dict[str, float]:
    top: dict[str, float] = {}
    for t in entry.top:  # most likely first
        top.setdefault(t.text, t.logprob)
    return top


def _tool_call_body(call: ParsedCall, index: int) -> dict[str, Any]:
    return {"index": index, "id": call.id, "type": "function", "function": {"name": call.name, "arguments": call.arguments}}


def answer_stream(req: APIRequest, chat_format: str | None = None, thinking_open: bool = False) -> AnswerStream | None:
    """The parser of one chat answer in the template's format ``chat_format`` (None: unknown, then
    only tools are read, in the Hermes format); None when the answer is sent as it comes."""
    if req.kind != "chat" or (chat_format is None and not req.parse_tools):
        return None
    tools = req.prompt.tools_for_template() if req.parse_tools and not isinstance(req.prompt, str) else None
    return AnswerStream(format_named(chat_format or "hermes"), tools, reasoning=req.reasoning and chat_format is not None,
                        thinking_open=thinking_open)


def response(req: APIRequest, choices: Sequence[Choice], usage: Usage, node: str, chat_format: str | None = None,
             thinking_open: bool = False) -> dict[str, Any]:
    """The non-streaming body; ``system_fingerprint`` names the node that served it; a chat answer
    is taken apart in ``chat_format`` (see ``answer_stream``)."""
    bodies = []
    for choice in sorted(choices, key=lambda c: c.index):
        logprobs = logprobs_body(req, choice.logprobs)
        if req.kind == "chat":
            message: dict[str, Any] = {"role": "assistant", "content": choice.text}
            finish = choice.finish_reason
            parser = answer_stream(req, chat_format, thinking_open)
            if parser is not None:
                answer = collect(parser.feed(choice.text) + parser.finish())
                message = {"role": "assistant", "content": answer.content}
                if answer.reasoning is not None:
                    message["reasoning_content"] = answer.reasoning
                if answer.calls:
                    message["content"] = answer.content.strip() or None
                    message["tool_calls"] = [{k: v for k, v in _tool_call_body(c, i).items() if k != "index"}
                                             for i, c in enumerate(answer.calls)]
                    finish = "tool_calls" if finish == "stop" else finish
            bodies.append({"index": choice.index, "message": message, "logprobs": logprobs, "finish_reason": finish})
        else:
            text = (req.prompt + choice.text) if req.echo and isinstance(req.prompt, str) else choice.text
            bodies.append({"index": choice.index, "text": text, "logprobs": logprobs, "finish_reason": choice.finish_reason})
    return {"id": response_id(req), "object": _object_name(req, chunk=False), "created": req.created, "model": req.model,
            "system_fingerprint": node, "choices": bodies, "usage": usage_body(usage)}


def chunk(req: APIRequest, choices: list[dict[str, Any]], *, usage: Usage | None = None,
          node: str | None = None) -> dict[str, Any]:
    """One stream chunk around ``choices`` (empty for the usage-only chunk)."""
    body: dict[str, Any] = {"id": response_id(req), "object": _object_name(req, chunk=True), "created": req.created,
                            "model": req.model, "choices": choices}
    if node is not None:
        body["system_fingerprint"] = node
    if usage is not None:
        body["usage"] = usage_body(usage)
    return body


@dataclass
class _ChoiceStream:
    """What the stream has sent of one choice so far."""

    started: bool = False
    parser: AnswerStream | None = None
    n_calls: int = 0
    pending_logprobs: list[TokenLogprob] = field(default_factory=list)


class StreamChunks:
    """The chunks of one streamed request, built from the router's items (see the module docstring)."""

    def __init__(self, req: APIRequest, chat_format: str | None = None, thinking_open: bool = False) -> None:
        self.req = req
        self.chat_format = chat_format
        self.thinking_open = thinking_open
        self._choices: dict[int, _ChoiceStream] = {}

    def _state(self, index: int) -> _ChoiceStream:
        state = self._choices.get(index)
        if state is None:
            state = self._choices[index] = _ChoiceStream(
                parser=answer_stream(self.req, self.chat_format, self.thinking_open))
        return state

    def piece(self, index: int, text: str, logprobs: Sequence[TokenLogprob] = ()) -> list[dict[str, Any]]:
        """Chunks for a piece of choice ``index`` (none while a tool call or a possible marker is held)."""
        state = self._state(index)
        state.pending_logprobs.extend(logprobs)
        if state.parser is None:
            return [self._delta(index, state, {"content": text} if self.req.kind == "chat" else {"text": text})] \
                if text or state.pending_logprobs else []
        return [c for event in state.parser.feed(text) for c in self._event(index, state, event)]

    def end(self, done: Finished) -> list[dict[str, Any]]:
        """The last chunk of every choice (what a tool parser still held, then ``finish_reason``),
        and the usage chunk if asked."""
        out: list[dict[str, Any]] = []
        for choice in sorted(done.choices, key=lambda c: c.index):
            index = choice.index
            state = self._state(index)
            finish = choice.finish_reason
            if state.parser is not None:
                out += [c for event in state.parser.finish() for c in self._event(index, state, event)]
                if state.n_calls and finish == "stop":
                    finish = "tool_calls"
            out.append(self._delta(index, state, {}, finish_reason=finish, node=done.node))
        if self.req.include_usage:
            out.append(chunk(self.req, [], usage=done.usage))
        return out

    def _event(self, index: int, state: _ChoiceStream, event: Event) -> list[dict[str, Any]]:
        if isinstance(event, str):
            return [self._delta(index, state, {"content": event})] if event else []
        if isinstance(event, Reasoning):
            return [self._delta(index, state, {"reasoning_content": event.text})] if event.text else []
        call = _tool_call_body(event, state.n_calls)
        state.n_calls += 1
        opening = {**call, "function": {"name": event.name, "arguments": ""}}
        arguments = {"index": call["index"], "function": {"arguments": event.arguments}}
        return [self._delta(index, state, {"tool_calls": [opening]}), self._delta(index, state, {"tool_calls": [arguments]})]

    def _delta(self, index: int, state: _ChoiceStream, delta: dict[str, Any], finish_reason: str | None = None,
               node: str | None = None) -> dict[str, Any]:
        logprobs = logprobs_body(self.req, state.pending_logprobs)
        state.pending_logprobs = []
        if self.req.kind == "chat":
            if not state.started:
                delta = {"role": "assistant", **({"content": ""} if not {"content", "tool_calls", "reasoning_content"} & set(delta)
                                                 else {}), **delta}
            body: dict[str, Any] = {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}
        else:
            body = {"index": index, "text": delta.get("text", ""), "logprobs": logprobs, "finish_reason": finish_reason}
        state.started = True
        return chunk(self.req, [body], node=node)
