"""Continuous batching in MoEEngine: several sequences per llama_decode step, each on its own."""

from __future__ import annotations

import queue
import threading

import numpy as np
import observer
import pytest
from outbox import finished_generations
from polling import wait_until
from test_engine import N_CTX, N_THREADS, budget_fraction, open_engine

from cluster.engine.cache import discover_layout
from cluster.engine.moe_engine import Generation
from cluster.engine.sampling import SamplingParams
from cluster.engine.sequence import Piece
from cluster.models import synth


def _prompts(topics, n: int) -> list[str]:
    return [synth.topic_prompt(topics, i % len(topics), 6 + i, seed=30 + i) for i in range(n)]


def _refuses(call, error: type[BaseException]) -> bool:
    """Whether ``call("a")`` raises ``error`` now."""
    try:
        call("a")
    except error:
        return True
    return False


EVERY_SLOT = {"adaptive_width": False, "expert_admission": False}  # under pressure too: every sequence runs at once


def _batched(engine, prompts: list[str], max_tokens: int) -> list[Generation]:
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0)
    return finished_generations(engine.submit_many([(p, params) for p in prompts]))


def test_each_sequence_of_a_batch_gets_the_same_text_with_and_without_the_cache(tiny_model, tiny_layout, tiny_topics):
    prompts = _prompts(tiny_topics, 4)
    with open_engine(tiny_model, n_slots=4) as plain:
        expected = _batched(plain, prompts, 24)
    with open_engine(tiny_model, budget_fraction(tiny_layout, 0.4), n_slots=4, **EVERY_SLOT) as cached:
        got = _batched(cached, prompts, 24)
        stats = cached.batch_stats()
    assert [g.text for g in got] == [g.text for g in expected]
    assert [g.tokens for g in got] == [g.tokens for g in expected]
    assert stats["decode_batch"] > 3, "the four sequences decoded together"
    assert sum(g.cache["n_evictions"] for g in got) > 0, "the budget must force evictions"


def test_a_sequences_counts_in_a_batch_equal_an_independent_count_of_its_prompt_alone(tiny_model, tiny_topics):
    layout = discover_layout(str(tiny_model))
    prompts = _prompts(tiny_topics, 3)
    with open_engine(tiny_model, budget_fraction(layout, 0.4), n_slots=3, **EVERY_SLOT) as engine:
        got = _batched(engine, prompts, 10)
    for prompt, gen in zip(prompts, got):
        seen = observer.observe(tiny_model, prompt, max_tokens=10, n_layers=layout.n_layers,
                                n_experts=layout.n_experts, n_ctx=N_CTX, n_batch=512, n_threads=N_THREADS)
        assert seen.tokens == gen.tokens
        np.testing.assert_array_equal(gen.expert_counts, seen.counts)
        assert gen.cache["n_tokens_prefill"] == gen.n_prompt_tokens
        assert gen.cache["n_tokens_decode"] == gen.n_generated - 1


def test_the_sequences_shares_of_a_batch_add_up_to_what_the_cache_read(tiny_model, tiny_layout, tiny_topics):
    with open_engine(tiny_model, budget_fraction(tiny_layout, 0.3), n_slots=4, **EVERY_SLOT) as engine:
        before = engine.cache_stats()
        got = _batched(engine, _prompts(tiny_topics, 4), 16)
        after = engine.cache_stats()
    read = after["bytes_read"] - before["bytes_read"]
    shares = sum(g.cache["bytes_read"] for g in got)
    assert read > 0
    assert abs(shares - read) <= len(got), (shares, read)  # each share is rounded once
    # a unit several sequences selected in one step is read once: their own misses count it each
    assert sum(g.cache["misses"] for g in got) >= after["misses"] - before["misses"]


def test_a_long_prompt_is_prefilled_in_chunks_while_the_others_keep_decoding(tiny_model, tiny_layout, tiny_topics):
    long_prompt = synth.topic_prompt(tiny_topics, 1, 150, seed=3)
    with open_engine(tiny_model, budget_fraction(tiny_layout, 1.0), n_slots=2, n_batch=16,
                     **EVERY_SLOT) as engine:
        short = engine.submit(synth.topic_prompt(tiny_topics, 0, 4, seed=1), SamplingParams(max_tokens=40, temperature=0))
        first = short.outbox.get(timeout=60)  # decoding
        assert isinstance(first, Piece)
        long = engine.submit(long_prompt, SamplingParams(max_tokens=4, temperature=0))
        short_done, long_done = finished_generations([short])[0], finished_generations([long])[0]
    assert long_done.n_prompt_tokens > 8 * 16
    steps = long_done.trace.ubatches()
    prompt_rows = [ub[0][1].shape[0] for ub in steps][: -long_done.n_generated + 1 or None]
    assert max(prompt_rows) <= 16, "no step evaluates more than n_batch tokens"
    assert 15 in prompt_rows, "chunks of 15 prompt tokens: each step also decoded the short request's token"
    assert short_done.n_generated == 40


