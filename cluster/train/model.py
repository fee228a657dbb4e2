"""A small MoE transformer in PyTorch that computes what llama.cpp's `qwen3moe` graph computes.

Checked against llama.cpp as vendored by llama-cpp-python 0.3.36 (`src/models/qwen3moe.cpp`,
`build_moe_ffn` in `src/llama-graph.cpp`, `llama_model_rope_type` in `src/llama-model.cpp`).
Per layer, for hidden states x [T, n_embd]:

1. h = RMSNorm(x) * attn_norm                                   (eps = rms_eps)
2. q = h Wq^T [T, n_head, head_dim], k = h Wk^T, v = h Wv^T [T, n_head_kv, head_dim]
3. q = RMSNorm_head(q) * attn_q_norm, k = RMSNorm_head(k) * attn_k_norm  (over head_dim, before RoPE)
4. RoPE, NEOX layout (qwen3moe's rope type): dimension i pairs with i + head_dim/2,
   angle pos * rope_freq_base^(-2i/head_dim)
5. causal softmax attention, scale 1/sqrt(head_dim); query head j reads kv head j // (n_head/n_head_kv)
6. x = x + attn Wo^T
7. h = RMSNorm(x) * ffn_norm
8. router: p = softmax(h Wr^T) over n_expert; S = top-k(p); w = p[S] / sum(p[S])  (norm_w = true,
   expert_weights_scale unset)
9. x = x + sum_{e in S} w_e * Wdown_e (silu(Wgate_e h) * Wup_e h)       (SwiGLU experts, no shared expert)

then logits = RMSNorm(x) * output_norm @ E^T, where E is the token embedding (tied: the GGUF has no
`output.weight`, and llama.cpp then uses `token_embd.weight`).

Parameters are stored in the layouts the GGUF holds (numpy shape = reversed ggml `ne`), so the
export writes them as they are: Linear weights [out, in]; experts' gate and up [n_expert, n_ff_exp,
n_embd] (stacked in one parameter `w_gate_up`, split by `gate_up_views`) and `w_down`
[n_expert, n_embd, n_ff_exp].

Training adds a Switch/Mixtral load-balancing loss per layer:
aux = n_expert * sum_e f_e * P_e, with f_e the fraction of the k * T selections that chose e and
P_e the mean router probability of e (1.0 when perfectly balanced). Its scope is a choice of the
forward pass: `global` (f and P over every token of the batch, as the first model trained) or
`sequence` (f and P per sequence, the loss averaged over sequences: the micro-batch-like
balancing that Qwen found to hurt expert specialisation).

With `selection_bias` (DeepSeek-V3's auxiliary-loss-free balancing) each MoE layer holds a
buffer b [n_expert], not a parameter, added to the softmax probabilities for the top-k choice
only: S = top-k(p + b), w = p[S] / sum(p[S]) -- what llama.cpp's build_moe_ffn does with an
`ffn_exp_probs_b` tensor. The trainer moves b after each step (`MoE.update_selection_bias`).
`qwen3moe` has no such tensor, so such a model does not export as it (see `export`).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class MoEConfig:
    """Shapes of the model; field names follow the GGUF `qwen3moe.*` keys they become.

    Attributes:
        n_vocab: vocabulary size (rows of the token embedding).
        n_ctx: training context length (tokens); also the GGUF's context_length.
        n_embd: width of the residual stream.
        n_layer: transformer blocks.
        n_head: query heads.
        n_head_kv: key/value heads (GQA); divides n_head.
        head_dim: width of one head (key_length = value_length = rope dimension count).
        n_expert: experts per layer.
        n_expert_used: experts selected per token (top-k).
        n_ff_exp: hidden width of one expert's SwiGLU.
        rope_freq_base: RoPE base.
        rms_eps: RMSNorm epsilon.
        selection_bias: each MoE layer holds a top-k selection bias (see the module docstring);
            off for the first model, whose checkpoints have no such buffer.
    """

    n_vocab: int = 8192
    n_ctx: int = 256
    n_embd: int = 192
    n_layer: int = 6
    n_head: int = 6
    n_head_kv: int = 2
    head_dim: int = 32
    n_expert: int = 64
    n_expert_used: int = 4
    n_ff_exp: int = 128
    rope_freq_base: float = 10000.0
    rms_eps: float = 1e-6
    selection_bias: bool = False

    def validate(self) -> None:
        """Raises ValueError naming the first inconsistent field."""
        for name in ("n_vocab", "n_ctx", "n_embd", "n_layer", "n_head", "n_head_kv", "head_dim", "n_expert",
                     "n_expert_used", "n_ff_exp"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.n_head % self.n_head_kv:
            raise ValueError(f"n_head ({self.n_head}) must be a multiple of n_head_kv ({self.n_head_kv})")
        if self.head_dim % 2:
            raise ValueError(f"head_dim must be even for RoPE, got {self.head_dim}")
        if self.n_expert_used > self.n_expert:
            raise ValueError(f"n_expert_used ({self.n_expert_used}) exceeds n_expert ({self.n_expert})")

    def to_dict(self) -> dict:
        return asdict(self)


class RMSNorm(nn.Module):
    """x / sqrt(mean(x^2) + eps) * weight over the last dimension (llama.cpp's LLM_NORM_RMS)."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


def rope_tables(n_ctx: int, head_dim: int, base: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin [n_ctx, head_dim/2] of angle pos * base^(-2i/head_dim) (ggml_rope_ext's theta)."""
    inv_freq = base ** (-torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    angles = torch.arange(n_ctx, dtype=torch.float64)[:, None] * inv_freq[None, :]
    return angles.cos().float(), angles.sin().float()


def apply_rope_neox(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotates x [..., T, H, head_dim] in NEOX layout: pairs (i, i + head_dim/2)."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    c, s = cos[:, None, :], sin[:, None, :]  # [T, 1, half]
    return torch.cat((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1)


class Attention(nn.Module):
    """GQA self-attention with per-head q/k RMSNorm before NEOX RoPE (steps 2-6)."""

    def __init__(self, cfg: MoEConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.wq = nn.Linear(cfg.n_embd, cfg.n_head * cfg.head_dim, bias=False)     # attn_q   [n_head*hd, n_embd]
        self.wk = nn.Linear(cfg.n_embd, cfg.n_head_kv * cfg.head_dim, bias=False)  # attn_k   [n_head_kv*hd, n_embd]
        self.wv = nn.Linear(cfg.n_embd, cfg.n_head_kv * cfg.head_dim, bias=False)  # attn_v
        self.wo = nn.Linear(cfg.n_head * cfg.head_dim, cfg.n_embd, bias=False)     # attn_output [n_embd, n_head*hd]
        self.q_norm = RMSNorm(cfg.head_dim, cfg.rms_eps)
        self.k_norm = RMSNorm(cfg.head_dim, cfg.rms_eps)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        cfg = self.cfg
        q = self.q_norm(self.wq(x).view(b, t, cfg.n_head, cfg.head_dim))
        k = self.k_norm(self.wk(x).view(b, t, cfg.n_head_kv, cfg.head_dim))
        v = self.wv(x).view(b, t, cfg.n_head_kv, cfg.head_dim)
        q = apply_rope_neox(q, cos[:t], sin[:t]).transpose(1, 2)  # [B, n_head, T, hd]
        k = apply_rope_neox(k, cos[:t], sin[:t]).transpose(1, 2)
        v = v.transpose(1, 2)
        group = cfg.n_head // cfg.n_head_kv
        if group > 1:  # query head j reads kv head j // group, as ggml's broadcast in mul_mat does
            k = k.repeat_interleave(group, dim=1)
            v = v.repeat_interleave(group, dim=1)
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=1.0 / math.sqrt(cfg.head_dim))
        return self.wo(out.transpose(1, 2).reshape(b, t, cfg.n_head * cfg.head_dim))


@dataclass
class RouterOutput:
    """What a MoE layer reports besides its output.

    Attributes:
        selected: expert ids [N, k] per token, in descending probability.
        aux_loss: the load-balancing loss of this layer (scalar tensor).
        load: fraction of selections per expert [n_expert] (detached).
    """

    selected: torch.Tensor
    aux_loss: torch.Tensor
    load: torch.Tensor


BALANCE_SCOPES: tuple[str, ...] = ("global", "sequence")
"""Where the load-balancing loss takes its statistics: the whole batch, or each sequence."""


def balancing_loss(probs: torch.Tensor, selected: torch.Tensor, n_expert: int, scope: str = "global") -> torch.Tensor:
    """The Switch loss n_expert * sum_e f_e P_e of one layer.

    Args:
        probs: router probabilities [B, T, n_expert] (or [N, n_expert], one sequence).
        selected: chosen experts [B, T, k] (or [N, k]).
        n_expert: experts in the layer.
        scope: "global" (f, P over all B*T tokens) or "sequence" (per sequence, then the mean).

    Raises:
        ValueError: an unknown scope.
    """
    if scope not in BALANCE_SCOPES:
        raise ValueError(f"balance scope must be one of {BALANCE_SCOPES}, got '{scope}'")
    if probs.dim() == 2:
        probs, selected = probs[None], selected[None]
    b = probs.shape[0]
    if scope == "global":
        probs, selected = probs.reshape(1, -1, n_expert), selected.reshape(1, -1, selected.shape[-1])
        b = 1
    flat = selected.reshape(b, -1)
    counts = torch.zeros(b, n_expert, dtype=probs.dtype).scatter_add_(1, flat, torch.ones_like(flat, dtype=probs.dtype))
    f = counts / flat.shape[1]
    return n_expert * (f * probs.mean(1)).sum(-1).mean()


class MoE(nn.Module):
    """Softmax router, top-k with renormalised weights, SwiGLU experts (steps 8-9)."""

    def __init__(self, cfg: MoEConfig) -> None:
        super().__init__()
        self.cfg = cfg
        e, f, d = cfg.n_expert, cfg.n_ff_exp, cfg.n_embd
        self.router = nn.Linear(d, e, bias=False)  # ffn_gate_inp  [n_expert, n_embd]
        # ffn_gate_exps and ffn_up_exps [n_expert, n_ff_exp, n_embd] stacked along dim 1: one product
        # per expert instead of two (about 20 % faster on CPU); gate_up_views() splits them.
        self.w_gate_up = nn.Parameter(torch.empty(e, 2 * f, d))  # [n_expert, 2*n_ff_exp, n_embd]
        self.w_down = nn.Parameter(torch.empty(e, d, f))  # ffn_down_exps [n_expert, n_embd, n_ff_exp]
        if cfg.selection_bias:  # ffn_exp_probs_b [n_expert]; a buffer: saved with the model, never a gradient
            self.register_buffer("selection_bias", torch.zeros(e))
        else:
            self.selection_bias = None

    @torch.no_grad()
    def update_selection_bias(self, load: torch.Tensor, rate: float) -> None:
        """DeepSeek-V3's update: b_e += rate * sign(mean load - load_e), `load` the step's selection shares."""
        if self.selection_bias is None:
            raise RuntimeError("this MoE layer has no selection bias (MoEConfig.selection_bias is off)")
        self.selection_bias += rate * torch.sign(load.mean() - load)

    def gate_up_views(self) -> tuple[torch.Tensor, torch.Tensor]:
        """ffn_gate_exps and ffn_up_exps [n_expert, n_ff_exp, n_embd], views of w_gate_up."""
        f = self.cfg.n_ff_exp
        return self.w_gate_up[:, :f], self.w_gate_up[:, f:]

    def forward(self, x: torch.Tensor, balance_scope: str = "global") -> tuple[torch.Tensor, RouterOutput]:
        shape = x.shape
        h = x.reshape(-1, shape[-1])  # [N, d]
        n_tokens, k, n_expert = h.shape[0], self.cfg.n_expert_used, self.cfg.n_expert
        probs = torch.softmax(self.router(h), dim=-1)  # [N, E]
        if self.selection_bias is None:
            top_p, top_i = torch.topk(probs, k, dim=-1)  # [N, k], descending
        else:  # choose on the biased scores, weigh with the unbiased probabilities
            top_i = torch.topk(probs + self.selection_bias, k, dim=-1).indices
            top_p = probs.gather(1, top_i)
        weights = top_p / top_p.sum(-1, keepdim=True).clamp_min(6.103515625e-5)  # the clamp llama.cpp applies
        # Dispatch: selections sorted by expert, one gather in, one scatter-add out, and per-expert
        # matrix products on views (unbind/split/cat), so no autograd op touches a whole expert
        # tensor or the whole batch once per expert.
        flat_e = top_i.reshape(-1)
        order = torch.argsort(flat_e, stable=True)
        counts = torch.bincount(flat_e, minlength=n_expert)
        token_of = order // k  # token index of each sorted selection
        xs = h.index_select(0, token_of)  # [N*k, d], grouped by expert
        sizes = counts.tolist()
        ys = []
        for xe, wgu, wd in zip(xs.split(sizes), self.w_gate_up.unbind(0), self.w_down.unbind(0)):
            if xe.shape[0]:
                gate, up = (xe @ wgu.T).chunk(2, dim=-1)  # [n_e, n_ff_exp] each
                ys.append((F.silu(gate) * up) @ wd.T)  # [n_e, d]
        y = torch.cat(ys) * weights.reshape(-1)[order, None]
        out = torch.zeros_like(h).index_add(0, token_of, y)
        load = counts.float() / (n_tokens * k)
        if balance_scope == "global":  # the first model's expression, kept as it was
            aux = n_expert * torch.sum(load * probs.mean(0))
        else:
            lead = shape[:-1] if len(shape) > 2 else (1, n_tokens)
            aux = balancing_loss(probs.view(*lead, n_expert), top_i.view(*lead, k), n_expert, balance_scope)
        return out.view(shape), RouterOutput(top_i, aux, load.detach())


class Block(nn.Module):
    """One transformer block: attention and MoE, each behind an RMSNorm with a residual."""

    def __init__(self, cfg: MoEConfig) -> None:
        super().__init__()
        self.attn_norm = RMSNorm(cfg.n_embd, cfg.rms_eps)
        self.attn = Attention(cfg)
        self.ffn_norm = RMSNorm(cfg.n_embd, cfg.rms_eps)
        self.moe = MoE(cfg)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                balance_scope: str = "global") -> tuple[torch.Tensor, RouterOutput]:
        x = x + self.attn(self.attn_norm(x), cos, sin)
        moe_out, routing = self.moe(self.ffn_norm(x), balance_scope)
        return x + moe_out, routing


@dataclass
class ModelOutput:
    """Logits [B, T, n_vocab], the mean load-balancing loss over layers, and each layer's routing."""

    logits: torch.Tensor
    aux_loss: torch.Tensor
    routing: list[RouterOutput]


class MoETransformer(nn.Module):
    """The whole qwen3moe-shaped model with tied input/output embeddings."""

    def __init__(self, cfg: MoEConfig) -> None:
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.n_vocab, cfg.n_embd)  # token_embd [n_vocab, n_embd]
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.norm = RMSNorm(cfg.n_embd, cfg.rms_eps)  # output_norm
        cos, sin = rope_tables(cfg.n_ctx, cfg.head_dim, cfg.rope_freq_base)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)

    def init_weights(self, generator: torch.Generator) -> None:
        """GPT-2 style: N(0, 0.02), output projections scaled by 1/sqrt(2 n_layer), norms 1."""
        std = 0.02
        out_std = std / math.sqrt(2 * self.cfg.n_layer)
        with torch.no_grad():
            for name, p in self.named_parameters():
                if name.endswith("norm.weight"):
                    p.fill_(1.0)
                elif name.endswith("wo.weight") or name.endswith("w_down"):
                    p.normal_(0.0, out_std, generator=generator)
                else:
                    p.normal_(0.0, std, generator=generator)

    def forward(self, ids: torch.Tensor, balance_scope: str = "global") -> ModelOutput:
        """Runs token ids [B, T] (T <= n_ctx) through the model; `balance_scope` shapes aux_loss."""
        if ids.shape[1] > self.cfg.n_ctx:
            raise ValueError(f"sequence of {ids.shape[1]} tokens exceeds n_ctx {self.cfg.n_ctx}")
        x = self.embed(ids)
        routing: list[RouterOutput] = []
        for block in self.blocks:
            x, r = block(x, self.rope_cos, self.rope_sin, balance_scope)
            routing.append(r)
        logits = self.norm(x) @ self.embed.weight.T
        aux = torch.stack([r.aux_loss for r in routing]).mean()
        return ModelOutput(logits, aux, routing)

    def gguf_tensors(self) -> dict[str, torch.Tensor]:
        """Every weight under its GGUF name, in the layout the GGUF stores (see the module docstring).

        The tensors are the parameters or views of them: writing into one writes the model.
        """
        tensors: dict[str, torch.Tensor] = {"token_embd.weight": self.embed.weight, "output_norm.weight": self.norm.weight}
        for i, blk in enumerate(self.blocks):
            gate, up = blk.moe.gate_up_views()
            tensors.update({
                f"blk.{i}.attn_norm.weight": blk.attn_norm.weight,
                f"blk.{i}.attn_q.weight": blk.attn.wq.weight,
                f"blk.{i}.attn_k.weight": blk.attn.wk.weight,
                f"blk.{i}.attn_v.weight": blk.attn.wv.weight,
                f"blk.{i}.attn_output.weight": blk.attn.wo.weight,
                f"blk.{i}.attn_q_norm.weight": blk.attn.q_norm.weight,
                f"blk.{i}.attn_k_norm.weight": blk.attn.k_norm.weight,
                f"blk.{i}.ffn_norm.weight": blk.ffn_norm.weight,
                f"blk.{i}.ffn_gate_inp.weight": blk.moe.router.weight,
                f"blk.{i}.ffn_gate_exps.weight": gate,
                f"blk.{i}.ffn_up_exps.weight": up,
                f"blk.{i}.ffn_down_exps.weight": blk.moe.w_down,
            })
        return tensors

    def load_gguf_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        """Copies weights named as gguf_tensors() names them into the model (shapes must match).

        Raises:
            ValueError: a tensor is missing or has another shape.
        """
        own = self.gguf_tensors()
        with torch.no_grad():
            for name, param in own.items():
                if name not in tensors:
                    raise ValueError(f"tensor '{name}' is missing")
                src = tensors[name]
                if tuple(src.shape) != tuple(param.shape):
                    raise ValueError(f"tensor '{name}' has shape {tuple(src.shape)}, expected {tuple(param.shape)}")
                param.copy_(src.to(param.dtype))

    def n_params(self) -> int:
        return sum(p.numel() for p in self.parameters())
