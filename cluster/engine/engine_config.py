"""How one node's engine runs a model: ``EngineConfig``, every knob of ``MoEEngine`` and its bounds."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from cluster.engine.cache import CacheConfig
from cluster.engine.expert_selection import ExpertSelection
from cluster.engine.node_memory import AUTO
from cluster.errors import CacheBudgetError, InvalidParameterError

MAX_SLOTS = 256  # sequences one engine decodes together at most (every surface's bound: CLI, gateway, config)


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
        swa_full: models with sliding-window layers (gpt-oss, Llama 4): those layers keep every
            position (llama.cpp's C default: any held prefix can be reused); False: about a window
            per slot (less memory, llama-server's default), and a held prefix whose window the cache
            dropped is recomputed (``cluster.engine.kv_state``). No effect on other models.
        expert_selection: exact (llama.cpp's choice, the default) or cache-aware selection of each
            token's experts within bounds (``cluster.engine.expert_selection``); needs a cache.
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
    swa_full: bool = True
    expert_selection: ExpertSelection = field(default_factory=ExpertSelection)
    verbose: bool = False

    @property
    def auto_budget(self) -> bool:
        return isinstance(self.cache_bytes, str) and self.cache_bytes == AUTO

    def validate(self) -> None:
        def positive_int(name: str, value: object, upper: int) -> None:
            if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= upper:
                raise InvalidParameterError(f"{name} must be an integer in [1, {upper}], got {value!r}", param=name)

        positive_int("n_ctx", self.n_ctx, 1 << 20)
        positive_int("n_slots", self.n_slots, MAX_SLOTS)
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
        if not isinstance(self.swa_full, bool):
            raise InvalidParameterError(f"swa_full must be True or False, got {self.swa_full!r}", param="swa_full")
        if self.predict not in (True, False, "always"):
            raise InvalidParameterError(f"predict must be True, False or 'always', got {self.predict!r}")
        if not isinstance(self.memory_share, (int, float)) or not 0.0 < self.memory_share <= 1.0:
            raise InvalidParameterError(f"memory_share must be a number in (0, 1], got {self.memory_share!r}")
        if not isinstance(self.n_io_threads, int) or not 0 <= self.n_io_threads <= 64:
            raise InvalidParameterError(f"n_io_threads must be an integer in [0, 64], got {self.n_io_threads!r}")
        if not isinstance(self.expert_selection, ExpertSelection):
            raise InvalidParameterError(f"expert_selection must be an ExpertSelection, got {self.expert_selection!r}",
                                        param="expert_selection")
        self.expert_selection.validate()
        if self.expert_selection.cache_aware and self.cache_bytes is None:
            raise InvalidParameterError("cache-aware expert selection needs the expert cache (a cache budget, or "
                                        "'auto'): it changes only experts the cache does not hold",
                                        param="expert_selection")

