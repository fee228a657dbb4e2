"""Held-out text to score a model on: token windows of every domain of a trained model's corpus.

A model trained by ``python -m cluster.train`` has its corpus manifest beside it
(``corpus-manifest.json``: the domains, in order, and the split rule). Its held-out documents are
found again the way the corpus found them (``cluster.train.corpus``: each domain's source on this
machine, candidate files ordered by the hash of their path, a file whose hash is 0 modulo
``heldout_modulus`` held out, its reader), reading only as many of them as the windows need:
nothing of the git-ignored ``trained/work/`` is needed. A domain whose source is missing on this
machine is skipped, with the reason.

A window is ``window_tokens`` tokens: BOS (where the vocabulary adds one, as a prompt starts) and
then the middle of one held-out document (the document's tokens, without special tokens, by the
model's own tokenizer); documents too short for a window are passed over. The windows of a domain
come from its first held-out documents in the corpus' order, so every run on the same machine
scores the same tokens.

A model without a manifest (not a trained one) is scored on text it may have seen or not: the
Python standard library's sources of this machine, taken by the same rule, and the result says so.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from cluster.train import corpus

MANIFEST = "corpus-manifest.json"
FALLBACK_DOMAIN = "python"  # the source a model without a manifest is scored on


@dataclass(frozen=True)
class TextWindows:
    """Token windows per domain, and where they came from.

    Attributes:
        windows: per domain (in the corpus' order), its windows of token ids.
        sources: per domain scored, what its text is and how many documents were read.
        skipped: per domain not scored, why.
        origin: one sentence: the trained model's held-out split, or the fallback text.
        trained: the windows are the model's own held-out text.
    """

    windows: dict[str, list[list[int]]]
    sources: dict[str, str] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)
    origin: str = ""
    trained: bool = True

    @property
    def n_windows(self) -> int:
        return sum(len(w) for w in self.windows.values())


def manifest_of(model_path: str | Path) -> Path | None:
    """The corpus manifest beside a trained model, or None."""
    path = Path(model_path).resolve().parent / MANIFEST
    return path if path.is_file() else None


def domain_windows(source: corpus.DomainSource, config: corpus.CorpusConfig, tokenize: Callable[[str], list[int]],
                   bos: int | None, n_windows: int, window_tokens: int) -> tuple[list[list[int]], int]:
    """Up to ``n_windows`` windows from the first held-out documents of ``source`` (module
    docstring), and how many documents were read.

    Raises:
        corpus.CorpusSourceError: the source's directory or tool is missing here.
    """
    corpus.check_source(source)
    candidates = sorted(source.list_files(), key=lambda p: (corpus._path_hash(p), str(p)))
    heldout = [p for p in candidates if corpus._path_hash(p) % config.heldout_modulus == 0]
    body = window_tokens - (bos is not None)
    windows: list[list[int]] = []
    n_read = 0
    for doc in corpus._take(heldout, source.read, config.heldout_bytes, config.max_file_bytes):
        n_read += 1
        ids = tokenize(doc.text)
        if len(ids) < body:
            continue
        start = (len(ids) - body) // 2
        windows.append(([bos] if bos is not None else []) + ids[start:start + body])
        if len(windows) == n_windows:
            break
    return windows, n_read


def heldout_windows(model_path: str | Path, tokenize: Callable[[str], list[int]], bos: int | None, *,
                    n_windows: int, window_tokens: int,
                    log: Callable[[str], None] = lambda line: None) -> TextWindows:
    """The windows a model is scored on: its corpus' held-out text if it is a trained model, else
    the fallback text (module docstring). ``tokenize`` gives a text's ids without special tokens;
    ``bos``: the id each window starts with, or None.

    Raises:
        ValueError: no domain gave a window (nothing to score).
    """
    if n_windows < 1 or window_tokens < 2:
        raise ValueError(f"need at least one window of two tokens, got {n_windows} x {window_tokens}")
    sources = corpus.default_sources()
    manifest_path = manifest_of(model_path)
    if manifest_path is not None:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
        config = corpus.CorpusConfig(**manifest["config"])
        domains = list(manifest["domains"])
        origin = (f"the held-out split of the model's corpus (`{manifest_path.name}` beside the model: files whose path "
                  f"hash is 0 mod {config.heldout_modulus}, found again on this machine by `cluster.train.corpus`)")
        trained = True
    else:
        config = corpus.CorpusConfig()
        domains = [FALLBACK_DOMAIN]
        origin = ("not the model's own held-out text: the model has no corpus manifest beside it (not a model of "
                  "`python -m cluster.train`), so it is scored on this machine's Python standard library sources "
                  f"(files whose path hash is 0 mod {config.heldout_modulus})")
        trained = False
    result = TextWindows(windows={}, origin=origin, trained=trained)
    for name in domains:
        source = sources.get(name)
        if source is None:
            result.skipped[name] = f"no source for domain '{name}' in cluster.train.corpus"
            continue
        try:
            windows, n_read = domain_windows(source, config, tokenize, bos, n_windows, window_tokens)
        except corpus.CorpusSourceError as exc:
            result.skipped[name] = str(exc)
            log(f"held-out text: {name} skipped: {exc}")
            continue
        if not windows:
            result.skipped[name] = (f"none of its {n_read} held-out documents under {', '.join(source.roots)} has "
                                    f"{window_tokens} tokens")
            log(f"held-out text: {name} skipped: {result.skipped[name]}")
            continue
        result.windows[name] = windows
        documents = "held-out document" if n_read == 1 else f"{n_read} held-out documents"
        result.sources[name] = f"{source.description}; {_count(len(windows), 'window')} from the first {documents}"
        log(f"held-out text: {name}: {len(windows)} windows of {window_tokens} tokens ({n_read} documents read)")
    if not result.windows:
        raise ValueError(f"no held-out text to score '{model_path}' on: "
                         + "; ".join(f"{k}: {v}" for k, v in result.skipped.items()))
    return result


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"
