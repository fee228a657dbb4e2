"""Deterministic synthetic Mixture-of-Experts GGUF models whose routing follows the topic of the text.

Nothing can be downloaded on the project's machines (DESIGN.md, "Models"), so tests, demos and
benchmarks run on these files; llama.cpp (llama-cpp-python 0.3.36) loads and runs them.

* Tokenizer: byte-level GPT-2 BPE (`tokenizer.ggml.model = "gpt2"`, pre-tokenizer "default"):
  the 256 byte tokens, `<|bos|>`/`<|eos|>` (CONTROL), a chat format's control tokens when
  `chat_template` asks for one (`<|im_start|>`, `<|im_end|>`, ...: see `cluster.engine.chat`), and
  n_topics x words_per_topic pseudo-words such as " kalo", each one token reached by a merge
  chain ("Ġ k", "Ġk a", ...).
* Routing follows topics. Topic t has a direction d_t, a coordinate axis of the residual stream
  (orthonormal, and no BLAS rounding enters the file). Word v of topic t embeds as
  ``s d_t + w_v`` with w_v a unit vector orthogonal to every d_t; other tokens embed as w_v.
  In each layer each topic owns a group of experts (`topic_experts`: a fresh random draw per
  layer, disjoint while the experts suffice). Router row e is ``u_e + b * (sum of d_t over the
  topics whose group holds e)``, scaled so that a token of topic t lifts the router logits of
  t's group by `specialization` standard deviations of the random term u_e . x.
* The residual stream stays near the token embedding (attention and each expert add a few
  percent of its norm), so routing is token-driven and layer l+1's router applied to layer l's
  hidden state predicts layer l+1's choice, as the cache's prefetcher assumes.
* The untied output head continues the topic with a different word each step: the row of a
  topic's word i is the embedding of word i-1, so greedy decoding walks the topic's words
  cyclically; `<|bos|>`/`<|eos|>` rows point away from every topic and are never chosen.

Measured with llama.cpp's own top-k ids (decode, 16-word topic prompts, 32 greedy tokens) at
REALISTIC_SPECIALIZATION = 2.0: next-token reuse 38 % (tiny), 43 % (demo), 34 % (bench), chance
12.5 / 12.5 / 6.3 %; 87 / 90 / 82 % of selections inside the topic's group; 97 / 96 / 98 % inside
the 40 % of each layer's experts most used by another conversation on the same topic.

Writing streams (all tensor infos, then each tensor generated and written in turn): the 1.8 GB
bench preset takes about 30 s and 200 MB of RAM. Same config, same bytes: every tensor draws
from its own ``default_rng([seed, crc32(name)])``, key and tensor order is fixed, no clock.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gguf
import numpy as np

from cluster.engine.chat import SYNTH_TEMPLATES
from cluster.errors import OutputFileError

__all__ = [
    "PRESETS",
    "REALISTIC_SPECIALIZATION",
    "SynthConfig",
    "SynthInfo",
    "config_from_args",
    "default_model",
    "mixed_prompt",
    "read_config",
    "read_topics",
    "synthesize",
    "topic_experts",
    "topic_group_size",
    "topic_prompt",
]

REALISTIC_SPECIALIZATION: float = 2.0
"""Router-logit boost, in standard deviations of the random router term, that a topic word gives
its topic's experts: calibrated so the presets show 25-50 % next-token expert reuse and keep
over 90 % of a one-topic conversation's selections in 40 % of each layer's experts (figures in
the module docstring)."""

KEY_TOPICS = "sniper.synth.topics"
"""GGUF key: array of strings, one per topic, the topic's words separated by single spaces
(in the order greedy decoding walks them)."""
KEY_CONFIG = "sniper.synth.config"
"""GGUF key: the SynthConfig that wrote the file, as a JSON object."""
KEY_FORMAT_VERSION = "sniper.synth.format_version"
"""GGUF key (uint32): version of the synthetic-model layout written here."""
FORMAT_VERSION = 1

BOS_TEXT = "<|bos|>"
EOS_TEXT = "<|eos|>"

_ARCHS = ("llama", "qwen3moe")
_DTYPES = {"f16": gguf.GGMLQuantizationType.F16, "q8_0": gguf.GGMLQuantizationType.Q8_0,
           "q4_k": gguf.GGMLQuantizationType.Q4_K}
_FILE_TYPES = {"f16": gguf.LlamaFileType.MOSTLY_F16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
               "q4_k": gguf.LlamaFileType.MOSTLY_Q4_K_M}
_RMS_EPS = {"llama": 1e-5, "qwen3moe": 1e-6}
_ROPE_FREQ_BASE = 10000.0
_MAX_EXPERTS = 1024  # LLAMA_MAX_EXPERTS in src/llama-hparams.h
_MAX_LAYERS = 512  # LLAMA_MAX_LAYERS in src/llama-hparams.h
_MAX_WORDS = 20000  # topic words in all; keeps vocabularies and merge lists modest

_TOPIC_STRENGTH = 1.0  # s: weight of the topic direction in a word's embedding (word part has norm 1)
_ATTN_OUT_RATIO = 0.03  # |attention output| / |residual| aimed for, per layer
_FFN_OUT_RATIO = 0.05  # |one expert's (or the dense FFN's) output| / |residual|, per layer
_SILU_GLU_MEAN_SQUARE = 0.3557  # E[(silu(g) * u)^2] for g, u ~ N(0, 1): sizes ffn_down

_CONSONANTS = "bdfgklmnprstvz"
_VOWELS = "aeiou"
_SPACE_MARK = "Ġ"  # GPT-2 byte-to-unicode spelling of b" "

_ALIASES = {"layers": "n_layers", "experts": "n_experts", "top_k": "n_experts_used", "dim": "n_embd", "ff": "n_ff",
            "dtype": "dtype", "arch": "arch", "specialization": "specialization", "seed": "seed",
            "chat_template": "chat_template"}  # CLI name -> field


@dataclass(frozen=True)
class SynthConfig:
    """Shape, routing structure and seed of one synthetic model.

    Attributes:
        arch: "llama" or "qwen3moe" (GGUF `general.architecture`).
        n_layers: transformer blocks.
        n_experts: experts per layer; 0 writes a dense model (ffn_gate/ffn_up/ffn_down, llama only).
        n_experts_used: experts selected per token (top-k); 0 for a dense model.
        n_embd: width of the residual stream.
        n_ff: feed-forward width of one expert (of the dense FFN when n_experts is 0).
        n_head: attention heads; n_embd / n_head is the head size.
        n_head_kv: key/value heads (grouped-query attention); divides n_head.
        dtype: "f16", "q8_0" or "q4_k" (a K-quant, as most published GGUFs use) for expert and
            attention matrices. Norms and ffn_gate_inp stay F32 (as llama.cpp's converters keep
            them); token_embd and output stay F16.
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

    def validate(self) -> None:
        """Checks that llama.cpp can load the model this config describes.

        Raises:
            ValueError: naming the first bad field, its value and what was expected.
        """

        def bad(field: str, expected: str) -> ValueError:
            return ValueError(f"SynthConfig.{field}={getattr(self, field)!r}: expected {expected}")

        ints = ("n_layers", "n_experts", "n_experts_used", "n_embd", "n_ff", "n_head", "n_head_kv",
                "n_topics", "words_per_topic", "n_ctx_train", "seed")
        for field in ints:
            value = getattr(self, field)
            if not isinstance(value, int) or isinstance(value, bool):
                raise bad(field, "an int")
        if self.arch not in _ARCHS:
            raise bad("arch", f"one of {', '.join(_ARCHS)}")
        if not 1 <= self.n_layers <= _MAX_LAYERS:
            raise bad("n_layers", f"1..{_MAX_LAYERS}")
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
        if (self.n_embd // self.n_head) % 2 != 0:
            raise bad("n_head", f"a divisor of n_embd ({self.n_embd}) leaving an even head size for RoPE")
        if self.n_head_kv < 1 or self.n_head % self.n_head_kv != 0:
            raise bad("n_head_kv", f"a positive divisor of n_head ({self.n_head})")
        if self.n_ff < 1:
            raise bad("n_ff", ">= 1")
        if self.dtype not in _DTYPES:
            raise bad("dtype", f"one of {', '.join(_DTYPES)}")
        if self.dtype != "f16":  # quantised rows are whole blocks
            block = gguf.GGML_QUANT_SIZES[_DTYPES[self.dtype]][0]
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
        """Returns the config as a compact JSON object (keys in field order)."""
        return json.dumps(dataclasses.asdict(self), separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str) -> SynthConfig:
        """Parses `to_json` output (absent keys take the defaults); raises ValueError on unknown keys."""
        data = json.loads(text)
        names = {f.name for f in dataclasses.fields(cls)}
        if not isinstance(data, dict) or set(data) - names:
            raise ValueError(f"synth config JSON {text[:200]!r}: expected an object with keys among {sorted(names)}")
        return cls(**data)


@dataclass(frozen=True)
class SynthInfo:
    """What `synthesize` wrote.

    Attributes:
        path: the GGUF file.
        n_bytes: its size in bytes.
        expert_bytes: bytes of all `*_exps` tensors (the part an expert cache manages).
        config: the config it was written from.
    """

    path: Path
    n_bytes: int
    expert_bytes: int
    config: SynthConfig


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
}


