"""Single-node MoE engine: one llama.cpp model and context with the native expert cache attached.

``MoEEngine`` is the engine's public face; each concept behind it has a module of its own:

* ``llama_context``: the model, context and batch, and the cache attached to them (lifetimes);
* ``scheduler``: the step loop, continuous batching of up to ``n_slots`` requests;
* ``request_check``: a request's prompt and parameters, checked before anything runs;
* ``sampler_chain``: llama.cpp's sampler chain for a ``SamplingParams`` and token log-probabilities;
* ``kv_state``: slots, shared prefixes and saved conversations in the context's KV memory;
* ``token_table``: each sampled token's bytes and end-of-generation flag, read once per token id;
* ``scoring``: teacher-forced scoring of a token sequence (``score``: bits per token, argmax, cache reads);
* ``engine_config`` (``EngineConfig``) and ``generation`` (``Generation``), re-exported here.

Decoding follows a ``SamplingParams`` (``cluster.engine.sampling``) with llama.cpp's own sampler chain
(logit bias, penalties, grammar, top-k/top-p/min-p, temperature, a seeded draw, or greedy);
generation ends on every end-of-generation token of the vocabulary, on the request's stop
tokens and stop strings (none of which reach the text), or at ``max_tokens``. Token
log-probabilities are the log-softmax of the logits llama.cpp computed for each sampled position.
"""

from __future__ import annotations

import os
import threading
from dataclasses import fields as dataclass_fields
from typing import Any, Callable, Generator, Sequence

from cluster.engine import node_memory, scoring, warmth_report
from cluster.engine.cache import ExpertCache, ExpertLayout, cache_stats
from cluster.engine.engine_config import EngineConfig
from cluster.engine.generation import Generation
from cluster.engine.kv_state import KvState
from cluster.engine.llama_context import LlamaModelContext
from cluster.engine.prefix import servable_prefixes
from cluster.engine.request_check import CheckedRequest, RequestChecker
from cluster.engine.sampler_chain import SamplerChains
from cluster.engine.sampling import SamplingParams
from cluster.engine.scheduler import Scheduler
from cluster.engine.scoring import ScoredText
from cluster.engine.sequence import Piece, Resume
from cluster.engine.sequence import Sequence as SequenceHandle
from cluster.engine.startup import Startup
from cluster.engine.token_table import TokenTable
from cluster.engine.tokenizer import Tokenizer
from cluster.errors import EngineClosedError, InvalidParameterError

__all__ = ["EngineConfig", "Generation", "MoEEngine", "Piece"]


