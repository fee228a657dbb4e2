"""Teacher-forced scoring of a token sequence by the engine: how probable the model finds each next token.

``score`` evaluates the tokens one per step, one token per ``llama_decode`` (the decode regime:
each token's layer selections meet the expert cache as a decoded token's do), through the step
loop's own step (``Scheduler.decode_alone``: the cache is told of every step before llama.cpp
evaluates it, so cache-aware expert selection acts as it does when serving), in a sequence slot
no request holds, and drops that slot's KV state afterwards. For each position i it keeps the
log2-probability of ``tokens[i + 1]`` (float64 log-softmax of llama.cpp's logits) and the argmax
token, plus what the cache counted over the scoring and the wall time (``ScoredText``). The last
token predicts nothing known, so it is not evaluated.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Sequence

import llama_cpp
import numpy as np

from cluster.engine.cache import ExpertCache
from cluster.engine.kv_state import KvState
from cluster.engine.scheduler import Scheduler
from cluster.errors import InvalidParameterError, PromptTooLongError

LOG2E = 1.0 / math.log(2.0)


@dataclass(frozen=True)
class ScoredText:
    """What ``score`` measured on one token sequence.

    Attributes:
        tokens: the sequence scored.
        log2_probs: float64 ``[len(tokens) - 1]``: per position i, log2 p(tokens[i + 1] | tokens[:i + 1]).
        argmax: int64 ``[len(tokens) - 1]``: per position i, the most probable next token.
        cache: the cache's counters over the scoring (after minus before; ``{}`` without a cache).
        seconds: wall time of the scoring (its steps and the logits read).
    """

    tokens: tuple[int, ...]
    log2_probs: np.ndarray
    argmax: np.ndarray
    cache: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def n_scored(self) -> int:
        """Positions scored (tokens evaluated): ``len(tokens) - 1``."""
        return int(self.log2_probs.shape[0])

    @property
    def bits_per_token(self) -> float:
        """Mean of -log2 p(next token) over the positions."""
        return float(-self.log2_probs.mean())

    @property
    def bytes_read(self) -> int:
        """Expert bytes the cache read while scoring (prefill and decode counters)."""
        return int(self.cache.get("bytes_read_prefill", 0) + self.cache.get("bytes_read_decode", 0))

    @property
    def tok_s(self) -> float:
        """Tokens evaluated per second."""
        return self.n_scored / self.seconds if self.seconds > 0 else float("nan")


def log2_softmax_at(logits: np.ndarray, token: int) -> float:
    """log2 of the softmax of ``logits`` (computed in float64) at ``token``."""
    x = logits.astype(np.float64)
    top = x.max()
    log_z = top + math.log(float(np.exp(x - top).sum()))
    return (float(x[token]) - log_z) * LOG2E


def check_tokens(tokens: Sequence[int], n_ctx: int, n_vocab: int) -> tuple[int, ...]:
    """``tokens`` as a tuple of ids, after checking they can be scored in a slot of ``n_ctx`` tokens.

    Raises:
        InvalidParameterError: fewer than two tokens, or an id outside the vocabulary.
        PromptTooLongError: more tokens than a sequence slot holds.
    """
    ids = tuple(int(t) for t in tokens)
    if len(ids) < 2:
        raise InvalidParameterError(f"scoring needs at least two tokens (one to predict), got {len(ids)}",
                                    param="tokens")
    if len(ids) > n_ctx:
        raise PromptTooLongError(f"{len(ids)} tokens do not fit in a sequence slot of {n_ctx} tokens "
                                 f"(open the engine with a larger n_ctx)")
    bad = [t for t in ids if not 0 <= t < n_vocab]
    if bad:
        raise InvalidParameterError(f"tokens: {bad[0]} is not a token id of this model (0..{n_vocab - 1})",
                                    param="tokens")
    return ids


def score(tokens: tuple[int, ...], scheduler: Scheduler, kv: KvState, cache: ExpertCache | None,
          ctx: llama_cpp.llama_context_p, n_vocab: int) -> ScoredText:
    """Scores ``tokens`` (checked by ``check_tokens``) on the step loop's thread, between two steps.

    Raises:
        RuntimeError: requests are running or waiting (scoring needs the engine to itself), or
            llama_decode failed.
    """
    if scheduler.n_running:
        raise RuntimeError(f"cannot score while requests run ({scheduler.n_running} running or waiting): "
                           f"scoring measures the engine alone")
    tag = scheduler.new_tag()
    slot = kv.borrow()
    before = cache.counters() if cache is not None else {}
    n = len(tokens) - 1
    log2_probs = np.empty(n, dtype=np.float64)
    argmax = np.empty(n, dtype=np.int64)
    t0 = time.perf_counter()
    try:
        for i in range(n):
            scheduler.decode_alone(slot.index, tag, tokens[i], i)
            logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(ctx, 0), shape=(n_vocab,))
            argmax[i] = int(logits.argmax())
            log2_probs[i] = log2_softmax_at(logits, tokens[i + 1])
        seconds = time.perf_counter() - t0
        if cache is not None:
            cache.settle()  # reads in flight land: the counters hold all of the scoring's
    finally:
        kv.release(slot, keep=False)
        if cache is not None:
            cache.take_sequence(tag)  # its record is not kept
    counters = {k: int(v - before.get(k, 0)) for k, v in cache.counters().items()} if cache is not None else {}
    return ScoredText(tokens=tokens, log2_probs=log2_probs, argmax=argmax, cache=counters, seconds=seconds)
