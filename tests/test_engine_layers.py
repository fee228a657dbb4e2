"""The engine's layers on their own where they carry behaviour of their own: greedy tokens read from
the batch's logits (``sampler_chain``), the token table, and a caller's emit failing in the step
loop (``scheduler``)."""

from __future__ import annotations

import queue

from outbox import finished_generations
from test_batching import _prompts
from test_engine import open_engine

from cluster.engine.sampler_chain import SamplerChains
from cluster.engine.sampling import SamplingParams
from cluster.engine.sequence import Piece
from cluster.engine.token_table import TokenTable


def test_greedy_tokens_read_from_the_batchs_logits_are_llama_cpps_greedy_samplers(tiny_model, tiny_topics):
    """The same three prompts in one batch, all plainly greedy (their tokens read from the batch's
    logits), then with the first and last greedy behind a logit bias of 0 (llama.cpp's sampler
    chain): the same answers, the middle one's read from its own row among the others."""
    prompts = _prompts(tiny_topics, 3)
    plain = SamplingParams(max_tokens=24, temperature=0.0)
    chained = plain.updated(logit_bias=((0, 0.0),))
    assert SamplerChains.is_plain_greedy(plain) and not SamplerChains.is_plain_greedy(chained)
    answers = []
    for params in ([plain, plain, plain], [chained, plain, chained]):
        with open_engine(tiny_model, n_slots=len(prompts)) as engine:
            answers.append([g.tokens for g in finished_generations(engine.submit_many(list(zip(prompts, params))))])
            assert engine.batch_stats()["decode_batch"] > 2, "the three sequences decoded together"
    assert answers[0] == answers[1]
    assert len(set(answers[0])) == len(prompts), "different prompts, different answers"


def test_the_token_table_gives_each_tokens_piece_and_end_flag_as_the_tokenizer_does(tiny_model):
    with open_engine(tiny_model) as engine:
        tokenizer = engine.tokenizer
        table = TokenTable(tokenizer)
        for _ in range(2):  # read, then kept
            assert [table.piece(t) for t in range(tokenizer.n_vocab)] == [tokenizer.piece(t) for t in range(tokenizer.n_vocab)]
            assert [table.is_eog(t) for t in range(tokenizer.n_vocab)] == [tokenizer.is_eog(t) for t in range(tokenizer.n_vocab)]
    assert any(table.is_eog(t) for t in range(tokenizer.n_vocab))


def test_an_emit_that_fails_on_a_piece_fails_its_sequence_and_the_others_go_on(tiny_model, tiny_topics):
    failing: queue.SimpleQueue = queue.SimpleQueue()

    def fails_on_the_third_piece(item: object) -> None:
        failing.put(item)
        if isinstance(item, Piece) and failing.qsize() == 3:
            raise RuntimeError("the caller went away")

    params = SamplingParams(max_tokens=16, temperature=0.0)
    prompts = _prompts(tiny_topics, 3)
    with open_engine(tiny_model, n_slots=3) as engine:
        alone = [engine.generate(p, params) for p in prompts[1:]]
        seqs = engine.submit_many([(p, params) for p in prompts], emits=[fails_on_the_third_piece, None, None])
        others = finished_generations(seqs[1:])
        items = [failing.get(timeout=60) for _ in range(4)]
        assert engine.n_running == 0
    assert [type(i) for i in items] == [Piece, Piece, Piece, RuntimeError], items
    assert [g.tokens for g in others] == [g.tokens for g in alone]
