"""What the step loop needs of each token it samples — its bytes and whether it ends generation —
asked of llama.cpp once per token id and kept.

``Tokenizer.piece`` allocates a buffer and calls into llama.cpp each time; a decoding sequence
needs its token's piece (its text, its stop strings) and end-of-generation flag every step, so
the engine reads them through this table instead. Entries are filled on first use (a vocabulary
has tens of thousands of tokens; a workload touches a small share of them).

A request may name tokens to write as their text although they are control tokens
(``SamplingParams.preserved_token_ids``: a chat format's markers); ``pieces`` gives its sequence
the piece function that does, one request's set, the other tokens as ``piece`` writes them.
"""

from __future__ import annotations

from typing import Callable, Iterable

from cluster.engine.tokenizer import Tokenizer

_UNKNOWN, _NOT_EOG, _EOG = 0, 1, 2


class TokenTable:
    """Token pieces (``special=False``, as ``Tokenizer.piece``) and end-of-generation flags of one
    vocabulary, read once per token. Safe to read from several threads: an entry is written whole,
    and two threads filling it write the same value."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self._tokenizer = tokenizer
        self._pieces: list[bytes | None] = [None] * tokenizer.n_vocab
        self._texts: dict[int, bytes] = {}  # pieces written with special=True, of preserved tokens
        self._eog = bytearray(tokenizer.n_vocab)  # _UNKNOWN, _NOT_EOG or _EOG per token

    def piece(self, token: int) -> bytes:
        """The bytes of ``token`` (control tokens render as nothing)."""
        piece = self._pieces[token]
        if piece is None:
            piece = self._pieces[token] = self._tokenizer.piece(token)
        return piece

    def text_piece(self, token: int) -> bytes:
        """The bytes of ``token`` with control tokens written as their text (``special=True``)."""
        piece = self._texts.get(token)
        if piece is None:
            piece = self._texts[token] = self._tokenizer.piece(token, special=True)
        return piece

    def pieces(self, preserved: Iterable[int] = ()) -> Callable[[int], bytes]:
        """The piece function of a request that writes the tokens of ``preserved`` as their text
        (``SamplingParams.preserved_token_ids``); ``piece`` itself when it names none."""
        kept = frozenset(preserved)
        if not kept:
            return self.piece
        piece, text = self.piece, self.text_piece
        return lambda token: text(token) if token in kept else piece(token)

    def is_eog(self, token: int) -> bool:
        """An end-of-generation token of the vocabulary (``Tokenizer.is_eog``)."""
        flag = self._eog[token]
        if flag == _UNKNOWN:
            flag = self._eog[token] = _EOG if self._tokenizer.is_eog(token) else _NOT_EOG
        return flag == _EOG
