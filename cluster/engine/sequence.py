"""One generation in an engine's batch: sampled tokens in, text pieces out.

A ``Sequence`` is created by ``MoEEngine.submit`` and lives in the engine's step loop: it owns its
llama.cpp sampler, its place in a KV slot (``cluster.engine.kv_slots``), how much of its prompt has been
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
from dataclasses import dataclass, replace
from typing import Any, Callable
from typing import Sequence as Seq

from cluster.errors import InvalidParameterError
from cluster.engine.sampling import SamplingParams, TokenLogprob


@dataclass(frozen=True)
class Piece:
    """A piece of a generation as it streams: its text, the tokens it made final (their text can
    no longer be cut by a stop string: a caller that keeps them can have the answer continued
    elsewhere, ``Resume``) and, when asked for, those tokens' log-probabilities."""

    text: str
    logprobs: tuple[TokenLogprob, ...] = ()
    tokens: tuple[int, ...] = ()


@dataclass(frozen=True)
class Resume:
    """An answer begun elsewhere (on a node that died), to be continued here.

    Attributes:
        tokens: the tokens its pieces carried so far, in order (``Piece.tokens``).
        sent_chars: the characters of text its caller has received: at least the text of
            ``tokens``; more where a piece sent text of a token that was not final yet (the next
            one, whose text a stop string could still cut), which the continuation generates
            again and does not send twice.

    The sequence evaluates them after the prompt, feeds them to its sampler (grammar state,
    penalties), counts them against ``max_tokens`` and as generated, and streams only the text
    after ``sent_chars``: the caller sees one answer, no piece repeated or missing. Greedy
    answers continue exactly as they would have; a sampled one draws afresh from the seed.
    """

    tokens: tuple[int, ...]
    sent_chars: int


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
                 piece_of: Callable[[int], bytes], emit: Callable[[Any], None] | None = None,
                 resume: Resume | None = None) -> None:
        self.tag = tag
        self.prompt = list(prompt) + list(resume.tokens if resume else ())  # what is evaluated before decoding
        self.n_resumed = len(resume.tokens) if resume else 0  # of which an earlier node's answer
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
        self.passed_over = 0      # times a later sequence started before it (cluster.engine.batch_admission)
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
        self._ends: list[int] = []  # where each generated token's text ends in text
        self._n_tokens_sent = 0     # generated tokens already emitted with a piece
        self._cut: int | None = None
        self.finish_reason: str | None = None
        if resume:
            self._take_over(resume)

    def _take_over(self, resume: Resume) -> None:
        """Rebuilds the text of an answer begun elsewhere, as if this sequence had generated it."""
        for token in resume.tokens:
            self.generated.append(token)
            self.text += self._decoder.decode(self._piece_of(token))
            self._ends.append(len(self.text))
        self._emitted = resume.sent_chars  # checked by the engine (check_resume)
        self._n_tokens_sent = len(resume.tokens)
        import llama_cpp

        for token in resume.tokens:  # the sampler's state as if it had chosen them: grammar, penalties
            llama_cpp.llama_sampler_accept(self.sampler.sampler, token)

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
        if len(self.generated) >= params.max_tokens:  # an answer taken over with its whole budget used
            return self._done("length")
        if is_end or token in self._stop_ids:
            return self._done("stop")
        before = self._decoder.getstate()
        added = self._decoder.decode(self._piece_of(token))
        if logprob is not None:
            entry = logprob(len(self.text))
            self.logprobs.append(replace(entry, text=added,
                                         top=tuple(replace(t, text=_decoded(before, t.piece)) for t in entry.top)))
        self.generated.append(token)
        start = max(0, len(self.text) - self._hold)  # a stop string that began earlier would have ended it
        self.text += added
        self._ends.append(len(self.text))
        cut = _find_stop(self.text, params.stop, start)
        if cut is not None:
            self.text, self._cut = self.text[:cut], cut
            return self._done("stop")
        safe = len(self.text) - self._hold if params.stop else len(self.text)
        if safe > self._emitted:
            n_tokens = self._final_tokens(safe)
            n_ready = max(self._n_sent, min(len(self.logprobs), n_tokens - self.n_resumed))
            self.emit(Piece(self.text[self._emitted:safe], tuple(self.logprobs[self._n_sent:n_ready]),
                            tuple(self.generated[self._n_tokens_sent:n_tokens])))
            self._emitted, self._n_sent, self._n_tokens_sent = safe, n_ready, n_tokens
        if len(self.generated) >= params.max_tokens or slot_full:
            return self._done("length")
        self.pending = token
        return False

    def _final_tokens(self, safe: int) -> int:
        """Index after the generated tokens final with text up to ``safe``: those whose text ends
        there or before (no stop string can cut it any more), the last one kept while the decoder
        holds part of a character (its end may still add a U+FFFD to that token's text). A piece
        carries these tokens and their log-probabilities: a caller holds only what is final, so an
        answer continued from them (``Resume``) repeats nothing and misses nothing."""
        n = self._n_tokens_sent
        while n < len(self._ends) and self._ends[n] <= safe:
            n += 1
        if n == len(self._ends) and n > self._n_tokens_sent and self._decoder.getstate()[0]:
            n -= 1
        return n

    def _done(self, reason: str) -> bool:
        self.finish_reason = reason
        self.pending = None
        if reason == "length":
            tail = self._decoder.decode(b"", final=True)  # an unfinished character, as U+FFFD
            self.text += tail
            if tail and self.logprobs and len(self.logprobs) > self._n_sent:
                self.logprobs[-1] = replace(self.logprobs[-1], text=self.logprobs[-1].text + tail)
        if self._cut is not None:  # tokens that began inside the cut-off stop string are not in the text
            self.logprobs = self.logprobs[:_count_before(self.logprobs, self._n_sent, self._cut)]
            if self.logprobs:  # the last one keeps the part of its text before the stop string
                last = self.logprobs[-1]
                self.logprobs[-1] = replace(last, text=last.text[:max(0, self._cut - last.offset)])
        return True

    def flush(self) -> None:
        """Emits the text not emitted yet (the sequence is done)."""
        if len(self.text) > self._emitted or len(self.logprobs) > self._n_sent:
            self.emit(Piece(self.text[self._emitted:], tuple(self.logprobs[self._n_sent:]),
                            tuple(self.generated[self._n_tokens_sent:])))
            self._emitted, self._n_sent, self._n_tokens_sent = len(self.text), len(self.logprobs), len(self.generated)