def test_a_cancelled_sequence_leaves_the_others_untouched(tiny_model, tiny_layout, tiny_topics):
    prompts = _prompts(tiny_topics, 3)
    with open_engine(tiny_model, budget_fraction(tiny_layout, 0.5), n_slots=3, **EVERY_SLOT) as engine:
        alone = _batched(engine, [prompts[0], prompts[2]], 20)
        engine.clear_kv()
        params = SamplingParams(max_tokens=20, temperature=0.0)
        a, b, c = engine.submit_many([(p, params) for p in prompts])
        b.cancel()
        got = finished_generations([a, c])
        while True:
            item = b.outbox.get(timeout=60)
            if not isinstance(item, Piece):
                break
    assert [g.text for g in got] == [g.text for g in alone]
    assert item.__class__.__name__ == "Cancelled"


def test_more_requests_than_slots_wait_and_all_finish(tiny_model, tiny_topics):
    with open_engine(tiny_model, n_slots=2) as engine:
        got = _batched(engine, _prompts(tiny_topics, 5), 8)
        assert engine.batch_stats()["slots"] == 2
    assert all(g.n_generated == 8 for g in got)
    assert max(g.queued_s for g in got) > 0


def test_a_conversation_keeps_its_kv_in_a_slot_or_saved_when_others_take_the_slots(tiny_model, tiny_topics):
    first = synth.topic_prompt(tiny_topics, 0, 10, seed=5)
    with open_engine(tiny_model, n_slots=1, session_bytes=64 << 20) as engine:
        turn1 = engine.generate(first, max_tokens=6, session="alice")
        engine.generate(synth.topic_prompt(tiny_topics, 2, 10, seed=6), max_tokens=6, session="bob")
        assert set(engine.sessions()) == {"alice", "bob"} and engine.saved_bytes > 0
        turn2 = engine.generate(first + turn1.text + " and then", max_tokens=6, session="alice")
    assert turn2.n_reused_tokens >= turn1.n_prompt_tokens, "alice's state was saved and restored"


def test_a_shared_prefix_is_copied_between_running_sequences(tiny_model, tiny_topics):
    prefix = synth.topic_prompt(tiny_topics, 3, 40, seed=8)
    with open_engine(tiny_model, n_slots=2) as engine:
        a = engine.submit(prefix + " one", SamplingParams(max_tokens=30, temperature=0))
        assert isinstance(a.outbox.get(timeout=60), Piece)  # a's prompt is in its slot
        b = engine.generate(prefix + " two", max_tokens=4, temperature=0)
        finished_generations([a])
    assert b.n_reused_tokens >= 40, b.n_reused_tokens