# generated default models: $SNIPER_MODEL_DIR, else the user's cache (never the current directory)
DEFAULT_MODEL_DIR = Path(os.environ.get("SNIPER_MODEL_DIR")
                         or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "expert-sniper" / "models")


def default_model(preset: str = "demo", *, progress: bool = True) -> Path:
    """Path of the generated default model for ``preset``, synthesising it the first time."""
    path = DEFAULT_MODEL_DIR / f"{preset}.gguf"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        synthesize(path, PRESETS[preset], progress=progress)
    return path


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
    perm = _rng(config.seed, f"blk.{layer}.topic_groups").permutation(config.n_experts)
    starts = (np.arange(config.n_topics) * config.n_experts) // config.n_topics
    return perm[(starts[:, None] + np.arange(topic_group_size(config))[None, :]) % config.n_experts]


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


def synthesize(path: str | os.PathLike[str], config: SynthConfig, *, progress: bool = True) -> SynthInfo:
    """Writes the model `config` describes to `path` (replaced atomically) and describes it.

    Tensors are generated and written one at a time; peak memory is about two copies of the
    largest tensor.

    Args:
        path: destination GGUF file (its directory is created if needed).
        config: what to write; validated first.
        progress: show a tqdm progress bar (bytes written) on stderr.

    Raises:
        ValueError: invalid config.
        OutputFileError: ``path`` cannot be written (checked before anything is generated), or
            writing it failed; no ``.partial`` file is left behind.
    """
    config.validate()
    path = Path(path)
    tmp = path.with_name(path.name + ".partial")
    _check_writable(path, tmp)
    plan = _Plan(config)
    writer = gguf.GGUFWriter(tmp, config.arch)
    _add_metadata(writer, config, plan.vocab)
    for spec in plan.tensors:
        writer.add_tensor_info(spec.name, spec.byte_shape, spec.np_dtype, spec.nbytes, raw_dtype=spec.raw_dtype)
    bar = _progress_bar(sum(s.nbytes for s in plan.tensors), path.name, progress)
    try:
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for spec in plan.tensors:
            data = spec.make()
            if data.nbytes != spec.nbytes:
                raise AssertionError(f"tensor {spec.name}: generated {data.nbytes} bytes, planned {spec.nbytes}")
            writer.write_tensor_data(data)
            del data
            if bar is not None:
                bar.update(spec.nbytes)
        writer.close()
        os.replace(tmp, path)
    except BaseException as exc:
        with contextlib.suppress(OSError):
            writer.close()
        tmp.unlink(missing_ok=True)
        if isinstance(exc, OSError):
            raise _output_error(path, exc) from None
        raise
    finally:
        if bar is not None:
            bar.close()
    expert_bytes = sum(s.nbytes for s in plan.tensors if "_exps." in s.name)
    return SynthInfo(path=path, n_bytes=path.stat().st_size, expert_bytes=expert_bytes, config=config)