def _decoded(state: tuple[bytes, int], piece: bytes) -> str:
    """The text ``piece`` adds after a UTF-8 decoder in ``state`` (as a sequence decodes its tokens)."""
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    decoder.setstate(state)
    return decoder.decode(piece)


def _count_before(entries: list[TokenLogprob], start: int, end: int) -> int:
    """Index after the last of ``entries[start:]`` whose text starts before character ``end``."""
    n = start
    while n < len(entries) and entries[n].offset < end:
        n += 1
    return n


def check_resume(resume: Resume, piece_of: Callable[[int], bytes]) -> None:
    """Raises InvalidParameterError unless ``resume.sent_chars`` lies within the text of its tokens."""
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    n_chars = sum(len(decoder.decode(piece_of(t))) for t in resume.tokens)
    if not isinstance(resume.sent_chars, int) or resume.sent_chars < n_chars:
        raise InvalidParameterError(f"resume.sent_chars must be an integer >= {n_chars} (the text of its "
                                    f"{len(resume.tokens)} tokens), got {resume.sent_chars!r}", param="resume")


def _find_stop(text: str, stops: tuple[str, ...], start: int = 0) -> int | None:
    """Index where the earliest stop string starts in ``text[start:]``, or None."""
    hits = [i for i in (text.find(s, start) for s in stops) if i >= 0]
    return min(hits) if hits else None
