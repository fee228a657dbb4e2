"""The stream machine every tool-call format but gpt-oss's shares: answer text with call blocks.

A format (``cluster.api.formats.syntaxes``) says where a block may start (``opens``: a marker
anywhere in the text; ``start_opens``: a marker only where the answer starts or right after a
block, past whitespace or the format's ``separators``) and ``scan``s a block: from the text that
starts at its marker, how far the block goes and the calls in it (None: not calls, the block
stays text), or None while the block may still grow. ``BlockStream`` runs a format over an answer
fed piece by piece: text goes out as soon as it cannot begin a marker, a block when it is whole.
Its decisions depend only on the text, never on how it was cut, so a whole answer and the same
answer streamed give the same events (up to how text is split between them); ``finish``
releases what is held, a block cut off (by ``max_tokens``) as text unless the format accepts
the end of the answer as its end.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, Sequence

from cluster.api.formats.events import Event, ParsedCall, held_suffix


@dataclass(frozen=True)
class Scan:
    """A block read whole: it covers ``text[:end]``; ``calls`` None: it is not a call (text)."""

    end: int
    calls: Sequence[ParsedCall] | None


class Syntax(Protocol):
    opens: tuple[str, ...]
    start_opens: tuple[str, ...]
    separators: str

    def scan(self, text: str, final: bool) -> Scan | None: ...


_WHITESPACE = " \t\r\n"


class BlockStream:
    """Incremental parser of one format: ``feed`` text, get text (str) and ``ParsedCall``s in order."""

    def __init__(self, syntax: Syntax) -> None:
        self.syntax = syntax
        self._buffer = ""
        self._in_block = False
        self._at_start = True  # where a start_opens marker may begin a block
        self._after_block = False
        self.calls = 0

    def feed(self, text: str) -> list[Event]:
        self._buffer += text
        return self._run(final=False)

    def finish(self) -> list[Event]:
        events = self._run(final=True)
        if self._buffer:
            events.append(self._buffer)
        self._buffer, self._in_block = "", False
        return events

    def _run(self, final: bool) -> list[Event]:
        events: list[Event] = []
        syntax = self.syntax
        while self._buffer:
            if self._in_block:
                scan = syntax.scan(self._buffer, final)
                if scan is None:
                    if not final:
                        return events
                    scan = Scan(len(self._buffer), None)
                if scan.calls:
                    events.extend(scan.calls)
                    self.calls += len(scan.calls)
                    self._at_start = self._after_block = True
                else:
                    events.append(self._buffer[:scan.end])
                    self._at_start = self._after_block = False
                self._buffer, self._in_block = self._buffer[scan.end:], False
                continue
            if self._at_start and syntax.start_opens:
                rest = self._buffer.lstrip(syntax.separators if self._after_block else _WHITESPACE)
                if any(rest.startswith(m) for m in syntax.start_opens):
                    lead = self._buffer[:len(self._buffer) - len(rest)]
                    if lead and not self._after_block:  # separators between calls are dropped
                        events.append(lead)
                    self._buffer, self._in_block = rest, True
                    continue
                if not final and (not rest or any(m.startswith(rest) for m in syntax.start_opens)):
                    return events
            self._at_start = self._after_block = False
            at, marker = min(((self._buffer.find(m), m) for m in syntax.opens if m in self._buffer),
                             default=(-1, ""))
            if at >= 0:
                if at:
                    events.append(self._buffer[:at])
                self._buffer, self._in_block = self._buffer[at:], True
                continue
            keep = 0 if final else held_suffix(self._buffer, syntax.opens)
            if len(self._buffer) > keep:
                events.append(self._buffer[:len(self._buffer) - keep])
                self._buffer = self._buffer[len(self._buffer) - keep:]
            return events
        return events
