"""Single-node MoE engine: one llama.cpp model and context with the native expert cache attached.

The model is loaded with llama-cpp-python's low-level API so the context parameters can carry
``cb_eval`` (the high-level ``Llama`` class cannot). Weights stay in llama.cpp's file mapping
(mmap, no repacking into private buffers), which is what the cache manages page by page.
Lifetimes follow ``llama_cpp/_internals.py``: one ExitStack; the context is freed before the
cache and the callback it points to; ``close()`` is idempotent.

Decoding follows a ``SamplingParams`` (``cluster.engine.sampling``) with llama.cpp's own sampler chain
(logit bias, penalties, grammar, top-k/top-p/min-p, temperature, a seeded draw, or greedy);
generation ends on every end-of-generation token of the vocabulary, on the request's stop
tokens and stop strings (none of which reach the text), or at ``max_tokens``. Token
log-probabilities are the log-softmax of the logits llama.cpp computed for each sampled position.
"""

from __future__ import annotations

import ctypes
import logging
import math
import os
import threading
import time
from collections import deque
from contextlib import ExitStack
from dataclasses import dataclass, field, replace
from dataclasses import fields as dataclass_fields
from typing import Any, Callable, Generator, Sequence

import llama_cpp
import numpy as np
from llama_cpp import _internals

from cluster import _native
from cluster.engine import node_memory
from cluster.engine import warmth_report
from cluster.engine.batch_admission import ExpertAdmission
from cluster.engine.batch_width import BatchWidth
from cluster.engine.cache import (
    CacheConfig,
    ExpertCacheParams,
    RoutingTrace,
    derived_stats,
    discover_layout,
)
from cluster.errors import (
    CacheBudgetError,
    EngineClosedError,
    InvalidParameterError,
    ModelFileError,
    PromptTooLongError,
)
from cluster.engine.kv_slots import KvSlots, SavedState, Slot
from cluster.engine.node_memory import AUTO
from cluster.engine.sampling import LOGIT_BIAS_BAN, SamplingParamError, SamplingParams, TokenLogprob, TopLogprob
from cluster.engine.sequence import CANCELLED, Cancelled, Piece, Resume, check_resume
from cluster.engine.sequence import Sequence as SequenceHandle
from cluster.engine.tokenizer import Tokenizer

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EngineConfig:
    """How to run one model on one node.

    Attributes:
        model_path: a GGUF Mixture-of-Experts model.
        cache_bytes: expert-cache budget in bytes; ``"auto"``: derived from the memory the node
            has once the model is loaded (``cluster.engine.node_memory``); None runs plain llama.cpp
            (no callback).
        n_ctx: context window of each sequence slot, in tokens.
        n_slots: sequences decoded together (continuous batching; 1: one request at a time).
        n_batch: tokens per step, one llama_decode (and one ubatch): a token of every decoding
            sequence, then chunks of waiting prompts (chunked prefill). At least ``n_slots``.
        session_bytes: bytes of saved conversation KV states (conversations whose slot another
            one took) kept for their next turn.
        adaptive_width: under a budget below the model's experts, run only as many sequences
            together as the cache sustains (``cluster.engine.batch_width``); False: every slot, always.
        expert_admission: under a budget below the model's experts, form batches of sequences
            expected to need the same experts (``cluster.engine.batch_admission``); False: first come,
            first served.
        n_threads: compute threads (default: all cores).
        cache: policy knobs other than the budget (its budget_bytes is replaced by cache_bytes).
        n_io_threads: I/O threads that read experts (0: no prefetch).
        predict: predict and prefetch the next layers' experts ``True``; ``"always"``: also
            predict layers whose experts are all resident (nothing to read, but predictions are
            scored and recorded in the trace: for traces replayed at smaller budgets).
        memory_share: with ``cache_bytes="auto"`` and no cgroup limit, the fraction of the
            machine's available memory this engine plans for (several engines on one machine).
        memory_reserve: with ``cache_bytes="auto"``, bytes the process will allocate after load
            (a node's saved conversation states) that the budget must leave free.
        verbose: let llama.cpp log to stderr.
    """

    model_path: str
    cache_bytes: int | str | None = None
    n_ctx: int = 2048
    n_slots: int = 1
    n_batch: int = 512
    session_bytes: int = 64 << 20
    adaptive_width: bool = True
    expert_admission: bool = True
    n_threads: int | None = None
    cache: CacheConfig = field(default_factory=lambda: CacheConfig(budget_bytes=1))
    n_io_threads: int = 2
    predict: bool | str = True
    memory_share: float = 1.0
    memory_reserve: int = 0
    verbose: bool = False

    @property
    def auto_budget(self) -> bool:
        return isinstance(self.cache_bytes, str) and self.cache_bytes == AUTO

    def validate(self) -> None:
        def positive_int(name: str, value: object, upper: int) -> None:
            if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= upper:
                raise InvalidParameterError(f"{name} must be an integer in [1, {upper}], got {value!r}", param=name)

        positive_int("n_ctx", self.n_ctx, 1 << 20)
        positive_int("n_slots", self.n_slots, 256)
        positive_int("n_batch", self.n_batch, 1 << 16)
        if self.n_batch < self.n_slots:
            raise InvalidParameterError(f"n_batch ({self.n_batch}) must be at least n_slots ({self.n_slots}): a step "
                                        f"evaluates one token of every decoding sequence")
        if not isinstance(self.session_bytes, int) or self.session_bytes < 0:
            raise InvalidParameterError(f"session_bytes must be an integer >= 0, got {self.session_bytes!r}")
        if self.n_threads is not None:
            positive_int("n_threads", self.n_threads, 1024)
        if isinstance(self.cache_bytes, str) and self.cache_bytes != AUTO:
            raise InvalidParameterError(f"cache_bytes must be an integer number of bytes, '{AUTO}' or None, "
                                        f"got {self.cache_bytes!r}")
        if self.cache_bytes is not None and not self.auto_budget:
            if not isinstance(self.cache_bytes, (int, np.integer)) or isinstance(self.cache_bytes, bool):
                raise InvalidParameterError(f"cache_bytes must be an integer number of bytes, 'auto' or None, "
                                            f"got {self.cache_bytes!r}")
            if self.cache_bytes <= 0:
                raise CacheBudgetError(f"cache_bytes must be > 0, got {self.cache_bytes}")
        if self.predict not in (True, False, "always"):
            raise InvalidParameterError(f"predict must be True, False or 'always', got {self.predict!r}")
        if not isinstance(self.memory_share, (int, float)) or not 0.0 < self.memory_share <= 1.0:
            raise InvalidParameterError(f"memory_share must be a number in (0, 1], got {self.memory_share!r}")
        if not isinstance(self.n_io_threads, int) or not 0 <= self.n_io_threads <= 64:
            raise InvalidParameterError(f"n_io_threads must be an integer in [0, 64], got {self.n_io_threads!r}")


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