def _check_writable(path: Path, tmp: Path) -> None:
    """Refuses ``path`` unless its directory (created if missing) takes a new file: ``tmp`` is
    created and removed, so what the file system would refuse is known before generating."""
    try:
        if path.is_dir():
            raise IsADirectoryError(21, "is a directory")
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb"):
            pass
        tmp.unlink()
    except OSError as exc:
        raise _output_error(path, exc) from None


def _output_error(path: Path, exc: OSError) -> OutputFileError:
    reason = exc.strerror or type(exc).__name__
    return OutputFileError(f"cannot write the model to {path}: {reason.lower()}; expected a path in a writable directory")


def read_topics(path: str | os.PathLike[str]) -> list[list[str]]:
    """Returns the topic word lists stored in a synthetic model (greedy-decoding order).

    Raises:
        ValueError: the file has no `sniper.synth.topics` metadata (not written by synthesize).
    """
    field = gguf.GGUFReader(path).fields.get(KEY_TOPICS)
    if field is None:
        raise ValueError(f"{path}: no {KEY_TOPICS} metadata; expected a model written by cluster.models.synth")
    return [bytes(field.parts[i]).decode("utf-8").split(" ") for i in field.data]


def read_config(path: str | os.PathLike[str]) -> SynthConfig:
    """Returns the SynthConfig stored in a synthetic model.

    Raises:
        ValueError: the file has no `sniper.synth.config` metadata.
    """
    field = gguf.GGUFReader(path).fields.get(KEY_CONFIG)
    if field is None:
        raise ValueError(f"{path}: no {KEY_CONFIG} metadata; expected a model written by cluster.models.synth")
    return SynthConfig.from_json(bytes(field.parts[field.data[0]]).decode("utf-8"))


