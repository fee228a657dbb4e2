"""Batching and sessions on each synthetic MoE family (``cluster.models.synth_families``).

1. Four slots decoding together give, at temperature 0, the same tokens as each prompt alone in a
   one-slot engine. Their log-probabilities are not bit-equal: a step's ubatch holds several
   sequences, so llama.cpp's matrix products run on other shapes (other kernels, other chunking of
   the quantised activations) and attention reads a unified KV buffer of another size with other
   cells masked; the sums are the same terms in another order. Measured on the ``tiny`` preset
   (2 threads): 1e-6 to 3e-5 per token, 9e-4 on glm4moe (sigmoid scores with a selection bias, the
   most sensitive); the tolerance asserted is ``LOGPROB_TOLERANCE``. No family's greedy text differs.
2. Memory that cannot be cut at any position (``cluster.engine.kv_state.MemoryRule``): gpt-oss's
   sliding-window layers (window 128) with ``swa_full=False`` keep about a window per slot, so a held
   prefix ending less than a window after the cache's first position is recomputed, not reused
   (reusing it attends to a window with holes: the log-probabilities move, 8e-4 here, though the
   synthetic text does not); a second turn gives the same tokens and bit-equal log-probabilities as
   the whole conversation evaluated fresh, the reuse counters say which happened, and the prefixes
   the node reports to the router are only those a matching prompt really reuses. With the default
   ``swa_full=True`` (llama.cpp's C default) nothing is dropped and gpt-oss reuses as full attention
   does. Llama 4's chunked attention has a chunk of 8192 (llama.cpp's default: the file sets none),
   beyond these contexts: it reuses as full attention. Recurrent state (qwen3next, qwen35moe: hybrid
   blocks) serves its whole length only: a turn that extends the conversation reuses it (kept,
   copied or restored), any other prefix is recomputed, and no prefix block is reported.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
from outbox import finished_generations

from cluster.engine.generation import Generation
from cluster.engine.kv_slots import KvSlots
from cluster.engine.moe_engine import MoEEngine
from cluster.engine.prefix import PREFIX_BLOCK, held_prefixes, prefix_hashes, servable_prefixes
from cluster.engine.sampling import SamplingParams
from cluster.engine.sequence import Piece
from cluster.models import synth
from cluster.models.synth_config import ARCHS

N_THREADS = 2
N_SEQ = 4
LOGPROB_TOLERANCE = 5e-3  # batched vs alone, per token (module docstring, 1.)
MEMORY_KIND = {arch: "full" for arch in ARCHS} | {"gpt-oss": "sliding-window", "llama4": "sliding-window",
                                                 "qwen3next": "recurrent", "qwen35moe": "recurrent"}


@pytest.fixture(scope="module")
def family_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("family_batching")
    return {arch: synth.synthesize(out / f"{arch}.gguf", dataclasses.replace(synth.PRESETS["tiny"], arch=arch),
                                   progress=False).path for arch in ARCHS}


@pytest.mark.parametrize("arch", ARCHS)
def test_four_slots_give_each_prompt_the_text_of_one_slot_at_temperature_0(family_files, arch: str) -> None:
    path = family_files[arch]
    topics = synth.read_topics(path)
    prompts = [synth.topic_prompt(topics, i % len(topics), 6 + 3 * i, seed=30 + i) for i in range(N_SEQ)]
    params = SamplingParams(max_tokens=24, temperature=0.0, logprobs=True)
    with MoEEngine(path, None, n_ctx=256, n_threads=N_THREADS, n_slots=1, n_batch=64) as one:
        alone = []
        for prompt in prompts:
            alone.append(one.generate(prompt, params))
            one.clear_kv()
    with MoEEngine(path, None, n_ctx=256, n_threads=N_THREADS, n_slots=N_SEQ, n_batch=64) as engine:
        assert engine.memory_kind == MEMORY_KIND[arch]
        together = finished_generations(engine.submit_many([(p, params) for p in prompts]))
        stats = engine.batch_stats()
    assert stats["decode_batch"] > N_SEQ - 0.5, "the four sequences decoded together"
    for a, b in zip(alone, together):
        assert b.tokens == a.tokens and b.text == a.text
        worst = max(abs(x.logprob - y.logprob) for x, y in zip(a.logprobs, b.logprobs))
        assert worst <= LOGPROB_TOLERANCE, (arch, worst)


# -- memory that cannot be cut anywhere ------------------------------------------------------------

LONG = dict(n_ctx=1024, n_threads=N_THREADS, n_slots=1, n_batch=16)  # the window cache: 256 cells of 1024


def _conversation(path: Path) -> tuple[str, str]:
    """A first prompt (111 tokens on the tiny vocabulary) and the start of what follows it."""
    topics = synth.read_topics(path)
    return synth.topic_prompt(topics, 0, 110, seed=3), " and then " + synth.topic_prompt(topics, 1, 10, seed=4)


def _fresh(path: Path, prompt: str, **kwargs) -> Generation:
    with MoEEngine(path, None, **{**LONG, **kwargs}) as engine:
        result = engine.generate(prompt, max_tokens=16, temperature=0, logprobs=True)
        assert engine.reuse_stats()["reused"] == 0
        return result


def _same(got: Generation, fresh: Generation, exact: bool) -> None:
    assert got.tokens == fresh.tokens and got.text == fresh.text
    diffs = [abs(x.logprob - y.logprob) for x, y in zip(got.logprobs, fresh.logprobs)]
    assert max(diffs) == 0.0 if exact else max(diffs) <= LOGPROB_TOLERANCE, diffs


def _router_view_is_true(engine: MoEEngine, prompt: str) -> tuple[int, bool]:
    """The longest block of ``prompt`` the engine reports (what the router would count as held) and
    whether it is one the engine really reuses: its end, less the last token, reaches min_reuse."""
    reported = set(engine.held_prefixes())
    hashes = prefix_hashes(engine.tokenize(prompt))
    matched = max((i + 1 for i, h in enumerate(hashes) if h in reported), default=0) * PREFIX_BLOCK
    servable = engine._kv.servable()
    return matched, all(matched - 1 >= m for _, m in servable) if matched else True


def test_gpt_oss_with_a_window_cache_recomputes_a_second_turn_whose_prefix_the_window_dropped(family_files) -> None:
    """The first turn's answer (200 tokens) pushes the window cache past the prompt's start; the next
    turn drops that answer (as gpt-oss's chat template drops a turn's analysis), so it shares the
    first 111 tokens only, of which the window layers no longer hold the end's window: recomputed."""
    path = family_files["gpt-oss"]
    first, more = _conversation(path)
    with MoEEngine(path, None, **LONG, swa_full=False) as engine:
        one = engine.generate(first, max_tokens=200, temperature=0, session="a")
        (held, min_reuse), = engine._kv.servable()
        assert len(held) == one.n_prompt_tokens + 199 and min_reuse > len(engine.tokenize(first)), min_reuse
        reported = engine.held_prefixes()
        assert set(reported) < set(held_prefixes([held])), "the blocks before the window are not reported"
        assert not set(prefix_hashes(engine.tokenize(first))) & set(reported)
        second = engine.generate(first + more, max_tokens=16, temperature=0, logprobs=True, session="a")
        stats = engine.reuse_stats()
    assert second.n_reused_tokens == 0
    assert stats["recomputed"] == 1 and stats["recomputed_tokens"] >= 110 and stats["reused"] == 0, stats
    _same(second, _fresh(path, first + more, swa_full=False), exact=True)


