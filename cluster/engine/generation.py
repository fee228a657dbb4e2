"""What one request to the engine produced: ``Generation``, its text, tokens, timings and cache figures."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from cluster.engine.cache import RoutingTrace
from cluster.engine.sampling import TokenLogprob


@dataclass(frozen=True)
class Generation:
    """Result of one request.

    Attributes:
        text: generated text (stop string excluded).
        tokens: generated token ids (an end-of-generation or stop token excluded), the ones of a
            resumed answer (``n_resumed``) first.
        n_prompt_tokens: tokens evaluated before decoding: the prompt (BOS included) and a resumed
            answer's tokens.
        finish_reason: ``stop`` (an end-of-generation token, a stop token or a stop string
            ended it) or ``length`` (``max_tokens`` or the context ended it), as OpenAI defines them.
        prefill_s, decode_s: wall time from the request's first step to its first token, and from
            there to its end (in a batch, both include the other sequences' share of each step).
        cache: cache counters of this request alone, with derived rates (empty without a cache):
            hits and misses of its own selections; bytes read: its share of each step's reads (a
            unit read on demand is shared by the sequences that selected it; a read ahead, by all
            sequences of the step); prediction counters: of the steps it was in.
        expert_counts: selections per (layer, expert) over every token evaluated by this
            request (prompt and fed-back generated tokens); None without a cache.
        trace: this request's routing trace (its own rows of every step); None without a cache.
        n_reused_tokens: prompt tokens whose KV state was already held (not prefilled).
        logprobs: with ``SamplingParams.logprobs``, one entry per token of ``text``.
        queued_s: time from submission to the request's first step (waiting for a slot).
        n_resumed: tokens of an answer begun on another node that this one continued
            (``sequence.Resume``): evaluated as prompt, counted as generated.
    """

    text: str
    tokens: tuple[int, ...]
    n_prompt_tokens: int
    finish_reason: str
    prefill_s: float
    decode_s: float
    cache: dict[str, float] = field(default_factory=dict)
    expert_counts: np.ndarray | None = None
    trace: RoutingTrace | None = None
    n_reused_tokens: int = 0
    logprobs: tuple[TokenLogprob, ...] | None = None
    queued_s: float = 0.0
    n_resumed: int = 0

    @property
    def n_generated(self) -> int:
        return len(self.tokens)

    @property
    def decode_tok_s(self) -> float:
        """Generated tokens per second of the generation loop (the first token comes from prefill)."""
        steps = max(0, self.n_generated - 1)
        return steps / self.decode_s if self.decode_s > 0 and steps else float("nan")



SELECTIONS_REPLACED = "n_selections_replaced"  # Generation.cache counters of cache-aware expert selection
SELECTIONS_SKIPPED = "n_selections_skipped"


def selection_counts(gens: Sequence[Generation]) -> tuple[int, int]:
    """``(changed, skipped)``: the expert selections (one per token, layer and top-k slot) that
    cache-aware selection (``cluster.engine.expert_selection``) replaced or skipped, and of those
    the skipped ones, over a request's choices; 0 where a generation's cache counts none (exact
    selection, no cache)."""
    replaced = sum(int(g.cache.get(SELECTIONS_REPLACED, 0)) for g in gens)
    skipped = sum(int(g.cache.get(SELECTIONS_SKIPPED, 0)) for g in gens)
    return replaced + skipped, skipped
