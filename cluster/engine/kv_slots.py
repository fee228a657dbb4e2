"""Which KV state a request starts from: the engine's sequence slots and its saved conversations.

Decisions only (no llama.cpp), so the engine and the cluster simulator (``bench.simulate``) follow
the same rules. An engine has ``n_slots`` sequence slots in one llama.cpp context; a slot keeps
the KV state of the last request it served (prompt and answer) until another request needs it.
A request takes the free slot that already holds the longest prefix of its prompt (its
conversation's slot, if free; ties go to the least recently used slot); if another slot, busy or
not, or the conversation's saved state holds a longer prefix, that prefix is copied (or the state
loaded) into the chosen slot instead of being recomputed. A conversation whose slot is taken by
another one is saved first (``session_bytes`` of saved states in all, least recently used out).
At least one prompt token is always evaluated (its logits start the answer).

A held state serves a prompt only from ``min_reuse`` tokens on: 0 where the memory can be cut at any
position (full attention); where it cannot (sliding-window layers whose early positions the cache
dropped, recurrent state that exists only at its last position), ``kv_state`` sets it from llama.cpp's
memory, a shorter common prefix counts as nothing and the prompt is recomputed.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Sequence

from cluster.engine.prefix import reusable_tokens


@dataclass
class Slot:
    """One sequence slot: the tokens whose KV state it holds, whose they are, whether a request runs."""

    index: int
    tokens: list[int] = field(default_factory=list)
    session: str | None = None
    busy: bool = False
    used_at: int = 0
    min_reuse: int = 0  # the shortest prefix of ``tokens`` its memory can serve (module docstring)


@dataclass(frozen=True)
class SavedState:
    """A conversation's KV state kept outside the slots (``state``: llama.cpp's bytes; the
    simulator keeps none and counts ``n_bytes`` only)."""

    tokens: tuple[int, ...]
    n_bytes: int
    state: bytes | None = None
    min_reuse: int = 0


@dataclass(frozen=True)
class Placement:
    """Where a request starts, to be carried out in this order:

    1. ``save``: the slot's conversation, to save before the slot is overwritten (or None);
    2. ``restore``: load this conversation's saved state into the slot; or ``copy_from``: copy
       that slot's first ``n_reused`` tokens into it;
    3. drop the slot's KV from position ``n_reused`` on.

    ``n_held``: the longest prefix of the prompt any slot or saved state holds, whether or not its
    memory can serve it (more than ``n_reused`` where it cannot: those tokens are recomputed).
    """

    slot: Slot
    n_reused: int
    save: str | None = None
    restore: str | None = None
    copy_from: Slot | None = None
    n_held: int = 0


def common_prefix(a: Sequence[int], b: Sequence[int], limit: int) -> int:
    n = 0
    limit = min(limit, len(a), len(b))
    while n < limit and a[n] == b[n]:
        n += 1
    return n


def usable(n: int, min_reuse: int) -> int:
    """Tokens of a common prefix of ``n`` that a held state serves: all of them, or none below ``min_reuse``."""
    return n if n >= min_reuse else 0


class KvSlots:
    """The slots and saved conversations of one engine."""

    def __init__(self, n_slots: int, session_bytes: int) -> None:
        self.slots = [Slot(i) for i in range(n_slots)]
        self.session_bytes = session_bytes
        self.saved: OrderedDict[str, SavedState] = OrderedDict()
        self._clock = 0

    @property
    def n_free(self) -> int:
        return sum(not s.busy for s in self.slots)

    def place(self, tokens: Sequence[int], session: str | None) -> Placement | None:
        """Where a request for ``tokens`` (of conversation ``session``) starts; None if every slot is busy."""
        free = [s for s in self.slots if not s.busy]
        if not free:
            return None
        limit = reusable_tokens(len(tokens))
        held = {id(s): common_prefix(s.tokens, tokens, limit) for s in self.slots}
        own = [s for s in free if session is not None and s.session == session]
        slot = own[0] if own else max(free, key=lambda s: (usable(held[id(s)], s.min_reuse), -s.used_at))
        n_reused = usable(held[id(slot)], slot.min_reuse)
        save = slot.session if slot.session not in (None, session) and slot.tokens else None
        restore, copy_from = None, None
        saved = self.saved.get(session) if session is not None else None
        n_saved = common_prefix(saved.tokens, tokens, limit) if saved is not None else 0
        if saved is not None and usable(n_saved, saved.min_reuse) > n_reused:
            restore, n_reused = session, n_saved
        for other in self.slots:
            n = usable(held[id(other)], other.min_reuse) if other is not slot else 0
            if n > n_reused:
                restore, copy_from, n_reused = None, other, n
        return Placement(slot=slot, n_reused=n_reused, save=save, restore=restore, copy_from=copy_from,
                         n_held=max([n_saved, *held.values()]))

    def occupy(self, placement: Placement, tokens: Sequence[int], session: str | None) -> None:
        """The request of ``placement`` runs in its slot, which now holds its first ``n_reused`` tokens."""
        slot = placement.slot
        if placement.restore is not None:
            self.saved.pop(placement.restore, None)
        slot.tokens = list(tokens[:placement.n_reused])
        slot.min_reuse = slot.min_reuse if placement.n_reused else 0  # kv_state reads it from the memory
        slot.session = session
        slot.busy = True
        self._clock += 1
        slot.used_at = self._clock

    def release(self, slot: Slot, keep: bool) -> None:
        """The slot's request ended; its KV state stays for the next one (``keep``) or was dropped."""
        slot.busy = False
        if not keep:
            slot.tokens, slot.session, slot.min_reuse = [], None, 0

    def store(self, session: str, saved: SavedState) -> None:
        """Keeps a conversation's saved state within ``session_bytes`` (least recently used out)."""
        self.saved.pop(session, None)
        if saved.n_bytes > self.session_bytes:
            return
        self.saved[session] = saved
        total = self.saved_bytes
        while total > self.session_bytes:
            total -= self.saved.popitem(last=False)[1].n_bytes

    def clear(self) -> None:
        """Forgets every slot's KV and every saved state (the context was cleared)."""
        for slot in self.slots:
            slot.tokens, slot.session, slot.min_reuse = [], None, 0
        self.saved.clear()

    @property
    def saved_bytes(self) -> int:
        return sum(s.n_bytes for s in self.saved.values())

    def held(self) -> list[Sequence[int]]:
        """Every token sequence whose KV state is held: the slots' and the saved conversations'."""
        return [s.tokens for s in self.slots if s.tokens] + [s.tokens for s in self.saved.values()]

    def servable(self) -> list[tuple[Sequence[int], int]]:
        """As ``held``, each with the shortest prefix of it its memory can serve (``min_reuse``)."""
        return [(s.tokens, s.min_reuse) for s in self.slots if s.tokens] + \
            [(s.tokens, s.min_reuse) for s in self.saved.values()]

    def sessions(self) -> tuple[str, ...]:
        """Conversations whose KV state is held, in a slot or saved."""
        names = [s.session for s in self.slots if s.session is not None and s.tokens]
        return tuple(dict.fromkeys([*names, *self.saved]))
