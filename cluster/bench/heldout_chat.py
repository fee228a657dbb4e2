"""Chat conversations cut from a trained model's held-out text: a workload a fresh clone can rebuild.

``cluster.bench.heldout_text`` finds the held-out documents of every domain of a trained model's
corpus on this machine (the corpus' own split rule, nothing of ``trained/work/`` needed) and cuts a
window from the middle of each. Asked for windows of characters (each character's code point a
"token", no BOS), it gives ``turns * chars_per_turn`` consecutive characters of one held-out document
per conversation; the conversation's turns are that text cut in ``turns`` pieces that follow each
other (a turn's successor is the text that came next, as ``cluster.train.prompts`` cuts its workload).

Conversations are ordered round the domains (the first conversation of every domain, then the
second...), each conversation's turns one after another: what one node sees when the router keeps a
conversation on it. A benchmark sends each turn as the conversation so far (earlier turns and the
answers they got) then the new turn (``cluster.bench.workload.conversation_prompt``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from cluster.bench.heldout_text import heldout_windows


@dataclass(frozen=True)
class HeldoutChat:
    """A chat workload: ``turns`` as ``(conversation, prompt)`` pairs in the order they are sent,
    where the text came from, and the domains that gave none (with the reason)."""

    turns: list[tuple[str, str]]
    origin: str
    skipped: dict[str, str] = field(default_factory=dict)

    @property
    def n_conversations(self) -> int:
        return len({conversation for conversation, _ in self.turns})


def heldout_chat(model_path: str | Path, *, conversations: int = 2, turns: int = 3, chars_per_turn: int = 600,
                 log: Callable[[str], None] = lambda line: None) -> HeldoutChat:
    """``conversations`` conversations of ``turns`` turns of ``chars_per_turn`` characters per domain of the
    model's corpus (module docstring).

    Raises:
        ValueError: a count below 1, or no domain has a held-out document long enough.
    """
    if min(conversations, turns, chars_per_turn) < 1:
        raise ValueError(f"need at least one conversation of one turn of one character, got {conversations} x "
                         f"{turns} x {chars_per_turn}")
    text = heldout_windows(model_path, lambda s: [ord(c) for c in s], None, n_windows=conversations,
                           window_tokens=turns * chars_per_turn, log=log)
    pieces = {domain: ["".join(map(chr, window)) for window in windows] for domain, windows in text.windows.items()}
    out: list[tuple[str, str]] = []
    for i in range(max(len(p) for p in pieces.values())):
        for domain, documents in pieces.items():
            if i < len(documents):
                out += [(f"{domain}-{i}", documents[i][t * chars_per_turn:(t + 1) * chars_per_turn])
                        for t in range(turns)]
    return HeldoutChat(turns=out, origin=text.origin, skipped=dict(text.skipped))
