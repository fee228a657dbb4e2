"""KV state in llama.cpp's context: carrying out ``kv_slots``' placements (save a conversation's
state, load it back, copy a prefix from another slot, drop the rest), and a snapshot of what
the slots hold for threads other than the step loop's.

``cluster.engine.kv_slots`` decides (no llama.cpp); this module does, on the engine's thread.

Not every model's memory can be cut at any position (``MemoryRule``). With sliding-window layers
(gpt-oss; Llama 4's chunked attention) the cache of those layers keeps a sequence's positions from
``llama_memory_seq_pos_min`` on: once it has dropped early ones (``swa_full=False``, or cells reused
past the window), a prefix ending less than a window after that minimum cannot be served;
``llama_memory_seq_rm`` still says it cut, and decoding on would attend to a window with holes.
Recurrent (and hybrid) memory holds its state at its last position only: ``seq_cp`` copies that
whole state and ``seq_rm`` at an earlier position fails. So each slot's and saved state's
``min_reuse`` is read from the memory before a request is placed, a prefix below it is recomputed
(as llama-server does without a usable context checkpoint: "forcing full prompt re-processing"),
what the slot holds after a copy or a restore is checked again before the prompt's tail is
evaluated, and ``reuse_stats`` counts what was reused and what was held but recomputed.
"""

from __future__ import annotations

import ctypes
from dataclasses import replace
from typing import Sequence

import llama_cpp
from llama_cpp import _internals

from cluster.engine.kv_slots import KvSlots, SavedState, Slot

_NEVER = 1 << 40  # a min_reuse no prefix reaches


class MemoryRule:
    """Which prefixes of a sequence's memory llama.cpp can serve, from the model's kind of memory.

    Attributes:
        n_swa: the sliding window (or attention chunk) of the model's windowed layers; 0: none.
        recurrent: recurrent layers (``llama_model_is_recurrent`` or ``llama_model_is_hybrid``).
        kind: "full", "sliding-window" or "recurrent", for reports.
    """

    def __init__(self, model: llama_cpp.llama_model_p, memory: llama_cpp.llama_memory_t) -> None:
        self._memory = memory
        self.n_swa = int(llama_cpp.llama_model_n_swa(model))
        self.recurrent = bool(llama_cpp.llama_model_is_recurrent(model) or llama_cpp.llama_model_is_hybrid(model))
        self.kind = "recurrent" if self.recurrent else "sliding-window" if self.n_swa > 0 else "full"

    def min_reuse(self, seq_id: int, n_tokens: int) -> int:
        """The shortest prefix of sequence ``seq_id``'s ``n_tokens`` held tokens its memory serves.

        Full attention: 0 (any). Recurrent: all of them (its state is at its last position only).
        Sliding window: a token at position n attends to positions above n - n_swa (a chunk's start,
        for chunked attention, is above it too), so a cut at n needs pos_min <= n - n_swa + 1; n >=
        pos_min + n_swa asks one position more (as llama-server's ``pos_min_thold`` does), or any n
        while position 0 is still held."""
        if self.kind == "full" or n_tokens == 0:
            return 0
        pos_min = int(llama_cpp.llama_memory_seq_pos_min(self._memory, seq_id))
        pos_max = int(llama_cpp.llama_memory_seq_pos_max(self._memory, seq_id))
        if pos_min < 0 or pos_max + 1 < n_tokens:  # the memory lost what the slot says it holds
            return _NEVER
        if self.recurrent:
            return pos_max + 1
        return 0 if pos_min == 0 else pos_min + self.n_swa


