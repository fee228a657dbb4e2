"""Typed surface of the native expert cache (``cluster._native`` is private).

Mirrors the C++ config structs as frozen dataclasses with the same field names, and wraps
the policy core (for trace replay and simulation) and the routing trace.
"""

from __future__ import annotations

import contextlib
import ctypes
import re
import threading
from dataclasses import asdict, dataclass, field
from typing import Any, Iterator, Sequence

import llama_cpp  # (also loads libggml-base before the extension that links it)
import numpy as np

from cluster import _native
from cluster.engine.expert_selection import ExpertSelection
from cluster.engine.model_file import check_model_file
from cluster.engine.trace_summary import RoutingTraceSummary, expert_id_dtype
from cluster.errors import CacheBudgetError, InvalidParameterError, ModelFileError

PAGE_SIZE: int = _native.PAGE_SIZE
EVICTION_POLICIES: tuple[str, ...] = ("adaptive", "lfu", "scan_resistant", "lru")
ExpertLayout = _native.ExpertLayout
CachePlan = _native.CachePlan  # after an access or prediction: drop ``evict``, then read ``load`` (unit ids, int32)


@dataclass(frozen=True)
class CacheConfig:
    """Knobs of the cache policy; see ``csrc/cache-core.h`` for the algorithm and ranges.

    Attributes:
        budget_bytes: bytes of expert footprint allowed resident.
        probation_fraction: share of the budget for units brought in by prefill or prefetch.
        heat_half_life_steps: half-life of an expert's heat, in evaluated ubatches.
        prefill_weight: heat of a prefill access relative to a decode access.
        layer_floor_fraction: share of a layer's fair budget that other layers cannot take.
        eviction: ``adaptive`` (default: each policy takes, from shadow replays of its own accesses,
            whichever of LFU with this half-life, LFU with a half-life of 2, or LRU reads the fewest
            bytes), ``lfu`` (frequency with ageing, heat alone), ``scan_resistant`` (heat behind a
            probation segment and per-layer floors) or ``lru`` (the baseline).
        prefetch: read predicted experts ahead (predictions are scored either way).
        prefetch_min_use: predictions made more than one layer ahead are read ahead only while
            at least this share of the reads made that far ahead were used (moving average).
        prefetch_min_precision: the next layer's predictions are read ahead only while at least this
            share of predicted experts were then selected (moving average; a wasted read costs bytes).
    """

    budget_bytes: int
    probation_fraction: float = 0.1
    heat_half_life_steps: float = 8.0
    prefill_weight: float = 1.0
    layer_floor_fraction: float = 0.5
    eviction: str = "adaptive"
    prefetch: bool = True
    prefetch_min_use: float = 0.5
    prefetch_min_precision: float = 0.8

    def to_native(self) -> _native.CacheConfig:
        if not isinstance(self.budget_bytes, (int, np.integer)) or isinstance(self.budget_bytes, bool):
            raise InvalidParameterError(f"budget_bytes must be an integer, got {self.budget_bytes!r}")
        if self.budget_bytes <= 0:
            raise InvalidParameterError(f"budget_bytes must be > 0, got {self.budget_bytes}")
        if self.eviction not in EVICTION_POLICIES:
            raise InvalidParameterError(f"eviction must be one of {EVICTION_POLICIES}, got {self.eviction!r}")
        native = _native.CacheConfig()
        for name, value in asdict(self).items():
            setattr(native, name, value)
        try:
            native.validate()
        except ValueError as exc:
            raise InvalidParameterError(str(exc)) from None
        return native


@dataclass(frozen=True)
class ExpertCacheParams:
    """Knobs of the cache attached to llama.cpp; see ``csrc/llama-glue.h``."""

    cache: CacheConfig
    n_io_threads: int = 2
    predict: bool = True
    predict_max_rows: int = 32
    predict_layers_ahead: int = 3
    predict_resident_layers: bool = False
    record_trace: bool = True
    trace_max_events: int = 1 << 20
    trace_max_ids: int = 1 << 24
    selection: ExpertSelection = field(default_factory=ExpertSelection)

    def to_native(self) -> _native.ExpertCacheParams:
        native = _native.ExpertCacheParams()
        native.cache = self.cache.to_native()
        self.selection.validate()
        selection = _native.SelectionConfig()
        selection.mode = self.selection.mode
        selection.max_changed_weight = float(self.selection.max_changed_weight)
        selection.min_score_ratio = float(self.selection.min_score_ratio)
        native.selection = selection
        for name in ("n_io_threads", "predict", "predict_max_rows", "predict_layers_ahead", "predict_resident_layers",
                     "record_trace",
                     "trace_max_events", "trace_max_ids"):
            setattr(native, name, getattr(self, name))
        try:
            native.validate()
        except ValueError as exc:
            raise InvalidParameterError(str(exc)) from None
        return native