class MoEEngine:
    """llama.cpp plus the native expert cache, decoding up to ``n_slots`` requests together.

    A thread of its own runs the steps: each step evaluates one token of every decoding
    sequence and chunks of waiting prompts in one ``llama_decode``, then samples each sequence
    with its own sampler; requests join at the next step and end on their own. Under a cache
    budget below the model's experts, how many run together adapts to what the cache sustains
    (``cluster.engine.batch_width``) and a batch takes sequences expected to need the same experts
    (``cluster.engine.batch_admission``); the others wait. Everything that touches the llama.cpp context
    or the cache runs on that thread (``_call``).

    Example:
        >>> engine = MoEEngine("model.gguf", cache_bytes=512 << 20)
        >>> engine.generate("hello", max_tokens=16).text
    """

    @classmethod
    def from_config(cls, config: EngineConfig) -> MoEEngine:
        """The engine ``config`` describes (every field of it)."""
        kwargs = {f.name: getattr(config, f.name) for f in dataclass_fields(config)}
        return cls(kwargs.pop("model_path"), kwargs.pop("cache_bytes"), **kwargs)

    def __init__(self, model_path: str | os.PathLike[str], cache_bytes: int | str | None = None, *,
                 n_ctx: int = 2048, n_threads: int | None = None, **kwargs: object) -> None:
        self.config = EngineConfig(model_path=os.fspath(model_path), cache_bytes=cache_bytes,
                                   n_ctx=n_ctx, n_threads=n_threads, **kwargs)  # type: ignore[arg-type]
        self._lock = threading.Lock()
        self._stack = ExitStack()
        self._closed = False
        self._cv = threading.Condition()
        self._closing = False
        self._waiting: deque[SequenceHandle] = deque()
        self._running: list[SequenceHandle] = []
        self._calls: list[tuple[Callable[[], Any], list[Any], threading.Event]] = []
        self._finished: list[tuple[SequenceHandle, Any]] = []
        self._outputs: list[tuple[SequenceHandle, int]] = []
        self._chunks: list[tuple[SequenceHandle, int]] = []
        self._next_tag = 0
        self._unsettled = False
        self._last_slot: Slot | None = None
        try:
            self._open()
        except BaseException:
            self._stack.close()
            raise
        self._thread = threading.Thread(target=self._loop, name="engine-steps", daemon=True)
        self._thread.start()

    # -- lifecycle ---------------------------------------------------------------------------

    def _open(self) -> None:
        cfg = self.config
        cfg.validate()
        self.layout = discover_layout(cfg.model_path)  # missing, corrupt, truncated or dense → ModelFileError

        self._native_cache = None
        self.auto_budget: node_memory.AutoBudget | None = None  # how an "auto" budget was derived
        footprint = int(self.layout.unit_bytes.sum())  # every expert's bytes
        if cfg.cache_bytes is not None:
            budget = footprint if cfg.auto_budget else int(cfg.cache_bytes)  # auto: set once loaded
            params = ExpertCacheParams(cache=replace(cfg.cache, budget_bytes=budget),
                                       n_io_threads=cfg.n_io_threads, predict=bool(cfg.predict),
                                       predict_resident_layers=cfg.predict == "always", record_trace=False)
            native_params = params.to_native()
            try:
                self._native_cache = _native.ExpertCache(self.layout, native_params)
            except ValueError as exc:
                raise CacheBudgetError(f"cache budget of {cfg.cache_bytes} bytes does not work for "
                                       f"'{cfg.model_path}': {exc}") from None

        if self._native_cache is not None:  # preload when experts will be dropped: small page-cache folios
            self._native_cache.before_load(cfg.auto_budget or cfg.cache_bytes < footprint)
        _quiet_llama_logs(cfg.verbose)
        llama_cpp.llama_backend_init()
        mparams = llama_cpp.llama_model_default_params()
        mparams.n_gpu_layers = 0
        mparams.load_mode = llama_cpp.LLAMA_LOAD_MODE_MMAP  # weights stay in the file mapping
        mparams.lazy_mode = 0                               # LLAMA_LAZY_MODE_OFF
        mparams.use_extra_bufts = False                     # no repacked private copies (DESIGN.md)
        try:
            self._model = _internals.LlamaModel(path_model=cfg.model_path, params=mparams, verbose=cfg.verbose)
        except ValueError as exc:
            raise ModelFileError(f"llama.cpp could not load '{cfg.model_path}': {exc}") from None
        self._stack.callback(self._model.close)
        # the cache goes after the context that calls it and before the model whose mapping it
        # drops pages of (its I/O threads finish their queued drops while the mapping exists)
        self._stack.callback(self._release_cache)

        cparams = llama_cpp.llama_context_default_params()
        cparams.n_ctx = cfg.n_ctx * cfg.n_slots
        cparams.n_seq_max = cfg.n_slots
        cparams.kv_unified = True  # one KV buffer: a step's ubatch may mix sequences of any lengths
        cparams.n_batch = cfg.n_batch
        cparams.n_ubatch = cfg.n_batch
        threads = cfg.n_threads or os.cpu_count() or 1
        cparams.n_threads = threads
        cparams.n_threads_batch = threads
        cparams.no_perf = True
        if self._native_cache is not None:
            self._cb_eval = llama_cpp.ggml_backend_sched_eval_callback(self._native_cache.callback_address)
            cparams.cb_eval = self._cb_eval
            cparams.cb_eval_user_data = ctypes.c_void_p(self._native_cache.user_data_address)
        try:
            self._ctx = _internals.LlamaContext(model=self._model, params=cparams, verbose=cfg.verbose)
        except ValueError as exc:
            raise InvalidParameterError(f"llama.cpp could not create a context with n_ctx={cfg.n_ctx}, "
                                        f"n_batch={cfg.n_batch}: {exc}") from None
        self._stack.callback(self._ctx.close)  # runs before the model's close (LIFO)
        if self._native_cache is not None:  # the model is mapped and the context's memory allocated
            if cfg.auto_budget:
                self.auto_budget = node_memory.auto_budget(
                    cfg.model_path, non_expert_bytes=self.layout.non_expert_bytes,
                    footprint_bytes=footprint, min_bytes=_native.min_budget(self.layout),
                    share=cfg.memory_share, reserve_bytes=cfg.memory_reserve)
                log.info("%s", self.auto_budget.explain())
                self._native_cache.set_budget(self.auto_budget.budget_bytes)
            self._native_cache.attach()
        # under a budget below the model's experts, how many sequences run together adapts to the cache
        pressured = (self._native_cache is not None
                     and self._native_cache.budget_bytes < footprint)
        self._width = BatchWidth(cfg.n_slots, pressured=pressured and cfg.adaptive_width)
        admit = pressured and cfg.expert_admission and cfg.n_slots > 1
        self._admission = ExpertAdmission(max_passes=cfg.n_slots) if admit else None
        self._bytes_read = 0
        self._batch = _internals.LlamaBatch(n_tokens=cfg.n_batch, embd=0, n_seq_max=1, verbose=cfg.verbose)
        self._stack.callback(self._batch.close)
        self._vocab = self._model.vocab
        self.tokenizer = Tokenizer(self._model)
        self._broken_utf8: list[int] | None = None
        self.n_ctx = min(cfg.n_ctx, self._ctx.n_ctx() // cfg.n_slots)  # of each slot
        self.n_slots = cfg.n_slots
        # one step is one ubatch (the cache attributes each step's rows to their sequences)
        self._n_batch = min(cfg.n_batch, llama_cpp.llama_n_batch(self._ctx.ctx), llama_cpp.llama_n_ubatch(self._ctx.ctx))
        self._row_tags = np.zeros(self._n_batch, dtype=np.int32)
        self._row_outputs = np.zeros(self._n_batch, dtype=np.uint8)
        self._kv = KvSlots(cfg.n_slots, cfg.session_bytes)
        self._held: tuple[tuple[str, ...], list[tuple[int, ...]], int] = ((), [], 0)
        self._batch_totals = _BatchTotals()

    def _release_cache(self) -> None:
        self._native_cache = None

    def close(self) -> None:
        """Ends every request (``EngineClosedError``), then frees context, model and cache; safe to call twice."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            with self._cv:
                self._closing = True
                self._cv.notify_all()
            if threading.current_thread() is not self._thread:
                self._thread.join()
            self._stack.close()
            self._native_cache = None

    def __enter__(self) -> "MoEEngine":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- introspection -----------------------------------------------------------------------

    @property
    def has_cache(self) -> bool:
        return self._native_cache is not None

    def tokenize(self, text: str, special: bool = False) -> list[int]:
        """The prompt tokens the engine evaluates for ``text`` (``cluster.engine.tokenizer`` rules)."""
        self._check_open()
        return self.tokenizer.tokenize(text, special=special)

    def cache_stats(self) -> dict[str, float]:
        """Cumulative cache counters since load, derived rates, budget and resident bytes (after
        reconciling the cache with what the kernel really holds)."""
        self._check_open()
        if self._native_cache is None:
            return {}
        cache = self._native_cache

        def stats() -> dict[str, float]:
            cache.reconcile()
            return _cache_stats(cache, cache.counters())
        return self._call(stats)

    def cache_report(self, reconcile: bool = True) -> tuple[dict[str, float], bytes]:
        """``cache_stats()`` and ``warmth()`` (without heat) in one visit to the step loop (a
        node's report: one wait for the loop instead of two). ``reconcile=False`` reports the
        cache's own accounting without asking the kernel what it still holds (a ``mincore`` pass
        over the whole model, longer the larger it is), for reports that must not hold a request up."""
        self._check_open()
        if self._native_cache is None:
            raise InvalidParameterError("a cache report needs the expert cache (cache_bytes set)")
        cache = self._native_cache

        def report() -> tuple[dict[str, float], bytes]:
            if reconcile:
                cache.reconcile()
            counters = cache.counters()
            return _cache_stats(cache, counters), _warmth_of(cache, False, counters)
        return self._call(report)

    def measured_resident_bytes(self) -> int:
        """Expert bytes of the model actually in memory now (mincore), cache or not."""
        self._check_open()
        if self._native_cache is None:
            raise InvalidParameterError("measured_resident_bytes needs the expert cache (cache_bytes set)")
        return self._call(self._native_cache.measured_resident_bytes)

    def warmth(self, heat: bool = False) -> bytes:
        """The warmth report (msgpack, see ``cluster.engine.warmth_report``), with each unit's heat if ``heat``."""
        self._check_open()
        if self._native_cache is None:
            raise InvalidParameterError("a warmth report needs the expert cache (cache_bytes set)")
        cache = self._native_cache

        def report() -> bytes:
            cache.reconcile()
            return _warmth_of(cache, heat, cache.counters())
        return self._call(report)

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
        return self._submit(self._checked(prompt, params, special, {}), session, emit)

    def submit_many(self, requests: Sequence[tuple[str | Sequence[int], SamplingParams]], *,
                    sessions: Sequence[str | None] | None = None,
                    emits: Sequence[Callable[[Any], None] | None] | None = None,
                    resumes: Sequence[Resume | None] | None = None) -> list[SequenceHandle]:
        """Submits several requests at once: they join the same step (in this order, slots
        permitting), so their schedule does not depend on when the step loop wakes. All are
        checked before any is submitted."""
        checked: list[_Checked] = []
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
        with self._cv:  # the step loop admits waiting requests under this lock: all or none of them
            return [self._submit(request, session, emit) for request, session, emit in zip(checked, sessions, emits)]

    def _checked(self, prompt: str | Sequence[int], params: SamplingParams | None, special: bool,
                 fields: dict[str, Any], resume: Resume | None = None) -> _Checked:
        """The request's tokens, its validated parameters and its sampler (a grammar llama.cpp
        refuses is an error here, before anything runs)."""
        self._check_open()
        if isinstance(prompt, str):
            if not prompt:
                raise InvalidParameterError("prompt must be a non-empty string", param="prompt")
            tokens = None
        elif isinstance(prompt, (list, tuple, np.ndarray)):
            tokens = list(prompt)
            if not tokens or not all(isinstance(t, (int, np.integer)) and 0 <= t < self.tokenizer.n_vocab for t in tokens):
                raise InvalidParameterError(f"prompt tokens must be a non-empty list of ids in [0, "
                                            f"{self.tokenizer.n_vocab}), got {tokens[:8]!r}...", param="prompt")
            tokens = [int(t) for t in tokens]
        else:
            raise InvalidParameterError(f"prompt must be a non-empty string or a list of token ids, got "
                                        f"{type(prompt).__name__}", param="prompt")
        params = (params or SamplingParams()).updated(**fields) if fields else (params or SamplingParams())
        params.validate()
        if params.max_tokens > self.n_ctx:
            raise SamplingParamError("max_tokens", f"at most {self.n_ctx} (the context)", params.max_tokens)
        if params.n != 1:
            raise SamplingParamError("n", "1 here (the engine makes one choice per call; see SamplingParams.choices)",
                                     params.n)
        params.check_vocabulary(self.tokenizer.n_vocab)
        if tokens is None:
            tokens = self.tokenizer.tokenize(prompt, special=special)
        if len(tokens) >= self.n_ctx:
            raise PromptTooLongError(f"prompt is {len(tokens)} tokens but the context holds {self.n_ctx} "
                                     f"(at least one more is needed to generate)")
        if resume is not None:
            self._check_resume(resume, len(tokens), params)
        return _Checked(tokens, params, self._make_sampler(params), resume)

    def _check_resume(self, resume: Resume, n_prompt: int, params: SamplingParams) -> None:
        if not isinstance(resume, Resume) or not all(isinstance(t, int) and 0 <= t < self.tokenizer.n_vocab
                                                     for t in resume.tokens):
            raise InvalidParameterError(f"resume must be a Resume whose tokens are ids in [0, {self.tokenizer.n_vocab})",
                                        param="resume")
        if len(resume.tokens) > params.max_tokens:
            raise InvalidParameterError(f"resume holds {len(resume.tokens)} tokens, more than max_tokens "
                                        f"({params.max_tokens})", param="resume")
        if n_prompt + len(resume.tokens) >= self.n_ctx:
            raise PromptTooLongError(f"prompt and resumed answer are {n_prompt + len(resume.tokens)} tokens but the "
                                     f"context holds {self.n_ctx}")
        check_resume(resume, self.tokenizer.piece)

    def _submit(self, request: _Checked, session: str | None, emit: Callable[[Any], None] | None) -> SequenceHandle:
        with self._cv:
            if self._closing:
                request.sampler.close()
                raise EngineClosedError("the engine was closed")
            self._next_tag += 1
            seq = SequenceHandle(self._next_tag, request.tokens, request.params, request.sampler, session,
                                 self.tokenizer.piece, emit, request.resume)
            self._waiting.append(seq)
            self._cv.notify_all()
        return seq

    def _follow(self, request: _Checked, session: str | None) -> Generator[Piece, None, Generation]:
        seq = self._submit(request, session, None)
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

    # -- the step loop ---------------------------------------------------------------------------

    @property
    def n_running(self) -> int:
        """Sequences in the batch or waiting for a slot."""
        with self._cv:
            return len(self._running) + len(self._waiting)

    def _call(self, fn: Callable[[], Any]) -> Any:
        """Runs ``fn`` on the step loop's thread between two steps (everything that touches the
        llama.cpp context or the cache runs there) and returns its result."""
        if threading.current_thread() is self._thread:
            return fn()
        done = threading.Event()
        box: list[Any] = []
        with self._cv:
            if self._closing:
                raise EngineClosedError("the engine was closed")
            self._calls.append((fn, box, done))
            self._cv.notify_all()
        done.wait()
        if isinstance(box[0], BaseException):
            raise box[0]
        return box[1]

    def _loop(self) -> None:
        while True:
            with self._cv:
                while not (self._closing or self._calls or self._waiting or self._running):
                    self._cv.wait()
                calls, self._calls = self._calls, []
                closing = self._closing
            for fn, box, done in calls:
                try:
                    box[:] = [None, fn()]
                except BaseException as exc:  # noqa: BLE001  (handed to the caller)
                    box[:] = [exc]
                done.set()
            if closing:
                with self._cv:
                    left, self._waiting = [*self._running, *self._waiting], deque()
                    self._running = []
                    late, self._calls = self._calls, []
                for _, box, done in late:  # asked for after the last round of calls
                    box[:] = [EngineClosedError("the engine was closed")]
                    done.set()
                for seq in left:
                    seq.sampler.close()
                    seq.emit(EngineClosedError("the engine was closed"))
                return
            try:
                self._step()
            except BaseException as exc:  # noqa: BLE001  (an engine-wide failure fails what was running)
                log.exception("engine step failed")
                for seq in list(self._running):
                    self._end(seq, exc, keep=False)
                self._deliver()

    def _step(self) -> None:
        for seq in [s for s in self._running if s.cancelled]:
            self._end(seq, CANCELLED, keep=False)
        with self._cv:
            while self._waiting and self._kv.n_free and len(self._running) < self._width.width:
                seq = self._next_waiting()
                if seq is None:
                    break
                if seq.cancelled:
                    seq.sampler.close()
                    seq.emit(CANCELLED)
                    continue
                self._start(seq)
        if not self._running:
            self._deliver()
            return
        t0 = time.perf_counter()
        rows, n_decoding = self._fill_batch()
        if self._native_cache is not None:
            self._native_cache.begin_step(self._row_tags[:rows], self._row_outputs[:rows])
        rc = llama_cpp.llama_decode(self._ctx.ctx, self._batch.batch)
        if rc != 0:
            error = RuntimeError(f"llama_decode failed with code {rc} ({len(self._running)} sequences in the step)")
            for seq in list(self._running):
                self._end(seq, error, keep=False)
        else:
            self._after_decode()
        if self._width.pressured:
            c = self._native_cache.counters()
            read = c["bytes_read_prefill"] + c["bytes_read_decode"]
            self._width.note(len(self._outputs), read - self._bytes_read)
            self._bytes_read = read
        self._unsettled = True
        self._batch_totals.note(rows, n_decoding, len(self._running) + len(self._finished),
                                time.perf_counter() - t0)
        self._deliver()

    def _next_waiting(self) -> SequenceHandle | None:
        """The waiting sequence to start now: the oldest, or under memory pressure the one
        that fits the running batch's experts, if any (``cluster.engine.batch_admission``)."""
        if self._admission is None:
            return self._waiting.popleft()
        batch = self._running[0].prompt if self._running else None
        index = self._admission.pick(self._waiting, self._native_cache.warmth()[0], batch)
        if index is None:
            return None
        seq = self._waiting[index]
        del self._waiting[index]
        return seq

    def _start(self, seq: SequenceHandle) -> None:
        """Gives a waiting sequence a slot and the longest KV prefix it can have (``cluster.engine.kv_slots``)."""
        placement = self._kv.place(seq.prompt, seq.session)
        assert placement is not None
        slot = placement.slot
        memory = self._ctx.memory
        if placement.save is not None and slot.tokens:
            self._kv.store(placement.save, self._save_slot(slot))
        if placement.restore is not None:
            saved = self._kv.saved[placement.restore]
            if not self._load_slot(slot.index, saved.state or b""):
                placement = replace(placement, restore=None, n_reused=0)
        elif placement.copy_from is not None:
            llama_cpp.llama_memory_seq_rm(memory, slot.index, 0, -1)
            llama_cpp.llama_memory_seq_cp(memory, placement.copy_from.index, slot.index, 0, placement.n_reused)
        if placement.n_reused == 0 or not llama_cpp.llama_memory_seq_rm(memory, slot.index, placement.n_reused, -1):
            llama_cpp.llama_memory_seq_rm(memory, slot.index, 0, -1)
            placement = replace(placement, n_reused=0)
        self._kv.occupy(placement, seq.prompt, seq.session)
        seq.slot = slot
        seq.n_reused = seq.n_evaluated = placement.n_reused
        seq.started_at = time.perf_counter()
        self._running.append(seq)
        self._last_slot = slot
        self._note_held()

    def _fill_batch(self) -> tuple[int, int]:
        """One token of every decoding sequence, then prompt chunks (oldest first) up to the step's
        budget; returns the rows and the decoding sequences. Each sequence's rows are contiguous
        (the cache needs it)."""
        batch = self._batch.batch
        rows = 0
        self._outputs.clear()
        self._chunks.clear()

        def put(seq: SequenceHandle, token: int, pos: int, output: bool) -> None:
            nonlocal rows
            batch.token[rows] = token
            batch.pos[rows] = pos
            batch.n_seq_id[rows] = 1
            batch.seq_id[rows][0] = seq.slot.index
            batch.logits[rows] = output
            self._row_tags[rows] = seq.tag
            self._row_outputs[rows] = output
            if output:
                self._outputs.append((seq, rows))
            rows += 1

        for seq in self._running:
            if seq.decoding:
                put(seq, seq.pending, len(seq.slot.tokens), True)
        n_decoding = rows
        for seq in self._running:
            if seq.decoding or rows >= self._n_batch:
                continue
            chunk = min(seq.n_prompt_left, self._n_batch - rows)
            start = seq.n_evaluated
            self._chunks.append((seq, chunk))
            for i in range(chunk):
                put(seq, seq.prompt[start + i], start + i, start + i == len(seq.prompt) - 1)
        batch.n_tokens = rows
        return rows, n_decoding

    def _after_decode(self) -> None:
        for seq, _ in self._outputs:  # what the step put in each slot's KV
            if seq.decoding:
                seq.slot.tokens.append(seq.pending)
        for seq, n in self._chunks:
            seq.slot.tokens.extend(seq.prompt[seq.n_evaluated:seq.n_evaluated + n])
            seq.n_evaluated += n
        for seq, row in self._outputs:
            if seq.pending is None and seq.prompt_done_at is None:
                seq.prompt_done_at = time.perf_counter()
                if self._admission is not None:
                    self._learn_kind(seq)
            try:
                token = llama_cpp.llama_sampler_sample(seq.sampler.sampler, self._ctx.ctx, row)
                logprob = (lambda offset, t=token, r=row, s=seq: self._logprob(t, offset, s.params.top_logprobs, r)) \
                    if seq.params.logprobs else None
                done = seq.accept(token, self.tokenizer.is_eog(token), logprob, len(seq.slot.tokens) + 1 > self.n_ctx)
            except Exception as exc:  # noqa: BLE001  (this sequence fails; the others go on)
                self._end(seq, exc, keep=False)
                continue
            if done:
                self._end(seq, None, keep=True)

    def _learn_kind(self, seq: SequenceHandle) -> None:
        """Admission learns the experts a prompt selected, as soon as its prefill has ended."""
        trace = RoutingTrace.from_native(self._native_cache.sequence_trace(seq.tag))
        self._admission.learn(trace.summary(seq.prompt[seq.n_reused:], self.layout.n_layers, self.layout.n_experts))

    def _end(self, seq: SequenceHandle, outcome: BaseException | Cancelled | None, keep: bool) -> None:
        """Takes a sequence out of the batch; its result is delivered after the step (``_deliver``)."""
        self._running.remove(seq)
        seq.sampler.close()
        record = self._native_cache.take_sequence(seq.tag) if self._native_cache is not None else None
        if not keep:
            llama_cpp.llama_memory_seq_rm(self._ctx.memory, seq.slot.index, 0, -1)
        self._kv.release(seq.slot, keep)
        self._note_held()
        if outcome is not None:
            self._finished.append((seq, outcome))
            return
        seq.flush()
        end = time.perf_counter()
        stats: dict[str, float] = {}
        counts = trace = None
        if record is not None:
            trace_dict, counters = record
            stats = _cache_stats(self._native_cache, counters)
            trace = RoutingTrace.from_native(trace_dict)
            counts = trace.expert_counts(self.layout.n_layers, self.layout.n_experts)
        prompt_done = seq.prompt_done_at or end
        result = Generation(text=seq.text, tokens=tuple(seq.generated), n_prompt_tokens=len(seq.prompt),
                            n_resumed=seq.n_resumed,
                            finish_reason=seq.finish_reason or "length",
                            prefill_s=prompt_done - (seq.started_at or prompt_done), decode_s=end - prompt_done,
                            cache=stats, expert_counts=counts, trace=trace, n_reused_tokens=seq.n_reused,
                            logprobs=tuple(seq.logprobs) if seq.params.logprobs else None,
                            queued_s=(seq.started_at or end) - seq.submitted_at)
        self._finished.append((seq, result))

    def _deliver(self) -> None:
        """Hands finished sequences their results; when the batch is empty, settles the cache first
        (reads in flight land, the budget is trimmed, the kernel's view reconciled), so that what a
        caller asks the cache after its request sees it settled."""
        if not self._finished:
            return
        if self._native_cache is not None and self._unsettled and not self._running and not self._waiting:
            self._native_cache.settle()
            self._unsettled = False
        finished, self._finished = self._finished, []
        for seq, outcome in finished:
            seq.emit(outcome)

    def batch_stats(self) -> dict[str, float]:
        """How the engine batches: slots, how many are busy and waiting now, how many may run
        together now (``width``: every slot, or what the cache sustains under memory pressure,
        ``cluster.engine.batch_width``), and since start the
        steps, tokens per step, decoding sequences per step, sequences per step and step time
        (with a cache: expert units each step selected, the union of its sequences' experts
        summed over layers; under memory pressure, ``cluster.engine.batch_admission``'s ``reordered``:
        sequences started before an older waiting one, and ``held``: times a free slot stayed
        free because no waiting sequence fitted the running batch)."""
        totals = self._batch_totals
        stats: dict[str, float] = {"slots": self.n_slots, "slots_busy": len(self._running), "width": self._width.width,
                                   "waiting": len(self._waiting), "steps": totals.steps,
                                   "decode_steps": totals.decode_steps, "decode_rows": totals.decoding}
        stats.update(totals.means())
        if self._admission is not None:
            stats["reordered"] = self._admission.reordered
            stats["held"] = self._admission.held
        if self._native_cache is not None and totals.steps:
            c = self._native_cache.counters()  # counters are read without the step loop: a consistent-enough sum
            selected = c["n_hits_prefill"] + c["n_hits_decode"] + c["n_misses_prefill"] + c["n_misses_decode"]
            stats["experts_per_step"] = selected / max(1, c["n_steps"])
        return stats

    # -- KV state: slots, prefixes and saved conversations ---------------------------------------

    @property
    def context_tokens(self) -> tuple[int, ...]:
        """Tokens whose KV state the most recently used slot holds (its last request's prompt and answer)."""
        slot = self._last_slot
        return tuple(slot.tokens) if slot is not None else ()

    def held_tokens(self) -> list[tuple[int, ...]]:
        """Every token sequence whose KV state the engine holds (slots and saved conversations), as
        of the last request that started or ended."""
        return self._held[1]

    def sessions(self) -> tuple[str, ...]:
        """Conversations whose KV state the engine holds, as of the last request that started or ended."""
        return self._held[0]

    @property
    def saved_bytes(self) -> int:
        """Bytes of saved conversation states."""
        return self._held[2]

    def _note_held(self) -> None:
        """Snapshot of what the slots hold, for other threads (one assignment: always whole)."""
        self._held = (self._kv.sessions(), [tuple(t) for t in self._kv.held()], self._kv.saved_bytes)

    def clear_kv(self) -> None:
        """Forgets every slot's KV state and every saved conversation (the next request prefills all)."""
        def clear() -> None:
            llama_cpp.llama_memory_clear(self._ctx.memory, True)
            self._kv.clear()
            self._note_held()
        self._check_open()
        self._call(clear)

    def _save_slot(self, slot: Slot) -> SavedState:
        size = llama_cpp.llama_state_seq_get_size(self._ctx.ctx, slot.index)
        buf = (ctypes.c_uint8 * size)()
        written = llama_cpp.llama_state_seq_get_data(self._ctx.ctx, buf, size, slot.index)
        return SavedState(tuple(slot.tokens), written, bytes(buf[:written]))

    def _load_slot(self, index: int, state: bytes) -> bool:
        llama_cpp.llama_memory_seq_rm(self._ctx.memory, index, 0, -1)
        if not state:
            return False
        buf = (ctypes.c_uint8 * len(state)).from_buffer_copy(state)
        return llama_cpp.llama_state_seq_set_data(self._ctx.ctx, buf, len(state), index) != 0

    def _make_sampler(self, params: SamplingParams) -> _internals.LlamaSampler:
        """llama.cpp's sampler chain for ``params``, in llama.cpp's own order: logit bias,
        penalties, grammar, then greedy, or top-k, top-p, min-p, temperature and a seeded draw."""
        n_vocab = self.tokenizer.n_vocab
        sampler = _internals.LlamaSampler()
        try:
            bias = {t: -math.inf if b <= LOGIT_BIAS_BAN else b for t, b in params.logit_bias}
            if params.grammar is not None:  # see _broken_utf8_tokens
                bias.update(dict.fromkeys(self._broken_utf8_tokens(), -math.inf))
            if bias:
                sampler.add_logit_bias(n_vocab, bias)
            if params.repeat_penalty != 1.0 or params.presence_penalty or params.frequency_penalty:
                sampler.add_penalties(n_vocab, params.penalty_last_n, params.repeat_penalty,
                                      params.frequency_penalty, params.presence_penalty)
            if params.grammar is not None:
                grammar = llama_cpp.llama_sampler_init_grammar(self._vocab, params.grammar.encode("utf-8"), b"root")
                if not grammar:
                    raise SamplingParamError("grammar", "a GBNF grammar llama.cpp can parse, with a 'root' rule",
                                             params.grammar[:200])
                llama_cpp.llama_sampler_chain_add(sampler.sampler, grammar)
            if params.greedy:
                sampler.add_greedy()
            else:
                if params.top_k > 0:
                    sampler.add_top_k(params.top_k)
                if params.top_p < 1.0:
                    sampler.add_top_p(params.top_p, 1)
                if params.min_p > 0.0:
                    sampler.add_min_p(params.min_p, 1)
                sampler.add_temp(params.temperature)
                sampler.add_dist(params.seed)
        except BaseException:
            sampler.close()
            raise
        return sampler

    def _broken_utf8_tokens(self) -> list[int]:
        """Tokens whose bytes are not whole UTF-8 characters (byte-level vocabularies have them).

        llama.cpp's grammar sampler reads text as code points and decodes some invalid byte
        sequences (overlong forms, surrogates) to code points it accepts, which a JSON parser
        later reads as several replacement characters: a string the grammar bounded to 12
        characters comes out longer. Under a grammar these tokens are banned, so the output is
        valid UTF-8 and means to the parser what it meant to the grammar. (A character the
        vocabulary has only in pieces can still be written as a JSON \\u escape.)
        """
        if self._broken_utf8 is None:
            broken = []
            for token in range(self.tokenizer.n_vocab):
                try:
                    self.tokenizer.piece(token).decode("utf-8")
                except UnicodeDecodeError:
                    broken.append(token)
            self._broken_utf8 = broken
        return self._broken_utf8

    def _logprob(self, token: int, offset: int, n_top: int, row: int) -> TokenLogprob:
        """The sampled token's log-probability: log-softmax of the logits llama.cpp computed for
        the batch's ``row`` (before any sampler changed them), and the ``n_top`` most likely tokens."""
        n_vocab = self.tokenizer.n_vocab
        logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(self._ctx.ctx, row), shape=(n_vocab,))
        logits = logits.astype(np.float64)
        top = logits.max()
        log_z = top + math.log(float(np.exp(logits - top).sum()))
        alternatives: tuple[TopLogprob, ...] = ()
        if n_top:
            best = np.argpartition(-logits, min(n_top, n_vocab) - 1)[:n_top]
            best = best[np.argsort(-logits[best], kind="stable")]
            alternatives = tuple(TopLogprob(int(t), self.tokenizer.piece(int(t)), float(logits[t] - log_z)) for t in best)
        return TokenLogprob(token=token, piece=self.tokenizer.piece(token), logprob=float(logits[token] - log_z),
                            offset=offset, top=alternatives)

    def _check_open(self) -> None:
        if self._closed:
            raise EngineClosedError("the engine was closed")


