"""Checking a request before it joins the batch: its prompt, its parameters against the model and
the slot, an answer it resumes, and its sampler chain (a grammar llama.cpp refuses is an error
here, before anything runs). Errors name the input and what it must be.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
from llama_cpp import _internals

from cluster.engine.sampler_chain import SamplerChains
from cluster.engine.sampling import SamplingParamError, SamplingParams
from cluster.engine.sequence import Resume, check_resume
from cluster.engine.tokenizer import Tokenizer
from cluster.errors import InvalidParameterError, PromptTooLongError


@dataclass(frozen=True)
class CheckedRequest:
    """A request ready to join the batch: its prompt's tokens, its parameters, its sampler."""

    tokens: list[int]
    params: SamplingParams
    sampler: _internals.LlamaSampler  # closed by the sequence that owns it
    resume: Resume | None = None


class RequestChecker:
    """Checks requests for one engine: a model's vocabulary and slots of ``n_ctx`` tokens."""

    def __init__(self, tokenizer: Tokenizer, n_ctx: int, samplers: SamplerChains) -> None:
        self._tokenizer = tokenizer
        self._n_ctx = n_ctx
        self._samplers = samplers

    def check(self, prompt: str | Sequence[int], params: SamplingParams | None, special: bool,
              fields: dict[str, Any], resume: Resume | None = None) -> CheckedRequest:
        """The request's tokens, its validated parameters (``fields`` override ``params`` by name)
        and its sampler.

        Raises:
            InvalidParameterError: an empty or ill-typed prompt, a parameter out of range, a bad resume.
            PromptTooLongError: the prompt (with a resumed answer) leaves no room to generate.
        """
        n_vocab = self._tokenizer.n_vocab
        if isinstance(prompt, str):
            if not prompt:
                raise InvalidParameterError("prompt must be a non-empty string", param="prompt")
            tokens = None
        elif isinstance(prompt, (list, tuple, np.ndarray)):
            tokens = list(prompt)
            if not tokens or not all(isinstance(t, (int, np.integer)) and 0 <= t < n_vocab for t in tokens):
                raise InvalidParameterError(f"prompt tokens must be a non-empty list of ids in [0, "
                                            f"{n_vocab}), got {tokens[:8]!r}...", param="prompt")
            tokens = [int(t) for t in tokens]
        else:
            raise InvalidParameterError(f"prompt must be a non-empty string or a list of token ids, got "
                                        f"{type(prompt).__name__}", param="prompt")
        params = (params or SamplingParams()).updated(**fields) if fields else (params or SamplingParams())
        if params.max_tokens > self._n_ctx:
            raise SamplingParamError("max_tokens", f"at most {self._n_ctx} (the context)", params.max_tokens)
        if params.n != 1:
            raise SamplingParamError("n", "1 here (the engine makes one choice per call; see SamplingParams.choices)",
                                     params.n)
        params.check_vocabulary(n_vocab)
        if tokens is None:
            tokens = self._tokenizer.tokenize(prompt, special=special)
        if len(tokens) >= self._n_ctx:
            raise PromptTooLongError(f"prompt is {len(tokens)} tokens but the context holds {self._n_ctx} "
                                     f"(at least one more is needed to generate)")
        if resume is not None:
            self._check_resume(resume, len(tokens), params)
        return CheckedRequest(tokens, params, self._samplers.chain(params), resume)

    def _check_resume(self, resume: Resume, n_prompt: int, params: SamplingParams) -> None:
        n_vocab = self._tokenizer.n_vocab
        if not isinstance(resume, Resume) or not all(isinstance(t, int) and 0 <= t < n_vocab for t in resume.tokens):
            raise InvalidParameterError(f"resume must be a Resume whose tokens are ids in [0, {n_vocab})",
                                        param="resume")
        if len(resume.tokens) > params.max_tokens:
            raise InvalidParameterError(f"resume holds {len(resume.tokens)} tokens, more than max_tokens "
                                        f"({params.max_tokens})", param="resume")
        if n_prompt + len(resume.tokens) >= self._n_ctx:
            raise PromptTooLongError(f"prompt and resumed answer are {n_prompt + len(resume.tokens)} tokens but the "
                                     f"context holds {self._n_ctx}")
        kept = frozenset(params.preserved_token_ids)  # written as their text in this answer
        check_resume(resume, lambda token: self._tokenizer.piece(token, special=token in kept))