class KvState:
    """The sequence slots of one llama.cpp context and the conversations saved outside them.

    Every method but the snapshot readers (``held_tokens``, ``sessions``, ``saved_bytes``,
    ``context_tokens``) runs on the step loop's thread.
    """

    def __init__(self, ctx: _internals.LlamaContext, n_slots: int, session_bytes: int,
                 model: llama_cpp.llama_model_p | None = None) -> None:
        self._ctx = ctx
        self._slots = KvSlots(n_slots, session_bytes)
        self._last_slot: Slot | None = None
        self.rule = MemoryRule(model if model is not None else llama_cpp.llama_get_model(ctx.ctx), ctx.memory)
        self._reuse = {"requests": 0, "reused": 0, "reused_tokens": 0, "recomputed": 0, "recomputed_tokens": 0}
        self._held: tuple[tuple[str, ...], list[tuple[int, ...]], int, tuple[tuple[tuple[int, ...], int], ...],
                          dict[str, int]] = ((), [], 0, (), dict(self._reuse))

    @property
    def n_free(self) -> int:
        """Slots no request runs in."""
        return self._slots.n_free

    def start(self, prompt: Sequence[int], session: str | None) -> tuple[Slot, int]:
        """Gives a request a slot holding the longest KV prefix of ``prompt`` it can have
        (``kv_slots.KvSlots.place``: what its memory can serve, ``MemoryRule``), and returns the slot
        and the prompt tokens reused."""
        self._read_min_reuse()
        placement = self._slots.place(prompt, session)
        assert placement is not None
        slot = placement.slot
        memory = self._ctx.memory
        if placement.save is not None and slot.tokens:
            self._slots.store(placement.save, self._save(slot))
        if placement.restore is not None:
            saved = self._slots.saved[placement.restore]
            if not self._load(slot.index, saved.state or b""):
                placement = replace(placement, restore=None, n_reused=0)
        elif placement.copy_from is not None:
            llama_cpp.llama_memory_seq_rm(memory, slot.index, 0, -1)
            llama_cpp.llama_memory_seq_cp(memory, placement.copy_from.index, slot.index, 0, placement.n_reused)
        n = placement.n_reused  # what the slot's memory holds now must serve it (checked again: correct text first)
        if n == 0 or n < self.rule.min_reuse(slot.index, n) or not llama_cpp.llama_memory_seq_rm(memory, slot.index, n, -1):
            llama_cpp.llama_memory_seq_rm(memory, slot.index, 0, -1)
            placement = replace(placement, n_reused=0)
        self._slots.occupy(placement, prompt, session)
        slot.min_reuse = self.rule.min_reuse(slot.index, len(slot.tokens))
        self._count(placement)
        self._last_slot = slot
        self._note_held()
        return slot, placement.n_reused

    def borrow(self) -> Slot:
        """An empty free slot for evaluation outside the requests (``cluster.engine.scoring``): the
        one a request without a held prefix would take, its conversation saved first as for a
        request, its KV state dropped, marked busy. Give it back with ``release(slot, keep=False)``.

        Raises:
            RuntimeError: every slot is busy.
        """
        self._read_min_reuse()
        placement = self._slots.place((), None)
        if placement is None:
            raise RuntimeError("every sequence slot is busy")
        slot = placement.slot
        if placement.save is not None and slot.tokens:
            self._slots.store(placement.save, self._save(slot))
        llama_cpp.llama_memory_seq_rm(self._ctx.memory, slot.index, 0, -1)
        self._slots.occupy(replace(placement, n_reused=0, restore=None, copy_from=None), (), None)
        self._note_held()
        return slot

    def _read_min_reuse(self) -> None:
        """Each slot's ``min_reuse`` as its memory stands now (windowed layers drop positions as slots decode)."""
        if self.rule.kind == "full":
            return
        for slot in self._slots.slots:
            slot.min_reuse = self.rule.min_reuse(slot.index, len(slot.tokens))

    def _count(self, placement) -> None:
        stats = self._reuse
        stats["requests"] += 1
        if placement.n_reused:
            stats["reused"] += 1
            stats["reused_tokens"] += placement.n_reused
        if placement.n_held > placement.n_reused:
            stats["recomputed"] += 1
            stats["recomputed_tokens"] += placement.n_held - placement.n_reused

    def release(self, slot: Slot, keep: bool) -> None:
        """The request in ``slot`` ended; ``keep``: its KV state stays for a later request, else dropped."""
        if not keep:
            llama_cpp.llama_memory_seq_rm(self._ctx.memory, slot.index, 0, -1)
        self._slots.release(slot, keep)
        self._note_held()

    def clear(self) -> None:
        """Forgets every slot's KV state and every saved conversation."""
        llama_cpp.llama_memory_clear(self._ctx.memory, True)
        self._slots.clear()
        self._note_held()

    def _save(self, slot: Slot) -> SavedState:
        size = llama_cpp.llama_state_seq_get_size(self._ctx.ctx, slot.index)
        buf = (ctypes.c_uint8 * size)()
        written = llama_cpp.llama_state_seq_get_data(self._ctx.ctx, buf, size, slot.index)
        return SavedState(tuple(slot.tokens), written, bytes(buf[:written]),
                          self.rule.min_reuse(slot.index, len(slot.tokens)))

    def _load(self, index: int, state: bytes) -> bool:
        llama_cpp.llama_memory_seq_rm(self._ctx.memory, index, 0, -1)
        if not state:
            return False
        buf = (ctypes.c_uint8 * len(state)).from_buffer_copy(state)
        return llama_cpp.llama_state_seq_set_data(self._ctx.ctx, buf, len(state), index) != 0

    # -- snapshots for other threads --------------------------------------------------------------

    def _note_held(self) -> None:
        """Snapshot of what the slots hold, for other threads (one assignment: always whole)."""
        self._read_min_reuse()
        self._held = (self._slots.sessions(), [tuple(t) for t in self._slots.held()], self._slots.saved_bytes,
                      tuple((tuple(t), m) for t, m in self._slots.servable()), dict(self._reuse))

    @property
    def context_tokens(self) -> tuple[int, ...]:
        """Tokens whose KV state the most recently used slot holds."""
        slot = self._last_slot
        return tuple(slot.tokens) if slot is not None else ()

    def held_tokens(self) -> list[tuple[int, ...]]:
        """Every token sequence whose KV state is held (slots and saved conversations)."""
        return self._held[1]

    def sessions(self) -> tuple[str, ...]:
        """Conversations whose KV state is held."""
        return self._held[0]

    def servable(self) -> tuple[tuple[tuple[int, ...], int], ...]:
        """``held_tokens``, each with the shortest prefix of it the memory serves (``MemoryRule.min_reuse``)."""
        return self._held[3]

    def reuse_stats(self) -> dict[str, int]:
        """Since start: requests placed; of them, those that reused a held prefix (and its tokens),
        and those whose prompt had a longer prefix held than the memory could serve, recomputed (and
        the tokens recomputed that way)."""
        return dict(self._held[4])

    @property
    def saved_bytes(self) -> int:
        """Bytes of saved conversation states."""
        return self._held[2]