def test_gpt_oss_with_a_window_cache_reuses_a_second_turn_that_continues_the_whole_first(family_files) -> None:
    path = family_files["gpt-oss"]
    first, more = _conversation(path)
    with MoEEngine(path, None, **LONG, swa_full=False) as engine:
        one = engine.generate(first, max_tokens=200, temperature=0, session="a")
        follow = first + one.text + more
        matched, true = _router_view_is_true(engine, follow)
        assert matched >= 256 and true, "the router sees the conversation's late blocks, which the node reuses"
        second = engine.generate(follow, max_tokens=16, temperature=0, logprobs=True, session="a")
        stats = engine.reuse_stats()
    assert second.n_reused_tokens >= matched and stats["reused"] == 1 and stats["recomputed"] == 0, stats
    _same(second, _fresh(path, follow, swa_full=False), exact=False)


def test_gpt_oss_with_a_window_cache_saves_and_restores_a_conversation_and_copies_only_what_it_serves(
        family_files) -> None:
    """Alice's state is saved when Bob takes the one slot and restored for her next turn (the
    window's positions travel with it); Bob's prompt sharing only Alice's early tokens is recomputed."""
    path = family_files["gpt-oss"]
    first, more = _conversation(path)
    with MoEEngine(path, None, **LONG, swa_full=False, session_bytes=64 << 20) as engine:
        one = engine.generate(first, max_tokens=200, temperature=0, session="alice")
        bob = engine.generate(first + " but bob", max_tokens=8, temperature=0, session="bob")
        assert bob.n_reused_tokens == 0 and set(engine.sessions()) == {"alice", "bob"}
        follow = first + one.text + more
        second = engine.generate(follow, max_tokens=16, temperature=0, logprobs=True, session="alice")
        stats = engine.reuse_stats()
    assert second.n_reused_tokens >= len(one.tokens) + 100, "alice's saved state was restored and reused"
    assert stats["requests"] == 3 and stats["reused"] == 1 and stats["recomputed"] == 1, stats  # bob recomputed
    _same(second, _fresh(path, follow, swa_full=False), exact=False)


