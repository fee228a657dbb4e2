"""The model's vocabulary: tokenizing and detokenizing exactly as the nodes' engines do.

One ``Tokenizer`` class serves both the router (which loads the vocabulary alone, without the
weights, to route before dispatch) and the engine (which wraps the model it loaded), so the
two tokenize a prompt by the same rule:

* plain text (``special=False``): special-token texts are ordinary text, BOS is added if the
  vocabulary asks for it;
* a chat rendering (``special=True``): special-token texts such as ``<|im_start|>`` become
  their tokens, and BOS is not added a second time when the rendering starts with it (chat
  templates often write ``{{ bos_token }}`` themselves).
"""

from __future__ import annotations

import ctypes

import llama_cpp
from llama_cpp import _internals

from cluster.errors import InvalidParameterError, ModelFileError


class Tokenizer:
    """Tokenization, token pieces and vocabulary facts of one llama.cpp model."""

    def __init__(self, model: _internals.LlamaModel) -> None:
        self._model = model
        self._vocab = model.vocab
        self.n_vocab: int = int(llama_cpp.llama_vocab_n_tokens(self._vocab))
        self.add_bos: bool = bool(llama_cpp.llama_vocab_get_add_bos(self._vocab))
        self.bos_id: int = int(llama_cpp.llama_vocab_bos(self._vocab))
        self.eos_id: int = int(llama_cpp.llama_vocab_eos(self._vocab))
        self.bos_text: str = self.text(self.bos_id) if self.bos_id >= 0 else ""
        self.eos_text: str = self.text(self.eos_id) if self.eos_id >= 0 else ""

    @classmethod
    def load(cls, model_path: str) -> "Tokenizer":
        """The vocabulary of a GGUF model alone (llama.cpp's vocab-only load: no weights)."""
        params = llama_cpp.llama_model_default_params()
        params.vocab_only = True
        try:
            model = _internals.LlamaModel(path_model=model_path, params=params, verbose=False)
        except ValueError as exc:
            raise ModelFileError(f"cannot read the vocabulary of '{model_path}': {exc}") from None
        return cls(model)

    # -- text <-> tokens ---------------------------------------------------------------------

    def tokenize(self, text: str, special: bool = False, add_special: bool = True) -> list[int]:
        """Token ids of ``text``.

        Args:
            text: what to tokenize.
            special: parse special-token texts (a chat rendering); see the module docstring.
            add_special: add BOS when the vocabulary asks for it (and ``text`` does not start
                with it under ``special``).
        """
        add = add_special and self.add_bos and not (special and self.bos_text and text.startswith(self.bos_text))
        return self._model.tokenize(text.encode("utf-8"), add_bos=add, special=special)

    def piece(self, token: int, special: bool = False) -> bytes:
        """The bytes of one token (``special``: control tokens render as their text, else as nothing)."""
        size = 64
        while True:
            buf = ctypes.create_string_buffer(size)
            n = llama_cpp.llama_token_to_piece(self._vocab, token, buf, size, 0, special)
            if n >= 0:
                return buf.raw[:n]
            size = -n

    def detokenize(self, tokens: list[int], special: bool = True) -> str:
        """The text of ``tokens`` (invalid UTF-8 replaced); ids outside the vocabulary are an error."""
        self.check_ids(tokens, "tokens")
        return b"".join(self.piece(t, special) for t in tokens).decode("utf-8", errors="replace")

    def check_ids(self, tokens: list[int], name: str) -> None:
        for token in tokens:
            if not isinstance(token, int) or isinstance(token, bool) or not 0 <= token < self.n_vocab:
                raise InvalidParameterError(f"{name}: {token!r} is not a token id of this model (0..{self.n_vocab - 1})",
                                            param=name)

    # -- vocabulary facts -----------------------------------------------------------------------

    def text(self, token: int) -> str:
        """The token's text as the vocabulary stores it (for control tokens: what templates write)."""
        raw = llama_cpp.llama_vocab_get_text(self._vocab, token)
        return raw.decode("utf-8", errors="replace") if raw else ""

    def is_control(self, token: int) -> bool:
        return bool(llama_cpp.llama_vocab_is_control(self._vocab, token))

    def is_eog(self, token: int) -> bool:
        """An end-of-generation token (EOS, end of turn, ...) as the vocabulary marks them."""
        return bool(llama_cpp.llama_vocab_is_eog(self._vocab, token))

    def chat_template(self) -> str | None:
        """The model's default chat template (GGUF ``tokenizer.chat_template``), if it has one."""
        raw = llama_cpp.llama_model_chat_template(self._model.model, None)
        return raw.decode("utf-8") if raw else None
