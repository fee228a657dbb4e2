"""KV state in llama.cpp's context: carrying out ``kv_slots``' placements (save a conversation's
state, load it back, copy a prefix from another slot, drop the rest), and a snapshot of what
the slots hold for threads other than the step loop's.

``cluster.engine.kv_slots`` decides (no llama.cpp); this module does, on the engine's thread.
"""

from __future__ import annotations

import ctypes
from dataclasses import replace
from typing import Sequence

import llama_cpp
from llama_cpp import _internals

from cluster.engine.kv_slots import KvSlots, SavedState, Slot


class KvState:
    """The sequence slots of one llama.cpp context and the conversations saved outside them.

    Every method but the snapshot readers (``held_tokens``, ``sessions``, ``saved_bytes``,
    ``context_tokens``) runs on the step loop's thread.
    """

    def __init__(self, ctx: _internals.LlamaContext, n_slots: int, session_bytes: int) -> None:
        self._ctx = ctx
        self._slots = KvSlots(n_slots, session_bytes)
        self._last_slot: Slot | None = None
        self._held: tuple[tuple[str, ...], list[tuple[int, ...]], int] = ((), [], 0)

    @property
    def n_free(self) -> int:
        """Slots no request runs in."""
        return self._slots.n_free

    def start(self, prompt: Sequence[int], session: str | None) -> tuple[Slot, int]:
        """Gives a request a slot holding the longest KV prefix of ``prompt`` it can have
        (``kv_slots.KvSlots.place``), and returns the slot and the prompt tokens reused."""
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
        if placement.n_reused == 0 or not llama_cpp.llama_memory_seq_rm(memory, slot.index, placement.n_reused, -1):
            llama_cpp.llama_memory_seq_rm(memory, slot.index, 0, -1)
            placement = replace(placement, n_reused=0)
        self._slots.occupy(placement, prompt, session)
        self._last_slot = slot
        self._note_held()
        return slot, placement.n_reused

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
        return SavedState(tuple(slot.tokens), written, bytes(buf[:written]))

    def _load(self, index: int, state: bytes) -> bool:
        llama_cpp.llama_memory_seq_rm(self._ctx.memory, index, 0, -1)
        if not state:
            return False
        buf = (ctypes.c_uint8 * len(state)).from_buffer_copy(state)
        return llama_cpp.llama_state_seq_set_data(self._ctx.ctx, buf, len(state), index) != 0

    # -- snapshots for other threads --------------------------------------------------------------

    def _note_held(self) -> None:
        """Snapshot of what the slots hold, for other threads (one assignment: always whole)."""
        self._held = (self._slots.sessions(), [tuple(t) for t in self._slots.held()], self._slots.saved_bytes)

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

    @property
    def saved_bytes(self) -> int:
        """Bytes of saved conversation states."""
        return self._held[2]
