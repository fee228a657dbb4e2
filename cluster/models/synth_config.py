"""What a synthetic model is: `SynthConfig`, its presets and limits, and the topic groups of experts it implies.

`cluster.models.synth` writes the file a config describes; `synth_vocab` and `synth_weights` build its
vocabulary and tensors. Everything random here and there draws from `named_rng`, one stream per named purpose,
so the same config gives the same bytes.
"""

from __future__ import annotations

import dataclasses
import json
import math
import zlib
from dataclasses import dataclass
from typing import Any

import gguf
import numpy as np

from cluster.engine.chat import SYNTH_TEMPLATES

__all__ = [
    "ARCHS",
    "DTYPES",
    "LEADING_DENSE",
    "PRESETS",
    "REALISTIC_SPECIALIZATION",
    "SLIDING_WINDOW_ROUTING",
    "SynthConfig",
    "config_from_args",
    "named_rng",
    "preset_of",
    "topic_experts",
    "topic_group_size",
    "topic_windows",
]

REALISTIC_SPECIALIZATION: float = 2.0
"""Router-logit boost, in standard deviations of the random router term, that a topic word gives
its topic's experts: calibrated so the presets show 25-50 % next-token expert reuse and keep
over 90 % of a one-topic conversation's selections in 40 % of each layer's experts (figures in
the `cluster.models.synth` docstring)."""

SLIDING_WINDOW_ROUTING: dict[str, float | int] = {"specialization": 2.8, "expert_window": 20, "window_ring": 48}
"""Sliding-window routing (`SynthConfig.expert_window`) for 128 experts, top-8, 32 words a topic: each word
lifts 20 of its topic's ring of 48 experts by 2.8 standard deviations. Calibrated, on the engine benchmark's
chat workload, to published top-8-of-128 routing (LRU hits 90-95 % of decode selections at 40 % of the expert
bytes, about half of each layer's experts cover 90 % of the selections, median reuse distance 2 tokens): the
figures `tests/test_synth_routing.py` checks from the construction and docs/regimes.md shows measured."""

ARCHS = ("llama", "qwen3moe", "qwen2moe", "olmoe", "granitemoe", "glm4moe", "deepseek2", "llama4", "gpt-oss",
         "qwen3next", "qwen35moe")
"""GGUF architectures written: llama (Mixtral-style) and qwen3moe here, the others by `synth_families`."""
LEADING_DENSE = {"glm4moe": 1, "deepseek2": 1}
"""Leading blocks with a dense FFN, per architecture (none where absent)."""
DTYPES = {"f16": gguf.GGMLQuantizationType.F16, "q8_0": gguf.GGMLQuantizationType.Q8_0,
          "q4_k": gguf.GGMLQuantizationType.Q4_K, "q4_k_m": gguf.GGMLQuantizationType.Q4_K}
"""GGML type of the expert and attention matrices for each `SynthConfig.dtype` (q4_k_m: the base
type; `synth_weights.q4_k_m_type` gives Q6_K where llama.cpp's Q4_K_M rule puts it)."""
_Q4_K_M_ARCHS = ("llama", "qwen3moe")  # every block has one attn_v, so llama.cpp's counter is the layer
_MAX_EXPERTS = 1024  # LLAMA_MAX_EXPERTS in src/llama-hparams.h
_MAX_LAYERS = 512  # LLAMA_MAX_LAYERS in src/llama-hparams.h
_MAX_WORDS = 20000  # topic words in all; keeps vocabularies and merge lists modest

_ALIASES = {"layers": "n_layers", "experts": "n_experts", "top_k": "n_experts_used", "dim": "n_embd", "ff": "n_ff",
            "dtype": "dtype", "arch": "arch", "specialization": "specialization", "seed": "seed",
            "chat_template": "chat_template"}  # CLI name -> field


