"""The MoE families `synth --arch` writes beside `llama` and `qwen3moe`: per GGUF architecture, its metadata keys, its
per-layer tensors (names, ggml shapes, types as llama.cpp's `src/models/<arch>.cpp` loads them) and its routing rule.

Every family keeps the topic design of `cluster.models.synth` (topic-steered router rows in `ffn_gate_inp`, small
attention and expert outputs, the output head that walks a topic's words); what differs is the family's own
structure around it: shared experts, leading dense layers, attention biases and norms, sigmoid scoring with a
selection bias (`exp_probs_b`) and expert groups, multi-head latent attention. `Family` says which of those a file
has, so tests can count what the cache must treat as expert and non-expert bytes, and which selection rule the
file's top-k follows. `cluster.models.synth_weights.Plan` calls `Family.layer` for each block; `cluster.models.synth`
calls `Family.metadata` for the architecture's keys.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import gguf
import numpy as np

from cluster.models.synth_config import LEADING_DENSE, SynthConfig, named_rng


class Plan(Protocol):
    """What a family's `layer` uses of `cluster.models.synth_weights.Plan` (which imports this module)."""

    config: SynthConfig
    in_std: float
    attn_out_std: float
    down_std: float

    def _add(self, name: str, shape: tuple[int, ...], qtype: gguf.GGMLQuantizationType,
             make: Callable[[], np.ndarray]) -> None: ...

    def _norm(self, name: str, size: int) -> None: ...

    def _matrix(self, name: str, shape: tuple[int, ...], std: float) -> None: ...

    def _router(self, layer: int) -> Any: ...

__all__ = ["FAMILIES", "Family"]

F32 = gguf.GGMLQuantizationType.F32
_BIAS_STD = 0.02  # attention q/k/v biases: small beside the ~N(0, 1) projections
_PROBS_BIAS_STD = 0.05  # exp_probs_b: a selection bias of a few hundredths, as trained ones are (sigmoid scores are 0..1)


@dataclass(frozen=True)
class Family:
    """One GGUF architecture's MoE structure as the synthetic writer realises it.

    Attributes:
        arch: GGUF `general.architecture`.
        rms_eps: `attention.layer_norm_rms_epsilon` written.
        gating: how router logits become selection scores: "softmax", "sigmoid" (top-k of
            sigmoid(logits) [+ exp_probs_b]), "logits" (top-k of the raw logits, sigmoid weights: Llama 4) or
            "softmax_weight" (top-k of the [biased] logits, softmax over the k chosen: gpt-oss).
        selection_bias: each MoE layer has `blk.<il>.exp_probs_b.bias` [n_experts] added to the scores
            for selection only (DeepSeek V3's correction bias).
        router_bias: each MoE layer has `blk.<il>.ffn_gate_inp.bias` added to the logits.
        expert_groups: (groups, groups used): top-k only inside the best groups (1, 1: no groups).
        shared_experts: shared experts per MoE layer (always computed: non-expert bytes to the cache).
        dense_layers: leading blocks with a dense FFN instead of experts.
        mha_only: key/value heads are the query heads (the family's q/k norms span n_embd).
        n_head_kv_fixed: key/value heads written whatever the config says (0: the config's).
        rope_dims: rope_dimension_count written (0: the head size).
        moe_step: every moe_step-th block (il + 1 a multiple of it) is MoE, the others dense (Llama 4's interleave).
        layer: plans block `il`'s tensors on a Plan.
        metadata: writes the family's keys beyond the common ones.
    """

    arch: str
    rms_eps: float
    gating: str
    layer: Callable[[Plan, int], None]
    metadata: Callable[[gguf.GGUFWriter, SynthConfig], None]
    selection_bias: bool = False
    router_bias: bool = False
    expert_groups: tuple[int, int] = (1, 1)
    shared_experts: int = 0
    dense_layers: int = 0
    mha_only: bool = False
    n_head_kv_fixed: int = 0
    rope_dims: int = 0
    moe_step: int = 1

    def n_head_kv(self, config: SynthConfig) -> int:
        """Key/value heads the file has for `config` (MLA caches one compressed row: 1)."""
        return self.n_head_kv_fixed or (config.n_head if self.mha_only else config.n_head_kv)

    def rope_dimension_count(self, config: SynthConfig) -> int:
        return self.rope_dims or config.n_embd // config.n_head

    def is_moe_layer(self, il: int) -> bool:
        return il >= self.dense_layers and (il + 1) % self.moe_step == 0


