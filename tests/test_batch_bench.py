"""``bench batch``'s parts that run without llama-server: its prompts and the engine's closed loop."""

from __future__ import annotations

from pathlib import Path

import pytest
from foreign_models import write_foreign_model

from cluster.bench import batch_bench


def test_topics_restrict_the_prompts_to_the_first_topics_in_turn(tiny_model: Path, tiny_topics) -> None:
    prompts = batch_bench.default_prompts(str(tiny_model), 6, n_topics=2)
    words = [set(topic) for topic in tiny_topics]
    for i, prompt in enumerate(prompts):
        used = set(prompt.split())
        assert used <= words[i % 2], (i, prompt)
    assert len(set(batch_bench.default_prompts(str(tiny_model), 8))) == 8
    with pytest.raises(ValueError, match=f"has {len(tiny_topics)} topics"):
        batch_bench.default_prompts(str(tiny_model), n_topics=len(tiny_topics) + 1)


def test_topics_need_a_synthetic_model(tmp_path: Path) -> None:
    model = write_foreign_model(tmp_path / "qwen.gguf", "qwen2moe")
    assert len(batch_bench.default_prompts(str(model), 3)) == 3
    with pytest.raises(ValueError, match="needs a synthetic model"):
        batch_bench.default_prompts(str(model), n_topics=2)


def test_the_engine_side_runs_with_each_variant_and_reports_a_bad_knob(tiny_model: Path) -> None:
    prompts = batch_bench.default_prompts(str(tiny_model), 4, n_topics=2)
    for knobs in (None, *batch_bench.LIMITED_VARIANTS.values()):  # the engine, and each variant of it
        run = batch_bench.run_engine(str(tiny_model), prompts, 2, cache_bytes="auto", max_tokens=8, n_threads=1,
                                     window_s=1.5, warmup_s=30, limit_bytes=None, knobs=knobs)
        assert "error" not in run, run
        assert run["tok_s"] > 0 and run["requests"] > 0 and run["decode_batch"] >= 1
    bad = batch_bench.run_engine(str(tiny_model), prompts, 2, cache_bytes="auto", max_tokens=8, n_threads=1,
                                 window_s=1, warmup_s=30, limit_bytes=None, knobs={"bogus": True})
    assert "bogus" in bad["error"]
