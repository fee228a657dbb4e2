"""Small random-weight MoE GGUFs of architectures ``cluster.models.synth`` does not write, as a user's
model would come: ``qwen2moe`` (a shared expert beside the routed ones, attention biases),
``deepseek`` (a dense first layer, then routed plus shared experts) and a Mixtral-like
``llama`` (8 experts, top-2, Q4_0 weights). Random weights from a seed, a byte-level BPE
vocabulary with one merge; nothing here knows about topics."""

from __future__ import annotations

import math
import zlib
from pathlib import Path

import gguf
import numpy as np

Q = gguf.GGMLQuantizationType
N_LAYERS, N_EMBD, N_HEAD, N_FF = 3, 64, 4, 64
ARCHS = ("qwen2moe", "deepseek", "mixtral")
SHAPES = {"qwen2moe": (8, 2), "deepseek": (8, 2), "mixtral": (8, 2)}  # (experts, top-k)
DENSE_LAYERS = {"deepseek": 1}  # leading layers without experts


def _byte_level_vocab() -> tuple[list[str], list[str]]:
    """The 256 byte tokens as GPT-2 spells them, BOS and EOS, and the merge "Ġ t"."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    spelled = {b: chr(b) for b in printable}
    spelled.update({b: chr(256 + i) for i, b in enumerate(b for b in range(256) if b not in spelled)})
    tokens = [spelled[b] for b in range(256)] + ["<|bos|>", "<|eos|>", spelled[ord(" ")] + "t"]
    return tokens, [f"{spelled[ord(' ')]} t"]


class _Writer:
    def __init__(self, path: Path, arch: str, seed: int) -> None:
        self.gguf = gguf.GGUFWriter(str(path), arch)
        self.seed = seed

    def tensor(self, name: str, shape: tuple[int, ...], qtype: Q = Q.F16, std: float | None = None) -> None:
        """``shape`` in numpy order; norms (std None) are ones."""
        rng = np.random.default_rng([self.seed, zlib.crc32(name.encode())])
        x = np.ones(shape, np.float32) if std is None else rng.standard_normal(shape, dtype=np.float32) * np.float32(std)
        if qtype in (Q.F32, Q.F16):
            self.gguf.add_tensor(name, x.astype(np.float32 if qtype == Q.F32 else np.float16))
        else:
            data = gguf.quants.quantize(x, qtype)
            self.gguf.add_tensor(name, data, raw_shape=data.shape, raw_dtype=qtype)

    def ffn(self, prefix: str, n_ff: int, qtype: Q, suffix: str = "") -> None:
        self.tensor(f"{prefix}ffn_gate{suffix}.weight", (n_ff, N_EMBD), qtype, 1 / math.sqrt(N_EMBD))
        self.tensor(f"{prefix}ffn_up{suffix}.weight", (n_ff, N_EMBD), qtype, 1 / math.sqrt(N_EMBD))
        self.tensor(f"{prefix}ffn_down{suffix}.weight", (N_EMBD, n_ff), qtype, 0.05)

    def experts(self, prefix: str, n_experts: int, qtype: Q) -> None:
        self.tensor(f"{prefix}ffn_gate_inp.weight", (n_experts, N_EMBD), Q.F32, 1 / math.sqrt(N_EMBD))
        self.tensor(f"{prefix}ffn_gate_exps.weight", (n_experts, N_FF, N_EMBD), qtype, 1 / math.sqrt(N_EMBD))
        self.tensor(f"{prefix}ffn_up_exps.weight", (n_experts, N_FF, N_EMBD), qtype, 1 / math.sqrt(N_EMBD))
        self.tensor(f"{prefix}ffn_down_exps.weight", (n_experts, N_EMBD, N_FF), qtype, 0.05)

    def close(self) -> None:
        self.gguf.write_header_to_file()
        self.gguf.write_kv_data_to_file()
        self.gguf.write_tensors_to_file()
        self.gguf.close()


def write_foreign_model(path: Path, arch: str, seed: int = 0) -> Path:
    """Writes one of ARCHS to ``path``."""
    n_experts, top_k = SHAPES[arch]
    qtype = Q.Q4_0 if arch == "mixtral" else Q.F16
    w = _Writer(path, "llama" if arch == "mixtral" else arch, seed)
    g = w.gguf
    g.add_name(f"foreign-{arch}")
    g.add_context_length(512)
    g.add_block_count(N_LAYERS)
    g.add_embedding_length(N_EMBD)
    g.add_feed_forward_length(N_FF)
    g.add_head_count(N_HEAD)
    g.add_head_count_kv(N_HEAD // 2)
    g.add_layer_norm_rms_eps(1e-6)
    g.add_rope_dimension_count(N_EMBD // N_HEAD)
    g.add_rope_freq_base(10000.0)
    g.add_expert_count(n_experts)
    g.add_expert_used_count(top_k)
    if arch == "qwen2moe":
        g.add_expert_feed_forward_length(N_FF)
        g.add_expert_shared_feed_forward_length(N_FF)
    elif arch == "deepseek":
        g.add_leading_dense_block_count(DENSE_LAYERS[arch])
        g.add_expert_feed_forward_length(N_FF)
        g.add_expert_shared_count(1)
        g.add_expert_weights_scale(1.0)
    tokens, merges = _byte_level_vocab()
    g.add_tokenizer_model("gpt2")
    g.add_tokenizer_pre("default")
    g.add_token_list(tokens)
    g.add_token_types([int(gguf.TokenType.NORMAL)] * 256 + [int(gguf.TokenType.CONTROL)] * 2
                      + [int(gguf.TokenType.NORMAL)])
    g.add_token_merges(merges)
    g.add_bos_token_id(256)
    g.add_eos_token_id(257)
    g.add_add_bos_token(True)

    n_q, n_kv = N_EMBD, N_EMBD // 2
    w.tensor("token_embd.weight", (len(tokens), N_EMBD), Q.F16, 1.0)
    for il in range(N_LAYERS):
        p = f"blk.{il}."
        w.tensor(p + "attn_norm.weight", (N_EMBD,), Q.F32)
        w.tensor(p + "attn_q.weight", (n_q, N_EMBD), qtype, 1 / math.sqrt(N_EMBD))
        w.tensor(p + "attn_k.weight", (n_kv, N_EMBD), qtype, 1 / math.sqrt(N_EMBD))
        w.tensor(p + "attn_v.weight", (n_kv, N_EMBD), qtype, 1 / math.sqrt(N_EMBD))
        w.tensor(p + "attn_output.weight", (N_EMBD, n_q), qtype, 0.05)
        if arch == "qwen2moe":
            for name, size in (("q", n_q), ("k", n_kv), ("v", n_kv)):
                w.tensor(f"{p}attn_{name}.bias", (size,), Q.F32, 0.02)
        w.tensor(p + "ffn_norm.weight", (N_EMBD,), Q.F32)
        if il < DENSE_LAYERS.get(arch, 0):
            w.ffn(p, N_FF, qtype)
            continue
        w.experts(p, n_experts, qtype)
        if arch == "qwen2moe":
            w.tensor(p + "ffn_gate_inp_shexp.weight", (N_EMBD,), Q.F32, 1 / math.sqrt(N_EMBD))
        if arch in ("qwen2moe", "deepseek"):
            w.ffn(p, N_FF, qtype, suffix="_shexp")
    w.tensor("output_norm.weight", (N_EMBD,), Q.F32)
    w.tensor("output.weight", (len(tokens), N_EMBD), Q.F16, 1 / math.sqrt(N_EMBD))
    w.close()
    return path