# -- building blocks (on a Plan) -----------------------------------------------------------------


def _bias(plan: Plan, name: str, size: int, std: float) -> None:
    """An F32 vector N(0, std^2) from the tensor's own stream."""
    seed = plan.config.seed
    plan._add(name, (size,), F32, lambda: named_rng(seed, name).standard_normal(size) * std)


def _attention(plan: Plan, p: str, *, n_kv_heads: int, biases: bool = False, qk_norm: int = 0) -> None:
    """attn_norm, q/k/v (with biases), attn_output; qk_norm > 0 adds attn_q_norm/attn_k_norm of that size."""
    c = plan.config
    n, head = c.n_embd, c.n_embd // c.n_head
    n_q, n_kv = c.n_head * head, n_kv_heads * head
    plan._norm(p + "attn_norm.weight", n)
    plan._matrix(p + "attn_q.weight", (n_q, n), plan.in_std)
    plan._matrix(p + "attn_k.weight", (n_kv, n), plan.in_std)
    plan._matrix(p + "attn_v.weight", (n_kv, n), plan.in_std)
    if biases:
        for name, size in (("q", n_q), ("k", n_kv), ("v", n_kv)):
            _bias(plan, f"{p}attn_{name}.bias", size, _BIAS_STD)
    plan._matrix(p + "attn_output.weight", (n, n_q), plan.attn_out_std)
    if qk_norm:
        plan._norm(p + "attn_q_norm.weight", qk_norm)
        plan._norm(p + "attn_k_norm.weight", qk_norm)


def _dense_ffn(plan: Plan, p: str, n_ff: int, suffix: str = "") -> None:
    """ffn_gate/ffn_up/ffn_down (+suffix, e.g. "_shexp"): ggml [n_embd, n_ff], [n_embd, n_ff], [n_ff, n_embd]."""
    n = plan.config.n_embd
    down_std = plan.down_std * math.sqrt(plan.config.n_ff / n_ff)
    plan._matrix(f"{p}ffn_gate{suffix}.weight", (n_ff, n), plan.in_std)
    plan._matrix(f"{p}ffn_up{suffix}.weight", (n_ff, n), plan.in_std)
    plan._matrix(f"{p}ffn_down{suffix}.weight", (n, n_ff), down_std)


def _router(plan: Plan, p: str, il: int) -> None:
    plan._add(p + "ffn_gate_inp.weight", (plan.config.n_experts, plan.config.n_embd), F32,
              lambda: plan._router(il))


def _experts(plan: Plan, p: str) -> None:
    """ffn_gate_exps, ffn_up_exps ggml [n_embd, n_ff, n_expert]; ffn_down_exps [n_ff, n_embd, n_expert]."""
    c = plan.config
    n, ff, e = c.n_embd, c.n_ff, c.n_experts
    plan._matrix(p + "ffn_gate_exps.weight", (e, ff, n), plan.in_std)
    plan._matrix(p + "ffn_up_exps.weight", (e, ff, n), plan.in_std)
    plan._matrix(p + "ffn_down_exps.weight", (e, n, ff), plan.down_std)


def _selection_bias(plan: Plan, p: str) -> None:
    _bias(plan, p + "exp_probs_b.bias", plan.config.n_experts, _PROBS_BIAS_STD)


def _dense_or_shared_moe_ffn(plan: Plan, p: str, il: int, arch: str, selection_bias: bool) -> None:
    """The FFN of a family with dense blocks beside MoE ones: a dense FFN twice the expert width where the
    block is not MoE (``Family.is_moe_layer``); else the router (with the ``exp_probs_b`` selection bias
    where the family has one), the routed experts and one shared expert."""
    c = plan.config
    if not FAMILIES[arch].is_moe_layer(il):
        _dense_ffn(plan, p, 2 * c.n_ff)
        return
    _router(plan, p, il)
    if selection_bias:
        _selection_bias(plan, p)
    _experts(plan, p)
    _dense_ffn(plan, p, c.n_ff, "_shexp")


# -- families ------------------------------------------------------------------------------------


def _qwen2moe_layer(plan: Plan, il: int) -> None:
    """Qwen1.5-MoE / Qwen2-57B-A14B: attention biases; routed experts (softmax, weights not renormalised)
    plus one shared expert scaled by sigmoid(ffn_gate_inp_shexp . x)."""
    c, p = plan.config, f"blk.{il}."
    _attention(plan, p, n_kv_heads=c.n_head_kv, biases=True)
    plan._norm(p + "ffn_norm.weight", c.n_embd)
    _router(plan, p, il)
    _experts(plan, p)
    _bias(plan, p + "ffn_gate_inp_shexp.weight", c.n_embd, 1.0 / math.sqrt(c.n_embd))  # ggml [n_embd]
    _dense_ffn(plan, p, c.n_ff, "_shexp")


