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
  t's group by `specialization` standard deviations of the random term u_e . x. Under
  sliding-window routing (`expert_window` > 0; the qwen3-30b-a3b preset) a word v lifts only a
  window of its topic's ring of experts (`topic_windows`), through its own part w_v, and the
  window moves along the ring as decoding walks the words: reuse then comes from recency
  (`SLIDING_WINDOW_ROUTING`, calibrated to published routing statistics; docs/regimes.md).
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

Modules: `synth_config` (SynthConfig, presets, topic groups of experts), `synth_vocab` (tokens, topic
words, topic prompts), `synth_weights` (the tensors and how their bytes are drawn), `synth_routing` (the
decode routing a config implies, computed without llama.cpp); this one writes and reads the GGUF file and
re-exports the public names of the others.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gguf

from cluster.engine.chat import SYNTH_TEMPLATES
from cluster.errors import OutputFileError
from cluster.models.synth_config import (
    PRESETS,
    REALISTIC_SPECIALIZATION,
    SLIDING_WINDOW_ROUTING,
    SynthConfig,
    config_from_args,
    topic_experts,
    topic_group_size,
    topic_windows,
)
from cluster.models.synth_families import FAMILIES
from cluster.models.synth_vocab import BOS_TEXT, EOS_TEXT, Vocab, mixed_prompt, topic_prompt
from cluster.models.synth_weights import Plan

__all__ = [
    "BOS_TEXT",
    "EOS_TEXT",
    "PRESETS",
    "REALISTIC_SPECIALIZATION",
    "SLIDING_WINDOW_ROUTING",
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
    "topic_windows",
]

KEY_TOPICS = "sniper.synth.topics"
"""GGUF key: array of strings, one per topic, the topic's words separated by single spaces
(in the order greedy decoding walks them)."""
KEY_CONFIG = "sniper.synth.config"
"""GGUF key: the SynthConfig that wrote the file, as a JSON object."""
KEY_FORMAT_VERSION = "sniper.synth.format_version"
"""GGUF key (uint32): version of the synthetic-model layout written here."""
FORMAT_VERSION = 1

_FILE_TYPES = {"f16": gguf.LlamaFileType.MOSTLY_F16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
               "q4_k": gguf.LlamaFileType.MOSTLY_Q4_K_M, "q4_k_m": gguf.LlamaFileType.MOSTLY_Q4_K_M}
_RMS_EPS = {"llama": 1e-5, "qwen3moe": 1e-6}


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
    plan = Plan(config)
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


def _add_metadata(writer: gguf.GGUFWriter, config: SynthConfig, vocab: Vocab) -> None:
    c = config
    writer.add_name(f"sniper-synth-{c.arch}-{c.n_layers}L-{c.n_experts}x{c.n_experts_used}-{c.n_embd}-seed{c.seed}")
    writer.add_file_type(int(_FILE_TYPES[c.dtype]))
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    writer.add_context_length(c.n_ctx_train)
    writer.add_embedding_length(c.n_embd)
    writer.add_block_count(c.n_layers)
    family = FAMILIES.get(c.arch)
    # llama sizes expert tensors by feed_forward_length; qwen3moe by expert_feed_forward_length
    # (its feed_forward_length is the would-be dense width, k * n_ff).
    if family is not None:
        family.metadata(writer, c)
    elif c.arch == "qwen3moe":
        writer.add_feed_forward_length(c.n_ff * c.n_experts_used)
        writer.add_expert_feed_forward_length(c.n_ff)
    else:
        writer.add_feed_forward_length(c.n_ff)
    writer.add_head_count(c.n_head)
    writer.add_head_count_kv(c.n_head_kv if family is None else family.n_head_kv(c))
    writer.add_layer_norm_rms_eps(_RMS_EPS[c.arch] if family is None else family.rms_eps)
    head = c.head_dim or c.n_embd // c.n_head
    writer.add_rope_dimension_count(head if family is None else family.rope_dimension_count(c))
    if c.head_dim:  # llama.cpp's default is n_embd / n_head
        writer.add_key_length(head)
        writer.add_value_length(head)
    writer.add_rope_freq_base(c.rope_freq_base)
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
