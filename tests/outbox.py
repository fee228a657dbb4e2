"""What submitted sequences finish with, read from their outboxes (tests of the engine's batching)."""

from __future__ import annotations

from cluster.engine.generation import Generation
from cluster.engine.sequence import Piece


def finished_generations(sequences, timeout_s: float = 120) -> list[Generation]:
    """Each sequence's ``Generation``, in order, after its pieces; anything else ending it fails the test."""
    out = []
    for seq in sequences:
        while True:
            item = seq.outbox.get(timeout=timeout_s)
            if isinstance(item, Generation):
                out.append(item)
                break
            if not isinstance(item, Piece):
                raise AssertionError(f"sequence ended with {item!r}")
    return out