def test_gpt_oss_with_its_full_window_cache_and_a_full_attention_family_reuse_the_prefix(family_files) -> None:
    for arch, kwargs in (("gpt-oss", {}), ("qwen3moe", {}), ("llama4", {})):
        path = family_files[arch]
        first, more = _conversation(path)
        with MoEEngine(path, None, **LONG, **kwargs) as engine:
            engine.generate(first, max_tokens=200, temperature=0, session="a")
            (held, min_reuse), = engine._kv.servable()
            assert min_reuse == 0 and engine.held_prefixes() == held_prefixes([held]), arch
            second = engine.generate(first + more, max_tokens=16, temperature=0, logprobs=True, session="a")
            stats = engine.reuse_stats()
            n_first = len(engine.tokenize(first))
        assert second.n_reused_tokens == n_first and stats["recomputed"] == 0, (arch, stats)
        _same(second, _fresh(path, first + more, **kwargs), exact=False)


def test_a_prefix_copy_between_running_slots_skips_a_window_the_source_dropped(family_files) -> None:
    path = family_files["gpt-oss"]
    first, more = _conversation(path)
    params = SamplingParams(max_tokens=520, temperature=0)
    with MoEEngine(path, None, **{**LONG, "n_slots": 2}, swa_full=False) as engine:
        a = engine.submit(first, params)
        n = 0
        while n < 480:  # a decodes past the window cache (2 slots: 512 cells): it drops the prompt's start
            item = a.outbox.get(timeout=120)
            assert isinstance(item, Piece)
            n += len(item.tokens)
        b = engine.generate(first + more, max_tokens=16, temperature=0, logprobs=True)
        finished_generations([a])
        stats = engine.reuse_stats()
    assert b.n_reused_tokens == 0 and stats["recomputed"] >= 1, stats
    _same(b, _fresh(path, first + more, swa_full=False), exact=False)


# -- recurrent state: Qwen3-Next's hybrid blocks (gated delta net state, every fourth block attention) ----

RECURRENT = [arch for arch in ("qwen3next", "qwen35moe") if arch in ARCHS]


@pytest.mark.parametrize("arch", RECURRENT)
def test_a_hybrid_model_reuses_its_whole_state_only_and_reports_no_prefix(family_files, arch: str) -> None:
    """Its recurrent state is at its last position only: a second turn that drops the first answer is
    recomputed (llama.cpp's seq_rm cannot cut it), one that extends the whole conversation reuses it,
    from its slot or restored after another conversation took the slot; the router is told no prefix
    block (a prompt matching one shares it, not necessarily the state's whole length)."""
    path = family_files[arch]
    first, more = _conversation(path)
    kwargs = {**LONG, "session_bytes": 64 << 20}
    with MoEEngine(path, None, **kwargs) as engine:
        assert engine.memory_kind == "recurrent"
        one = engine.generate(first, max_tokens=50, temperature=0, session="alice")
        (held, min_reuse), = engine._kv.servable()
        assert min_reuse == len(held) and engine.held_prefixes() == ()
        dropped = engine.generate(first + more, max_tokens=16, temperature=0, logprobs=True, session="alice")
        assert dropped.n_reused_tokens == 0 and engine.reuse_stats()["recomputed"] == 1
        two = engine.generate(first + one.text, max_tokens=50, temperature=0, session="alice")
        engine.generate(more, max_tokens=8, temperature=0, session="bob")  # alice's state is saved
        follow = first + one.text + two.text + more
        restored = engine.generate(follow, max_tokens=16, temperature=0, logprobs=True, session="alice")
        stats = engine.reuse_stats()
    assert restored.n_reused_tokens >= len(one.tokens) + len(two.tokens) + 100 and stats["reused"] == 1, stats
    _same(dropped, _fresh(path, first + more), exact=True)
    _same(restored, _fresh(path, follow), exact=False)


# -- recurrent state: the placement rule alone ---------------------------------------------------------

def test_a_state_that_serves_its_whole_length_only_is_reused_by_a_prompt_that_extends_it_and_reported_nowhere():
    kv = KvSlots(2, session_bytes=1 << 20)
    held = list(range(70))
    placement = kv.place(held, None)
    kv.occupy(placement, held, None)
    placement.slot.tokens = list(held)  # the engine's steps evaluated them
    kv.release(placement.slot, keep=True)
    placement.slot.min_reuse = len(held)  # kv_state.MemoryRule for a recurrent model: pos_max + 1
    extends = kv.place(held + [1000, 1001], None)
    assert extends.n_reused == 70
    shorter = kv.place(held[:40] + [1000, 1001], None)
    assert shorter.n_reused == 0 and shorter.n_held == 40, "the state at position 69 cannot serve 40 tokens"
    assert servable_prefixes(kv.servable()) == (), "no block of it is a prefix a matching prompt reuses"
    placement.slot.min_reuse = 0
    assert servable_prefixes(kv.servable()) == held_prefixes([held])
