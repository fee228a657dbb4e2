"""Single-node MoE engine: one llama.cpp model and context with the native expert cache attached.

The model is loaded with llama-cpp-python's low-level API so the context parameters can carry
``cb_eval`` (the high-level ``Llama`` class cannot). Weights stay in llama.cpp's file mapping
(mmap, no repacking into private buffers), which is what the cache manages page by page.
Lifetimes follow ``llama_cpp/_internals.py``: one ExitStack; the context is freed before the
cache and the callback it points to; ``close()`` is idempotent.

Decoding follows a ``SamplingParams`` (``cluster.sampling``) with llama.cpp's own sampler chain
(logit bias, penalties, grammar, top-k/top-p/min-p, temperature, a seeded draw, or greedy);
generation ends on every end-of-generation token of the vocabulary, on the request's stop
tokens and stop strings (none of which reach the text), or at ``max_tokens``. Token
log-probabilities are the log-softmax of the logits llama.cpp computed for each sampled position.
"""

from __future__ import annotations

import codecs
import ctypes
import logging
import math
import os
import threading
import time
from contextlib import ExitStack
from dataclasses import dataclass, field, replace
from typing import Any, Generator, Sequence

import llama_cpp
import numpy as np
from llama_cpp import _internals

from cluster import _native, node_memory
from cluster import warmth as warmth_report
from cluster.cache import (
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
from cluster.node_memory import AUTO
from cluster.sampling import LOGIT_BIAS_BAN, SamplingParamError, SamplingParams, TokenLogprob, TopLogprob
from cluster.tokenizer import Tokenizer

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EngineConfig:
    """How to run one model on one node.

    Attributes:
        model_path: a GGUF Mixture-of-Experts model.
        cache_bytes: expert-cache budget in bytes; ``"auto"``: derived from the memory the node
            has once the model is loaded (``cluster.node_memory``); None runs plain llama.cpp
            (no callback).
        n_ctx: context window in tokens.
        n_threads: compute threads (default: all cores).
        n_batch: prompt tokens per llama_decode call (and per ubatch).
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
    n_threads: int | None = None
    n_batch: int = 512
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
                raise InvalidParameterError(f"{name} must be an integer in [1, {upper}], got {value!r}")

        positive_int("n_ctx", self.n_ctx, 1 << 20)
        positive_int("n_batch", self.n_batch, 1 << 16)
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
class Piece:
    """A piece of a generation as it streams: its text and, when asked for, the
    log-probabilities of the tokens whose text starts in it."""

    text: str
    logprobs: tuple[TokenLogprob, ...] = ()


@dataclass(frozen=True)
class Generation:
    """Result of one request.

    Attributes:
        text: generated text (stop string excluded).
        tokens: generated token ids (an end-of-generation or stop token excluded).
        n_prompt_tokens: tokens of the prompt (BOS included).
        finish_reason: ``stop`` (an end-of-generation token, a stop token or a stop string
            ended it) or ``length`` (``max_tokens`` or the context ended it), as OpenAI defines them.
        prefill_s, decode_s: wall time of prompt processing and of the generation loop.
        cache: cache counters of this request alone, with derived rates (empty without a cache).
        expert_counts: selections per (layer, expert) over every token evaluated by this
            request (prompt and fed-back generated tokens); None without a cache.
        trace: this request's routing trace; None without a cache.
        n_reused_tokens: prompt tokens whose KV state was already in the context (not prefilled).
        logprobs: with ``SamplingParams.logprobs``, one entry per token of ``text``.
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

    @property
    def n_generated(self) -> int:
        return len(self.tokens)

    @property
    def decode_tok_s(self) -> float:
        """Generated tokens per second of the generation loop (the first token comes from prefill)."""
        steps = max(0, self.n_generated - 1)
        return steps / self.decode_s if self.decode_s > 0 and steps else float("nan")


class MoEEngine:
    """llama.cpp plus the native expert cache, serving one request at a time.

    Example:
        >>> engine = MoEEngine("model.gguf", cache_bytes=512 << 20)
        >>> engine.generate("hello", max_tokens=16).text
    """

    def __init__(self, model_path: str | os.PathLike[str], cache_bytes: int | str | None = None, *,
                 n_ctx: int = 2048, n_threads: int | None = None, **kwargs: object) -> None:
        self.config = EngineConfig(model_path=os.fspath(model_path), cache_bytes=cache_bytes,
                                   n_ctx=n_ctx, n_threads=n_threads, **kwargs)  # type: ignore[arg-type]
        self._lock = threading.Lock()
        self._stack = ExitStack()
        self._closed = False
        try:
            self._open()
        except BaseException:
            self._stack.close()
            raise

    # -- lifecycle ---------------------------------------------------------------------------

    def _open(self) -> None:
        cfg = self.config
        cfg.validate()
        if not os.path.exists(cfg.model_path):
            raise ModelFileError(f"model file not found: '{cfg.model_path}'")
        self.layout = discover_layout(cfg.model_path)  # corrupt, truncated or dense → ModelFileError

        self._native_cache = None
        self.auto_budget: node_memory.AutoBudget | None = None  # how an "auto" budget was derived
        if cfg.cache_bytes is not None:
            footprint = int(self.layout.unit_bytes.sum())
            budget = footprint if cfg.auto_budget else int(cfg.cache_bytes)  # auto: set once loaded
            params = ExpertCacheParams(cache=replace(cfg.cache, budget_bytes=budget),
                                       n_io_threads=cfg.n_io_threads, predict=bool(cfg.predict),
                                       predict_resident_layers=cfg.predict == "always")
            native_params = params.to_native()
            try:
                self._native_cache = _native.ExpertCache(self.layout, native_params)
            except ValueError as exc:
                raise CacheBudgetError(f"cache budget of {cfg.cache_bytes} bytes does not work for "
                                       f"'{cfg.model_path}': {exc}") from None

        if self._native_cache is not None:  # preload when experts will be dropped: small page-cache folios
            self._native_cache.before_load(cfg.auto_budget or cfg.cache_bytes < int(self.layout.unit_bytes.sum()))
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
        cparams.n_ctx = cfg.n_ctx
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
                    footprint_bytes=int(self.layout.unit_bytes.sum()), min_bytes=_native.min_budget(self.layout),
                    share=cfg.memory_share, reserve_bytes=cfg.memory_reserve)
                log.info("%s", self.auto_budget.explain())
                self._native_cache.set_budget(self.auto_budget.budget_bytes)
            self._native_cache.attach()
        self._batch = _internals.LlamaBatch(n_tokens=cfg.n_batch, embd=0, n_seq_max=1, verbose=cfg.verbose)
        self._stack.callback(self._batch.close)
        self._vocab = self._model.vocab
        self.tokenizer = Tokenizer(self._model)
        self._broken_utf8: list[int] | None = None
        self.n_ctx = self._ctx.n_ctx()
        self._n_batch = min(cfg.n_batch, llama_cpp.llama_n_batch(self._ctx.ctx), llama_cpp.llama_n_ubatch(self._ctx.ctx))
        self._ctx_tokens: list[int] = []

    def _release_cache(self) -> None:
        self._native_cache = None

    def close(self) -> None:
        """Frees context, model and cache; safe to call twice."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
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
        """The prompt tokens the engine evaluates for ``text`` (``cluster.tokenizer`` rules)."""
        self._check_open()
        return self.tokenizer.tokenize(text, special=special)

    def cache_stats(self) -> dict[str, float]:
        """Cumulative cache counters since load, derived rates, budget and resident bytes (after
        reconciling the cache with what the kernel really holds)."""
        self._check_open()
        if self._native_cache is None:
            return {}
        with self._lock:
            self._native_cache.reconcile()
            return _cache_stats(self._native_cache, self._native_cache.counters())

    def measured_resident_bytes(self) -> int:
        """Expert bytes of the model actually in memory now (mincore), cache or not."""
        self._check_open()
        if self._native_cache is None:
            raise InvalidParameterError("measured_resident_bytes needs the expert cache (cache_bytes set)")
        with self._lock:
            return self._native_cache.measured_resident_bytes()

    def warmth(self) -> bytes:
        """The warmth report (msgpack, see ``cluster.warmth``)."""
        self._check_open()
        if self._native_cache is None:
            raise InvalidParameterError("a warmth report needs the expert cache (cache_bytes set)")
        with self._lock:
            self._native_cache.reconcile()
            resident, heat = self._native_cache.warmth()
            return warmth_report.encode(resident, heat, budget_bytes=self._native_cache.budget_bytes,
                                        resident_bytes=self._native_cache.resident_bytes,
                                        counters=self._native_cache.counters())

    # -- generation --------------------------------------------------------------------------

    def generate(self, prompt: str, params: SamplingParams | None = None, *, special: bool = False,
                 **fields: Any) -> Generation:
        """Generates a completion and returns it with timings, cache statistics and trace.

        Args:
            prompt: the prompt text.
            params: decoding options (default ``SamplingParams()``); ``fields`` override some
                of them by name (``max_tokens=8``).
            special: the prompt is a chat rendering: special-token texts are parsed as tokens
                (see ``cluster.tokenizer``).
        """
        pieces = self.pieces(prompt, params, special=special, **fields)
        while True:
            try:
                next(pieces)
            except StopIteration as done:
                return done.value

    def stream(self, prompt: str, params: SamplingParams | None = None, *, special: bool = False,
               **fields: Any) -> Generator[str, None, Generation]:
        """Yields text pieces as they are generated; the generator returns the ``Generation``.

        Parameters are checked before anything runs: bad ones raise ``InvalidParameterError``,
        a prompt that does not fit raises ``PromptTooLongError``.
        """
        pieces = self.pieces(prompt, params, special=special, **fields)
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
               **fields: Any) -> Generator[Piece, None, Generation]:
        """As ``stream``, with each piece's token log-probabilities (``params.logprobs``). The
        prompt may also be given as token ids (tokenized elsewhere: the router does it once).

        One choice per call: ``SamplingParams.choices()`` gives the params of each of ``n``.
        """
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
        sampler = self._make_sampler(params)  # a grammar llama.cpp refuses is an error before anything runs
        return self._run(tokens, params, sampler)

    def _run(self, prompt_tokens: list[int], params: SamplingParams,
             sampler: _internals.LlamaSampler) -> Generator[Piece, None, Generation]:
        with self._lock:
            self._check_open()
            cache = self._native_cache
            if cache is not None:
                cache.take_trace()
                counters_before = cache.counters()
                counts_before = cache.expert_counts()
            completed = False
            try:
                t0 = time.perf_counter()
                n_reused = self._reuse_prefix(prompt_tokens)
                self._decode(prompt_tokens[n_reused:], n_past=n_reused)
                prefill_s = time.perf_counter() - t0

                decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
                stop_ids = frozenset(params.stop_token_ids)
                generated: list[int] = []
                logprobs: list[TokenLogprob] = []  # of generated tokens, in order
                n_sent = 0  # logprobs entries already sent with a piece
                text, emitted = "", 0
                hold = max((len(s) for s in params.stop), default=1) - 1
                finish, cut = "length", None
                t1 = time.perf_counter()
                while len(generated) < params.max_tokens:
                    token = llama_cpp.llama_sampler_sample(sampler.sampler, self._ctx.ctx, -1)
                    if self.tokenizer.is_eog(token) or token in stop_ids:
                        finish = "stop"
                        break
                    if params.logprobs:
                        logprobs.append(self._logprob(token, len(text), params.top_logprobs))
                    generated.append(token)
                    start = max(0, len(text) - hold)  # a stop string that began earlier would have ended the loop
                    text += decoder.decode(self.tokenizer.piece(token))
                    cut = _find_stop(text, params.stop, start)
                    if cut is not None:
                        text, finish = text[:cut], "stop"
                        break
                    safe = len(text) - hold if params.stop else len(text)
                    if safe > emitted:
                        n_ready = _count_before(logprobs, n_sent, safe)
                        yield Piece(text[emitted:safe], tuple(logprobs[n_sent:n_ready]))
                        emitted, n_sent = safe, n_ready
                    if len(generated) == params.max_tokens or len(self._ctx_tokens) >= self.n_ctx:
                        break
                    self._decode([token], n_past=len(self._ctx_tokens))
                if finish == "length":
                    text += decoder.decode(b"", final=True)
                decode_s = time.perf_counter() - t1
                if cut is not None:  # tokens that began inside the cut-off stop string are not in the text
                    logprobs = logprobs[:_count_before(logprobs, n_sent, cut)]
                if len(text) > emitted or len(logprobs) > n_sent:
                    yield Piece(text[emitted:], tuple(logprobs[n_sent:]))
                completed = True
            finally:
                sampler.close()
                if not completed:  # abandoned or failed mid-way: the KV state is not worth keeping
                    self._forget_context()
                if cache is not None:
                    cache.settle()

            stats: dict[str, float] = {}
            counts = trace = None
            if cache is not None:
                after = cache.counters()
                stats = _cache_stats(cache, {k: after[k] - counters_before[k] for k in after})
                counts = cache.expert_counts() - counts_before
                trace = RoutingTrace.from_native(cache.take_trace())
            result = Generation(text=text, tokens=tuple(generated), n_prompt_tokens=len(prompt_tokens),
                                finish_reason=finish, prefill_s=prefill_s, decode_s=decode_s, cache=stats,
                                expert_counts=counts, trace=trace, n_reused_tokens=n_reused,
                                logprobs=tuple(logprobs) if params.logprobs else None)
            return result

    # -- KV state: prefix reuse and saved sessions ----------------------------------------------

    @property
    def context_tokens(self) -> tuple[int, ...]:
        """Tokens whose KV state the context holds now (the last request's prompt and answer)."""
        return tuple(self._ctx_tokens)

    def _reuse_prefix(self, prompt_tokens: list[int]) -> int:
        """Keeps the KV of the longest common prefix with the context; returns its length."""
        held = self._ctx_tokens
        n = 0
        limit = min(len(held), len(prompt_tokens) - 1)  # at least one token must be evaluated
        while n < limit and held[n] == prompt_tokens[n]:
            n += 1
        if n == 0 or not llama_cpp.llama_memory_seq_rm(self._ctx.memory, 0, n, -1):
            llama_cpp.llama_memory_clear(self._ctx.memory, True)
            n = 0
        self._ctx_tokens = list(prompt_tokens[:n])
        return n

    def _forget_context(self) -> None:
        llama_cpp.llama_memory_clear(self._ctx.memory, True)
        self._ctx_tokens = []

    def save_state(self) -> tuple[tuple[int, ...], bytes]:
        """The context's tokens and KV state, to restore later with ``load_state``."""
        self._check_open()
        with self._lock:
            size = llama_cpp.llama_state_seq_get_size(self._ctx.ctx, 0)
            buf = (ctypes.c_uint8 * size)()
            written = llama_cpp.llama_state_seq_get_data(self._ctx.ctx, buf, size, 0)
            return tuple(self._ctx_tokens), bytes(buf[:written])

    def load_state(self, tokens: Sequence[int], state: bytes) -> bool:
        """Restores a state from ``save_state``; False (and an empty context) if llama.cpp refuses it."""
        self._check_open()
        with self._lock:
            llama_cpp.llama_memory_clear(self._ctx.memory, True)
            buf = (ctypes.c_uint8 * len(state)).from_buffer_copy(state)
            if not state or llama_cpp.llama_state_seq_set_data(self._ctx.ctx, buf, len(state), 0) == 0:
                self._ctx_tokens = []
                return False
            self._ctx_tokens = list(tokens)
            return True

    def _decode(self, tokens: list[int], n_past: int) -> None:
        step = self._n_batch  # what the context accepts (llama.cpp may lower the requested size)
        for start in range(0, len(tokens), step):
            chunk = tokens[start:start + step]
            self._batch.set_batch(chunk, n_past=n_past + start, logits_all=False)
            rc = llama_cpp.llama_decode(self._ctx.ctx, self._batch.batch)
            if rc != 0:
                raise RuntimeError(f"llama_decode failed with code {rc} at position {n_past + start}")
            self._ctx_tokens.extend(chunk)

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

    def _logprob(self, token: int, offset: int, n_top: int) -> TokenLogprob:
        """The sampled token's log-probability: log-softmax of the logits llama.cpp computed for
        the position (before any sampler changed them), and the ``n_top`` most likely tokens."""
        n_vocab = self.tokenizer.n_vocab
        logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(self._ctx.ctx, -1), shape=(n_vocab,))
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


def _cache_stats(cache: Any, counters: dict[str, int]) -> dict[str, float]:
    """Counters, the rates derived from them, and the cache's resident and budget bytes."""
    stats: dict[str, float] = dict(counters)
    stats.update(derived_stats(counters))
    stats["resident_bytes"] = cache.resident_bytes
    stats["budget_bytes"] = cache.budget_bytes
    return stats


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
