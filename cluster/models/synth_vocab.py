"""The synthetic models' vocabulary: byte-level GPT-2 BPE tokens, the topics' pseudo-words, and prompts made of them.

`build_vocab` lays out the token list a `SynthConfig` implies (bytes, control tokens, merge-chain
prefixes, then the topic words, topic-major); `topic_prompt` and `mixed_prompt` turn the topic word
lists stored in a model (`cluster.models.synth.read_topics`) into seeded prompts.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import gguf
import numpy as np

from cluster.engine.chat import SYNTH_TEMPLATES
from cluster.models.synth_config import SynthConfig, named_rng

__all__ = ["BOS_TEXT", "EOS_TEXT", "Vocab", "build_vocab", "mixed_prompt", "topic_prompt"]

BOS_TEXT = "<|bos|>"  # CONTROL tokens right after the 256 byte tokens
EOS_TEXT = "<|eos|>"

_CONSONANTS = "bdfgklmnprstvz"
_VOWELS = "aeiou"
_SPACE_MARK = "Ġ"  # GPT-2 byte-to-unicode spelling of b" "


@dataclass(frozen=True)
class Vocab:
    """The token list of one synthetic model (GGUF `tokenizer.ggml.*`) and where its topic words sit."""

    tokens: list[str]
    token_types: list[int]
    merges: list[str]
    topic_words: list[list[str]]  # without the space mark
    topic_ids: list[list[int]]  # token id of each topic word
    bos_id: int
    eos_id: int
    eot_id: int | None = None  # the chat format's end-of-turn token


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
    rng = named_rng(config.seed, "topic_words")
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


def build_vocab(config: SynthConfig) -> Vocab:
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
    if config.n_vocab:  # padding, as llama.cpp's converter pads Qwen's vocabulary: UNUSED, never produced
        if config.n_vocab < len(tokens):
            raise ValueError(f"SynthConfig.n_vocab={config.n_vocab}: expected 0 or >= {len(tokens)} "
                             "(the tokens the topics need)")
        tokens += [f"[PAD{i}]" for i in range(len(tokens), config.n_vocab)]
        types += [int(gguf.TokenType.UNUSED)] * (config.n_vocab - len(types))
    return Vocab(tokens=tokens, token_types=types, merges=merge_list, topic_words=topic_words,
                  topic_ids=topic_ids, bos_id=bos_id, eos_id=eos_id, eot_id=eot_id)


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