def _qwen2moe_meta(w: gguf.GGUFWriter, c: SynthConfig) -> None:
    w.add_feed_forward_length(c.n_ff * c.n_experts_used)
    w.add_expert_feed_forward_length(c.n_ff)
    w.add_expert_shared_feed_forward_length(c.n_ff)


def _olmoe_layer(plan: Plan, il: int) -> None:
    """OLMoE-1B-7B: q/k norms over the whole projection (n_embd, so key/value heads = query heads);
    experts sized by feed_forward_length, softmax top-k, no shared expert."""
    c, p = plan.config, f"blk.{il}."
    _attention(plan, p, n_kv_heads=c.n_head, qk_norm=c.n_embd)
    plan._norm(p + "ffn_norm.weight", c.n_embd)
    _router(plan, p, il)
    _experts(plan, p)


def _olmoe_meta(w: gguf.GGUFWriter, c: SynthConfig) -> None:
    w.add_feed_forward_length(c.n_ff)


def _granitemoe_layer(plan: Plan, il: int) -> None:
    """Granite 3.x MoE (the "shared" variant): llama-style attention, softmax top-k experts and one shared
    expert of expert_shared_feed_forward_length."""
    c, p = plan.config, f"blk.{il}."
    _attention(plan, p, n_kv_heads=c.n_head_kv)
    plan._norm(p + "ffn_norm.weight", c.n_embd)
    _router(plan, p, il)
    _experts(plan, p)
    _dense_ffn(plan, p, c.n_ff, "_shexp")


