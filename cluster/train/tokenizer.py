"""The subword tokenizer: byte-level BPE trained on the corpus' training split (`tokenizers`).

It is shaped so llama.cpp tokenizes like it (`tokenizer.ggml.model = "gpt2"`,
`tokenizer.ggml.pre = "qwen2"`):

* pre-tokenizer: Qwen2's split regex (the one llama.cpp's `LLAMA_VOCAB_PRE_TYPE_QWEN2` applies:
  contractions, letters with at most one leading non-letter, single digits, punctuation runs,
  newlines, spaces), then byte-level mapping without a prefix space and without GPT-2's regex;
* no normalizer (llama.cpp applies none);
* model: BPE over the 256 byte symbols, merges learnt until `vocab_size`;
* special tokens first, ids 0..3: `<|bos|>`, `<|eos|>`, `<|im_start|>`, `<|im_end|>` (control
  tokens in the GGUF; the last two frame ChatML turns).

Training documents come from every domain of the corpus (its manifest's list) in turn, so no domain
dominates the merges.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from cluster.train.corpus import corpus_domains, read_documents

if TYPE_CHECKING:  # tokenizers is imported where it is used: importing this module must not need it
    from tokenizers import Tokenizer

BOS = "<|bos|>"
EOS = "<|eos|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
SPECIAL_TOKENS: tuple[str, ...] = (BOS, EOS, IM_START, IM_END)

QWEN2_SPLIT_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
"""Qwen2's pre-tokenizer regex as its tokenizer.json states it (llama.cpp: src/llama-vocab.cpp, QWEN2)."""

GGUF_PRE = "qwen2"
"""The `tokenizer.ggml.pre` value naming that pre-tokenizer in llama.cpp."""

TOKENIZER_FILE = "tokenizer.json"


@dataclass(frozen=True)
class TokenizerConfig:
    """BPE training knobs.

    Attributes:
        vocab_size: tokens in the final vocabulary, special tokens and the 256 bytes included.
        min_frequency: a pair seen fewer times is never merged.
    """

    vocab_size: int = 8192
    min_frequency: int = 2

    def validate(self) -> None:
        """Raises ValueError naming the first field out of range."""
        if not 512 <= self.vocab_size <= 65_535:  # token ids are stored as uint16
            raise ValueError(f"vocab_size must be in [512, 65535], got {self.vocab_size}")
        if self.min_frequency < 1:
            raise ValueError(f"min_frequency must be at least 1, got {self.min_frequency}")


def _interleaved_documents(work_dir: Path) -> Iterator[str]:
    per_domain = [read_documents(work_dir, domain, "train") for domain in corpus_domains(work_dir)]
    for i in range(max(len(docs) for docs in per_domain)):
        for docs in per_domain:
            if i < len(docs):
                yield docs[i].text


def new_tokenizer() -> Tokenizer:
    """An untrained tokenizer with the pipeline described in the module docstring."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_SPLIT_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    return tok


def train_tokenizer(work_dir: Path, path: Path, config: TokenizerConfig = TokenizerConfig()) -> Path:
    """Trains the tokenizer on every domain's training split (under `work_dir/corpus`) and saves it.

    Args:
        work_dir: the directory the corpus was built in.
        path: the tokenizer.json to write.
        config: vocabulary size and merge threshold.

    Returns:
        The path written.
    """
    from tokenizers import pre_tokenizers, trainers

    config.validate()
    tok = new_tokenizer()
    trainer = trainers.BpeTrainer(
        vocab_size=config.vocab_size,
        min_frequency=config.min_frequency,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_interleaved_documents(work_dir), trainer=trainer)
    tok.save(str(path))
    return path


def load_tokenizer(path: Path) -> Tokenizer:
    """The tokenizer saved by train_tokenizer.

    Raises:
        FileNotFoundError: nothing at `path`.
    """
    from tokenizers import Tokenizer

    if not path.exists():
        raise FileNotFoundError(f"no tokenizer at {path}: run `python -m cluster.train tokenizer` first")
    return Tokenizer.from_file(str(path))


@dataclass(frozen=True)
class Vocabulary:
    """What the GGUF needs of the tokenizer: tokens by id, merges in rank order, special ids."""

    tokens: list[str]
    merges: list[str]
    special_ids: dict[str, int]

    @property
    def bos_id(self) -> int:
        return self.special_ids[BOS]

    @property
    def eos_id(self) -> int:
        return self.special_ids[EOS]


def read_vocabulary(path: Path) -> Vocabulary:
    """Tokens, merges ("a b", as GGUF stores them) and special-token ids from a tokenizer.json.

    Raises:
        ValueError: the file is not a BPE tokenizer with contiguous ids and every special token.
    """
    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    model = data["model"]
    if model.get("type") != "BPE":
        raise ValueError(f"'{path}' holds a {model.get('type')} tokenizer, expected BPE")
    vocab: dict[str, int] = dict(model["vocab"])
    for added in data.get("added_tokens", []):
        vocab[added["content"]] = added["id"]
    tokens = [""] * len(vocab)
    for token, idx in vocab.items():
        if not 0 <= idx < len(tokens) or tokens[idx]:
            raise ValueError(f"'{path}': token ids are not contiguous (id {idx} of '{token}')")
        tokens[idx] = token
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    missing = [t for t in SPECIAL_TOKENS if t not in vocab]
    if missing:
        raise ValueError(f"'{path}' lacks the special tokens {missing}")
    return Vocabulary(tokens, merges, {t: vocab[t] for t in SPECIAL_TOKENS})