def topic_prompt(topics: Sequence[Sequence[str]], topic: int, n_words: int, seed: int) -> str:
    """A prompt of `n_words` random words of one topic, each preceded by a space (" kalo bira ...").

    Args:
        topics: as returned by read_topics.
        topic: index into topics.
        n_words: words in the prompt (>= 1).
        seed: picks the words (>= 0); same seed, same prompt.

    Raises:
        ValueError: topic out of range, n_words < 1 or seed < 0.
    """
    if not 0 <= topic < len(topics):
        raise ValueError(f"topic={topic}: expected 0..{len(topics) - 1}")
    if n_words < 1:
        raise ValueError(f"n_words={n_words}: expected >= 1")
    if seed < 0:
        raise ValueError(f"seed={seed}: expected >= 0")
    words = topics[topic]
    picks = np.random.default_rng([seed, topic]).integers(0, len(words), size=n_words)
    return "".join(" " + words[i] for i in picks)


def mixed_prompt(topics: Sequence[Sequence[str]], topic_ids: Sequence[int], n_words_each: int, seed: int) -> str:
    """Concatenates topic_prompt segments, one per entry of topic_ids, in that order.

    Raises:
        ValueError: topic_ids is empty, or as topic_prompt.
    """
    if not topic_ids:
        raise ValueError("topic_ids=[]: expected at least one topic")
    return "".join(topic_prompt(topics, t, n_words_each, seed + 7919 * i) for i, t in enumerate(topic_ids))


# --------------------------------------------------------------------------------------------
# construction


@dataclass(frozen=True)
class _Vocab:
    tokens: list[str]
    token_types: list[int]
    merges: list[str]
    topic_words: list[list[str]]  # without the space mark
    topic_ids: list[list[int]]  # token id of each topic word
    bos_id: int
    eos_id: int
    eot_id: int | None = None  # the chat format's end-of-turn token