def test_sequences_from_many_threads_all_complete(tiny_model, tiny_topics):
    results: dict[int, Generation] = {}
    with open_engine(tiny_model, n_slots=4) as engine:
        def run(i: int) -> None:
            results[i] = engine.generate(synth.topic_prompt(tiny_topics, i % 4, 5, seed=i), max_tokens=12)
        threads = [threading.Thread(target=run, args=(i,)) for i in range(10)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
    assert sorted(results) == list(range(10)) and all(g.n_generated == 12 for g in results.values())


def test_closing_the_engine_ends_every_waiting_and_running_sequence(tiny_model, tiny_topics):
    from cluster.errors import EngineClosedError

    engine = open_engine(tiny_model, n_slots=1)
    running: queue.SimpleQueue = queue.SimpleQueue()

    def held_until_closed(item: object) -> None:  # the running sequence's output, on the engine's thread
        running.put(item)
        if isinstance(item, Piece):  # it cannot end before close() has begun: its step waits here until then
            wait_until(lambda: _refuses(engine.tokenize, EngineClosedError), 60, "the engine was closed")

    seqs = [engine.submit(synth.topic_prompt(tiny_topics, 0, 5, seed=0), SamplingParams(max_tokens=200),
                          emit=held_until_closed)]
    seqs += [engine.submit(synth.topic_prompt(tiny_topics, 0, 5, seed=i), SamplingParams(max_tokens=200))
             for i in (1, 2)]  # one slot: these two wait
    assert isinstance(running.get(timeout=60), Piece), "the first sequence runs"
    engine.close()
    ends = []
    for outbox in (running, seqs[1].outbox, seqs[2].outbox):
        while True:
            item = outbox.get(timeout=30)
            if not isinstance(item, Piece):
                break
        ends.append(item)
    assert [type(e) for e in ends] == [EngineClosedError] * 3, ends  # the running one and both waiting ones


@pytest.mark.parametrize("slots", [0, 300])
def test_bad_slot_counts_are_refused(tiny_model, slots):
    from cluster.errors import InvalidParameterError

    with pytest.raises(InvalidParameterError, match="n_slots"):
        open_engine(tiny_model, n_slots=slots)


def test_under_memory_pressure_the_width_adapts_and_every_request_still_finishes(tiny_model, tiny_layout, tiny_topics):
    with open_engine(tiny_model, budget_fraction(tiny_layout, 0.3), n_slots=4) as engine:
        assert engine.batch_stats()["width"] == 1, "under pressure it starts with one sequence"
        got = _batched(engine, _prompts(tiny_topics, 8), 40)
        stats = engine.batch_stats()
    assert all(g.n_generated == 40 for g in got)
    assert 1 <= stats["width"] <= 4 and stats["decode_batch"] >= 1
    with open_engine(tiny_model, int(tiny_layout.unit_bytes.sum()), n_slots=4) as roomy:
        assert roomy.batch_stats()["width"] == 4, "with every expert resident every slot is used"


@pytest.mark.parametrize("expert_admission", [True, False])
def test_under_memory_pressure_sequences_of_one_kind_run_together_and_the_others_after_them(
        tiny_model, tiny_layout, tiny_topics, expert_admission):
    def prompt(topic: int, seed: int) -> str:
        return synth.topic_prompt(tiny_topics, topic, 12, seed=seed)

    with open_engine(tiny_model, budget_fraction(tiny_layout, 0.3), n_slots=2, adaptive_width=False,
                     expert_admission=expert_admission) as engine:
        for topic in range(len(tiny_topics)):  # it learns which experts each kind of prompt selects
            _batched(engine, [prompt(topic, 1)], 8)
        a, b, a2 = _batched(engine, [prompt(1, 2), prompt(0, 3), prompt(1, 4)], 24)
        stats = engine.batch_stats()
    assert all(g.n_generated == 24 for g in (a, b, a2))
    together, apart = abs(a.queued_s - a2.queued_s), abs(a.queued_s - b.queued_s)
    if expert_admission:  # the two of topic 1 start in one step, the one of topic 0 before or after both
        assert together < 0.25 * apart and stats["reordered"] >= 1, (a.queued_s, b.queued_s, a2.queued_s)
    else:  # first come, first served: the first two start together, the third when a slot frees
        assert apart < 0.25 * together and "reordered" not in stats, (a.queued_s, b.queued_s, a2.queued_s)


def test_a_running_sequences_trace_so_far_is_a_prefix_of_its_final_one(tiny_model, tiny_layout, tiny_topics):
    from cluster.engine.cache import RoutingTrace

    with open_engine(tiny_model, budget_fraction(tiny_layout, 0.4), n_slots=2) as engine:
        seq = engine.submit(_prompts(tiny_topics, 1)[0], SamplingParams(max_tokens=32, temperature=0.0))
        assert isinstance(seq.outbox.get(timeout=60), Piece)  # its prompt is prefilled
        cache = engine._native_cache
        early = RoutingTrace.from_native(engine._call(lambda: cache.sequence_trace(seq.tag)))
        final = finished_generations([seq])[0].trace
        assert engine._call(lambda: cache.sequence_trace(seq.tag)).kind.size == 0, "taken with its result"
    n = early.kind.size
    assert 0 < n < final.kind.size
    assert np.array_equal(early.kind, final.kind[:n]) and np.array_equal(early.layer, final.layer[:n])
    assert np.array_equal(early.ids, final.ids[:early.ids.size])


def test_a_step_with_a_sequences_rows_apart_is_refused_and_the_engine_goes_on(tiny_model, tiny_layout, tiny_topics):
    with open_engine(tiny_model, budget_fraction(tiny_layout, 0.4), n_slots=2) as engine:
        cache = engine._native_cache
        with pytest.raises(ValueError, match="not contiguous"):
            engine._call(lambda: cache.begin_step(np.array([5, 6, 5], np.int32), np.ones(3, np.uint8)))
        with pytest.raises(ValueError, match="negative tag"):
            engine._call(lambda: cache.begin_step(np.array([5, -1], np.int32), np.ones(2, np.uint8)))
        got = _batched(engine, _prompts(tiny_topics, 2), 8)
    assert all(g.n_generated > 0 and g.cache["n_hits_decode"] + g.cache["n_misses_decode"] > 0 for g in got)


def test_a_requests_trace_marks_each_of_its_steps(tiny_model, tiny_layout, tiny_topics):
    from cluster.engine.cache import TRACE_STEP

    prompts = _prompts(tiny_topics, 2)
    with open_engine(tiny_model, budget_fraction(tiny_layout, 0.4), n_slots=2, **EVERY_SLOT) as engine:
        got = _batched(engine, prompts, 8)
        n_prompt = [len(engine.tokenize(p)) for p in prompts]
    for gen, n in zip(got, n_prompt):
        steps = gen.trace.steps()
        assert (gen.trace.kind == TRACE_STEP).sum() == len(steps.rows)
        assert steps.rows[~steps.decode].sum() == n, "the prompt's chunks"
        assert steps.decode.sum() == gen.n_generated - 1, "one step per generated token but the last"
        assert len(gen.trace.decode_steps()) == gen.n_generated - 1
