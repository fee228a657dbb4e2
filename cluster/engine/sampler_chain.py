"""Decoding one request's tokens: llama.cpp's sampler chain for its ``SamplingParams``, and
the log-probabilities of what it sampled.

The chain is llama.cpp's own, in its order: logit bias, penalties, grammar, then greedy, or
top-k, top-p, min-p, temperature and a seeded draw. Under a grammar, tokens whose bytes are not
whole UTF-8 characters are banned (``broken_utf8_tokens``). Where the chain is the greedy sampler
alone, the step loop reads the tokens of all such rows from the batch's logits at once
(``argmax_tokens``: llama.cpp's greedy sampler takes a row's first largest logit too). A token's
log-probability is the log-softmax of the logits llama.cpp computed for its batch row, before any
sampler changed them.
"""

from __future__ import annotations

import math
from typing import Sequence

import llama_cpp
import numpy as np
from llama_cpp import _internals

from cluster.engine.sampling import LOGIT_BIAS_BAN, SamplingParamError, SamplingParams, TokenLogprob, TopLogprob
from cluster.engine.token_table import TokenTable
from cluster.engine.tokenizer import Tokenizer


class SamplerChains:
    """Builds the sampler chain of each request and reads log-probabilities, for one model and context."""

    def __init__(self, tokenizer: Tokenizer, tokens: TokenTable, vocab: llama_cpp.llama_vocab_p,
                 ctx: llama_cpp.llama_context_p) -> None:
        self._tokenizer = tokenizer
        self._tokens = tokens
        self._vocab = vocab
        self._ctx = ctx
        self._broken_utf8: list[int] | None = None

    def chain(self, params: SamplingParams) -> _internals.LlamaSampler:
        """llama.cpp's sampler chain for ``params`` (the caller closes it).

        Raises:
            SamplingParamError: a grammar llama.cpp cannot parse.
        """
        n_vocab = self._tokenizer.n_vocab
        sampler = _internals.LlamaSampler()
        try:
            bias = {t: -math.inf if b <= LOGIT_BIAS_BAN else b for t, b in params.logit_bias}
            if params.grammar is not None:  # see broken_utf8_tokens
                bias.update(dict.fromkeys(self.broken_utf8_tokens(), -math.inf))
            if bias:
                sampler.add_logit_bias(n_vocab, bias)
            if _penalised(params):
                sampler.add_penalties(n_vocab, params.penalty_last_n, params.repeat_penalty,
                                      params.frequency_penalty, params.presence_penalty)
            if params.grammar is not None:
                grammar = llama_cpp.llama_sampler_init_grammar(self._vocab, params.grammar.encode("utf-8"), b"root")
                if not grammar:
                    raise SamplingParamError("grammar", "a GBNF grammar llama.cpp can parse, with a 'root' rule",
                                             params.grammar[:200])
                llama_cpp.llama_sampler_chain_add(sampler.sampler, grammar)
            if params.greedy:
                sampler.add_greedy()
            else:
                if params.top_k > 0:
                    sampler.add_top_k(params.top_k)
                if params.top_p < 1.0:
                    sampler.add_top_p(params.top_p, 1)
                if params.min_p > 0.0:
                    sampler.add_min_p(params.min_p, 1)
                sampler.add_temp(params.temperature)
                sampler.add_dist(params.seed)
        except BaseException:
            sampler.close()
            raise
        return sampler

    @staticmethod
    def is_plain_greedy(params: SamplingParams) -> bool:
        """The chain of ``params`` is llama.cpp's greedy sampler alone (no bias, penalty or
        grammar before it): its token is a row's first largest logit (``argmax_tokens``)."""
        return params.greedy and not params.logit_bias and not _penalised(params) and params.grammar is None

    def argmax_tokens(self, n_outputs: int, outputs: list[int]) -> list[int]:
        """Per entry ``j`` of ``outputs``, the token of the first largest logit of the step's
        ``j``-th output (rows with logits, in batch order; ``n_outputs`` of them), as
        llama.cpp's greedy sampler would pick it: one vectorised pass over the batch's logits."""
        logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits(self._ctx), shape=(n_outputs, self._tokenizer.n_vocab))
        return logits.argmax(axis=1)[outputs].tolist()

    def sample(self, sampler: _internals.LlamaSampler, row: int) -> int:
        """The token ``sampler`` draws from the logits of the batch's ``row`` (and accepts: its
        state, grammar and penalties, moves on)."""
        return llama_cpp.llama_sampler_sample(sampler.sampler, self._ctx, row)

    def broken_utf8_tokens(self) -> list[int]:
        """Tokens whose bytes are not whole UTF-8 characters (byte-level vocabularies have them).

        llama.cpp's grammar sampler reads text as code points and decodes some invalid byte
        sequences (overlong forms, surrogates) to code points it accepts, which a JSON parser
        later reads as several replacement characters: a string the grammar bounded to 12
        characters comes out longer. Under a grammar these tokens are banned, so the output is
        valid UTF-8 and means to the parser what it meant to the grammar. (A character the
        vocabulary has only in pieces can still be written as a JSON \\u escape.)
        """
        if self._broken_utf8 is None:
            broken = []
            for token in range(self._tokenizer.n_vocab):
                try:
                    self._tokens.piece(token).decode("utf-8")
                except UnicodeDecodeError:
                    broken.append(token)
            self._broken_utf8 = broken
        return self._broken_utf8

    def logprob(self, token: int, offset: int, n_top: int, row: int, preserved: Sequence[int] = ()) -> TokenLogprob:
        """The sampled token's log-probability: log-softmax of the logits llama.cpp computed for
        the batch's ``row`` (before any sampler changed them), and the ``n_top`` most likely tokens;
        ``offset``: where the token's text starts in the generation's text; ``preserved``: the
        request's tokens written as their text (``SamplingParams.preserved_token_ids``)."""
        n_vocab = self._tokenizer.n_vocab
        piece = self._tokens.pieces(preserved)
        logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(self._ctx, row), shape=(n_vocab,))
        logits = logits.astype(np.float64)
        top = logits.max()
        log_z = top + math.log(float(np.exp(logits - top).sum()))
        alternatives: tuple[TopLogprob, ...] = ()
        if n_top:
            best = np.argpartition(-logits, min(n_top, n_vocab) - 1)[:n_top]
            best = best[np.argsort(-logits[best], kind="stable")]
            alternatives = tuple(TopLogprob(int(t), piece(int(t)), float(logits[t] - log_z)) for t in best)
        return TokenLogprob(token=token, piece=piece(token), logprob=float(logits[token] - log_z),
                            offset=offset, top=alternatives)


def _penalised(params: SamplingParams) -> bool:
    """``params`` ask for a repeat, presence or frequency penalty (llama.cpp's penalties sampler)."""
    return params.repeat_penalty != 1.0 or bool(params.presence_penalty) or bool(params.frequency_penalty)