@dataclass(frozen=True)
class _TensorSpec:
    name: str
    byte_shape: tuple[int, ...]  # numpy order (reverse of ggml's ne); bytes for quantised types
    np_dtype: np.dtype[Any]
    raw_dtype: gguf.GGMLQuantizationType
    nbytes: int
    make: Callable[[], np.ndarray]


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


def _rng(seed: int, stream: str) -> np.random.Generator:
    """One independent, order-free random stream per named purpose."""
    return np.random.default_rng([seed, zlib.crc32(stream.encode("utf-8"))])


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable-character map (openai/gpt-2 encoder.py)."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars = keep[:]
    n = 0
    for b in range(256):
        if b not in keep:
            keep.append(b)
            chars.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(keep, chars, strict=True)}


def _topic_words(config: SynthConfig) -> list[list[str]]:
    """n_topics lists of distinct pronounceable pseudo-words (2-3 consonant-vowel syllables)."""
    rng = _rng(config.seed, "topic_words")
    seen: set[str] = set()
    topics: list[list[str]] = []
    for _ in range(config.n_topics):
        words: list[str] = []
        while len(words) < config.words_per_topic:
            n_syllables = 2 if rng.random() < 0.6 else 3
            word = "".join(_CONSONANTS[rng.integers(len(_CONSONANTS))] + _VOWELS[rng.integers(len(_VOWELS))]
                           for _ in range(n_syllables))
            if word not in seen:
                seen.add(word)
                words.append(word)
        topics.append(words)
    return topics


def _build_vocab(config: SynthConfig) -> _Vocab:
    """Bytes, control tokens, merge-chain prefixes, then the topic words (topic-major)."""
    normal, control = int(gguf.TokenType.NORMAL), int(gguf.TokenType.CONTROL)
    byte_map = _bytes_to_unicode()
    tokens = [byte_map[b] for b in range(256)]
    types = [normal] * 256
    bos_id, eos_id = len(tokens), len(tokens) + 1
    tokens += [BOS_TEXT, EOS_TEXT]
    types += [control, control]
    eot_id = None
    if config.chat_template:
        _, controls, end_of_turn, own_bos = SYNTH_TEMPLATES[config.chat_template]
        first = len(tokens)
        tokens += list(controls)
        types += [control] * len(controls)
        eot_id = first + controls.index(end_of_turn)
        if own_bos is not None:
            bos_id = first + controls.index(own_bos)
    topic_words = _topic_words(config)
    spelled = [[_SPACE_MARK + w for w in words] for words in topic_words]
    whole = {w for words in spelled for w in words}
    merges: set[tuple[str, str]] = set()
    for words in spelled:
        for word in words:
            for i in range(2, len(word) + 1):
                merges.add((word[: i - 1], word[i - 1]))
    prefixes = sorted({a + b for a, b in merges} - whole - set(tokens), key=lambda t: (len(t), t))
    tokens += prefixes
    types += [normal] * len(prefixes)
    topic_ids: list[list[int]] = []
    for words in spelled:
        topic_ids.append(list(range(len(tokens), len(tokens) + len(words))))
        tokens += words
        types += [normal] * len(words)
    merge_list = [f"{a} {b}" for a, b in sorted(merges, key=lambda m: (len(m[0]) + len(m[1]), m))]
    return _Vocab(tokens=tokens, token_types=types, merges=merge_list, topic_words=topic_words,
                  topic_ids=topic_ids, bos_id=bos_id, eos_id=eos_id, eot_id=eot_id)


