"""What a node learned from serving one request: the experts each prefilled token chose and the
decoding's selections (``RoutingTraceSummary``). Made by ``cache.RoutingTrace.summary``; read by the
batch rules, the token affinity, the router's policies (inside ``NodeReport``). numpy only: the
router's process loads it without llama.cpp."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


def expert_id_dtype(n_experts: int) -> np.dtype:
    """The smallest signed integer type that holds expert ids ``0 .. n_experts - 1`` and -1 (not
    seen): int8 up to 128 experts (Qwen3-30B-A3B: a quarter of int32's bytes on the wire), int16
    up to 32,768, int32 beyond."""
    if n_experts < 0:
        raise ValueError(f"n_experts must be >= 0, got {n_experts}")
    for dtype in (np.int8, np.int16, np.int32):
        if n_experts - 1 <= np.iinfo(dtype).max:
            return np.dtype(dtype)
    return np.dtype(np.int64)


@dataclass(frozen=True)
class RoutingTraceSummary:
    """What a node reports about one served request, for the policies to learn from.

    Attributes:
        tokens: the prompt tokens that were prefilled (in order).
        prompt_experts: ``[n_tokens, L, k]`` experts each prefilled token chose per layer (-1
            where a layer did not see the token), of ``expert_id_dtype(E)`` as nodes send it
            (any integer type is read).
        decode_counts: int ``[L, E]`` selections during decoding.
    """

    tokens: tuple[int, ...]
    prompt_experts: np.ndarray
    decode_counts: np.ndarray

    def selections(self, shape: tuple[int, int], decode: bool = True) -> np.ndarray:
        """Selections per (layer, expert), int64 ``shape`` ``[L, E]``: the prefilled tokens', and with
        ``decode`` the decoding's too (ids outside the shape are left out)."""
        n_layers, n_experts = shape
        counts = np.zeros(n_layers * n_experts, dtype=np.int64)
        experts = self.prompt_experts
        if experts.ndim == 3 and experts.size:
            layers = min(n_layers, experts.shape[1])
            ids = experts[:, :layers, :].astype(np.int64)  # (layer, expert) numbers pass a compact id type
            units = ids + (np.arange(layers, dtype=np.int64) * n_experts)[None, :, None]
            counts += np.bincount(units[(ids >= 0) & (ids < n_experts)], minlength=counts.size)[:counts.size]
        decoded = np.asarray(self.decode_counts)
        if decode and decoded.shape == shape:
            counts += decoded.reshape(-1).astype(np.int64)
        return counts.reshape(shape)