def _granitemoe_meta(w: gguf.GGUFWriter, c: SynthConfig) -> None:
    w.add_feed_forward_length(c.n_ff)
    w.add_expert_shared_feed_forward_length(c.n_ff)
    w.add_logit_scale(1.0)  # required; 1 leaves the head's logits as they are
    w.add_attention_scale(1.0 / math.sqrt(c.n_embd // c.n_head))
    w.add_residual_scale(1.0)
    w.add_embedding_scale(1.0)


def _glm4moe_layer(plan: Plan, il: int) -> None:
    """GLM-4.5: attention biases and per-head q/k norms, post_attention_norm before the FFN; block 0 dense;
    then sigmoid scores, exp_probs_b selection bias, weights renormalised, one shared expert."""
    c, p = plan.config, f"blk.{il}."
    head = c.n_embd // c.n_head
    _attention(plan, p, n_kv_heads=c.n_head_kv, biases=True, qk_norm=head)
    plan._norm(p + "post_attention_norm.weight", c.n_embd)
    _dense_or_shared_moe_ffn(plan, p, il, "glm4moe", selection_bias=True)


def _glm4moe_meta(w: gguf.GGUFWriter, c: SynthConfig) -> None:
    w.add_feed_forward_length(2 * c.n_ff)  # the dense block's width
    w.add_expert_feed_forward_length(c.n_ff)
    w.add_expert_shared_count(1)
    w.add_leading_dense_block_count(FAMILIES["glm4moe"].dense_layers)
    w.add_expert_weights_scale(1.0)
    w.add_expert_weights_norm(True)
    w.add_expert_gating_func(gguf.ExpertGatingFuncType.SIGMOID)


_MLA = {"q_lora": 32, "kv_lora": 32, "rope": 8, "nope": 16, "v_head": 16}
"""deepseek2's multi-head latent attention at the tiny scale (DeepSeek V3: 1536, 512, 64, 128, 128)."""


def _deepseek2_layer(plan: Plan, il: int) -> None:
    """DeepSeek V3: multi-head latent attention as llama.cpp loads it (q through a low-rank q_a/q_b with
    its norm; one compressed KV row kv_a_mqa [kv_lora + rope] with its norm; per-head k_b and v_b
    decompressing it); block 0 dense; then sigmoid scores plus the exp_probs_b correction bias, top-k
    inside the best expert groups, weights renormalised and scaled, one shared expert."""
    c, p, m = plan.config, f"blk.{il}.", _MLA
    n, h = c.n_embd, c.n_head
    plan._norm(p + "attn_norm.weight", n)
    plan._norm(p + "attn_q_a_norm.weight", m["q_lora"])
    plan._norm(p + "attn_kv_a_norm.weight", m["kv_lora"])
    plan._matrix(p + "attn_q_a.weight", (m["q_lora"], n), plan.in_std)  # ggml [n_embd, q_lora]
    plan._matrix(p + "attn_q_b.weight", (h * (m["nope"] + m["rope"]), m["q_lora"]), 1 / math.sqrt(m["q_lora"]))
    plan._matrix(p + "attn_kv_a_mqa.weight", (m["kv_lora"] + m["rope"], n), plan.in_std)
    plan._matrix(p + "attn_k_b.weight", (h, m["kv_lora"], m["nope"]), 1 / math.sqrt(m["nope"]))  # ggml [nope, kv_lora, h]
    plan._matrix(p + "attn_v_b.weight", (h, m["v_head"], m["kv_lora"]), 1 / math.sqrt(m["kv_lora"]))  # [kv_lora, v, h]
    plan._matrix(p + "attn_output.weight", (n, h * m["v_head"]),
                 plan.attn_out_std * math.sqrt(n / (h * m["v_head"])))
    plan._norm(p + "ffn_norm.weight", n)
    _dense_or_shared_moe_ffn(plan, p, il, "deepseek2", selection_bias=True)


def _deepseek2_meta(w: gguf.GGUFWriter, c: SynthConfig) -> None:
    m, family = _MLA, FAMILIES["deepseek2"]
    w.add_feed_forward_length(2 * c.n_ff)
    w.add_expert_feed_forward_length(c.n_ff)
    w.add_expert_shared_count(family.shared_experts)
    w.add_leading_dense_block_count(family.dense_layers)
    w.add_expert_weights_scale(2.5)
    w.add_expert_weights_norm(True)
    w.add_expert_gating_func(gguf.ExpertGatingFuncType.SIGMOID)
    w.add_expert_group_count(family.expert_groups[0])
    w.add_expert_group_used_count(family.expert_groups[1])
    w.add_q_lora_rank(m["q_lora"])
    w.add_kv_lora_rank(m["kv_lora"])
    w.add_key_length(m["kv_lora"] + m["rope"])  # the cached (compressed) key row, as the converter writes MLA files
    w.add_value_length(m["kv_lora"])
    w.add_key_length_mla(m["nope"] + m["rope"])
    w.add_value_length_mla(m["v_head"])


_LLAMA4_MOE_STEP = 2  # Llama 4 Maverick: every second block is MoE, the others dense


def _llama4_layer(plan: Plan, il: int) -> None:
    """Llama 4 (Maverick's interleave): attention (unweighted L2 q/k norm, chunked attention on 3 of 4
    blocks, NoPE on the 4th); in MoE blocks the top-k of the raw router logits, each chosen expert's input
    scaled by sigmoid(logit), plus one shared expert; the other blocks a dense FFN."""
    c, p = plan.config, f"blk.{il}."
    _attention(plan, p, n_kv_heads=c.n_head_kv)
    plan._norm(p + "ffn_norm.weight", c.n_embd)
    _dense_or_shared_moe_ffn(plan, p, il, "llama4", selection_bias=False)


def _llama4_meta(w: gguf.GGUFWriter, c: SynthConfig) -> None:
    w.add_feed_forward_length(2 * c.n_ff)
    w.add_expert_feed_forward_length(c.n_ff)
    w.add_interleave_moe_layer_step(_LLAMA4_MOE_STEP)
    w.add_expert_shared_count(1)


_GPT_OSS_WINDOW = 128  # gpt-oss: sliding-window attention (128 tokens) on every second block
_SINK_STD = 0.5


def _gpt_oss_layer(plan: Plan, il: int) -> None:
    """gpt-oss: attention with an output bias and per-head sinks (alternating sliding-window and full
    blocks), post_attention_norm before the FFN; routed experts only, their matrices in MXFP4 with F32
    biases per expert (gate/up [n_ff, n_expert], down [n_embd, n_expert]); router with a bias, top-k of
    the biased logits, softmax over the k chosen (SOFTMAX_WEIGHT), SwiGLU with clamping (OAI)."""
    c, p = plan.config, f"blk.{il}."
    n, ff, e = c.n_embd, c.n_ff, c.n_experts
    _attention(plan, p, n_kv_heads=c.n_head_kv, biases=True)
    _bias(plan, p + "attn_output.bias", n, _BIAS_STD)
    _bias(plan, p + "attn_sinks.weight", c.n_head, _SINK_STD)
    plan._norm(p + "post_attention_norm.weight", n)
    _router(plan, p, il)
    _bias(plan, p + "ffn_gate_inp.bias", e, _BIAS_STD)
    seed, mxfp4 = c.seed, gguf.GGMLQuantizationType.MXFP4
    for name, shape, std in (("ffn_gate_exps", (e, ff, n), plan.in_std), ("ffn_up_exps", (e, ff, n), plan.in_std),
                             ("ffn_down_exps", (e, n, ff), plan.down_std)):
        full = p + name + ".weight"
        plan._add(full, shape, mxfp4,
                  lambda full=full, shape=shape, std=std: named_rng(seed, full).standard_normal(shape) * std)
    for name, size in (("ffn_gate_exps", ff), ("ffn_up_exps", ff), ("ffn_down_exps", n)):
        full = p + name + ".bias"  # ggml [size, n_expert]
        plan._add(full, (e, size), F32,
                  lambda full=full, size=size: named_rng(seed, full).standard_normal((e, size)) * _BIAS_STD)


def _gpt_oss_meta(w: gguf.GGUFWriter, c: SynthConfig) -> None:
    w.add_feed_forward_length(c.n_ff)
    w.add_expert_feed_forward_length(c.n_ff)
    w.add_sliding_window(_GPT_OSS_WINDOW)


_QWEN3NEXT_FULL_ATTENTION = 4  # Qwen3-Next: every fourth block full attention, the others gated delta net
_SSM_CONV = 4  # ssm.conv_kernel: the short causal convolution over q, k, v


def _qwen3next_dims(c: SynthConfig) -> dict[str, int]:
    """The gated delta net's sizes at this config's scale (Qwen3-Next-80B: head 128, 16 key heads, 32 value heads):
    head = the attention head size, key heads = n_head_kv, value heads = n_head."""
    head = c.n_embd // c.n_head
    d = {"head": head, "k_heads": c.n_head_kv, "v_heads": c.n_head}
    d["key"], d["value"] = head * d["k_heads"], head * d["v_heads"]
    d["conv"] = 2 * d["key"] + d["value"]
    return d


def _qwen3next_layer(plan: Plan, il: int, split_ba: bool = False) -> None:
    """Qwen3-Next: hybrid blocks. Every fourth block full attention (q projection twice wide: query and its
    sigmoid output gate; per-head q/k norms), the others linear attention (gated delta net: fused q/k/v
    projection and the z gate, a short causal convolution, beta/alpha projection, dt bias and A, a gated
    norm, output projection); post_attention_norm before the FFN; then softmax top-k experts, weights
    renormalised, and one shared expert scaled by sigmoid(ffn_gate_inp_shexp . x)."""
    c, p = plan.config, f"blk.{il}."
    n, head = c.n_embd, c.n_embd // c.n_head
    plan._norm(p + "attn_norm.weight", n)
    if (il + 1) % _QWEN3NEXT_FULL_ATTENTION == 0:
        n_q, n_kv = c.n_head * head, c.n_head_kv * head
        plan._matrix(p + "attn_q.weight", (2 * n_q, n), plan.in_std)  # ggml [n_embd, 2 * n_head * head]
        plan._matrix(p + "attn_k.weight", (n_kv, n), plan.in_std)
        plan._matrix(p + "attn_v.weight", (n_kv, n), plan.in_std)
        plan._matrix(p + "attn_output.weight", (n, n_q), plan.attn_out_std)
        plan._norm(p + "attn_q_norm.weight", head)
        plan._norm(p + "attn_k_norm.weight", head)
    else:
        d, seed = _qwen3next_dims(c), c.seed
        plan._matrix(p + "attn_qkv.weight", (d["conv"], n), plan.in_std)  # ggml [n_embd, 2 key + value]
        plan._matrix(p + "attn_gate.weight", (d["value"], n), plan.in_std)  # z
        conv = p + "ssm_conv1d.weight"  # ggml [conv_kernel, conv_dim], F32 as the converter writes it
        plan._add(conv, (d["conv"], _SSM_CONV), F32,
                  lambda: named_rng(seed, conv).standard_normal((d["conv"], _SSM_CONV)) / math.sqrt(_SSM_CONV))
        plan._add(p + "ssm_dt.bias", (d["v_heads"],), F32, lambda: np.zeros(d["v_heads"]))
        plan._add(p + "ssm_a", (d["v_heads"],), F32, lambda: -np.ones(d["v_heads"]))  # -exp(A_log), A_log = 0
        if split_ba:  # Qwen3.5: beta and alpha projections apart, ggml [n_embd, value heads] each
            plan._matrix(p + "ssm_beta.weight", (d["v_heads"], n), plan.in_std)
            plan._matrix(p + "ssm_alpha.weight", (d["v_heads"], n), plan.in_std)
        else:
            plan._matrix(p + "ssm_ba.weight", (2 * d["v_heads"], n), plan.in_std)  # ggml [n_embd, 2 * value heads]
        plan._norm(p + "ssm_norm.weight", d["head"])
        plan._matrix(p + "ssm_out.weight", (n, d["value"]), plan.attn_out_std * math.sqrt(n / d["value"]))
    plan._norm(p + "post_attention_norm.weight", n)
    _router(plan, p, il)
    _experts(plan, p)
    _bias(plan, p + "ffn_gate_inp_shexp.weight", n, 1.0 / math.sqrt(n))  # ggml [n_embd]
    _dense_ffn(plan, p, c.n_ff, "_shexp")


def _qwen3next_meta(w: gguf.GGUFWriter, c: SynthConfig) -> None:
    d = _qwen3next_dims(c)
    w.add_feed_forward_length(c.n_ff)
    w.add_expert_feed_forward_length(c.n_ff)
    w.add_expert_shared_feed_forward_length(c.n_ff)
    w.add_ssm_conv_kernel(_SSM_CONV)
    w.add_ssm_inner_size(d["value"])  # head_v_dim = inner_size / time_step_rank
    w.add_ssm_state_size(d["head"])
    w.add_ssm_time_step_rank(d["v_heads"])
    w.add_ssm_group_count(d["k_heads"])
    w.add_full_attention_interval(_QWEN3NEXT_FULL_ATTENTION)


def _qwen35moe_layer(plan: Plan, il: int) -> None:
    """Qwen3.5 MoE: Qwen3-Next's blocks with the gated delta net's beta and alpha projections apart."""
    _qwen3next_layer(plan, il, split_ba=True)


def _qwen35moe_meta(w: gguf.GGUFWriter, c: SynthConfig) -> None:
    """Qwen3-Next's keys and the multi-axis rope sections (text only: the first axis takes the most; the
    sections cover half the rotated dimensions, as Qwen3.5's [11, 11, 10, 0] cover 64)."""
    _qwen3next_meta(w, c)
    half = (c.n_embd // c.n_head) // 2
    w.add_rope_dimension_sections([half - 2 * (half // 3), half // 3, half // 3, 0])


FAMILIES: dict[str, Family] = {
    "qwen2moe": Family("qwen2moe", 1e-6, "softmax", _qwen2moe_layer, _qwen2moe_meta, shared_experts=1),
    "olmoe": Family("olmoe", 1e-5, "softmax", _olmoe_layer, _olmoe_meta, mha_only=True),
    "granitemoe": Family("granitemoe", 1e-6, "softmax", _granitemoe_layer, _granitemoe_meta, shared_experts=1),
    "glm4moe": Family("glm4moe", 1e-5, "sigmoid", _glm4moe_layer, _glm4moe_meta, selection_bias=True,
                      shared_experts=1, dense_layers=LEADING_DENSE["glm4moe"]),
    "deepseek2": Family("deepseek2", 1e-6, "sigmoid", _deepseek2_layer, _deepseek2_meta, selection_bias=True,
                        expert_groups=(4, 2), shared_experts=1, dense_layers=LEADING_DENSE["deepseek2"], n_head_kv_fixed=1,
                        rope_dims=_MLA["rope"]),
    "llama4": Family("llama4", 1e-5, "logits", _llama4_layer, _llama4_meta, shared_experts=1,
                     moe_step=_LLAMA4_MOE_STEP),
    "gpt-oss": Family("gpt-oss", 1e-5, "softmax_weight", _gpt_oss_layer, _gpt_oss_meta, router_bias=True),
    "qwen3next": Family("qwen3next", 1e-6, "softmax", _qwen3next_layer, _qwen3next_meta, shared_experts=1),
    "qwen35moe": Family("qwen35moe", 1e-6, "softmax", _qwen35moe_layer, _qwen35moe_meta, shared_experts=1),
}
"""Families by GGUF architecture name (beside `llama` and `qwen3moe`, which `synth_weights` writes itself)."""
