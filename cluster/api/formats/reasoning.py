"""A thought between tags at the start of an answer (``<think>...</think>``, Mistral's
``[THINK]...[/THINK]``) taken apart from the answer, whole or streamed.

As llama.cpp's ``try_parse_reasoning``: the thought counts only at the start of the answer
(after whitespace), or from the first character when the prompt already opened it
(``opened``: the template's generation prompt ends with ``<think>``). A thought never closed is
all reasoning. Whitespace around the thought, and between it and the answer, is dropped; the
stream holds back only whitespace and what may begin the tags.
"""

from __future__ import annotations

from cluster.api.formats.events import Event, Reasoning, held_suffix

_START, _THINK, _CONTENT = "start", "think", "content"


class ThinkStream:
    """Incremental splitter: ``feed`` text, get ``Reasoning`` and answer text (str) in order."""

    def __init__(self, tags: tuple[str, str], opened: bool = False) -> None:
        self.open, self.close = tags
        self._state = _THINK if opened else _START
        self._buffer = ""
        self._strip = opened  # drop the whitespace that starts the thought or the answer after it

    def feed(self, text: str) -> list[Event]:
        self._buffer += text
        events: list[Event] = []
        while True:
            if self._state == _START:
                rest = self._buffer.lstrip()
                if rest.startswith(self.open):
                    self._buffer, self._state, self._strip = rest[len(self.open):], _THINK, True
                    continue
                if not rest or self.open.startswith(rest):
                    return events  # still may be the opening tag
                self._state = _CONTENT
                continue
            if self._strip:
                self._buffer = self._buffer.lstrip()
                if not self._buffer:
                    return events
                self._strip = False
            if self._state == _CONTENT:
                if self._buffer:
                    events.append(self._buffer)
                self._buffer = ""
                return events
            end = self._buffer.find(self.close)
            if end >= 0:
                thought = self._buffer[:end].rstrip()
                if thought:
                    events.append(Reasoning(thought))
                self._buffer, self._state, self._strip = self._buffer[end + len(self.close):], _CONTENT, True
                continue
            partial = held_suffix(self._buffer, (self.close,))
            body = self._buffer[:len(self._buffer) - partial]
            send = body.rstrip()  # trailing whitespace waits: it is dropped if the tag follows
            if send:
                events.append(Reasoning(send))
                self._buffer = self._buffer[len(send):]
            return events

    def finish(self) -> list[Event]:
        """What is still held: a thought never closed is reasoning; the rest is answer text."""
        rest, self._buffer = self._buffer, ""
        if self._state == _THINK:
            rest = rest.strip() if self._strip else rest.rstrip()
            return [Reasoning(rest)] if rest else []
        if self._strip:
            rest = rest.lstrip()
        return [rest] if rest else []
