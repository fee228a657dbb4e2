"""gpt-oss's harmony format: an answer in channels, taken apart whole or streamed.

The model writes messages ``<|channel|>NAME<|message|>TEXT<|end|>``, each after the first opened
by ``<|start|>assistant``: ``analysis`` is its thought (reasoning), ``final`` the answer,
``commentary`` a preamble to calls (answer text). A call names its recipient in the header,
``to=functions.NAME`` (before or after the channel, with ``<|constrain|>json`` or ``json``), and
its message is the JSON arguments, ended by ``<|call|>``. Like llama.cpp's ``common_chat_parse_gpt_oss``:
a message's text runs to ``<|end|>``, ``<|return|>``, ``<|call|>``, the next ``<|start|>`` or the
answer's end; an answer that does not open with a header is all text, and so is a header of
no known channel. The stream holds back a header until its ``<|message|>``, a call until its
end, and otherwise only what may begin an end marker.
"""

from __future__ import annotations

import re

from cluster.api.formats.events import Event, ParsedCall, Reasoning, arguments_text, held_suffix, is_function_name

MESSAGE = "<|message|>"
START = "<|start|>"
ENDS = ("<|end|>", "<|return|>", "<|call|>", START)
_OPENERS = ("<|channel|>", START, " to=")
_RECIPIENT = re.compile(r"to=functions\.([^<\s]+)")
_CHANNEL = re.compile(r"<\|channel\|>\s*(\w+)")

_HEADER, _BODY, _PLAIN = "header", "body", "plain"


class HarmonyStream:
    """Incremental parser: ``feed`` text, get answer text (str), ``Reasoning`` and ``ParsedCall``s.

    ``tools``: calls become ``ParsedCall`` (else their arguments are answer text)."""

    def __init__(self, tools: bool = True) -> None:
        self.tools = tools
        self._buffer = ""
        self._state = _HEADER
        self._first = True
        self._kind = "content"  # of the message being read: content, reasoning or a call
        self._name = ""
        self.calls = 0

    def feed(self, text: str) -> list[Event]:
        self._buffer += text
        return self._run(final=False)

    def finish(self) -> list[Event]:
        events = self._run(final=True)
        rest, self._buffer = self._buffer, ""
        if self._state == _BODY:
            events += self._message(rest)
        elif rest:
            events.append(rest)
        return events

    def _run(self, final: bool) -> list[Event]:
        events: list[Event] = []
        while self._buffer:
            if self._state == _PLAIN:
                events.append(self._buffer)
                self._buffer = ""
            elif self._state == _HEADER:
                at = self._buffer.find(MESSAGE)
                if self._first and not any(self._buffer.startswith(m) or m.startswith(self._buffer) for m in _OPENERS):
                    self._state = _PLAIN  # not harmony: all of it is text
                    continue
                if at < 0:
                    return events
                header = self._buffer[:at]
                self._buffer, self._state, self._first = self._buffer[at + len(MESSAGE):], _BODY, False
                self._classify(header)
                if self._kind == "unknown":
                    events.append(header + MESSAGE)
                    self._kind = "content"
            else:
                found = [(self._buffer.find(m), m) for m in ENDS if m in self._buffer]
                if found:
                    at, marker = min(found)
                    events += self._message(self._buffer[:at])
                    self._buffer = self._buffer[at if marker == START else at + len(marker):]
                    self._state = _HEADER
                    continue
                if self._kind == "call" or final:
                    return events  # a call waits for its end; finish() takes the rest
                keep = held_suffix(self._buffer, ENDS)
                send = self._buffer[:len(self._buffer) - keep]
                if send:
                    events += self._message(send)
                    self._buffer = self._buffer[len(send):]
                return events
        return events

    def _classify(self, header: str) -> None:
        recipient = _RECIPIENT.search(header)
        channel = _CHANNEL.search(header)
        name = channel.group(1) if channel else None
        if recipient and name in ("analysis", "commentary"):
            self._kind, self._name = "call", recipient.group(1)
        elif name == "analysis":
            self._kind = "reasoning"
        elif name in ("final", "commentary"):
            self._kind = "content"
        else:
            self._kind = "unknown"

    def _message(self, text: str) -> list[Event]:
        if not text:
            return []
        if self._kind == "reasoning":
            return [Reasoning(text)]
        if self._kind == "call":
            arguments = arguments_text(text.strip())
            if self.tools and arguments is not None and is_function_name(self._name):
                self.calls += 1
                return [ParsedCall(name=self._name, arguments=arguments)]
        return [text]
