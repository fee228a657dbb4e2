"""What the step loop needs of each token it samples — its bytes and whether it ends generation —
asked of llama.cpp once per token id and kept.

``Tokenizer.piece`` allocates a buffer and calls into llama.cpp each time; a decoding sequence
needs its token's piece (its text, its stop strings) and end-of-generation flag every step, so
the engine reads them through this table instead. Entries are filled on first use (a vocabulary
has tens of thousands of tokens; a workload touches a small share of them).
"""

from __future__ import annotations

from cluster.engine.tokenizer import Tokenizer

_UNKNOWN, _NOT_EOG, _EOG = 0, 1, 2


class TokenTable:
    """Token pieces (``special=False``, as ``Tokenizer.piece``) and end-of-generation flags of one
    vocabulary, read once per token. Safe to read from several threads: an entry is written whole,
    and two threads filling it write the same value."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self._tokenizer = tokenizer
        self._pieces: list[bytes | None] = [None] * tokenizer.n_vocab
        self._eog = bytearray(tokenizer.n_vocab)  # _UNKNOWN, _NOT_EOG or _EOG per token

    def piece(self, token: int) -> bytes:
        """The bytes of ``token`` (control tokens render as nothing)."""
        piece = self._pieces[token]
        if piece is None:
            piece = self._pieces[token] = self._tokenizer.piece(token)
        return piece

    def is_eog(self, token: int) -> bool:
        """An end-of-generation token of the vocabulary (``Tokenizer.is_eog``)."""
        flag = self._eog[token]
        if flag == _UNKNOWN:
            flag = self._eog[token] = _EOG if self._tokenizer.is_eog(token) else _NOT_EOG
        return flag == _EOG