def discover_layout(path: str) -> ExpertLayout:
    """Reads a GGUF header and returns where every expert's bytes are.

    The file passes ``check_model_file`` first; ggml's GGUF reader then runs with its log held
    back (what it says of a damaged header ends the error's message instead of the terminal).

    Raises:
        ModelFileError: missing, corrupt or truncated file, or a dense (non-MoE) model.
    """
    check_model_file(path)
    with _ggml_log_held() as log:
        try:
            return _native.discover_layout(str(path))
        except RuntimeError as exc:
            said = "; ".join(re.sub(r"^\w+: ", "", line.strip()) for line in log if line.strip())
            raise ModelFileError(f"{exc}; ggml: {said}" if said else str(exc)) from None


_LOG_LOCK = threading.Lock()


@contextlib.contextmanager
def _ggml_log_held() -> Iterator[list[str]]:
    """ggml's log goes into the list yielded while the block runs, then back where it went."""
    lines: list[str] = []

    @llama_cpp.llama_log_callback
    def hold(level: int, text: bytes, user_data: ctypes.c_void_p) -> None:
        lines.append(text.decode("utf-8", "replace"))

    with _LOG_LOCK:
        previous, user_data = llama_cpp.llama_log_callback(), ctypes.c_void_p()
        llama_cpp.llama_log_get(ctypes.byref(previous), ctypes.byref(user_data))
        llama_cpp.llama_log_set(hold, ctypes.c_void_p(0))
        try:
            yield lines
        finally:
            llama_cpp.llama_log_set(previous, user_data)


TRACE_ACCESS = 0
TRACE_PREDICT = 1
TRACE_STEP = 2


@dataclass(frozen=True)
class TraceSteps:
    """How a trace's events fall into steps (one ubatch each: one ``llama_decode``).

    Attributes:
        index: per event, its step (0-based).
        decode: per step, whether it only decoded (no prompt rows).
        rows: per step, its tokens (rows of the trace's sequence or sequences).
    """

    index: np.ndarray
    decode: np.ndarray
    rows: np.ndarray

    @property
    def starts(self) -> np.ndarray:
        """Per step, the position of its first token (one more entry: the end of the last)."""
        return np.concatenate([[0], np.cumsum(self.rows)])


