"""Token streams of the corpus: tokenized splits on disk, training batches, held-out windows.

Each split of each domain becomes one stream: every document's token ids followed by `<|eos|>`,
in corpus order, saved as uint16 (`tokens/<domain>.<split>.npy`). A training or evaluation
window of n_ctx positions is `<|bos|>` followed by n_ctx - 1 stream tokens (input) and the
n_ctx stream tokens after `<|bos|>` (targets), so every window starts as llama.cpp starts a
prompt (the GGUF sets `add_bos_token`).

The domains are the corpus manifest's (`corpus.corpus_domains`), in its order.

Training batches are balanced: sequence i of a batch comes from domain i mod n_domains, at an offset
drawn from ``numpy.random.default_rng([seed, step])`` -- the batch of a step does not depend
on what ran before it, so a resumed run sees the batches an uninterrupted one would have.
Held-out windows are evenly spaced over each held-out stream, the same for every caller.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from cluster.train.corpus import corpus_domains, read_documents
from cluster.train.tokenizer import BOS, EOS, load_tokenizer

SPLITS: tuple[str, ...] = ("train", "heldout")


def tokens_path(out_dir: Path, domain: str, split: str) -> Path:
    return out_dir / "tokens" / f"{domain}.{split}.npy"


def tokenize_corpus(out_dir: Path, tokenizer_path: Path) -> dict[str, dict[str, int]]:
    """Tokenizes every split of every corpus domain into `out_dir/tokens/` (skipped where already written).

    Returns:
        Token counts, {domain: {split: n_tokens}}, in manifest order.
    """
    tok = load_tokenizer(tokenizer_path)
    eos = tok.token_to_id(EOS)
    (out_dir / "tokens").mkdir(parents=True, exist_ok=True)
    counts: dict[str, dict[str, int]] = {}
    for domain in corpus_domains(out_dir):
        counts[domain] = {}
        for split in SPLITS:
            path = tokens_path(out_dir, domain, split)
            if not path.exists():
                docs = read_documents(out_dir, domain, split)
                encoded = tok.encode_batch([d.text for d in docs], add_special_tokens=False)
                stream = np.fromiter((i for e in encoded for i in [*e.ids, eos]), dtype=np.uint16)
                tmp = path.with_suffix(".tmp.npy")
                np.save(tmp, stream)
                tmp.replace(path)
            counts[domain][split] = int(np.load(path, mmap_mode="r").shape[0])
    return counts


def load_streams(out_dir: Path, split: str) -> dict[str, np.ndarray]:
    """Every corpus domain's token stream of one split, in manifest order.

    Raises:
        FileNotFoundError: the corpus has not been built or tokenized.
    """
    streams = {}
    for domain in corpus_domains(out_dir):
        path = tokens_path(out_dir, domain, split)
        if not path.exists():
            raise FileNotFoundError(f"no token stream at {path}: run `python -m cluster.train train` (it tokenizes first)")
        streams[domain] = np.load(path)
    return streams


def bos_id(tokenizer_path: Path) -> int:
    return int(load_tokenizer(tokenizer_path).token_to_id(BOS))


def window(stream: np.ndarray, offset: int, n_ctx: int, bos: int) -> tuple[np.ndarray, np.ndarray]:
    """Input ids [n_ctx] (BOS + n_ctx - 1 stream tokens) and target ids [n_ctx] at `offset`."""
    piece = stream[offset : offset + n_ctx].astype(np.int64)
    if piece.shape[0] != n_ctx:
        raise ValueError(f"window at {offset} of {n_ctx} tokens runs past the stream ({stream.shape[0]} tokens)")
    return np.concatenate(([bos], piece[:-1])), piece


def training_batch(streams: dict[str, np.ndarray], step: int, seed: int, batch_size: int, n_ctx: int,
                   bos: int) -> tuple[np.ndarray, np.ndarray]:
    """Inputs and targets [batch_size, n_ctx] of one step (see the module docstring)."""
    rng = np.random.default_rng([seed, step])
    names = list(streams)
    xs, ys = [], []
    for i in range(batch_size):
        stream = streams[names[i % len(names)]]
        x, y = window(stream, int(rng.integers(0, stream.shape[0] - n_ctx)), n_ctx, bos)
        xs.append(x)
        ys.append(y)
    return np.stack(xs), np.stack(ys)


def heldout_windows(stream: np.ndarray, n_windows: int, n_ctx: int, bos: int) -> tuple[np.ndarray, np.ndarray]:
    """`n_windows` evenly spaced held-out windows [n_windows, n_ctx] (inputs, targets).

    Raises:
        ValueError: the stream is shorter than one window.
    """
    if stream.shape[0] < n_ctx:
        raise ValueError(f"held-out stream of {stream.shape[0]} tokens is shorter than one window ({n_ctx})")
    offsets = np.linspace(0, stream.shape[0] - n_ctx, n_windows).astype(np.int64)
    pairs = [window(stream, int(o), n_ctx, bos) for o in offsets]
    return np.stack([p[0] for p in pairs]), np.stack([p[1] for p in pairs])