class MoEEngine:
    """llama.cpp plus the native expert cache, decoding up to ``n_slots`` requests together.

    A thread of its own runs the steps (``cluster.engine.scheduler``): each step evaluates one
    token of every decoding sequence and chunks of waiting prompts in one ``llama_decode``, then
    samples each sequence with its own sampler; requests join at the next step and end on their
    own. Under a cache budget below the model's experts, how many run together adapts to what the
    cache sustains (``cluster.engine.batch_width``) and a batch takes sequences expected to need
    the same experts (``cluster.engine.batch_admission``); the others wait. Everything that
    touches the llama.cpp context or the cache runs on that thread (``_call``).

    Attributes:
        config: what the engine was opened with.
        layout: where every expert's bytes are in the model file.
        auto_budget: how an ``"auto"`` budget was derived, or None.
        tokenizer: the model's vocabulary.
        n_ctx: tokens of each sequence slot.
        n_slots: sequences decoded together at most.

    Example:
        >>> engine = MoEEngine("model.gguf", cache_bytes=512 << 20)
        >>> engine.generate("hello", max_tokens=16).text
    """

    @classmethod
    def from_config(cls, config: EngineConfig, startup: Startup | None = None) -> MoEEngine:
        """The engine ``config`` describes (every field of it); ``startup`` as in ``__init__``."""
        kwargs = {f.name: getattr(config, f.name) for f in dataclass_fields(config)}
        return cls(kwargs.pop("model_path"), kwargs.pop("cache_bytes"), startup=startup, **kwargs)

    def __init__(self, model_path: str | os.PathLike[str], cache_bytes: int | str | None = None, *,
                 n_ctx: int = 2048, n_threads: int | None = None, startup: Startup | None = None,
                 **kwargs: object) -> None:
        """Opens the engine; ``startup`` (``cluster.engine.startup``) is told each phase of the
        opening as it ends, up to ``engine``; its owner reports ``ready`` (None: phases only logged)."""
        self.config = EngineConfig(model_path=os.fspath(model_path), cache_bytes=cache_bytes,
                                   n_ctx=n_ctx, n_threads=n_threads, **kwargs)  # type: ignore[arg-type]
        self._lock = threading.Lock()
        self._closed = False
        startup = startup or Startup()
        self._llama = LlamaModelContext(self.config, startup)
        try:
            startup.begin("engine")
            self.layout: ExpertLayout = self._llama.layout
            self.auto_budget: node_memory.AutoBudget | None = self._llama.auto_budget
            self.tokenizer: Tokenizer = self._llama.tokenizer
            self.n_ctx: int = self._llama.n_ctx
            self.n_slots: int = self.config.n_slots
            self._kv = KvState(self._llama.ctx, self.config.n_slots, self.config.session_bytes, self._llama.model.model)
            self.memory_kind: str = self._kv.rule.kind
            tokens = TokenTable(self.tokenizer)
            samplers = SamplerChains(self.tokenizer, tokens, self._llama.vocab, self._llama.ctx.ctx)
            self._requests = RequestChecker(self.tokenizer, self.n_ctx, samplers)
            self._scheduler = Scheduler(self._llama, self._kv, samplers, tokens, self.config)
            startup.end()
        except BaseException:
            startup.abandon()
            self._llama.close()
            raise

    def close(self) -> None:
        """Ends every request (``EngineClosedError``), then frees context, model and cache; safe to call twice."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._scheduler.stop()
            self._llama.close()

    def __enter__(self) -> "MoEEngine":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _check_open(self) -> None:
        if self._closed:
            raise EngineClosedError("the engine was closed")

    def _call(self, fn: Callable[[], Any]) -> Any:
        """Runs ``fn`` on the step loop's thread between two steps (everything that touches the
        llama.cpp context or the cache runs there) and returns its result."""
        return self._scheduler.call(fn)

    # -- introspection -----------------------------------------------------------------------

    @property
    def _native_cache(self) -> ExpertCache | None:
        """The expert cache attached to the context (None without one, or once closed)."""
        return self._llama.cache

    @property
    def has_cache(self) -> bool:
        return self._llama.cache is not None

    def tokenize(self, text: str, special: bool = False) -> list[int]:
        """The prompt tokens the engine evaluates for ``text`` (``cluster.engine.tokenizer`` rules)."""
        self._check_open()
        return self.tokenizer.tokenize(text, special=special)

    def _needs_cache(self, what: str) -> ExpertCache:
        self._check_open()
        cache = self._llama.cache
        if cache is None:
            raise InvalidParameterError(f"{what} needs the expert cache (cache_bytes set)")
        return cache

    def cache_stats(self) -> dict[str, float]:
        """Cumulative cache counters since load, derived rates, budget and resident bytes (after
        reconciling the cache with what the kernel really holds)."""
        self._check_open()
        cache = self._llama.cache
        if cache is None:
            return {}

        def stats() -> dict[str, float]:
            cache.reconcile()
            return cache_stats(cache, cache.counters())
        return self._call(stats)

    def cache_report(self, reconcile: bool = True) -> tuple[dict[str, float], bytes]:
        """``cache_stats()`` and ``warmth()`` (without heat) in one visit to the step loop (a
        node's report: one wait for the loop instead of two). ``reconcile=False`` reports the
        cache's own accounting without asking the kernel what it still holds (a ``mincore`` pass
        over the whole model, longer the larger it is), for reports that must not hold a request up."""
        cache = self._needs_cache("a cache report")

        def report() -> tuple[dict[str, float], bytes]:
            if reconcile:
                cache.reconcile()
            counters = cache.counters()
            return cache_stats(cache, counters), _warmth_of(cache, False, counters)
        return self._call(report)

    def measured_resident_bytes(self) -> int:
        """Expert bytes of the model actually in memory now (mincore), cache or not."""
        return self._call(self._needs_cache("measured_resident_bytes").measured_resident_bytes)

    def warmth(self, heat: bool = False) -> bytes:
        """The warmth report (msgpack, see ``cluster.engine.warmth_report``), with each unit's heat if ``heat``."""
        cache = self._needs_cache("a warmth report")

        def report() -> bytes:
            cache.reconcile()
            return _warmth_of(cache, heat, cache.counters())
        return self._call(report)

    def batch_stats(self) -> dict[str, float]:
        """How the engine batches: slots, how many are busy and waiting now, how many may run
        together now (``width``: every slot, or what the cache sustains under memory pressure,
        ``cluster.engine.batch_width``), and since start the
        steps, tokens per step, decoding sequences per step, sequences per step and step time
        (with a cache: expert units each step selected, the union of its sequences' experts
        summed over layers; under memory pressure, ``cluster.engine.batch_admission``'s ``reordered``:
        sequences started before an older waiting one, and ``held``: times a free slot stayed
        free because no waiting sequence fitted the running batch)."""
        return self._scheduler.batch_stats()

    @property
    def n_running(self) -> int:
        """Sequences in the batch or waiting for a slot."""
        return self._scheduler.n_running

    # -- generation --------------------------------------------------------------------------

    def generate(self, prompt: str | Sequence[int], params: SamplingParams | None = None, *, special: bool = False,
                 session: str | None = None, **fields: Any) -> Generation:
        """Generates a completion and returns it with timings, cache statistics and trace.

        Args:
            prompt: the prompt text (or its token ids).
            params: decoding options (default ``SamplingParams()``); ``fields`` override some
                of them by name (``max_tokens=8``).
            special: the prompt is a chat rendering: special-token texts are parsed as tokens
                (see ``cluster.engine.tokenizer``).
            session: the conversation this request continues: its KV state is kept (in a slot or
                saved) for its next turn.
        """
        pieces = self.pieces(prompt, params, special=special, session=session, **fields)
        while True:
            try:
                next(pieces)
            except StopIteration as done:
                return done.value

    def stream(self, prompt: str | Sequence[int], params: SamplingParams | None = None, *, special: bool = False,
               session: str | None = None, **fields: Any) -> Generator[str, None, Generation]:
        """Yields text pieces as they are generated; the generator returns the ``Generation``.

        Parameters are checked before anything runs: bad ones raise ``InvalidParameterError``,
        a prompt that does not fit raises ``PromptTooLongError``.
        """
        pieces = self.pieces(prompt, params, special=special, session=session, **fields)
        return self._texts(pieces)

    @staticmethod
    def _texts(pieces: Generator[Piece, None, Generation]) -> Generator[str, None, Generation]:
        try:
            while True:
                try:
                    piece = next(pieces)
                except StopIteration as done:
                    return done.value
                if piece.text:
                    yield piece.text
        finally:
            pieces.close()

    def pieces(self, prompt: str | Sequence[int], params: SamplingParams | None = None, *, special: bool = False,
               session: str | None = None, resume: Resume | None = None,
               **fields: Any) -> Generator[Piece, None, Generation]:
        """As ``stream``, with each piece's token log-probabilities (``params.logprobs``). The
        prompt may also be given as token ids (tokenized elsewhere: the router does it once).
        The request joins the engine's batch when the generator is first advanced; closing the
        generator cancels it.

        One choice per call: ``SamplingParams.choices()`` gives the params of each of ``n``.
        ``resume``: the answer was begun on another node; this continues it (``sequence.Resume``).
        """
        return self._follow(self._checked(prompt, params, special, fields, resume), session)

    def submit(self, prompt: str | Sequence[int], params: SamplingParams | None = None, *, special: bool = False,
               session: str | None = None, emit: Callable[[Any], None] | None = None) -> SequenceHandle:
        """Puts a request in the batch at once and returns its sequence: it emits ``Piece`` items,
        then its ``Generation`` (or the exception that failed it, or ``sequence.CANCELLED``), to
        ``emit`` (called on the engine's thread; default: the sequence's ``outbox`` queue).
        Raises at once for bad parameters, a prompt that does not fit or a closed engine."""
        return self._scheduler.submit(self._checked(prompt, params, special, {}), session, emit)

    def submit_many(self, requests: Sequence[tuple[str | Sequence[int], SamplingParams]], *,
                    sessions: Sequence[str | None] | None = None,
                    emits: Sequence[Callable[[Any], None] | None] | None = None,
                    resumes: Sequence[Resume | None] | None = None) -> list[SequenceHandle]:
        """Submits several requests at once: they join the same step (in this order, slots
        permitting), so their schedule does not depend on when the step loop wakes. All are
        checked before any is submitted."""
        checked: list[CheckedRequest] = []
        resumes = resumes or [None] * len(requests)
        try:
            for (prompt, params), resume in zip(requests, resumes):
                checked.append(self._checked(prompt, params, False, {}, resume))
        except BaseException:
            for request in checked:
                request.sampler.close()
            raise
        sessions = sessions or [None] * len(checked)
        emits = emits or [None] * len(checked)
        return self._scheduler.submit_all(list(zip(checked, sessions, emits)))

    def _checked(self, prompt: str | Sequence[int], params: SamplingParams | None, special: bool,
                 fields: dict[str, Any], resume: Resume | None = None) -> CheckedRequest:
        self._check_open()
        return self._requests.check(prompt, params, special, fields, resume)

    def _follow(self, request: CheckedRequest, session: str | None) -> Generator[Piece, None, Generation]:
        seq = self._scheduler.submit(request, session, None)
        done = False
        try:
            while True:
                item = seq.outbox.get()
                if isinstance(item, Piece):
                    yield item
                elif isinstance(item, Generation):
                    done = True
                    return item
                elif isinstance(item, BaseException):
                    done = True
                    raise item
                else:  # cancelled
                    done = True
                    raise EngineClosedError("the request was cancelled")
        finally:
            if not done:
                seq.cancel()

    # -- scoring ------------------------------------------------------------------------------

    def score(self, tokens: Sequence[int]) -> ScoredText:
        """Teacher-forced scoring of ``tokens`` (``cluster.engine.scoring``): one token per step as
        a decoded token is evaluated, with the cache told of each step; per position the log2
        probability of the next token and the argmax, the cache's counters over the scoring and
        its wall time. Leaves no KV state behind.

        Raises:
            RuntimeError: requests are running or waiting.
            PromptTooLongError: more tokens than a sequence slot (``n_ctx``) holds.
            InvalidParameterError: fewer than two tokens, or ids outside the vocabulary.
        """
        with self._lock:
            self._check_open()
            ids = scoring.check_tokens(tokens, self.n_ctx, self.tokenizer.n_vocab)
            return self._call(lambda: scoring.score(ids, self._scheduler, self._kv, self._llama.cache,
                                                    self._llama.ctx.ctx, self.tokenizer.n_vocab))

    # -- KV state: slots, prefixes and saved conversations ---------------------------------------

    @property
    def context_tokens(self) -> tuple[int, ...]:
        """Tokens whose KV state the most recently used slot holds (its last request's prompt and answer)."""
        return self._kv.context_tokens

    def held_tokens(self) -> list[tuple[int, ...]]:
        """Every token sequence whose KV state the engine holds (slots and saved conversations), as
        of the last request that started or ended."""
        return self._kv.held_tokens()

    def sessions(self) -> tuple[str, ...]:
        """Conversations whose KV state the engine holds, as of the last request that started or ended."""
        return self._kv.sessions()

    def held_prefixes(self) -> tuple[int, ...]:
        """The prefix hashes (``cluster.engine.prefix``) of the held KV states that a prompt matching
        them really reuses, as of the last request that started or ended: every block of each held
        state on full attention; on sliding-window layers that dropped early positions the blocks
        ending a window past them; none of a recurrent state (``prefix.servable_prefixes``)."""
        return servable_prefixes(self._kv.servable())

    def reuse_stats(self) -> dict[str, int]:
        """Prefix reuse since start (``kv_state.KvState.reuse_stats``): ``requests``; ``reused`` and
        ``reused_tokens``; ``recomputed`` and ``recomputed_tokens``: a longer prefix was held than the
        model's memory could serve (``memory_kind``: "full", "sliding-window" or "recurrent")."""
        return self._kv.reuse_stats()

    @property
    def saved_bytes(self) -> int:
        """Bytes of saved conversation states."""
        return self._kv.saved_bytes

    def clear_kv(self) -> None:
        """Forgets every slot's KV state and every saved conversation (the next request prefills all)."""
        self._check_open()
        self._call(self._kv.clear)


def _warmth_of(cache: ExpertCache, heat: bool, counters: dict[str, int]) -> bytes:
    """The warmth report of ``cache``, with each unit's heat if ``heat``."""
    resident, unit_heat = cache.warmth()
    return warmth_report.encode(resident, unit_heat if heat else None, budget_bytes=cache.budget_bytes,
                                resident_bytes=cache.resident_bytes, counters=counters)
