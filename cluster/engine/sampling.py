"""Sampling parameters: the one definition of every decoding option and its bounds.

``SamplingParams`` is what a request asks of the decoder; the engine turns it into llama.cpp's
sampler chain, the node, the router, the client, the CLI and the HTTP gateway all pass it
along, and ``validate`` is the only place its bounds are written. An error names the field
(``SamplingParamError.field``), so each surface can report it under its own spelling (the
OpenAI layer as the wire field, the CLI as the flag).

``TokenLogprob`` is what comes back per generated token when ``logprobs`` is asked for.

This module is self-contained (no Ray, no llama.cpp): anything may import it cheaply.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields, replace
from typing import Any, Iterator, Mapping, Sequence

from cluster.errors import InvalidParameterError

MAX_SEED = 2**32 - 2
"""Largest seed: llama.cpp reads 2**32 - 1 (LLAMA_DEFAULT_SEED) as "pick a random seed"."""
MAX_STOP = 4  # stop strings per request (OpenAI's limit)
MAX_STOP_TOKEN_IDS = 64
MAX_PRESERVED_TOKEN_IDS = 64
MAX_N = 16  # choices per request
MAX_TOP_LOGPROBS = 20  # alternatives per token (OpenAI's chat limit)
MAX_LOGIT_BIAS = 300  # entries of logit_bias (OpenAI's limit)
LOGIT_BIAS_BAN = -100.0  # a bias at (or below) this value bans the token, as OpenAI documents


class SamplingParamError(InvalidParameterError):
    """A sampling parameter is out of range or of the wrong type.

    Attributes:
        field: the SamplingParams field, e.g. ``top_k``.
        expected: what the field must be ("an integer >= 0").
        value: the value given.
    """

    def __init__(self, field: str, expected: str, value: Any) -> None:
        self.field = field
        self.expected = expected
        self.value = value
        super().__init__(f"{field} must be {expected}, got {value!r}", param=field)

    def __reduce__(self) -> tuple[Any, ...]:  # crosses Ray's process boundaries intact
        return (SamplingParamError, (self.field, self.expected, self.value))


@dataclass(frozen=True)
class SamplingParams:
    """One request's decoding options.

    Attributes:
        max_tokens: tokens generated at most per choice (>= 1; the engine also caps it at its context).
        temperature: 0 decodes greedily; otherwise logits are divided by it before sampling. [0, 2].
        top_p: nucleus sampling: keep the smallest set of tokens whose probability reaches it. (0, 1].
        top_k: keep the k most likely tokens; 0 keeps all. >= 0.
        min_p: drop tokens less likely than min_p times the most likely one; 0 keeps all. [0, 1].
        repeat_penalty: divides the (positive) logit of each token among the last
            ``penalty_last_n`` generated ones (llama.cpp's repetition penalty); 1 is off. (0, 10].
        presence_penalty: subtracted once from the logit of every token generated so far
            (within ``penalty_last_n``), as OpenAI defines it. [-2, 2].
        frequency_penalty: subtracted from a token's logit once per time it was generated
            (within ``penalty_last_n``). [-2, 2].
        penalty_last_n: how many of the latest generated tokens the three penalties look at. >= 1.
        logit_bias: (token id, bias) pairs added to the logits before sampling; a bias of -100
            or less bans the token. A mapping is accepted and stored as sorted pairs. Bias in
            [-100, 100]; ids must exist in the vocabulary (checked where the vocabulary is).
        seed: seeds the sampler; the same seed gives the same text. [0, 2**32 - 2]. Choice i of
            ``n`` uses ``choice_seed(seed, i)`` (choice 0 uses ``seed`` itself).
        stop: strings that end the generation (not included in the text); a single string is
            one stop string. At most 4, non-empty.
        stop_token_ids: token ids that end the generation (not included), besides every
            end-of-generation token of the vocabulary. At most 64.
        n: choices generated for the request, each with its own seed. [1, 16].
        logprobs: return the log-probability of every generated token.
        top_logprobs: with ``logprobs``, also the most likely alternatives at each position. [0, 20].
        grammar: a GBNF grammar (llama.cpp's) the output must follow, or None. JSON schemas are
            turned into one by ``cluster.engine.grammar``.
        preserved_token_ids: tokens written as their text in the answer (pieces, streamed text,
            log-probability entries) even when they are control tokens, which are otherwise written
            as nothing: a chat format's markers (``cluster.engine.chat_format.ChatFormat.preserved``),
            set where the request is rendered (``ChatRenderer.chat_params``). At most 64; stored sorted.
    """

    max_tokens: int = 64
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    repeat_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    penalty_last_n: int = 64
    logit_bias: tuple[tuple[int, float], ...] = ()
    seed: int = 0
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    n: int = 1
    logprobs: bool = False
    top_logprobs: int = 0
    grammar: str | None = None
    preserved_token_ids: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        # conveniences, so callers may pass what they have: "x" is one stop string (not the
        # characters of one), lists become tuples, a {token: bias} mapping sorted pairs
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        elif isinstance(self.stop, list):
            object.__setattr__(self, "stop", tuple(self.stop))
        if isinstance(self.stop_token_ids, list):
            object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids))
        if isinstance(self.preserved_token_ids, (list, tuple, set, frozenset)):
            try:
                object.__setattr__(self, "preserved_token_ids", tuple(sorted(set(self.preserved_token_ids))))
            except TypeError:  # mixed types: validate names the problem
                object.__setattr__(self, "preserved_token_ids", tuple(self.preserved_token_ids))
        if isinstance(self.logit_bias, Mapping):
            try:
                pairs = tuple(sorted(self.logit_bias.items()))
            except TypeError:  # keys of mixed types: validate names the problem
                pairs = tuple(self.logit_bias.items())
            object.__setattr__(self, "logit_bias", pairs)
        elif isinstance(self.logit_bias, list):
            object.__setattr__(self, "logit_bias", tuple(tuple(p) if isinstance(p, list) else p for p in self.logit_bias))
        self._validate()  # valid once constructed: nothing downstream checks again

    @classmethod
    def create(cls, **values: Any) -> SamplingParams:
        """Builds params from keyword arguments; an unknown name is an error naming it."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise InvalidParameterError(f"unknown sampling parameter {unknown[0]!r}; expected one of {', '.join(sorted(known))}",
                                        param=unknown[0])
        return cls(**values)

    def updated(self, **values: Any) -> SamplingParams:
        """A validated copy with some fields changed (unknown names are errors naming them)."""
        return SamplingParams.create(**{**{f.name: getattr(self, f.name) for f in fields(self)}, **values})

    def _validate(self) -> None:
        """Checks every field; raises SamplingParamError naming the first bad one."""
        _integer("max_tokens", self.max_tokens, 1, None)
        _number("temperature", self.temperature, 0.0, 2.0)
        _number("top_p", self.top_p, 0.0, 1.0, low_open=True)
        _integer("top_k", self.top_k, 0, None)
        _number("min_p", self.min_p, 0.0, 1.0)
        _number("repeat_penalty", self.repeat_penalty, 0.0, 10.0, low_open=True)
        _number("presence_penalty", self.presence_penalty, -2.0, 2.0)
        _number("frequency_penalty", self.frequency_penalty, -2.0, 2.0)
        _integer("penalty_last_n", self.penalty_last_n, 1, 1 << 20)
        self._validate_logit_bias()
        _integer("seed", self.seed, 0, MAX_SEED)
        stop = self.stop
        if not isinstance(stop, tuple) or len(stop) > MAX_STOP or not all(isinstance(s, str) and s for s in stop):
            raise SamplingParamError("stop", f"a non-empty string or a list of at most {MAX_STOP} of them", stop)
        ids = self.stop_token_ids
        if not isinstance(ids, tuple) or len(ids) > MAX_STOP_TOKEN_IDS or not all(_is_int(t) and t >= 0 for t in ids):
            raise SamplingParamError("stop_token_ids", f"a list of at most {MAX_STOP_TOKEN_IDS} token ids (integers >= 0)", ids)
        kept = self.preserved_token_ids
        if not isinstance(kept, tuple) or len(kept) > MAX_PRESERVED_TOKEN_IDS or not all(_is_int(t) and t >= 0 for t in kept):
            raise SamplingParamError("preserved_token_ids",
                                     f"a list of at most {MAX_PRESERVED_TOKEN_IDS} token ids (integers >= 0)", kept)
        _integer("n", self.n, 1, MAX_N)
        if not isinstance(self.logprobs, bool):
            raise SamplingParamError("logprobs", "a boolean", self.logprobs)
        _integer("top_logprobs", self.top_logprobs, 0, MAX_TOP_LOGPROBS)
        if self.top_logprobs and not self.logprobs:
            raise SamplingParamError("top_logprobs", "0 unless logprobs is on", self.top_logprobs)
        if self.grammar is not None and (not isinstance(self.grammar, str) or not self.grammar.strip()):
            raise SamplingParamError("grammar", "a non-empty GBNF grammar or None", self.grammar)

    def _validate_logit_bias(self) -> None:
        bias = self.logit_bias
        expected = f"a mapping of at most {MAX_LOGIT_BIAS} token ids (integers >= 0) to numbers in [-100, 100]"
        if not isinstance(bias, tuple) or len(bias) > MAX_LOGIT_BIAS:
            raise SamplingParamError("logit_bias", expected, bias)
        seen: set[int] = set()
        for pair in bias:
            if not isinstance(pair, tuple) or len(pair) != 2:
                raise SamplingParamError("logit_bias", expected, bias)
            token, value = pair
            if not _is_int(token) or token < 0 or token in seen:
                raise SamplingParamError("logit_bias", expected + " (each id once)", bias)
            if not _is_number(value) or not -100.0 <= value <= 100.0:
                raise SamplingParamError("logit_bias", expected, bias)
            seen.add(token)

    def check_vocabulary(self, n_vocab: int) -> None:
        """Token ids given in logit_bias, stop_token_ids and preserved_token_ids exist in a vocabulary of n_vocab tokens."""
        for name, ids in (("logit_bias", [t for t, _ in self.logit_bias]), ("stop_token_ids", self.stop_token_ids),
                          ("preserved_token_ids", self.preserved_token_ids)):
            bad = [t for t in ids if t >= n_vocab]
            if bad:
                raise SamplingParamError(name, f"token ids of this model's vocabulary (< {n_vocab})", bad[0])

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    def choices(self) -> Iterator[SamplingParams]:
        """The params of each of the ``n`` choices: one choice each, with its own seed."""
        for index in range(self.n):
            yield replace(self, n=1, seed=choice_seed(self.seed, index))


def choice_seed(seed: int, index: int) -> int:
    """The seed of choice ``index``: ``seed`` for choice 0, a hash of (seed, index) otherwise.

    SplitMix64's finaliser spreads neighbouring inputs apart, so requests with seeds s and s+1
    do not share choices; the result stays within [0, MAX_SEED].
    """
    if index == 0:
        return seed
    x = (seed * 0x9E3779B97F4A7C15 + index * 0xBF58476D1CE4E5B9) & (2**64 - 1)
    x ^= x >> 30
    x = (x * 0xBF58476D1CE4E5B9) & (2**64 - 1)
    x ^= x >> 27
    x = (x * 0x94D049BB133111EB) & (2**64 - 1)
    x ^= x >> 31
    return x % (MAX_SEED + 1)


@dataclass(frozen=True)
class TopLogprob:
    """One alternative at a position: its token, bytes and log-probability, and ``text``: what
    it would have added to the choice's text there (decoded as ``TokenLogprob.text`` is)."""

    token: int
    piece: bytes
    logprob: float
    text: str = ""


@dataclass(frozen=True)
class TokenLogprob:
    """A generated token with its log-probability under the model (log-softmax of the logits
    llama.cpp returned for that position, before any sampler changed them).

    Attributes:
        token: the token id.
        piece: its bytes (may be part of a UTF-8 character).
        logprob: natural log of its probability.
        offset: where its text starts in the choice's text (characters).
        top: the ``top_logprobs`` most likely tokens at that position, most likely first.
        text: what it added to the choice's text, as the sequence decoded it (incremental UTF-8,
            invalid bytes replaced by U+FFFD): a character split across tokens comes with the
            token that completes it, so the entries' texts put together are the choice's text.
            Set by ``cluster.engine.sequence``.
    """

    token: int
    piece: bytes
    logprob: float
    offset: int
    top: tuple[TopLogprob, ...] = field(default_factory=tuple)
    text: str = ""


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _integer(name: str, value: Any, low: int, high: int | None) -> None:
    if not _is_int(value) or value < low or (high is not None and value > high):
        raise SamplingParamError(name, f"an integer >= {low}" if high is None else f"an integer in [{low}, {high}]", value)


def _number(name: str, value: Any, low: float, high: float, low_open: bool = False) -> None:
    ok = _is_number(value) and (low < value if low_open else low <= value) and value <= high
    if not ok:
        raise SamplingParamError(name, f"a number in {'(' if low_open else '['}{low:g}, {high:g}]", value)


def parse_logit_bias(pairs: Sequence[str]) -> dict[int, float]:
    """``TOKEN=BIAS`` strings (the CLI's ``--logit-bias``) as a mapping; errors name the pair."""
    bias: dict[int, float] = {}
    for pair in pairs:
        token, sep, value = pair.partition("=")
        try:
            bias[int(token)] = float(value)
        except ValueError:
            raise SamplingParamError("logit_bias", "TOKEN=BIAS pairs (an integer id, a number)", pair) from None
        if not sep:
            raise SamplingParamError("logit_bias", "TOKEN=BIAS pairs (an integer id, a number)", pair)
    return bias
