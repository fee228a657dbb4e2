"""The engine on MoE architectures the project's generator does not write (``foreign_models``):
discovery, text unchanged by the cache, routing counts against the independent observer."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import observer
import pytest
from foreign_models import ARCHS, DENSE_LAYERS, N_LAYERS, SHAPES, write_foreign_model

from cluster.engine.cache import discover_layout
from cluster.engine.moe_engine import MoEEngine

PROMPT = " the test is this: a model nobody here trained, tested as it comes"
N_CTX, N_THREADS, N_BATCH = 256, 2, 16


@pytest.fixture(scope="module", params=ARCHS)
def foreign(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[str, Path]:
    arch = request.param
    return arch, write_foreign_model(tmp_path_factory.mktemp("foreign") / f"{arch}.gguf", arch)


def test_discovery_finds_the_experts_of_every_moe_layer_and_none_in_dense_ones(foreign: tuple[str, Path]) -> None:
    arch, path = foreign
    layout = discover_layout(str(path))
    n_experts, top_k = SHAPES[arch]
    assert (layout.n_layers, layout.n_experts, layout.n_experts_used) == (N_LAYERS, n_experts, top_k)
    dense = DENSE_LAYERS.get(arch, 0)
    assert not layout.unit_bytes[:dense].any() and (layout.unit_bytes[dense:] > 0).all()


def test_text_is_unchanged_by_the_cache_and_its_counts_match_the_observer(foreign: tuple[str, Path]) -> None:
    arch, path = foreign
    layout = discover_layout(str(path))
    with MoEEngine(path, None, n_ctx=N_CTX, n_threads=N_THREADS, n_batch=N_BATCH) as plain:
        expected = plain.generate(PROMPT, max_tokens=24)
    with MoEEngine(path, int(layout.unit_bytes.sum()) // 3, n_ctx=N_CTX, n_threads=N_THREADS, n_batch=N_BATCH) as engine:
        result = engine.generate(PROMPT, max_tokens=24)
    assert result.tokens == expected.tokens and result.text == expected.text
    assert result.cache["hits"] + result.cache["misses"] > 0
    seen = observer.observe(path, PROMPT, max_tokens=24, n_layers=layout.n_layers, n_experts=layout.n_experts,
                            n_ctx=N_CTX, n_batch=N_BATCH, n_threads=N_THREADS)
    assert seen.tokens == result.tokens
    np.testing.assert_array_equal(result.expert_counts, seen.counts)
    dense = DENSE_LAYERS.get(arch, 0)
    assert not result.expert_counts[:dense].any() and result.expert_counts[dense:].sum(axis=1).min() > 0
