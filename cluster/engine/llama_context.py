"""The llama.cpp model, context and batch of one engine, with the native expert cache attached.

The model is loaded with llama-cpp-python's low-level API so the context parameters can carry
``cb_eval`` (the high-level ``Llama`` class cannot). Weights stay in llama.cpp's file mapping
(mmap, no repacking into private buffers), which is what the cache manages page by page.
Lifetimes follow ``llama_cpp/_internals.py``: one ExitStack; the context is freed before the
cache and the callback it points to, the cache before the model whose mapping it drops pages
of; ``close()`` is idempotent.
"""

from __future__ import annotations

import ctypes
import logging
import os
from contextlib import ExitStack
from dataclasses import replace

import llama_cpp
from llama_cpp import _internals

from cluster.engine import cache as expert_cache
from cluster.engine import node_memory
from cluster.engine.engine_config import EngineConfig
from cluster.engine.startup import Startup
from cluster.engine.tokenizer import Tokenizer
from cluster.errors import CacheBudgetError, InvalidParameterError, ModelFileError

log = logging.getLogger(__name__)


class LlamaModelContext:
    """What an ``EngineConfig`` opens: the model, one context of ``n_slots`` sequences, the batch
    of a step, and the expert cache (None when ``cache_bytes`` is None: plain llama.cpp).

    Attributes:
        layout: where every expert's bytes are in the model file.
        cache: the native ``ExpertCache`` attached to the context, or None (also once closed).
        auto_budget: how an ``"auto"`` budget was derived (``cluster.engine.node_memory``), or None.
        footprint_bytes: every expert's bytes.
        model, ctx, batch: llama-cpp-python's low-level objects.
        vocab: the model's vocabulary (llama.cpp's pointer); ``tokenizer`` reads it.
        n_ctx: tokens of each sequence slot.
        n_batch: tokens of one step: one ``llama_decode``, one ubatch (the cache attributes each
            step's rows to their sequences).
    """

    def __init__(self, config: EngineConfig, startup: Startup | None = None) -> None:
        self._stack = ExitStack()
        startup = startup or Startup()
        try:
            self._open(config, startup)
        except BaseException:
            startup.abandon()
            self._stack.close()
            raise

    def _open(self, cfg: EngineConfig, startup: Startup) -> None:
        """Opens everything, each step a phase of ``startup`` (``cluster.engine.startup``); the
        phases that read the model file at length (``preload``, ``load``) name it."""
        cfg.validate()
        startup.begin("layout")
        self.layout = expert_cache.discover_layout(cfg.model_path)  # missing, corrupt, truncated or dense → ModelFileError
        startup.note(_layout_note(self.layout, cfg.model_path))

        self.cache: expert_cache.ExpertCache | None = None
        self.auto_budget: node_memory.AutoBudget | None = None
        self.footprint_bytes = footprint = int(self.layout.unit_bytes.sum())
        if cfg.cache_bytes is not None:
            budget = footprint if cfg.auto_budget else int(cfg.cache_bytes)  # auto: set once loaded
            params = expert_cache.ExpertCacheParams(
                cache=replace(cfg.cache, budget_bytes=budget), n_io_threads=cfg.n_io_threads,
                predict=bool(cfg.predict), predict_resident_layers=cfg.predict == "always", record_trace=False,
                selection=cfg.expert_selection)
            try:
                self.cache = expert_cache.open_expert_cache(self.layout, params)
            except CacheBudgetError as exc:
                raise CacheBudgetError(f"cache budget of {cfg.cache_bytes} bytes does not work for "
                                       f"'{cfg.model_path}': {exc}") from None

        if self.cache is not None:  # preload when experts will be dropped: small page-cache folios
            startup.begin("preload", reads=cfg.model_path)
            self.cache.before_load(cfg.auto_budget or cfg.cache_bytes < footprint)
        startup.begin("load", reads=cfg.model_path)  # llama.cpp maps the file and reads it in
        quiet_llama_logs(cfg.verbose)
        llama_cpp.llama_backend_init()
        mparams = llama_cpp.llama_model_default_params()
        mparams.n_gpu_layers = 0
        mparams.load_mode = llama_cpp.LLAMA_LOAD_MODE_MMAP  # weights stay in the file mapping
        mparams.lazy_mode = 0                               # LLAMA_LAZY_MODE_OFF
        mparams.use_extra_bufts = False                     # no repacked private copies (DESIGN.md)
        try:
            self.model = _internals.LlamaModel(path_model=cfg.model_path, params=mparams, verbose=cfg.verbose)
        except ValueError as exc:
            raise ModelFileError(f"llama.cpp could not load '{cfg.model_path}': {exc}") from None
        self._stack.callback(self.model.close)
        # the cache goes after the context that calls it and before the model whose mapping it
        # drops pages of (its I/O threads finish their queued drops while the mapping exists)
        self._stack.callback(self._release_cache)

        startup.begin("context")
        cparams = llama_cpp.llama_context_default_params()
        cparams.n_ctx = cfg.n_ctx * cfg.n_slots
        cparams.n_seq_max = cfg.n_slots
        cparams.kv_unified = True  # one KV buffer: a step's ubatch may mix sequences of any lengths
        cparams.swa_full = cfg.swa_full  # windowed layers: every position, or a window per slot (kv_state)
        cparams.n_batch = cfg.n_batch
        cparams.n_ubatch = cfg.n_batch
        threads = cfg.n_threads or os.cpu_count() or 1
        cparams.n_threads = threads
        cparams.n_threads_batch = threads
        cparams.no_perf = True
        if self.cache is not None:
            self._cb_eval = llama_cpp.ggml_backend_sched_eval_callback(self.cache.callback_address)  # kept referenced
            cparams.cb_eval = self._cb_eval
            cparams.cb_eval_user_data = ctypes.c_void_p(self.cache.user_data_address)
        try:
            self.ctx = _internals.LlamaContext(model=self.model, params=cparams, verbose=cfg.verbose)
        except ValueError as exc:
            raise InvalidParameterError(f"llama.cpp could not create a context with n_ctx={cfg.n_ctx}, "
                                        f"n_batch={cfg.n_batch}: {exc}") from None
        self._stack.callback(self.ctx.close)  # runs before the model's close (LIFO)
        startup.note(f"{cfg.n_slots} slots of {cfg.n_ctx} tokens, batch {cfg.n_batch}, {threads} threads")
        if self.cache is not None:  # the model is mapped and the context's memory allocated
            if cfg.auto_budget:
                startup.begin("budget")
                self.auto_budget = node_memory.auto_budget(
                    cfg.model_path, non_expert_bytes=self.layout.non_expert_bytes,
                    footprint_bytes=footprint, min_bytes=expert_cache.min_budget(self.layout),
                    share=cfg.memory_share, reserve_bytes=cfg.memory_reserve)
                log.info("%s", self.auto_budget.explain())
                startup.note(self.auto_budget.explain())
                self.cache.set_budget(self.auto_budget.budget_bytes)
            startup.begin("attach")
            startup.note(f"budget {self.cache.budget_bytes / GIB:.2f} GiB of {footprint / GIB:.2f} GiB of experts")
            self.cache.attach()
        self.batch = _internals.LlamaBatch(n_tokens=cfg.n_batch, embd=0, n_seq_max=1, verbose=cfg.verbose)
        self._stack.callback(self.batch.close)
        self.vocab = self.model.vocab
        self.tokenizer = Tokenizer(self.model)
        self.n_ctx = min(cfg.n_ctx, self.ctx.n_ctx() // cfg.n_slots)
        self.n_batch = min(cfg.n_batch, llama_cpp.llama_n_batch(self.ctx.ctx), llama_cpp.llama_n_ubatch(self.ctx.ctx))
        startup.end()

    @property
    def pressured(self) -> bool:
        """The cache's budget is below the model's experts: some are dropped and read again."""
        return self.cache is not None and self.cache.budget_bytes < self.footprint_bytes

    def _release_cache(self) -> None:
        self.cache = None

    def close(self) -> None:
        """Frees batch, context, cache and model, in that order; safe to call twice."""
        self._stack.close()
        self.cache = None


GIB = 1 << 30


def _layout_note(layout: expert_cache.ExpertLayout, path: str) -> str:
    """The ``layout`` phase's line: the model's MoE shape and sizes."""
    return (f"{layout.arch}, {layout.n_layers} layers x {layout.n_experts} experts (top-{layout.n_experts_used}), "
            f"experts {layout.unit_bytes.sum() / GIB:.2f} GiB of {os.path.getsize(path) / GIB:.2f} GiB")


_LOG_CALLBACK = None


def quiet_llama_logs(verbose: bool) -> None:
    """Routes llama.cpp's log to nowhere unless verbose (the callback must stay referenced)."""
    global _LOG_CALLBACK
    if verbose or _LOG_CALLBACK is not None:
        return

    @llama_cpp.llama_log_callback
    def _silent(level: int, text: bytes, user_data: ctypes.c_void_p) -> None:
        return None

    _LOG_CALLBACK = _silent
    llama_cpp.llama_log_set(_LOG_CALLBACK, ctypes.c_void_p(0))
