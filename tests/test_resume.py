"""An answer continued by another engine (``sequence.Resume``): the seam is invisible.

A node that dies while streaming leaves its caller with the pieces it sent and the tokens they
carried; another node continues from there. Here the "other node" is a second call on a real
engine: for every place the first stream could have been cut, the text before the cut plus the
continuation's text must equal the undisturbed answer, the tokens and usage must count each token
once, and the finish reason must be the same.
"""

from __future__ import annotations

import pytest
from test_engine import open_engine

from cluster.models import synth
from cluster.engine.moe_engine import Generation
from cluster.errors import InvalidParameterError, PromptTooLongError
from cluster.engine.sampling import SamplingParams
from cluster.engine.sequence import Piece, Resume


@pytest.fixture(scope="module")
def engine(tiny_model):
    with open_engine(tiny_model, n_slots=2) as e:
        yield e


def _run(engine, prompt: str, params: SamplingParams, resume: Resume | None = None) -> tuple[list[Piece], Generation]:
    stream = engine.pieces(prompt, params, resume=resume)
    pieces = []
    while True:
        try:
            pieces.append(next(stream))
        except StopIteration as done:
            return pieces, done.value


def _resume_after(pieces: list[Piece]) -> Resume:
    return Resume(tuple(t for p in pieces for t in p.tokens), sum(len(p.text) for p in pieces))


@pytest.mark.parametrize("case", ["plain", "stop_string", "logprobs", "penalties"])
def test_a_greedy_answer_resumed_after_any_piece_is_the_undisturbed_answer(engine, tiny_topics, case: str) -> None:
    prompt = synth.topic_prompt(tiny_topics, 1, 8, seed=5)
    params = SamplingParams(max_tokens=40, temperature=0.0)
    whole_pieces, whole = _run(engine, prompt, params)
    if case == "stop_string":  # a stop string that ends the answer part way: text before it is held back
        params = SamplingParams(max_tokens=40, temperature=0.0, stop=(whole.text[25:29],))
    elif case == "logprobs":
        params = SamplingParams(max_tokens=40, temperature=0.0, logprobs=True, top_logprobs=2)
    elif case == "penalties":  # the sampler's history must include the resumed tokens
        params = SamplingParams(max_tokens=40, temperature=0.0, repeat_penalty=1.5, penalty_last_n=64)
    if case != "plain":
        whole_pieces, whole = _run(engine, prompt, params)
    assert len(whole_pieces) >= 3 and sum(len(p.tokens) for p in whole_pieces) == whole.n_generated
    for cut in range(1, len(whole_pieces)):
        kept = whole_pieces[:cut]
        rest, gen = _run(engine, prompt, params, _resume_after(kept))
        assert "".join(p.text for p in kept + rest) == whole.text, cut
        assert gen.tokens == whole.tokens and gen.finish_reason == whole.finish_reason, cut
        assert gen.n_prompt_tokens - gen.n_resumed == whole.n_prompt_tokens, cut
        assert [t for p in kept + rest for t in p.tokens] == list(whole.tokens), cut
        if case == "logprobs":
            entries = [e for p in kept + rest for e in p.logprobs]
            assert [e.token for e in entries] == list(whole.tokens), cut
            assert [round(e.logprob, 4) for e in entries] == [round(e.logprob, 4) for e in whole.logprobs], cut


def test_an_answer_resumed_with_its_whole_budget_ends_at_once(engine, tiny_topics) -> None:
    prompt = synth.topic_prompt(tiny_topics, 2, 8, seed=6)
    params = SamplingParams(max_tokens=12, temperature=0.0)
    _, whole = _run(engine, prompt, params)
    assert whole.finish_reason == "length"
    rest, gen = _run(engine, prompt, params, Resume(whole.tokens, len(whole.text)))
    assert "".join(p.text for p in rest) == "" and gen.text == whole.text and gen.tokens == whole.tokens
    assert gen.finish_reason == "length"


def test_text_sent_beyond_the_final_tokens_is_not_sent_again(engine, tiny_topics) -> None:
    """A piece may carry text of a token that was not final yet (a stop string could still have
    cut it): the caller has that text but not the token; the continuation makes the token again
    and sends only what follows."""
    prompt = synth.topic_prompt(tiny_topics, 1, 8, seed=5)
    params = SamplingParams(max_tokens=30, temperature=0.0)
    _, whole = _run(engine, prompt, params)
    for n_tokens in (3, 10):
        text = b"".join(engine.tokenizer.piece(t) for t in whole.tokens[:n_tokens]).decode("utf-8", "replace")
        for extra in (1, 3):
            sent = min(len(whole.text), len(text) + extra)
            rest, gen = _run(engine, prompt, params, Resume(whole.tokens[:n_tokens], sent))
            assert whole.text[:sent] + "".join(p.text for p in rest) == whole.text
            assert gen.tokens == whole.tokens


def test_a_bad_resume_is_refused_before_anything_runs(engine, tiny_topics) -> None:
    prompt = synth.topic_prompt(tiny_topics, 0, 8, seed=7)
    params = SamplingParams(max_tokens=8, temperature=0.0)
    _, whole = _run(engine, prompt, params)
    assert whole.text[:2]
    with pytest.raises(InvalidParameterError, match="sent_chars"):
        engine.pieces(prompt, params, resume=Resume(whole.tokens[:4], 0))  # the caller has less than its tokens' text
    with pytest.raises(InvalidParameterError, match="max_tokens"):
        engine.pieces(prompt, SamplingParams(max_tokens=1), resume=Resume(whole.tokens[:2], 0))
    with pytest.raises(InvalidParameterError, match="ids in"):
        engine.pieces(prompt, params, resume=Resume((-1,), 0))
    with pytest.raises(PromptTooLongError):
        engine.pieces(prompt, SamplingParams(max_tokens=256), resume=Resume((whole.tokens[0],) * 255, 0))
