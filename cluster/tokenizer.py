"""The model's tokenizer alone (llama.cpp vocab-only load), for routing before dispatch."""

from __future__ import annotations

import llama_cpp
from llama_cpp import _internals

from cluster.errors import ModelFileError


class Tokenizer:
    """Tokenizes exactly as the nodes' engines do (same vocabulary, same BOS rule)."""

    def __init__(self, model_path: str) -> None:
        params = llama_cpp.llama_model_default_params()
        params.vocab_only = True
        try:
            self._model = _internals.LlamaModel(path_model=model_path, params=params, verbose=False)
        except ValueError as exc:
            raise ModelFileError(f"cannot read the vocabulary of '{model_path}': {exc}") from None
        self._add_bos = bool(self._model.add_bos_token())

    def tokenize(self, text: str) -> list[int]:
        return self._model.tokenize(text.encode("utf-8"), add_bos=self._add_bos, special=False)