class _Plan:
    """Every tensor of the file, in file order, with a generator for its bytes.

    Holds only the small shared matrices (topic directions, embeddings, output head); the
    per-layer matrices are generated when their `make` is called.
    """

    def __init__(self, config: SynthConfig) -> None:
        self.config = config
        self.vocab = _build_vocab(config)
        n, s = config.n_embd, _TOPIC_STRENGTH
        self.residual_norm = math.sqrt(1.0 + s * s)  # |s d_t + w_v| for a topic word
        # d_t = unit vector along coordinate topic_axes[t]: orthonormal without any linear algebra,
        # so no BLAS rounding enters the file and the bytes are the same on every machine.
        self.topic_axes = _rng(config.seed, "topic_directions").permutation(n)[: config.n_topics]
        self.embd = self._embeddings()
        self.tensors: list[_TensorSpec] = []
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
        w = self._orthogonal_noise(_rng(self.config.seed, "token_embd"), len(v.tokens))
        w /= np.linalg.norm(w, axis=1, keepdims=True)
        for t, ids in enumerate(v.topic_ids):
            w[ids, self.topic_axes[t]] = _TOPIC_STRENGTH
        return w  # [n_vocab, n_embd] float64

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
        router = self._orthogonal_noise(_rng(c.seed, f"blk.{layer}.ffn_gate_inp"), c.n_experts)
        # x = rmsnorm(s d_t + w_v) = sqrt(n) (s d_t + w_v) / residual_norm: the noise term u.x has
        # std 1 / residual_norm and b = specialization / (s sqrt(n)) makes the topic term
        # specialization / residual_norm; scaling by residual_norm gives logits unit noise std.
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
        self.tensors.append(_TensorSpec(name, tuple(byte_shape), np_dtype, qtype, nbytes, produce))

    def _norm(self, name: str, size: int) -> None:
        """F32 norm weights, all 1 (llama.cpp multiplies the normalised row by them)."""
        self._add(name, (size,), gguf.GGMLQuantizationType.F32, lambda: np.ones(size))

    def _matrix(self, name: str, shape: tuple[int, ...], std: float) -> None:
        """Weights of mean 0 and deviation std in the config's dtype, from the tensor's own stream:
        N(0, std^2), or for q4_k uniform 4-bit codes written as Q4_K blocks directly."""
        seed = self.config.seed
        if self.config.dtype == "q4_k":
            self._add_q4_k(name, shape, std)
            return

        def make() -> np.ndarray:
            x = _rng(seed, name).standard_normal(shape, dtype=np.float32)
            x *= np.float32(std)
            return x
        self._add(name, shape, _DTYPES[self.config.dtype], make)

    def _add_q4_k(self, name: str, shape: tuple[int, ...], std: float) -> None:
        """A Q4_K tensor written block by block (gguf has no Q4_K quantiser; ggml-common.h
        block_q4_K: f16 d, f16 dmin, 12 bytes of 6-bit sub-block scales and mins, 128 bytes of
        4-bit codes q for 256 weights w = d*scale*q - dmin*min). Every sub-block gets scale =
        min = 32 and dmin = 7.5 d, so w = 32 d (q - 7.5): uniform codes give mean 0 and
        deviation 32 d * 4.61 (the deviation of 0..15), and d is set for `std`."""
        qtype = gguf.GGMLQuantizationType.Q4_K
        block_weights, block_bytes = gguf.GGML_QUANT_SIZES[qtype]
        byte_shape = gguf.quants.quant_shape_to_byte_shape(shape, qtype)
        n_blocks = int(np.prod(shape)) // block_weights
        d = np.float16(std / (32 * math.sqrt((16 * 16 - 1) / 12)))
        header = np.zeros(16, dtype=np.uint8)  # d, dmin, scales[12]
        header[0:4] = np.array([d, np.float16(7.5 * float(d))], dtype=np.float16).view(np.uint8)
        # scales[0..3]: scale of sub-blocks 0-3 (low 6 bits) and the top 2 bits of sub-blocks 4-7's
        # scale; scales[4..7]: the same for mins; scales[8..11]: low 4 bits of 4-7's scale / min.
        # 160 = 0b10_100000: 32 for sub-blocks 0-3, and 0b10 << 4 = 32 for sub-blocks 4-7.
        header[4:12] = 160
        seed = self.config.seed

        def produce() -> np.ndarray:
            out = np.empty((n_blocks, block_bytes), dtype=np.uint8)
            out[:, :16] = header
            out[:, 16:] = _rng(seed, name).integers(0, 256, size=(n_blocks, block_bytes - 16), dtype=np.uint8)
            return out.reshape(byte_shape)
        nbytes = n_blocks * block_bytes
        self.tensors.append(_TensorSpec(name, tuple(byte_shape), np.dtype(np.uint8), qtype, nbytes, produce))

    def _plan_tensors(self) -> None:
        c = self.config
        n, ff, e, f16 = c.n_embd, c.n_ff, c.n_experts, gguf.GGMLQuantizationType.F16
        head = n // c.n_head
        n_q, n_kv = c.n_head * head, c.n_head_kv * head
        n_vocab = len(self.vocab.tokens)
        # Inputs to every matrix are rms-normalised (components ~ N(0, 1)), so 1/sqrt(n) keeps
        # pre-activations ~ N(0, 1); output matrices are sized so attention and one expert add
        # _ATTN_OUT_RATIO and _FFN_OUT_RATIO of |residual| (see the module docstring).
        in_std = 1.0 / math.sqrt(n)
        attn_out_std = _ATTN_OUT_RATIO * self.residual_norm / n
        down_std = _FFN_OUT_RATIO * self.residual_norm / math.sqrt(_SILU_GLU_MEAN_SQUARE * ff * n)

        self._add("token_embd.weight", (n_vocab, n), f16, lambda: self.embd)  # ggml [n_embd, n_vocab]
        for il in range(c.n_layers):
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
        self._add("output.weight", (n_vocab, n), f16, self._output_head)  # ggml [n_embd, n_vocab], not tied


