"""Prompt prefixes, one rule each: how a prompt's prefixes are hashed (cumulative hashes of whole
blocks of ``PREFIX_BLOCK`` tokens, ``csrc/prefix-hash.h``), the set a node reports for the KV states
it holds, and how much of a prompt a held KV state can serve (all but the last token, which is
always prefilled: its logits start the answer). Used by the KV slots, the node, the warmth policy
and the simulator."""

from __future__ import annotations

from typing import Iterable, Sequence

import numpy as np

from cluster._routing import prefix_hashes as _native_prefix_hashes

PREFIX_BLOCK = 32  # tokens per hashed block
MAX_PREFIX_BLOCKS = 256  # blocks hashed per prompt at most (8192 tokens)


def prefix_hashes(tokens: Sequence[int] | np.ndarray, block: int = PREFIX_BLOCK,
                  max_blocks: int = MAX_PREFIX_BLOCKS) -> list[int]:
    """Cumulative hashes of tokens[:block], tokens[:2*block], ... (holding block i means holding 0..i)."""
    return _native_prefix_hashes(np.asarray(tokens, dtype=np.int64), block, max_blocks).tolist()


def held_prefixes(contexts: Iterable[Sequence[int]]) -> tuple[int, ...]:
    """The prefix hashes of the KV states a node holds (its slots' and saved sessions' tokens), sorted."""
    return tuple(sorted({h for tokens in contexts for h in prefix_hashes(tokens)}))


def servable_prefixes(contexts: Iterable[tuple[Sequence[int], int]]) -> tuple[int, ...]:
    """As ``held_prefixes`` for ``(tokens, min_reuse)`` pairs: only the blocks a prompt matching them
    really reuses (``kv_slots``: a held state serves a common prefix of at least ``min_reuse`` tokens;
    a prompt matching block i shares at least its ``(i + 1) * PREFIX_BLOCK`` tokens, less the last
    one where the prompt ends there). Full attention: every block; sliding-window layers that dropped
    early positions: the later blocks only; recurrent state: none (it serves its whole length only)."""
    out: set[int] = set()
    for tokens, min_reuse in contexts:
        hashes = prefix_hashes(tokens)
        first = max(0, (min_reuse + 1 + PREFIX_BLOCK - 1) // PREFIX_BLOCK - 1)  # (i + 1) * block - 1 >= min_reuse
        out.update(hashes[first:])
    return tuple(sorted(out))


def reusable_tokens(n_prompt: int) -> int:
    """At most how many of a prompt's ``n_prompt`` tokens a held KV state serves: all but the last."""
    return max(0, n_prompt - 1)
