"""One answer taken apart in its chat format: reasoning, text and tool calls, whole or streamed.

``AnswerStream`` stacks what a format needs: gpt-oss's harmony channels (``harmony``), or a
thought between tags at the start (``reasoning``) and then the format's tool-call blocks
(``blocks`` with ``syntaxes``). ``parse_answer`` runs it over a whole answer; fed piece by piece it
gives the same reasoning, text and calls.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

from cluster.api.formats.blocks import BlockStream
from cluster.api.formats.events import Event, ParsedCall, Reasoning
from cluster.api.formats.harmony import HarmonyStream
from cluster.api.formats.reasoning import ThinkStream
from cluster.api.formats.syntaxes import syntax_for, tool_types
from cluster.engine.chat_format import CONTENT, ChatFormat


class AnswerStream:
    """Incremental parser of one answer: ``feed`` text pieces, get text (str), ``Reasoning`` and
    ``ParsedCall`` events in order; ``finish`` at the answer's end.

    Args:
        fmt: the template's format (``cluster.engine.chat_format.detect_format``).
        tools: the request's function tools (OpenAI's shape); None or empty: calls are not parsed.
        reasoning: split the thought off (False: llama-server's ``reasoning_format: none``; a
            harmony thought is then answer text).
        thinking_open: the prompt already opened the thought.
    """

    def __init__(self, fmt: ChatFormat = CONTENT, tools: Sequence[dict[str, Any]] | None = None, *,
                 reasoning: bool = True, thinking_open: bool = False) -> None:
        self.reasoning = reasoning
        self._harmony = HarmonyStream(tools=bool(tools)) if fmt.harmony else None
        self._think = ThinkStream(fmt.think_tags, opened=thinking_open) \
            if reasoning and fmt.think_tags is not None and not fmt.harmony else None
        syntax = syntax_for(fmt.name, tool_types(tools)) if tools and not fmt.harmony else None
        self._blocks = BlockStream(syntax) if syntax is not None else None
        self.calls = 0

    def feed(self, text: str) -> list[Event]:
        if self._harmony is not None:
            return self._out(self._harmony.feed(text))
        return self._out(self._tools(self._think.feed(text) if self._think else [text]))

    def finish(self) -> list[Event]:
        if self._harmony is not None:
            return self._out(self._harmony.finish())
        events = self._tools(self._think.finish()) if self._think else []
        if self._blocks is not None:
            events += self._blocks.finish()
        return self._out(events)

    def _tools(self, events: list[Event]) -> list[Event]:
        if self._blocks is None:
            return events
        return [out for e in events for out in (self._blocks.feed(e) if isinstance(e, str) else [e])]

    def _out(self, events: list[Event]) -> list[Event]:
        out: list[Event] = []
        for e in events:
            if isinstance(e, Reasoning) and not self.reasoning:
                e = e.text
            if isinstance(e, ParsedCall):
                self.calls += 1
            if e != "":
                out.append(e)
        return out


@dataclass(frozen=True)
class ParsedAnswer:
    """A whole answer taken apart: its text, its thought (None when it has none) and its calls."""

    content: str
    reasoning: str | None = None
    calls: list[ParsedCall] = field(default_factory=list)


def collect(events: Sequence[Event]) -> ParsedAnswer:
    """The answer the events make up."""
    content = "".join(e for e in events if isinstance(e, str))
    reasoning = "".join(e.text for e in events if isinstance(e, Reasoning))
    return ParsedAnswer(content, reasoning or None, [e for e in events if isinstance(e, ParsedCall)])


def parse_answer(text: str, fmt: ChatFormat = CONTENT, tools: Sequence[dict[str, Any]] | None = None, *,
                 reasoning: bool = True, thinking_open: bool = False) -> ParsedAnswer:
    """A whole answer taken apart (``AnswerStream`` over all of it)."""
    stream = AnswerStream(fmt, tools, reasoning=reasoning, thinking_open=thinking_open)
    return collect(stream.feed(text) + stream.finish())