@dataclass(frozen=True)
class RoutingTrace:
    """What every MoE layer selected, in evaluation order (see ``csrc/routing-trace.h``).

    Attributes:
        kind: per event, ``TRACE_STEP`` (a step begins: ids are its decode and prefill rows),
            ``TRACE_ACCESS`` (a layer's top-k for one ubatch) or ``TRACE_PREDICT``.
        layer: per event, the layer (-1 for a step).
        n_tokens: per event, tokens of the ubatch (rows of the top-k; 1 for predictions).
        n_ids: per event, ids stored.
        ids: all ids, events back to back (ACCESS: ``[n_tokens, k]`` row-major).
        n_dropped: events lost because the recording reservation was full.
    """

    kind: np.ndarray
    layer: np.ndarray
    n_tokens: np.ndarray
    n_ids: np.ndarray
    ids: np.ndarray
    n_dropped: int = 0

    @classmethod
    def from_native(cls, native: _native.RoutingTrace) -> "RoutingTrace":
        return cls(kind=native.kind, layer=native.layer, n_tokens=native.n_tokens, n_ids=native.n_ids, ids=native.ids,
                   n_dropped=native.n_dropped)

    @classmethod
    def concat(cls, traces: list["RoutingTrace"]) -> "RoutingTrace":
        if not traces:
            empty = np.zeros(0, dtype=np.int32)
            return cls(np.zeros(0, dtype=np.uint8), empty, empty, empty, empty)
        return cls(
            kind=np.concatenate([t.kind for t in traces]),
            layer=np.concatenate([t.layer for t in traces]),
            n_tokens=np.concatenate([t.n_tokens for t in traces]),
            n_ids=np.concatenate([t.n_ids for t in traces]),
            ids=np.concatenate([t.ids for t in traces]),
            n_dropped=sum(t.n_dropped for t in traces),
        )

    def to_native(self) -> _native.RoutingTrace:
        return _native.RoutingTrace(kind=self.kind, layer=self.layer, n_tokens=self.n_tokens, n_ids=self.n_ids,
                                    ids=self.ids, n_dropped=self.n_dropped)

    def __len__(self) -> int:
        return int(self.kind.shape[0])

    def offsets(self) -> np.ndarray:
        """Where each event's ids begin in ``ids`` (one more entry: their end)."""
        return np.concatenate([[0], np.cumsum(self.n_ids, dtype=np.int64)])

    def events(self) -> Iterator[tuple[int, int, np.ndarray]]:
        """Yields ``(kind, layer, ids)``; ACCESS ids are ``[n_tokens, k]``, PREDICT and STEP ids 1-D."""
        offsets = self.offsets()
        for i in range(len(self)):
            ids = self.ids[offsets[i] : offsets[i + 1]]
            if self.kind[i] == TRACE_ACCESS:
                ids = ids.reshape(int(self.n_tokens[i]), -1)
            yield int(self.kind[i]), int(self.layer[i]), ids

    def expert_counts(self, n_layers: int, n_experts: int, events: np.ndarray | None = None) -> np.ndarray:
        """Selections per (layer, expert) over every token of every ACCESS event (of those where
        the bool mask ``events`` is true, if given)."""
        chosen = self.kind == TRACE_ACCESS if events is None else (self.kind == TRACE_ACCESS) & events
        access = np.repeat(chosen, self.n_ids)
        layers = np.repeat(self.layer, self.n_ids)[access].astype(np.int64)
        ids = self.ids[access].astype(np.int64)
        valid = (ids >= 0) & (ids < n_experts) & (layers >= 0) & (layers < n_layers)
        units = layers[valid] * n_experts + ids[valid]
        return np.bincount(units, minlength=n_layers * n_experts).reshape(n_layers, n_experts).astype(np.int64)

    def steps(self) -> TraceSteps:
        """Which step each event belongs to. The engine's cache records a STEP event as each
        step begins; a trace without them (recorded by an older version, or built by hand) is
        split by the layer order instead: a step begins when an access's layer does not
        increase, and it decodes when that first access has one row."""
        n = len(self)
        is_step = self.kind == TRACE_STEP
        if is_step.any():
            marks = is_step
            where = np.flatnonzero(is_step)
            decode = self.ids[self.offsets()[where] + 1] == 0  # no prefill rows
        else:
            access = np.flatnonzero(self.kind == TRACE_ACCESS)
            layers = self.layer[access]
            where = access[np.concatenate([[True], layers[1:] <= layers[:-1]])] if len(access) else access
            marks = np.zeros(n, dtype=bool)
            marks[where] = True
            decode = self.n_tokens[where] == 1
        index = np.maximum(np.cumsum(marks, dtype=np.int64) - 1, 0)
        return TraceSteps(index, np.asarray(decode, dtype=bool), self.n_tokens[where].astype(np.int64))

    def ubatches(self) -> Iterator[list[tuple[int, np.ndarray]]]:
        """ACCESS events grouped by step (``steps``); a step without accesses yields nothing."""
        index = self.steps().index
        current: list[tuple[int, np.ndarray]] = []
        current_step = -1
        for i, (kind, layer, ids) in enumerate(self.events()):
            if kind != TRACE_ACCESS:
                continue
            if current and index[i] != current_step:
                yield current
                current = []
            current_step = int(index[i])
            current.append((layer, ids))
        if current:
            yield current

    def split_prefill(self, n_prefill_tokens: int, n_layers: int, n_experts: int) -> tuple[np.ndarray, np.ndarray]:
        """Per prefilled token its experts, and the decode selections.

        Returns:
            prompt_experts: ``expert_id_dtype(n_experts)`` (int8 up to 128 experts) ``[n_prefill_tokens,
                L, k]``, -1 where a layer did not see the token (llama.cpp's last layer keeps only
                the rows whose logits are needed): it crosses to the router in every summary.
            decode_counts: int64 ``[L, E]`` selections of the ubatches after the prefill.
        """
        access = self.kind == TRACE_ACCESS
        k = int(self.n_ids[access][0] // self.n_tokens[access][0]) if access.any() else 0
        prompt = np.full((n_prefill_tokens, n_layers, max(k, 1)), -1, dtype=expert_id_dtype(n_experts))
        steps = self.steps()
        starts = steps.starts
        in_prompt = access & (starts[steps.index] < n_prefill_tokens) if len(steps.rows) else access & False
        decode = self.expert_counts(n_layers, n_experts, ~in_prompt)  # every selection after the prompt
        offsets = self.offsets()
        for i in np.flatnonzero(in_prompt):  # the prompt's steps: each token's experts
            rows, layer = int(self.n_tokens[i]), int(self.layer[i])
            ids = self.ids[offsets[i]:offsets[i + 1]].reshape(rows, -1)
            begin = int(starts[steps.index[i]])
            end = min(begin + int(steps.rows[steps.index[i]]), n_prefill_tokens)
            start = max(begin, end - rows)  # fewer rows: the last tokens of the step
            prompt[start:end, layer, :] = ids[rows - (end - start):]
        return prompt, decode

    def select(self, *, decode_only: bool = False, predictions: bool = True) -> "RoutingTrace":
        """The same trace without the steps that prefilled (``decode_only``) and/or its PREDICT events."""
        keep = np.ones(len(self), dtype=bool)
        if not predictions:
            keep &= self.kind != TRACE_PREDICT
        if decode_only and len(self):
            steps = self.steps()
            keep &= steps.decode[steps.index] if len(steps.decode) else False
        offsets = self.offsets()
        ids = np.concatenate([self.ids[offsets[i]:offsets[i + 1]] for i in np.flatnonzero(keep)]) if keep.any() \
            else np.zeros(0, dtype=np.int32)
        return RoutingTrace(kind=self.kind[keep], layer=self.layer[keep], n_tokens=self.n_tokens[keep],
                            n_ids=self.n_ids[keep], ids=ids.astype(np.int32), n_dropped=self.n_dropped)

    def summary(self, prefilled: Sequence[int], n_layers: int, n_experts: int) -> RoutingTraceSummary:
        """What the router's affinity learns from this request: the tokens it ``prefilled``, the
        experts each chose, and the selections of its decoding (``split_prefill``)."""
        prompt_experts, decode_counts = self.split_prefill(len(prefilled), n_layers, n_experts)
        return RoutingTraceSummary(tokens=tuple(prefilled), prompt_experts=prompt_experts, decode_counts=decode_counts)

    def decode_steps(self) -> list[dict[int, np.ndarray]]:
        """Per decoding step, ``{layer: ids}``: the decode part of the trace (single-token steps)."""
        return [dict(ubatch) for ubatch in self.ubatches() if ubatch[0][1].shape[0] == 1]


def reuse_rate(trace: RoutingTrace) -> float:
    """Next-token expert reuse: mean over layers and consecutive decode tokens of |S_t ∩ S_t-1| / k."""
    steps = trace.decode_steps()
    total, n = 0.0, 0
    for prev, cur in zip(steps, steps[1:]):
        for layer, ids in cur.items():
            if layer in prev:
                a, b = set(prev[layer].ravel().tolist()), set(ids.ravel().tolist())
                total += len(a & b) / max(1, len(b))
                n += 1
    return total / n if n else float("nan")


@dataclass
class CachePolicy:
    """The native policy core alone: replays traces exactly as the eval callback drives it."""

    n_layers: int
    n_experts: int
    unit_bytes: np.ndarray
    config: CacheConfig
    min_units_resident: int = 1
    _native: Any = field(init=False, repr=False)

    def __post_init__(self) -> None:
        try:
            self._native = _native.CachePolicy(
                self.n_layers, self.n_experts, np.asarray(self.unit_bytes, dtype=np.uint64).ravel(),
                self.config.to_native(), self.min_units_resident,
            )
        except ValueError as exc:
            raise InvalidParameterError(str(exc)) from None

    def access(self, layer: int, ids: np.ndarray) -> CachePlan:
        return self._native.access(layer, np.atleast_2d(np.asarray(ids, dtype=np.int32)))

    def predict(self, layer: int, experts: np.ndarray, distance: int = 1) -> CachePlan:
        return self._native.predict(layer, np.asarray(experts, dtype=np.int32), distance)

    def settle(self) -> CachePlan:
        return self._native.settle()

    def replay(self, trace: RoutingTrace) -> None:
        _native.replay(self._native, trace.to_native())

    def is_resident(self, layer: int, expert: int) -> bool:
        return self._native.is_resident(layer * self.n_experts + expert)

    @property
    def resident_bytes(self) -> int:
        return self._native.resident_bytes

    def counters(self) -> dict[str, int]:
        return self._native.counters()

    def warmth(self) -> tuple[np.ndarray, np.ndarray]:
        return self._native.warmth()

    def expert_counts(self) -> np.ndarray:
        return self._native.expert_counts()


def derived_stats(counters: dict[str, int]) -> dict[str, float]:
    """Rates computed from raw counters (one definition, used by engine, CLI and benchmarks)."""
    hits = counters["n_hits_prefill"] + counters["n_hits_decode"]
    misses = counters["n_misses_prefill"] + counters["n_misses_decode"]
    decode = counters["n_hits_decode"] + counters["n_misses_decode"]

    def ratio(a: float, b: float) -> float:
        return a / b if b else float("nan")

    return {
        "hits": hits,
        "misses": misses,
        "hit_rate": ratio(hits, hits + misses),
        "decode_hit_rate": ratio(counters["n_hits_decode"], decode),
        "bytes_read": counters["bytes_read_prefill"] + counters["bytes_read_decode"],
        "prefetch_precision": ratio(counters["n_predicted_correct"], counters["n_predicted"]),
        "prefetch_recall": ratio(counters["n_predicted_correct"], counters["n_selected_predicted"]),
        "prefetch_used_fraction": ratio(counters["n_prefetch_used"], counters["n_prefetch_issued"]),
    }


def check_budget(layout: ExpertLayout, budget_bytes: int) -> None:
    """Raises CacheBudgetError unless the policy core takes ``budget_bytes`` for this model: the
    budget must hold each layer's largest top-k experts, which one decode step pins at once.
    The engine's cache applies the same rule; this checks it without loading the model."""
    try:
        CachePolicy(layout.n_layers, layout.n_experts, layout.unit_bytes, CacheConfig(budget_bytes=budget_bytes),
                    min_units_resident=layout.n_experts_used)
    except InvalidParameterError as exc:
        raise CacheBudgetError(f"a cache budget of {budget_bytes} bytes cannot work for this model: {exc}") from None


ExpertCache = _native.ExpertCache  # the cache llama.cpp's eval callback drives (one per engine)


def open_expert_cache(layout: ExpertLayout, params: ExpertCacheParams) -> ExpertCache:
    """The native cache of the model ``layout`` describes, under ``params``, not yet attached
    to a llama.cpp context (``ExpertCache.attach`` does that once the model is mapped).

    Raises:
        InvalidParameterError: a knob of ``params`` out of its range.
        CacheBudgetError: the budget cannot work for this model (it must hold each layer's top-k).
    """
    native_params = params.to_native()
    if params.selection.cache_aware and layout.selection_off:
        raise InvalidParameterError(f"cache-aware expert selection cannot run on '{layout.path}': {layout.selection_off}",
                                    param="expert_selection")
    try:
        return _native.ExpertCache(layout, native_params)
    except ValueError as exc:
        raise CacheBudgetError(str(exc)) from None


def min_budget(layout: ExpertLayout) -> int:
    """The smallest budget, in bytes, an ``ExpertCache`` takes for this model (each layer's
    largest top-k experts, which one decode step pins at once)."""
    return int(_native.min_budget(layout))


def cache_stats(cache: ExpertCache, counters: dict[str, int]) -> dict[str, float]:
    """``counters`` of ``cache``, the rates derived from them (``derived_stats``), and the
    cache's resident and budget bytes."""
    stats: dict[str, float] = dict(counters)
    stats.update(derived_stats(counters))
    stats["resident_bytes"] = cache.resident_bytes
    stats["budget_bytes"] = cache.budget_bytes
    stats["predictor_on"] = float(not cache.predictor_off)  # why not: ExpertCache.predictor_off
    return stats
