"""One generation in an engine's batch: sampled tokens in, text pieces out.

A ``Sequence`` is created by ``MoEEngine.submit`` and lives in the engine's step loop: it owns its
llama.cpp sampler, its place in a KV slot (``cluster.kv_slots``), how much of its prompt has been
evaluated, and its text. Each sampled token goes through ``accept``, which applies the request's
ends — every end-of-generation token, its stop tokens and stop strings (none of which reach the
text), ``max_tokens``, a full slot — and emits the text that can no longer turn into a stop
string as a ``Piece``. What a sequence emits (pieces, then its ``Generation`` or the exception
that ended it, or ``Cancelled``) goes to its ``emit`` callable, called on the engine's thread:
by default a queue its caller reads.
"""

from __future__ import annotations

import codecs
import queue
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable
from typing import Sequence as Seq

from cluster.sampling import SamplingParams, TokenLogprob


@dataclass(frozen=True)
class Piece:
    """A piece of a generation as it streams: its text and, when asked for, the
    log-probabilities of the tokens whose text starts in it."""

    text: str
    logprobs: tuple[TokenLogprob, ...] = ()


class Cancelled:
    """What a cancelled sequence emits last (its caller went away, or asked)."""


CANCELLED = Cancelled()


class Sequence:
    """One request's generation of one choice (see module docstring).

    Attributes:
        tag: unique within its engine; the cache records the sequence's steps under it.
        prompt: prompt token ids.
        params: decoding options.
        session: the conversation it continues (its KV state is kept for the next turn), or None.
    """

    def __init__(self, tag: int, prompt: Seq[int], params: SamplingParams, sampler: Any, session: str | None,
                 piece_of: Callable[[int], bytes], emit: Callable[[Any], None] | None = None) -> None:
        self.tag = tag
        self.prompt = list(prompt)
        self.params = params
        self.sampler = sampler
        self.session = session
        self._piece_of = piece_of
        self.outbox: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self.emit = emit or self.outbox.put
        self._cancel = threading.Event()
        # where it stands in the engine (the engine's thread changes these)
        self.slot: Any = None
        self.n_reused = 0         # prompt tokens whose KV was already held (not evaluated)
        self.n_evaluated = 0      # prompt tokens evaluated so far (n_reused included)
        self.pending: int | None = None  # the sampled token to evaluate next (decoding)
        self.passed_over = 0      # times a later sequence started before it (cluster.batch_admission)
        self.submitted_at = time.perf_counter()
        self.started_at: float | None = None    # its first step
        self.prompt_done_at: float | None = None
        # its text
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._stop_ids = frozenset(params.stop_token_ids)
        self._hold = max((len(s) for s in params.stop), default=1) - 1
        self.generated: list[int] = []
        self.logprobs: list[TokenLogprob] = []
        self.text = ""
        self._emitted = 0     # characters of text already emitted
        self._n_sent = 0      # logprobs entries already emitted with a piece
        self._cut: int | None = None
        self.finish_reason: str | None = None

    # -- caller side ---------------------------------------------------------------------------

    def cancel(self) -> None:
        """Stops the sequence at the engine's next step (its KV state is dropped)."""
        self._cancel.set()

    @property
    def cancelled(self) -> bool:
        return self._cancel.is_set()

    # -- engine side ---------------------------------------------------------------------------

    @property
    def decoding(self) -> bool:
        return self.pending is not None

    @property
    def n_prompt_left(self) -> int:
        return len(self.prompt) - self.n_evaluated

    def accept(self, token: int, is_end: bool, logprob: Callable[[int], TokenLogprob] | None,
               slot_full: bool) -> bool:
        """Takes a sampled token; True when the sequence is done (``finish_reason`` set).

        ``is_end``: an end-of-generation token of the vocabulary; ``logprob(offset)``: the token's
        log-probability entry (when asked for); ``slot_full``: no room to evaluate it.
        """
        params = self.params
        if is_end or token in self._stop_ids:
            return self._done("stop")
        if logprob is not None:
            self.logprobs.append(logprob(len(self.text)))
        self.generated.append(token)
        start = max(0, len(self.text) - self._hold)  # a stop string that began earlier would have ended it
        self.text += self._decoder.decode(self._piece_of(token))
        cut = _find_stop(self.text, params.stop, start)
        if cut is not None:
            self.text, self._cut = self.text[:cut], cut
            return self._done("stop")
        safe = len(self.text) - self._hold if params.stop else len(self.text)
        if safe > self._emitted:
            n_ready = _count_before(self.logprobs, self._n_sent, safe)
            self.emit(Piece(self.text[self._emitted:safe], tuple(self.logprobs[self._n_sent:n_ready])))
            self._emitted, self._n_sent = safe, n_ready
        if len(self.generated) >= params.max_tokens or slot_full:
            return self._done("length")
        self.pending = token
        return False

    def _done(self, reason: str) -> bool:
        self.finish_reason = reason
        self.pending = None
        if reason == "length":
            self.text += self._decoder.decode(b"", final=True)
        if self._cut is not None:  # tokens that began inside the cut-off stop string are not in the text
            self.logprobs = self.logprobs[:_count_before(self.logprobs, self._n_sent, self._cut)]
        return True

    def flush(self) -> None:
        """Emits the text not emitted yet (the sequence is done)."""
        if len(self.text) > self._emitted or len(self.logprobs) > self._n_sent:
            self.emit(Piece(self.text[self._emitted:], tuple(self.logprobs[self._n_sent:])))
            self._emitted, self._n_sent = len(self.text), len(self.logprobs)


def _count_before(entries: list[TokenLogprob], start: int, end: int) -> int:
    """Index after the last of ``entries[start:]`` whose text starts before character ``end``."""
    n = start
    while n < len(entries) and entries[n].offset < end:
        n += 1
    return n


def _find_stop(text: str, stops: tuple[str, ...], start: int = 0) -> int | None:
    """Index where the earliest stop string starts in ``text[start:]``, or None."""
    hits = [i for i in (text.find(s, start) for s in stops) if i >= 0]
    return min(hits) if hits else None
