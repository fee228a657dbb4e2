"""Tool calls in model output: the Hermes / Qwen ``<tool_call>{json}</tool_call>`` format parsed
back into OpenAI's ``tool_calls``.

A model that calls a function writes ``<tool_call>\\n{"name": "f", "arguments": {...}}\\n</tool_call>``
(one block per call) in its answer. ``split_tool_calls`` takes a whole answer apart into its
text and its calls; ``ToolCallStream`` does the same incrementally for streaming, holding back
only text that may be the start of a ``<tool_call>`` tag. A block whose JSON does not parse, or
lacks a string ``name``, stays text (the model wrote something else), and so does a block cut
off by ``max_tokens``.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass, field
from typing import Any

OPEN = "<tool_call>"
CLOSE = "</tool_call>"
FUNCTION_NAME = re.compile(r"[a-zA-Z0-9_-]{1,64}")
"""What a tool's function name may be (OpenAI's rule, ``^[a-zA-Z0-9_-]{1,64}$``): letters, digits,
underscores and dashes, 1 to 64 of them."""


def is_function_name(name: Any) -> bool:
    """``name`` is a string OpenAI accepts as a function name (``FUNCTION_NAME``)."""
    return isinstance(name, str) and FUNCTION_NAME.fullmatch(name) is not None


@dataclass(frozen=True)
class ParsedCall:
    """One call found in the output: its id, function name and arguments (JSON text)."""

    name: str
    arguments: str
    id: str = field(default_factory=lambda: "call_" + uuid.uuid4().hex[:24])


def parse_call(body: str) -> ParsedCall | None:
    """The call in the text between the tags, or None if it is not one."""
    try:
        data: Any = json.loads(body)
    except json.JSONDecodeError:
        return None
    if not isinstance(data, dict) or not isinstance(data.get("name"), str) or not data["name"]:
        return None
    arguments = data.get("arguments", data.get("parameters", {}))
    if isinstance(arguments, str):  # some models write the arguments already serialised
        try:
            arguments = json.loads(arguments)
        except json.JSONDecodeError:
            return None
    if not isinstance(arguments, dict):
        return None
    return ParsedCall(name=data["name"], arguments=json.dumps(arguments, ensure_ascii=False))


def split_tool_calls(text: str) -> tuple[str, list[ParsedCall]]:
    """An answer's text without its tool-call blocks, and the calls in order."""
    stream = ToolCallStream()
    events = stream.feed(text) + stream.finish()
    return "".join(e for e in events if isinstance(e, str)), [e for e in events if isinstance(e, ParsedCall)]


class ToolCallStream:
    """Incremental parser: ``feed`` text pieces, get back text (str) and calls (ParsedCall) in order.

    Text that could still become ``<tool_call>`` is held until it cannot; a block is held until
    its ``</tool_call>`` arrives; ``finish`` releases whatever is held as text.
    """

    def __init__(self) -> None:
        self._buffer = ""
        self._in_call = False
        self.calls = 0

    def feed(self, text: str) -> list[str | ParsedCall]:
        self._buffer += text
        events: list[str | ParsedCall] = []
        while True:
            if self._in_call:
                end = self._buffer.find(CLOSE)
                if end < 0:
                    return events
                body = self._buffer[len(OPEN):end]
                call = parse_call(body.strip())
                events.append(call if call is not None else self._buffer[:end + len(CLOSE)])
                if call is not None:
                    self.calls += 1
                self._buffer = self._buffer[end + len(CLOSE):]
                self._in_call = False
                continue
            start = self._buffer.find(OPEN)
            if start >= 0:
                if start:
                    events.append(self._buffer[:start])
                self._buffer = self._buffer[start:]
                self._in_call = True
                continue
            keep = _partial_tag(self._buffer)
            if len(self._buffer) > keep:
                events.append(self._buffer[:len(self._buffer) - keep])
                self._buffer = self._buffer[len(self._buffer) - keep:]
            return events

    def finish(self) -> list[str | ParsedCall]:
        """What is still held, as text (an unterminated block or a partial tag)."""
        rest, self._buffer, self._in_call = self._buffer, "", False
        return [rest] if rest else []


def _partial_tag(text: str) -> int:
    """Length of the longest suffix of ``text`` that is a proper prefix of ``<tool_call>``."""
    for n in range(min(len(OPEN) - 1, len(text)), 0, -1):
        if OPEN.startswith(text[-n:]):
            return n
    return 0