def _add_metadata(writer: gguf.GGUFWriter, config: SynthConfig, vocab: _Vocab) -> None:
    c = config
    writer.add_name(f"sniper-synth-{c.arch}-{c.n_layers}L-{c.n_experts}x{c.n_experts_used}-{c.n_embd}-seed{c.seed}")
    writer.add_file_type(int(_FILE_TYPES[c.dtype]))
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    writer.add_context_length(c.n_ctx_train)
    writer.add_embedding_length(c.n_embd)
    writer.add_block_count(c.n_layers)
    # llama sizes expert tensors by feed_forward_length; qwen3moe by expert_feed_forward_length
    # (its feed_forward_length is the would-be dense width, k * n_ff).
    if c.arch == "qwen3moe":
        writer.add_feed_forward_length(c.n_ff * c.n_experts_used)
        writer.add_expert_feed_forward_length(c.n_ff)
    else:
        writer.add_feed_forward_length(c.n_ff)
    writer.add_head_count(c.n_head)
    writer.add_head_count_kv(c.n_head_kv)
    writer.add_layer_norm_rms_eps(_RMS_EPS[c.arch])
    writer.add_rope_dimension_count(c.n_embd // c.n_head)
    writer.add_rope_freq_base(_ROPE_FREQ_BASE)
    if c.n_experts > 0:
        writer.add_expert_count(c.n_experts)
        writer.add_expert_used_count(c.n_experts_used)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(vocab.tokens)
    writer.add_token_types(vocab.token_types)
    writer.add_token_merges(vocab.merges)
    writer.add_bos_token_id(vocab.bos_id)
    writer.add_eos_token_id(vocab.eos_id)
    writer.add_add_bos_token(True)
    if c.chat_template:
        writer.add_eot_token_id(vocab.eot_id)
        writer.add_chat_template(SYNTH_TEMPLATES[c.chat_template][0])
    writer.add_uint32(KEY_FORMAT_VERSION, FORMAT_VERSION)
    writer.add_string(KEY_CONFIG, c.to_json())
    writer.add_array(KEY_TOPICS, [" ".join(words) for words in vocab.topic_words])


def _progress_bar(total: int, label: str, enabled: bool) -> Any:
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=total, desc=f"synth {label}", unit="B", unit_scale=True, unit_divisor=1024)
