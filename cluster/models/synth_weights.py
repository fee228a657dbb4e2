"""The synthetic models' tensors: which ones a `SynthConfig` implies, in file order, and how each one's bytes are drawn.

`Plan` lists every tensor with its shape, type and size, and a `make` that generates its data on demand, so
`cluster.models.synth` can write the tensor infos first and then stream the data one tensor at a time. The
weights realise the design in `cluster.models.synth`'s docstring: topic directions along coordinate axes,
embeddings and the output head that walks each topic's words, routers that favour a topic's experts, and
attention and expert matrices sized by the ratio constants below.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import gguf
import numpy as np

from cluster.models.synth_config import DTYPES, SynthConfig, named_rng, topic_experts, topic_windows
from cluster.models.synth_families import FAMILIES
from cluster.models.synth_vocab import build_vocab

__all__ = ["Plan", "TensorSpec", "q4_k_m_type"]

_TOPIC_STRENGTH = 1.0  # s: weight of the topic direction in a word's embedding (word part has norm 1)
_ATTN_OUT_RATIO = 0.03  # |attention output| / |residual| aimed for, per layer
_FFN_OUT_RATIO = 0.05  # |one expert's (or the dense FFN's) output| / |residual|, per layer
_SILU_GLU_MEAN_SQUARE = 0.3557  # E[(silu(g) * u)^2] for g, u ~ N(0, 1): sizes ffn_down


_Q4_K = gguf.GGMLQuantizationType.Q4_K
_Q6_K = gguf.GGMLQuantizationType.Q6_K
_Q8_0 = gguf.GGMLQuantizationType.Q8_0


def q4_k_m_type(name: str, n_layers: int) -> gguf.GGMLQuantizationType:
    """The type llama.cpp's quantizer gives matrix `name` of a Q4_K_M file whose blocks each hold one
    attn_v (src/llama-quant.cpp, llama_tensor_get_type_impl, for n_expert != 8 and not Falcon):
    Q6_K for output.weight, and for attn_v and ffn_down(_exps/_shexp) of the layers `use_more_bits`
    picks (the first and last eighth, and every third between); Q4_K elsewhere, token_embd included."""
    if name == "output.weight":
        return _Q6_K
    if name.startswith("blk.") and ("attn_v.weight" in name or "ffn_down" in name):
        i = int(name.split(".")[1])
        if i < n_layers // 8 or i >= 7 * n_layers // 8 or (i - n_layers // 8) % 3 == 2:
            return _Q6_K
    return _Q4_K


def _quantize_q4_k(x: np.ndarray) -> np.ndarray:
    """Rows of x (float, width a multiple of 256) as Q4_K blocks [rows, width/256*144]: per 32-weight
    sub-block a 6-bit scale and min over [min(x, 0), max(x)], 4-bit codes rounded to nearest."""
    rows = x.shape[0]
    b = np.asarray(x, dtype=np.float32).reshape(-1, 8, 32)
    lo = np.minimum(b.min(axis=2), 0.0)
    scale_f = (b.max(axis=2) - lo) / 15.0
    d = (scale_f.max(axis=1) / 63.0).astype(np.float16)
    dmin = (-lo.min(axis=1) / 63.0).astype(np.float16)
    df, dminf = d.astype(np.float32)[:, None], dmin.astype(np.float32)[:, None]
    sc = np.clip(np.rint(np.divide(scale_f, df, out=np.zeros_like(scale_f), where=df > 0)), 0, 63).astype(np.uint8)
    m = np.clip(np.rint(np.divide(-lo, dminf, out=np.zeros_like(lo), where=dminf > 0)), 0, 63).astype(np.uint8)
    step = (df * sc)[:, :, None]
    q = np.rint(np.divide(b + (dminf * m)[:, :, None], step, out=np.zeros_like(b), where=step > 0))
    q = np.clip(q, 0, 15).astype(np.uint8).reshape(-1, 4, 2, 32)  # chunk j: sub-blocks 2j (low), 2j+1 (high)
    out = np.empty((b.shape[0], 144), dtype=np.uint8)
    out[:, 0:2] = d.reshape(-1, 1).view(np.uint8)
    out[:, 2:4] = dmin.reshape(-1, 1).view(np.uint8)
    out[:, 4:8] = sc[:, :4] | ((sc[:, 4:] >> 4) << 6)
    out[:, 8:12] = m[:, :4] | ((m[:, 4:] >> 4) << 6)
    out[:, 12:16] = (sc[:, 4:] & 15) | ((m[:, 4:] & 15) << 4)
    out[:, 16:] = (q[:, :, 0, :] | (q[:, :, 1, :] << 4)).reshape(-1, 128)
    return out.reshape(rows, -1)


def _quantize_q8_0(x: np.ndarray) -> np.ndarray:
    """Rows of x (float, width a multiple of 32) as Q8_0 blocks (the gguf package's quantiser)."""
    return gguf.quants.quantize(np.asarray(x, dtype=np.float32), _Q8_0)


def _pack_q6_k(q: np.ndarray, scales: np.ndarray, d: np.ndarray) -> np.ndarray:
    """Q6_K blocks [n, 210] from codes q [n, 256] (0..63, weight = d * scale * (q - 32)), int8 scales
    [n, 16] and f16 d [n] (ggml-common.h block_q6_K: ql[128], qh[64], scales[16], d)."""
    n = q.shape[0]
    q4 = (q & 15).reshape(n, 2, 2, 64)
    q2 = (q >> 4).reshape(n, 2, 4, 32)
    out = np.empty((n, 210), dtype=np.uint8)
    out[:, :128] = (q4[:, :, 0] | (q4[:, :, 1] << 4)).reshape(n, 128)
    out[:, 128:192] = (q2[:, :, 0] | (q2[:, :, 1] << 2) | (q2[:, :, 2] << 4) | (q2[:, :, 3] << 6)).reshape(n, 64)
    out[:, 192:208] = scales.astype(np.int8).view(np.uint8)
    out[:, 208:210] = d.astype(np.float16).reshape(n, 1).view(np.uint8)
    return out


def _quantize_q6_k(x: np.ndarray) -> np.ndarray:
    """Rows of x (float, width a multiple of 256) as Q6_K blocks [rows, width/256*210]: per 16-weight
    sub-block an 8-bit scale of max|x| / 31, 6-bit codes rounded to nearest."""
    rows = x.shape[0]
    b = np.asarray(x, dtype=np.float32).reshape(-1, 16, 16)
    scale_f = np.abs(b).max(axis=2) / 31.0
    d = (scale_f.max(axis=1) / 127.0).astype(np.float16)
    df = d.astype(np.float32)[:, None]
    sc = np.clip(np.rint(np.divide(scale_f, df, out=np.zeros_like(scale_f), where=df > 0)), 0, 127)
    step = (df * sc)[:, :, None]
    q = np.clip(np.rint(np.divide(b, step, out=np.zeros_like(b), where=step > 0)), -32, 31) + 32
    return _pack_q6_k(q.astype(np.uint8).reshape(-1, 256), sc, d).reshape(rows, -1)


@dataclass(frozen=True)
class TensorSpec:
    """One tensor of the file: its GGUF tensor info, and `make`, which generates its data."""

    name: str
    byte_shape: tuple[int, ...]  # numpy order (reverse of ggml's ne); bytes for quantised types
    np_dtype: np.dtype[Any]
    raw_dtype: gguf.GGMLQuantizationType
    nbytes: int
    make: Callable[[], np.ndarray]


class Plan:
    """Every tensor of the file, in file order, with a generator for its bytes.

    Holds only the small shared matrices (topic directions, embeddings, output head); the
    per-layer matrices are generated when their `make` is called.
    """

    def __init__(self, config: SynthConfig) -> None:
        self.config = config
        self.vocab = build_vocab(config)
        unused = int(gguf.TokenType.UNUSED)
        self.n_real = len(self.vocab.tokens) - sum(1 for t in self.vocab.token_types if t == unused)  # before the padding
        n, s = config.n_embd, _TOPIC_STRENGTH
        self.residual_norm = math.sqrt(1.0 + s * s)  # |s d_t + w_v| for a topic word
        # d_t = unit vector along coordinate topic_axes[t]: orthonormal without any linear algebra,
        # so no BLAS rounding enters the file and the bytes are the same on every machine.
        self.topic_axes = named_rng(config.seed, "topic_directions").permutation(n)[: config.n_topics]
        self.embd = self._embeddings()
        self.tensors: list[TensorSpec] = []
        self._plan_tensors()

    # -- shared matrices ----------------------------------------------------------------------

    def _orthogonal_noise(self, rng: np.random.Generator, rows: int) -> np.ndarray:
        """rows x n_embd Gaussian N(0, 1/n_embd) vectors with the topic directions projected out."""
        n = self.config.n_embd
        x = rng.standard_normal((rows, n)) / math.sqrt(n)
        x[:, self.topic_axes] = 0.0
        return x

    def _embeddings(self) -> np.ndarray:
        v = self.vocab
        w = self._orthogonal_noise(named_rng(self.config.seed, "token_embd"), self.n_real)
        w /= np.linalg.norm(w, axis=1, keepdims=True)
        for t, ids in enumerate(v.topic_ids):
            w[ids, self.topic_axes[t]] = _TOPIC_STRENGTH
        return w  # [n_real, n_embd] float64 (padding rows are zero, added when written)

    def _output_head(self) -> np.ndarray:
        v = self.vocab
        out = np.zeros_like(self.embd)
        for ids in v.topic_ids:
            out[ids] = self.embd[np.roll(ids, 1)]  # row of word i = embedding of word i-1
        out[np.ix_([v.bos_id, v.eos_id], self.topic_axes)] = -_TOPIC_STRENGTH  # away from every topic
        return out

    def _router(self, layer: int) -> np.ndarray:
        c = self.config
        n, s = c.n_embd, _TOPIC_STRENGTH
        router = self._orthogonal_noise(named_rng(c.seed, f"blk.{layer}.ffn_gate_inp"), c.n_experts)
        # x = rmsnorm(s d_t + w_v) = sqrt(n) (s d_t + w_v) / residual_norm: the noise term u.x has
        # std 1 / residual_norm and b = specialization / (s sqrt(n)) makes the topic term
        # specialization / residual_norm; scaling by residual_norm gives logits unit noise std.
        if c.expert_window:  # sliding-window routing: word v lifts its window by the same
            # specialization through its own part w_v (x . w_v = sqrt(n) / residual_norm, as for d_t at s = 1)
            for ids, windows in zip(self.vocab.topic_ids, topic_windows(c, layer)):
                for v, window in zip(ids, windows):
                    word = self.embd[v].copy()
                    word[self.topic_axes] = 0.0  # w_v, a unit vector
                    router[window] += (c.specialization / math.sqrt(n)) * word
            return router * self.residual_norm
        for t, members in enumerate(topic_experts(c, layer)):
            router[members, self.topic_axes[t]] = c.specialization / (s * math.sqrt(n))
        return router * self.residual_norm  # [n_experts, n_embd]

    # -- tensor list ---------------------------------------------------------------------------

    def _add(self, name: str, shape: tuple[int, ...], qtype: gguf.GGMLQuantizationType,
             make: Callable[[], np.ndarray]) -> None:
        """Plans tensor `name` of numpy `shape` (ggml ne reversed), stored as `qtype`."""
        if qtype in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16):
            np_dtype = np.dtype(np.float32 if qtype == gguf.GGMLQuantizationType.F32 else np.float16)
            byte_shape = shape

            def produce() -> np.ndarray:
                return np.ascontiguousarray(make(), dtype=np_dtype)
        else:
            np_dtype = np.dtype(np.uint8)
            byte_shape = gguf.quants.quant_shape_to_byte_shape(shape, qtype)

            def produce() -> np.ndarray:
                return gguf.quants.quantize(np.asarray(make(), dtype=np.float32), qtype)
        nbytes = int(np.prod(byte_shape)) * np_dtype.itemsize
        self.tensors.append(TensorSpec(name, tuple(byte_shape), np_dtype, qtype, nbytes, produce))

    def _norm(self, name: str, size: int) -> None:
        """F32 norm weights, all 1 (llama.cpp multiplies the normalised row by them)."""
        self._add(name, (size,), gguf.GGMLQuantizationType.F32, lambda: np.ones(size))

    def _matrix(self, name: str, shape: tuple[int, ...], std: float) -> None:
        """Weights of mean 0 and deviation std in the config's dtype, from the tensor's own stream:
        N(0, std^2), or for q4_k and q8_0 uniform codes written as Q4_K or Q8_0 blocks directly."""
        seed = self.config.seed
        if self.config.dtype == "q4_k":
            self._add_q4_k(name, shape, std)
            return
        if self.config.dtype == "q8_0":
            self._add_q8_0(name, shape, std)
            return
        if self.config.dtype == "q4_k_m":
            if q4_k_m_type(name, self.config.n_layers) == _Q6_K:
                self._add_q6_k(name, shape, std)
            else:  # scale 1: d is a coarse f16 subnormal at 32 for weights this small
                self._add_q4_k(name, shape, std, scale=1)
            return

        def make() -> np.ndarray:
            x = named_rng(seed, name).standard_normal(shape, dtype=np.float32)
            x *= np.float32(std)
            return x
        self._add(name, shape, DTYPES[self.config.dtype], make)

    def _add_q4_k(self, name: str, shape: tuple[int, ...], std: float, scale: int = 32) -> None:
        """A Q4_K tensor written block by block (gguf has no Q4_K quantiser; ggml-common.h
        block_q4_K: f16 d, f16 dmin, 12 bytes of 6-bit sub-block scales and mins, 128 bytes of
        4-bit codes q for 256 weights w = d*scale*q - dmin*min). Every sub-block gets scale =
        min = 32 and dmin = 7.5 d, so w = 32 d (q - 7.5): uniform codes give mean 0 and
        deviation 32 d * 4.61 (the deviation of 0..15), and d is set for `std` (`scale` other than
        32: that scale and min instead)."""
        qtype = gguf.GGMLQuantizationType.Q4_K
        block_weights, block_bytes = gguf.GGML_QUANT_SIZES[qtype]
        byte_shape = gguf.quants.quant_shape_to_byte_shape(shape, qtype)
        n_blocks = int(np.prod(shape)) // block_weights
        d = np.float16(std / (scale * math.sqrt((16 * 16 - 1) / 12)))
        header = np.zeros(16, dtype=np.uint8)  # d, dmin, scales[12]
        header[0:4] = np.array([d, np.float16(7.5 * float(d))], dtype=np.float16).view(np.uint8)
        # scales[0..3]: scale of sub-blocks 0-3 (low 6 bits) and the top 2 bits of sub-blocks 4-7's
        # scale; scales[4..7]: the same for mins; scales[8..11]: low 4 bits of 4-7's scale / min.
        # 160 = 0b10_100000: 32 for sub-blocks 0-3, and 0b10 << 4 = 32 for sub-blocks 4-7.
        header[4:12] = scale | ((scale >> 4) << 6)
        header[12:16] = (scale & 15) | ((scale & 15) << 4)
        seed = self.config.seed

        def produce() -> np.ndarray:
            out = np.empty((n_blocks, block_bytes), dtype=np.uint8)
            out[:, :16] = header
            out[:, 16:] = named_rng(seed, name).integers(0, 256, size=(n_blocks, block_bytes - 16), dtype=np.uint8)
            return out.reshape(byte_shape)
        nbytes = n_blocks * block_bytes
        self.tensors.append(TensorSpec(name, tuple(byte_shape), np.dtype(np.uint8), qtype, nbytes, produce))

    def _add_q8_0(self, name: str, shape: tuple[int, ...], std: float) -> None:
        """A Q8_0 tensor written block by block (ggml-common.h block_q8_0: f16 d, then 32 int8 codes q,
        w = d q): uniform codes in -m..m (mean 0, deviation sqrt(((2m+1)^2 - 1) / 12)), d the f16 nearest
        std / deviation(127) and m (64..127) the one that brings d * deviation(m) nearest `std` (for weights
        this small d is a coarse f16 subnormal). Drawing codes, not quantising Gaussian weights, keeps a
        full-size layer's writing in seconds."""
        block_weights, block_bytes = gguf.GGML_QUANT_SIZES[_Q8_0]
        byte_shape = gguf.quants.quant_shape_to_byte_shape(shape, _Q8_0)
        n_blocks = int(np.prod(shape)) // block_weights

        def deviation(m: int) -> float:
            return math.sqrt(((2 * m + 1) ** 2 - 1) / 12)
        d = np.float16(std / deviation(127))
        m = min(range(64, 128), key=lambda m: abs(float(d) * deviation(m) - std))
        d_bytes = np.array([d], dtype=np.float16).view(np.uint8)
        seed = self.config.seed

        def produce() -> np.ndarray:
            out = np.empty((n_blocks, block_bytes), dtype=np.uint8)
            out[:, :2] = d_bytes
            out[:, 2:] = named_rng(seed, name).integers(-m, m + 1, size=(n_blocks, block_weights),
                                                         dtype=np.int8).view(np.uint8)
            return out.reshape(byte_shape)
        self.tensors.append(TensorSpec(name, tuple(byte_shape), np.dtype(np.uint8), _Q8_0, n_blocks * block_bytes,
                                       produce))

    def _add_q6_k(self, name: str, shape: tuple[int, ...], std: float) -> None:
        """A Q6_K tensor written block by block: uniform 6-bit codes q (deviation sqrt((64^2-1)/12))
        and sub-block scales alternating +1 / -1, so w = +-d (q - 32) has mean 0 over each pair of
        sub-blocks; d is set for `std` (scale 1 keeps d, an f16, precise for weights this small)."""
        block_weights, block_bytes = gguf.GGML_QUANT_SIZES[_Q6_K]
        byte_shape = gguf.quants.quant_shape_to_byte_shape(shape, _Q6_K)
        n_blocks = int(np.prod(shape)) // block_weights
        d = np.float16(std / math.sqrt((64 * 64 - 1) / 12))
        tail = np.zeros(18, dtype=np.uint8)  # scales[16], d
        tail[:16] = np.tile(np.array([1, -1], dtype=np.int8), 8).view(np.uint8)
        tail[16:] = np.array([d], dtype=np.float16).view(np.uint8)
        seed = self.config.seed

        def produce() -> np.ndarray:
            out = np.empty((n_blocks, block_bytes), dtype=np.uint8)
            out[:, :192] = named_rng(seed, name).integers(0, 256, size=(n_blocks, 192), dtype=np.uint8)
            out[:, 192:] = tail
            return out.reshape(byte_shape)
        self.tensors.append(TensorSpec(name, tuple(byte_shape), np.dtype(np.uint8), _Q6_K, n_blocks * block_bytes,
                                       produce))

    def _vocab_matrix(self, name: str, rows: Callable[[], np.ndarray]) -> None:
        """token_embd or output [n_vocab, n_embd]: F16; Q8_0 for q8_0 and for q4_k_m the Q4_K_M
        rule's type, as llama.cpp's quantizer gives them (quantised here); the padding tokens' rows are zero."""
        n_vocab, n = len(self.vocab.tokens), self.config.n_embd
        n_pad = n_vocab - self.n_real
        if self.config.dtype not in ("q4_k_m", "q8_0"):
            if n_pad == 0:
                self._add(name, (n_vocab, n), gguf.GGMLQuantizationType.F16, rows)
            else:
                self._add(name, (n_vocab, n), gguf.GGMLQuantizationType.F16,
                          lambda: np.concatenate([rows(), np.zeros((n_pad, n))]))
            return
        if self.config.dtype == "q8_0":
            qtype = _Q8_0
            quantize = _quantize_q8_0
        else:
            qtype = q4_k_m_type(name, self.config.n_layers)
            quantize = _quantize_q6_k if qtype == _Q6_K else _quantize_q4_k
        byte_shape = gguf.quants.quant_shape_to_byte_shape((n_vocab, n), qtype)

        def produce() -> np.ndarray:
            out = np.zeros(byte_shape, dtype=np.uint8)  # zero bytes: d = 0, every weight 0
            out[: self.n_real] = quantize(rows())
            return out
        nbytes = int(np.prod(byte_shape))
        self.tensors.append(TensorSpec(name, tuple(byte_shape), np.dtype(np.uint8), qtype, nbytes, produce))

    def _plan_tensors(self) -> None:
        c = self.config
        n, ff, e = c.n_embd, c.n_ff, c.n_experts
        head = c.head_dim or n // c.n_head
        n_q, n_kv = c.n_head * head, c.n_head_kv * head
        # Inputs to every matrix are rms-normalised (components ~ N(0, 1)), so 1/sqrt(n) keeps
        # pre-activations ~ N(0, 1); output matrices are sized so attention and one expert add
        # _ATTN_OUT_RATIO and _FFN_OUT_RATIO of |residual| (see the cluster.models.synth docstring).
        in_std = self.in_std = 1.0 / math.sqrt(n)
        attn_out_std = self.attn_out_std = _ATTN_OUT_RATIO * self.residual_norm / (n if n_q == n else math.sqrt(n_q * n))
        down_std = self.down_std = _FFN_OUT_RATIO * self.residual_norm / math.sqrt(_SILU_GLU_MEAN_SQUARE * ff * n)

        self._vocab_matrix("token_embd.weight", lambda: self.embd)  # ggml [n_embd, n_vocab]
        family = FAMILIES.get(c.arch)
        for il in range(c.n_layers):
            if family is not None:  # the families of synth_families plan their own blocks
                family.layer(self, il)
                continue
            p = f"blk.{il}."
            self._norm(p + "attn_norm.weight", n)
            self._matrix(p + "attn_q.weight", (n_q, n), in_std)  # ggml [n_embd, n_head*head]
            self._matrix(p + "attn_k.weight", (n_kv, n), in_std)  # ggml [n_embd, n_head_kv*head]
            self._matrix(p + "attn_v.weight", (n_kv, n), in_std)
            self._matrix(p + "attn_output.weight", (n, n_q), attn_out_std)
            if c.arch == "qwen3moe":
                self._norm(p + "attn_q_norm.weight", head)
                self._norm(p + "attn_k_norm.weight", head)
            self._norm(p + "ffn_norm.weight", n)
            if e == 0:  # dense (llama only): ggml [n_embd, n_ff], [n_embd, n_ff], [n_ff, n_embd]
                self._matrix(p + "ffn_gate.weight", (ff, n), in_std)
                self._matrix(p + "ffn_up.weight", (ff, n), in_std)
                self._matrix(p + "ffn_down.weight", (n, ff), down_std)
                continue
            self._add(p + "ffn_gate_inp.weight", (e, n), gguf.GGMLQuantizationType.F32,  # ggml [n_embd, n_expert]
                      lambda il=il: self._router(il))
            if c.merged_gate_up:  # ggml [n_embd, 2*n_ff, n_expert], gate rows first (llama-graph.cpp build_moe_ffn)
                self._matrix(p + "ffn_gate_up_exps.weight", (e, 2 * ff, n), in_std)
            else:  # ggml [n_embd, n_ff, n_expert] each
                self._matrix(p + "ffn_gate_exps.weight", (e, ff, n), in_std)
                self._matrix(p + "ffn_up_exps.weight", (e, ff, n), in_std)
            self._matrix(p + "ffn_down_exps.weight", (e, n, ff), down_std)  # ggml [n_ff, n_embd, n_expert]
        self._norm("output_norm.weight", n)
        self._vocab_matrix("output.weight", self._output_head)  # ggml [n_embd, n_vocab], not tied
