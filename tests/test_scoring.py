"""MoEEngine.score (cluster.engine.scoring) on the committed trained model: teacher-forced bits per
token as llama.cpp's own evaluation gives them, exact selection unchanged by a small cache budget,
no KV state left behind, and the cases it refuses."""

from __future__ import annotations

import math
from pathlib import Path

import llama_cpp
import numpy as np
import pytest

from cluster.bench.heldout_text import domain_windows
from cluster.engine.cache import discover_layout
from cluster.engine.moe_engine import MoEEngine
from cluster.engine.sampling import SamplingParams
from cluster.engine.tokenizer import Tokenizer
from cluster.errors import InvalidParameterError, PromptTooLongError
from cluster.train import corpus

TRAINED = Path(__file__).resolve().parent.parent / "trained" / "moe-5domains.gguf"
N_TOKENS = 96


@pytest.fixture(scope="module")
def snippet() -> list[int]:
    """BOS and the middle of the first held-out Python document (the corpus' rule, this machine's stdlib)."""
    tok = Tokenizer.load(str(TRAINED))
    windows, _ = domain_windows(corpus.default_sources()["python"], corpus.CorpusConfig(),
                                lambda text: tok.tokenize(text, add_special=False), tok.bos_id, 1, N_TOKENS)
    assert windows and len(windows[0]) == N_TOKENS
    return windows[0]


@pytest.fixture(scope="module")
def full_budget() -> int:
    return int(discover_layout(str(TRAINED)).unit_bytes.sum())


def _llama_bits(tokens: list[int]) -> tuple[float, np.ndarray]:
    """Mean bits per token and per-position argmax from llama-cpp-python's Llama(logits_all=True)."""
    llm = llama_cpp.Llama(model_path=str(TRAINED), n_ctx=256, logits_all=True, n_threads=1, verbose=False)
    try:
        llm.eval(tokens)
        logits = np.array(llm.scores[:len(tokens) - 1], dtype=np.float64)
    finally:
        llm.close()
    shifted = logits - logits.max(-1, keepdims=True)
    logp = shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))
    return float(-logp[np.arange(len(tokens) - 1), tokens[1:]].mean() / math.log(2)), logits.argmax(-1)


def test_score_matches_llama_cpp_python_on_held_out_text(snippet: list[int], full_budget: int) -> None:
    with MoEEngine(TRAINED, cache_bytes=full_budget, n_ctx=256, n_threads=1) as engine:
        scored = engine.score(snippet)
    assert scored.n_scored == N_TOKENS - 1
    assert scored.log2_probs.dtype == np.float64 and np.all(scored.log2_probs <= 0)
    assert math.isfinite(scored.bits_per_token) and scored.bits_per_token > 0
    bits, argmax = _llama_bits(snippet)
    assert scored.bits_per_token == pytest.approx(bits, abs=0.01)
    assert np.mean(scored.argmax == argmax) >= 0.95  # one token per step against one batch: F16 near-ties
    assert scored.seconds > 0 and scored.tok_s > 0
    assert scored.cache["n_steps"] == N_TOKENS - 1  # one step per token evaluated


def test_exact_selection_is_unchanged_by_a_small_budget_that_reads_experts(snippet: list[int],
                                                                          full_budget: int) -> None:
    with MoEEngine(TRAINED, cache_bytes=full_budget, n_ctx=256, n_threads=1) as engine:
        full = engine.score(snippet)
    with MoEEngine(TRAINED, cache_bytes=full_budget // 3, n_ctx=256, n_threads=1) as engine:
        small = engine.score(snippet)
    assert small.bytes_read > 0
    assert small.cache["n_misses_decode"] > 0
    assert np.array_equal(small.log2_probs, full.log2_probs)
    assert np.array_equal(small.argmax, full.argmax)


def test_score_leaves_no_kv_state_and_keeps_the_slots_conversations(snippet: list[int], full_budget: int) -> None:
    with MoEEngine(TRAINED, cache_bytes=full_budget, n_ctx=256, n_slots=2, n_threads=1) as engine:
        first = engine.generate("def main():\n", max_tokens=8, session="s")
        held = engine.held_tokens()
        once = engine.score(snippet)
        memory = engine._llama.ctx.memory
        positions = [int(llama_cpp.llama_memory_seq_pos_max(memory, s)) for s in range(2)]
        assert sorted(positions) == [-1, len(held[0]) - 1]  # the scoring's slot is empty again
        assert engine.held_tokens() == held
        again = engine.generate("def main():\n", max_tokens=8, session="s")
        assert again.n_reused_tokens > 0 and again.tokens == first.tokens
        twice = engine.score(snippet)
    assert np.array_equal(once.log2_probs, twice.log2_probs)


def test_score_refuses_what_it_cannot_measure(snippet: list[int], full_budget: int) -> None:
    with MoEEngine(TRAINED, cache_bytes=full_budget, n_ctx=128, n_threads=1) as engine:
        with pytest.raises(PromptTooLongError, match="128"):
            engine.score(list(snippet) * 2)
        with pytest.raises(InvalidParameterError, match="two tokens"):
            engine.score(snippet[:1])
        with pytest.raises(InvalidParameterError, match="not a token id"):
            engine.score([snippet[0], engine.tokenizer.n_vocab])
        no_end = tuple((t, -100.0) for t in range(engine.tokenizer.n_vocab) if engine.tokenizer.is_eog(t))
        seq = engine.submit("import os\n", SamplingParams(max_tokens=120, logit_bias=no_end))
        seq.outbox.get()  # its first piece: the request runs
        try:
            with pytest.raises(RuntimeError, match="requests run"):
                engine.score(snippet)
        finally:
            seq.cancel()
