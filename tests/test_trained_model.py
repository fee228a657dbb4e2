"""The committed trained model (trained/moe-5domains.gguf) loads and generates in llama.cpp; no torch needed."""

from __future__ import annotations

from pathlib import Path

import llama_cpp
import pytest

from cluster.engine.cache import discover_layout

TRAINED = Path(__file__).resolve().parent.parent / "trained" / "moe-5domains.gguf"


@pytest.fixture(scope="module")
def llm() -> llama_cpp.Llama:
    assert TRAINED.exists(), f"the committed model {TRAINED} is missing"
    model = llama_cpp.Llama(model_path=str(TRAINED), n_ctx=256, n_threads=2, verbose=False)
    yield model
    model.close()


def test_trained_model_is_a_qwen3moe_with_64_experts_top_4() -> None:
    layout = discover_layout(str(TRAINED))
    assert layout.n_layers == 6
    assert layout.n_experts == 64
    assert layout.n_experts_used == 4


def test_trained_model_is_smaller_than_64_mib() -> None:
    assert TRAINED.stat().st_size < 64 * 2**20


def test_trained_model_continues_python_code(llm: llama_cpp.Llama) -> None:
    out = llm.create_completion("import os\nimport sys\n\n\ndef main(", max_tokens=24, temperature=0.0)
    text = out["choices"][0]["text"]
    assert out["usage"]["completion_tokens"] > 0
    assert text.strip(), "greedy continuation is empty"


def test_trained_model_tokenizes_with_bos_and_round_trips_text(llm: llama_cpp.Llama) -> None:
    text = "Die Datei wurde nicht gefunden.\n#include <stdio.h>\n"
    ids = llm.tokenize(text.encode(), add_bos=True, special=False)
    assert ids[0] == llm.token_bos()
    assert llm.detokenize(ids[1:]).decode() == text
    assert len(ids) < len(text)  # subwords, not bytes