@dataclass(frozen=True)
class SynthConfig:
    """Shape, routing structure and seed of one synthetic model.

    Attributes:
        arch: GGUF `general.architecture`: "llama" (Mixtral-style), "qwen3moe", or a family of
            `cluster.models.synth_families` ("qwen2moe", "olmoe", "granitemoe", "glm4moe", ...), each with its
            own tensors, keys and routing rule.
        n_layers: transformer blocks.
        n_experts: experts per layer; 0 writes a dense model (ffn_gate/ffn_up/ffn_down, llama only).
        n_experts_used: experts selected per token (top-k); 0 for a dense model.
        n_embd: width of the residual stream.
        n_ff: feed-forward width of one expert (of the dense FFN when n_experts is 0).
        n_head: attention heads; n_embd / n_head is the head size.
        n_head_kv: key/value heads (grouped-query attention); divides n_head.
        dtype: "f16", "q8_0" or "q4_k" (a K-quant, as most published GGUFs use) for expert and
            attention matrices. Norms and ffn_gate_inp stay F32 (as llama.cpp's converters keep
            them); token_embd and output stay F16 (Q8_0 for q8_0, as llama.cpp's quantizer
            makes them; "q4_k_m": the types of its Q4_K_M rule throughout).
        specialization: router-logit boost, in standard deviations of the random router term,
            that a topic word gives its topic's experts; 0 makes routing unrelated to topics.
        n_topics: number of topics (vocabulary groups with their own expert groups).
        words_per_topic: single-token words per topic (at least 2, so decoding moves on).
        n_ctx_train: `context_length` written to the file.
        chat_template: "" (none), or a chat format of `cluster.engine.chat.SYNTH_TEMPLATES` ("chatml",
            "llama3"): its Jinja template goes into `tokenizer.chat_template` and its control
            tokens into the vocabulary (CONTROL type, after <|bos|>/<|eos|>), with
            `tokenizer.ggml.eot_token_id` set to its end-of-turn token (and the BOS id to its own
            BOS token when it writes one, as Llama 3's <|begin_of_text|>).
        merged_gate_up: write one `ffn_gate_up_exps` tensor [n_embd, 2*n_ff, n_experts] (gate
            rows first) instead of ffn_gate_exps and ffn_up_exps. llama and qwen3moe in this
            llama.cpp refuse that layout ("tensor 'blk.0.ffn_up_exps.weight' not found"); it
            exists for byte-range discovery tests.
        seed: seeds every random draw; same config, same bytes.
        n_vocab: 0 (the tokens the topics need), or the vocabulary size, padded with UNUSED
            "[PAD<i>]" tokens (as llama.cpp's converter pads Qwen's) whose embedding and output
            rows are zero.
        rope_freq_base: `rope.freq_base` written to the file.
        head_dim: 0 (n_embd / n_head), or the attention head size, written as
            `attention.key_length`/`value_length` (Qwen3-30B-A3B: 32 heads of 128 over a
            residual of 2048); llama and qwen3moe only.
        expert_window: 0: a topic word lifts its topic's whole group (`topic_experts`) by
            `specialization`. w > 0 (sliding-window routing): a word lifts only w experts of
            its topic's ring (`topic_windows`), a window that moves along the ring as greedy
            decoding walks the topic's words, so consecutive tokens share experts and a topic
            uses its whole ring over a cycle: reuse comes from recency, as in trained MoEs.
        window_ring: experts on each topic's ring under sliding-window routing (0 when
            expert_window is 0); each topic draws its own ring per layer, so rings overlap by chance.
    """

    arch: str = "llama"
    n_layers: int = 4
    n_experts: int = 32
    n_experts_used: int = 4
    n_embd: int = 64
    n_ff: int = 128
    n_head: int = 4
    n_head_kv: int = 2
    dtype: str = "f16"
    specialization: float = REALISTIC_SPECIALIZATION
    n_topics: int = 4
    words_per_topic: int = 16
    n_ctx_train: int = 4096
    merged_gate_up: bool = False
    seed: int = 0
    chat_template: str = ""
    n_vocab: int = 0
    rope_freq_base: float = 10000.0
    head_dim: int = 0
    expert_window: int = 0
    window_ring: int = 0

    def validate(self) -> None:
        """Checks that llama.cpp can load the model this config describes.

        Raises:
            ValueError: naming the first bad field, its value and what was expected.
        """

        def bad(field: str, expected: str) -> ValueError:
            return ValueError(f"SynthConfig.{field}={getattr(self, field)!r}: expected {expected}")

        ints = ("n_layers", "n_experts", "n_experts_used", "n_embd", "n_ff", "n_head", "n_head_kv",
                "n_topics", "words_per_topic", "n_ctx_train", "seed", "n_vocab", "head_dim",
                "expert_window", "window_ring")
        for field in ints:
            value = getattr(self, field)
            if not isinstance(value, int) or isinstance(value, bool):
                raise bad(field, "an int")
        if self.arch not in ARCHS:
            raise bad("arch", f"one of {', '.join(ARCHS)}")
        if not 1 <= self.n_layers <= _MAX_LAYERS:
            raise bad("n_layers", f"1..{_MAX_LAYERS}")
        if self.arch == "llama4" and self.n_layers < 2:
            raise bad("n_layers", ">= 2 for llama4 (every second block is MoE)")
        if self.arch == "gpt-oss" and (self.n_embd % 32 or self.n_ff % 32):
            raise bad("n_embd" if self.n_embd % 32 else "n_ff", "a multiple of 32 for gpt-oss (MXFP4 experts)")
        if self.n_layers <= LEADING_DENSE.get(self.arch, 0):
            raise bad("n_layers", f"> {LEADING_DENSE[self.arch]} (the leading dense blocks of {self.arch})")
        if self.n_experts == 0:
            if self.arch != "llama":
                raise bad("n_experts", f"> 0 for arch {self.arch!r} (only llama has a dense form)")
            if self.n_experts_used != 0:
                raise bad("n_experts_used", "0 for a dense model (n_experts=0)")
            if self.merged_gate_up:
                raise bad("merged_gate_up", "False for a dense model (n_experts=0)")
        else:
            if not 2 <= self.n_experts <= _MAX_EXPERTS:
                raise bad("n_experts", f"0 (dense) or 2..{_MAX_EXPERTS}")
            if not 1 <= self.n_experts_used <= self.n_experts:
                raise bad("n_experts_used", f"1..n_experts ({self.n_experts})")
        if self.n_head < 1:
            raise bad("n_head", ">= 1")
        if self.n_embd < 1 or self.n_embd % self.n_head != 0:
            raise bad("n_embd", f"a positive multiple of n_head ({self.n_head})")
        if not self.head_dim and (self.n_embd // self.n_head) % 2 != 0:
            raise bad("n_head", f"a divisor of n_embd ({self.n_embd}) leaving an even head size for RoPE")
        if self.n_head_kv < 1 or self.n_head % self.n_head_kv != 0:
            raise bad("n_head_kv", f"a positive divisor of n_head ({self.n_head})")
        if self.n_ff < 1:
            raise bad("n_ff", ">= 1")
        if self.dtype not in DTYPES:
            raise bad("dtype", f"one of {', '.join(DTYPES)}")
        if self.dtype == "q4_k_m" and self.arch not in _Q4_K_M_ARCHS:
            raise bad("dtype", f"f16, q8_0 or q4_k for arch {self.arch!r} (q4_k_m: {', '.join(_Q4_K_M_ARCHS)})")
        if self.head_dim and (self.head_dim < 2 or self.head_dim % 2 or self.arch not in _Q4_K_M_ARCHS):
            raise bad("head_dim", f"0, or an even size >= 2 for arch {', '.join(_Q4_K_M_ARCHS)}")
        if self.n_vocab < 0:
            raise bad("n_vocab", ">= 0 (0: the tokens the topics need)")
        if not isinstance(self.rope_freq_base, (int, float)) or isinstance(self.rope_freq_base, bool) \
                or not math.isfinite(self.rope_freq_base) or self.rope_freq_base <= 0:
            raise bad("rope_freq_base", "a finite number > 0")
        if self.dtype != "f16":  # quantised rows are whole blocks
            block = gguf.GGML_QUANT_SIZES[DTYPES[self.dtype]][0]
            if self.n_embd % block != 0:
                raise bad("n_embd", f"a multiple of {block} for dtype {self.dtype}")
            if self.n_ff % block != 0:
                raise bad("n_ff", f"a multiple of {block} for dtype {self.dtype}")
        if not isinstance(self.specialization, (int, float)) or isinstance(self.specialization, bool) \
                or not math.isfinite(self.specialization) or self.specialization < 0:
            raise bad("specialization", "a finite number >= 0")
        if not 1 <= self.n_topics <= self.n_embd // 2:
            raise bad("n_topics", f"1..n_embd/2 ({self.n_embd // 2})")
        if self.words_per_topic < 2:
            raise bad("words_per_topic", ">= 2")
        if self.expert_window == 0:
            if self.window_ring != 0:
                raise bad("window_ring", "0 without sliding-window routing (expert_window 0)")
        else:
            if self.n_experts == 0 or not 1 <= self.expert_window <= self.n_experts:
                raise bad("expert_window", f"0, or 1..n_experts ({self.n_experts}) for an MoE config")
            if not self.expert_window <= self.window_ring <= self.n_experts:
                raise bad("window_ring", f"expert_window..n_experts ({self.expert_window}..{self.n_experts})")
        if self.n_topics * self.words_per_topic > _MAX_WORDS:
            raise bad("words_per_topic", f"n_topics * words_per_topic <= {_MAX_WORDS}")
        if self.n_ctx_train < 1:
            raise bad("n_ctx_train", ">= 1")
        if not isinstance(self.merged_gate_up, bool):
            raise bad("merged_gate_up", "a bool")
        if self.chat_template != "" and self.chat_template not in SYNTH_TEMPLATES:
            raise bad("chat_template", f"'' or one of {', '.join(SYNTH_TEMPLATES)}")
        if self.seed < 0:
            raise bad("seed", ">= 0")

    def to_json(self) -> str:
        """Returns the config as a compact JSON object (keys in field order; n_vocab, rope_freq_base,
        head_dim, expert_window and window_ring only where they differ from their defaults, so older files keep
        their bytes)."""
        data = dataclasses.asdict(self)
        for name in _OMITTED_AT_DEFAULT:
            if data[name] == _DEFAULTS[name]:
                del data[name]
        return json.dumps(data, separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str) -> SynthConfig:
        """Parses `to_json` output (absent keys take the defaults); raises ValueError on unknown keys."""
        data = json.loads(text)
        names = {f.name for f in dataclasses.fields(cls)}
        if not isinstance(data, dict) or set(data) - names:
            raise ValueError(f"synth config JSON {text[:200]!r}: expected an object with keys among {sorted(names)}")
        return cls(**data)

_OMITTED_AT_DEFAULT = ("n_vocab", "rope_freq_base", "head_dim", "expert_window", "window_ring")
_DEFAULTS = {f.name: f.default for f in dataclasses.fields(SynthConfig)}

PRESETS: dict[str, SynthConfig] = {
    # ~6 MB: unit tests.
    "tiny": SynthConfig(arch="llama", n_layers=4, n_experts=32, n_experts_used=4, n_embd=64, n_ff=128,
                        n_head=4, n_head_kv=2, n_topics=4, words_per_topic=16),
    # ~150 MB: demos, small clusters.
    "demo": SynthConfig(arch="llama", n_layers=8, n_experts=32, n_experts_used=4, n_embd=256, n_ff=384,
                        n_head=4, n_head_kv=2, n_topics=4, words_per_topic=32),
    # ~1.8 GB: benchmarks under a memory limit.
    "bench": SynthConfig(arch="qwen3moe", n_layers=12, n_experts=128, n_experts_used=8, n_embd=512, n_ff=384,
                         n_head=8, n_head_kv=4, n_topics=8, words_per_topic=32),
    # ~3.1 GB: Qwen3-30B-A3B's expert shapes (hidden 2048, expert FFN 768, 128 experts, top-8,
    # 32 query heads over 4 KV heads) in Q4_K, with as many layers as fit about 3 GB: an expert
    # is 2.5 MiB, as in the published model's Q4_K_M file.
    "large": SynthConfig(arch="qwen3moe", n_layers=9, n_experts=128, n_experts_used=8, n_embd=2048, n_ff=768,
                         n_head=32, n_head_kv=4, dtype="q4_k", n_topics=8, words_per_topic=32),
    # 18.6 GB: Qwen3-30B-A3B's whole layout (48 layers, hidden 2048, 32 query and 4 KV heads of 128
    # with q/k norms, 128 experts, top-8, expert FFN 768, 151,936 tokens, rope base 1e6, context
    # 40,960) in the types llama.cpp's quantizer gives a Q4_K_M file (--dtype q8_0: 32.5 GB of tensors, as
    # `pytest -s tests/test_full_size_preset.py -k q8_0` computes from the layout);
    # sliding-window routing calibrated to the published model's routing statistics.
    "qwen3-30b-a3b": SynthConfig(arch="qwen3moe", n_layers=48, n_experts=128, n_experts_used=8, n_embd=2048,
                                 n_ff=768, n_head=32, n_head_kv=4, dtype="q4_k_m", n_topics=8, words_per_topic=32,
                                 n_ctx_train=40960, n_vocab=151936, rope_freq_base=1e6, head_dim=128,
                                 **SLIDING_WINDOW_ROUTING),  # type: ignore[arg-type]
}


def topic_group_size(config: SynthConfig) -> int:
    """Experts per topic group in each layer: n_experts / n_topics, clamped to [2k, 4k] and to n_experts.

    With every selection inside the group, next-token reuse would be about k / size, so the
    clamp keeps it between 25 % and 50 %; groups overlap when n_topics * size > n_experts.
    """
    k = config.n_experts_used
    return min(config.n_experts, max(2 * k, min(4 * k, config.n_experts // config.n_topics)))


def topic_experts(config: SynthConfig, layer: int) -> np.ndarray:
    """The experts each topic's words are steered to in `layer`: int array [n_topics, topic_group_size].

    Raises:
        ValueError: a dense config or a layer out of range.
    """
    if config.n_experts == 0 or not 0 <= layer < config.n_layers:
        raise ValueError(f"layer={layer}, n_experts={config.n_experts}: expected an MoE config and 0..n_layers-1")
    perm = named_rng(config.seed, f"blk.{layer}.topic_groups").permutation(config.n_experts)
    starts = (np.arange(config.n_topics) * config.n_experts) // config.n_topics
    return perm[(starts[:, None] + np.arange(topic_group_size(config))[None, :]) % config.n_experts]


def topic_windows(config: SynthConfig, layer: int) -> np.ndarray:
    """The experts each topic word lifts in `layer` under sliding-window routing: int array
    [n_topics, words_per_topic, expert_window], words in greedy-decoding order.

    Topic t's ring is `window_ring` experts of the layer in a random order (its own draw per topic
    and layer); word i's window is the `expert_window` experts from ring position
    i * window_ring // words_per_topic on, wrapping, so the window moves by about
    window_ring / words_per_topic experts a word and one cycle of the topic's words visits the
    whole ring.

    Raises:
        ValueError: a config without sliding-window routing or a layer out of range.
    """
    if config.expert_window == 0 or not 0 <= layer < config.n_layers:
        raise ValueError(f"layer={layer}, expert_window={config.expert_window}: expected sliding-window routing "
                         f"(expert_window > 0) and 0..n_layers-1")
    ring_positions = (np.arange(config.words_per_topic) * config.window_ring) // config.words_per_topic
    window = (ring_positions[:, None] + np.arange(config.expert_window)[None, :]) % config.window_ring
    rings = [named_rng(config.seed, f"blk.{layer}.topic{t}.window_ring").permutation(config.n_experts)
             [: config.window_ring] for t in range(config.n_topics)]
    return np.stack([ring[window] for ring in rings])


def preset_of(config: SynthConfig) -> tuple[str, int] | None:
    """The preset `config` is, allowing fewer layers: (name, the preset's n_layers), or None.

    A layer-truncated preset (``synth --preset P --layers N``) keeps every width and the routing of P, so
    its measurements stand for P's with N of its layers."""
    for name, preset in PRESETS.items():
        if dataclasses.replace(config, n_layers=preset.n_layers) == preset and config.n_layers <= preset.n_layers:
            return name, preset.n_layers
    return None


def config_from_args(preset: str, **overrides: Any) -> SynthConfig:
    """Builds a validated config from a preset and command-line style overrides.

    Args:
        preset: a key of PRESETS.
        **overrides: any of layers, experts, top_k, dim, ff, dtype, arch, specialization, seed
            (or the SynthConfig field names). None means "keep the preset's value".
            specialization may be a number, a numeric string or "realistic". Setting experts
            to 0 without top_k makes top_k 0 (dense).

    Raises:
        ValueError: unknown preset or override, or an invalid resulting config.
    """
    if preset not in PRESETS:
        raise ValueError(f"preset {preset!r}: expected one of {', '.join(PRESETS)}")
    fields = {f.name for f in dataclasses.fields(SynthConfig)}
    changes: dict[str, Any] = {}
    for key, value in overrides.items():
        if value is None:
            continue
        field = _ALIASES.get(key, key if key in fields else None)
        if field is None:
            raise ValueError(f"override {key!r}: expected one of {', '.join(_ALIASES)} or a SynthConfig field")
        if field == "specialization":
            value = _parse_specialization(value)
        changes[field] = value
    if changes.get("n_experts") == 0 and "n_experts_used" not in changes:
        changes["n_experts_used"] = 0
    config = dataclasses.replace(PRESETS[preset], **changes)
    config.validate()
    return config


def _parse_specialization(value: Any) -> float:
    if isinstance(value, str):
        if value.strip().lower() == "realistic":
            return REALISTIC_SPECIALIZATION
        try:
            return float(value)
        except ValueError:
            raise ValueError(f"specialization={value!r}: expected a number >= 0 or 'realistic'") from None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    raise ValueError(f"specialization={value!r}: expected a number >= 0 or 'realistic'")


def named_rng(seed: int, stream: str) -> np.random.Generator:
    """One independent, order-free random stream per named purpose."""
    return np.random.default_rng([seed, zlib.crc32(stream.encode("utf-8"))])