@dataclass(frozen=True)
class _Checked:
    """A request ready to join the batch: its prompt's tokens, its parameters, its sampler."""
    tokens: list[int]
    params: SamplingParams
    sampler: _internals.LlamaSampler  # closed by the sequence that owns it
    resume: Resume | None = None


@dataclass
class _BatchTotals:
    """Sums over the engine's steps (``MoEEngine.batch_stats``)."""

    steps: int = 0
    rows: int = 0
    decoding: int = 0
    decode_steps: int = 0
    sequences: int = 0
    seconds: float = 0.0

    def note(self, rows: int, decoding: int, sequences: int, seconds: float) -> None:
        self.steps += 1
        self.rows += rows
        self.decoding += decoding
        self.decode_steps += decoding > 0
        self.sequences += sequences
        self.seconds += seconds

    def means(self) -> dict[str, float]:
        if not self.steps:
            return {}
        return {"tokens_per_step": self.rows / self.steps, "sequences_per_step": self.sequences / self.steps,
                "decode_batch": self.decoding / self.decode_steps if self.decode_steps else 0.0,
                "step_ms": 1000 * self.seconds / self.steps}


def _cache_stats(cache: Any, counters: dict[str, int]) -> dict[str, float]:
    """Counters, the rates derived from them, and the cache's resident and budget bytes."""
    stats: dict[str, float] = dict(counters)
    stats.update(derived_stats(counters))
    stats["resident_bytes"] = cache.resident_bytes
    stats["budget_bytes"] = cache.budget_bytes
    return stats


def _warmth_of(cache: Any, heat: bool, counters: dict[str, int]) -> bytes:
    """The warmth report of ``cache`` (a native ``ExpertCache``), with each unit's heat if ``heat``."""
    resident, unit_heat = cache.warmth()
    return warmth_report.encode(resident, unit_heat if heat else None, budget_bytes=cache.budget_bytes,
                                resident_bytes=cache.resident_bytes, counters=counters)


_LOG_CALLBACK = None


def _quiet_llama_logs(verbose: bool) -> None:
    """Routes llama.cpp's log to nowhere unless verbose (the callback must stay referenced)."""
    global _LOG_CALLBACK
    if verbose or _LOG_CALLBACK is not None:
        return

    @llama_cpp.llama_log_callback
    def _silent(level: int, text: bytes, user_data: ctypes.c_void_p) -> None:
        return None

    _LOG_CALLBACK = _silent
    llama_cpp.llama_log_set(_LOG_CALLBACK, ctypes.c_void_p(0))
