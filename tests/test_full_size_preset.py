"""The `qwen3-30b-a3b` preset: Qwen3-30B-A3B's whole layout in the types llama.cpp's quantizer gives a Q4_K_M
file (or, with dtype q8_0, a Q8_0 file). The full 18 GB (or 32 GB) file is never written here: the same layout
with two layers (real widths, 128 experts, 151,936 tokens) is, and llama.cpp loads and runs it; each tensor's
type equals the Q4_K_M rule as src/llama-quant.cpp states it (recomputed here), or Q8_0 for every matrix but
the router; discovery's counts and the cache's selection counts equal an independent count (the gguf package's
header, the observer's top-k tensors)."""

from __future__ import annotations

import dataclasses
import re

import gguf
import numpy as np
import observer
import pytest
from test_synth_routing import agreement

from cluster.engine.cache import discover_layout
from cluster.engine.moe_engine import MoEEngine
from cluster.models import synth
from cluster.models.synth_config import SLIDING_WINDOW_ROUTING
from cluster.models.synth_routing import decode_selections
from cluster.models.synth_weights import Plan

N_CTX, N_THREADS, N_BATCH, N_TOKENS = 128, 2, 16, 6
Q4_K, Q6_K, Q8_0 = gguf.GGMLQuantizationType.Q4_K, gguf.GGMLQuantizationType.Q6_K, gguf.GGMLQuantizationType.Q8_0
F32 = gguf.GGMLQuantizationType.F32
FULL = synth.PRESETS["qwen3-30b-a3b"]


@pytest.fixture(scope="module")
def two_layers(tmp_path_factory: pytest.TempPathFactory) -> synth.SynthInfo:
    config = dataclasses.replace(FULL, n_layers=2)
    return synth.synthesize(tmp_path_factory.mktemp("full") / "qwen3-30b-a3b-2L.gguf", config, progress=False)


@pytest.fixture(scope="module")
def two_layers_q8_0(tmp_path_factory: pytest.TempPathFactory) -> synth.SynthInfo:
    config = synth.config_from_args("qwen3-30b-a3b", layers=2, dtype="q8_0")
    return synth.synthesize(tmp_path_factory.mktemp("full-q8") / "qwen3-30b-a3b-2L-q8_0.gguf", config, progress=False)


def _rule(name: str, n_layers: int) -> gguf.GGMLQuantizationType:
    """llama.cpp's Q4_K_M choice (llama_tensor_get_type_impl, n_expert 128): output -> Q6_K; attn_v (i-th in
    file order) and ffn_down (layer from the name) -> Q6_K where use_more_bits(i, n); else the Q4_K default."""
    def use_more_bits(i: int, n: int) -> bool:
        return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2

    if name == "output.weight":
        return Q6_K
    m = re.fullmatch(r"blk\.(\d+)\.(attn_v|ffn_down_exps)\.weight", name)
    if m and use_more_bits(int(m.group(1)), n_layers):
        return Q6_K
    return Q4_K


def test_the_preset_is_qwen3_30b_a3b() -> None:
    assert (FULL.arch, FULL.n_layers, FULL.n_embd, FULL.n_head, FULL.n_head_kv, FULL.n_experts,
            FULL.n_experts_used, FULL.n_ff, FULL.n_vocab, FULL.rope_freq_base, FULL.dtype) == (
        "qwen3moe", 48, 2048, 32, 4, 128, 8, 768, 151936, 1e6, "q4_k_m")
    routing = {name: getattr(FULL, name) for name in SLIDING_WINDOW_ROUTING}
    assert routing == SLIDING_WINDOW_ROUTING  # calibrated: tests/test_synth_routing.py
    assert FULL.head_dim == 128 and FULL.n_head * FULL.head_dim == 4096  # wider than the residual, as published
    # the 48-layer rule: Q6_K in layers 0-5, 42-47 and every third between (8, 11, ..., 41): 24 of 48
    more = [il for il in range(48) if _rule(f"blk.{il}.attn_v.weight", 48) == Q6_K]
    assert more == [*range(6), *range(8, 42, 3), *range(42, 48)] and len(more) == 24


def test_two_layers_have_the_layout_and_the_q4_k_m_types(two_layers: synth.SynthInfo) -> None:
    reader = gguf.GGUFReader(two_layers.path)
    tensors = {t.name: t for t in reader.tensors}
    n = 2
    for name, t in tensors.items():
        if t.name.endswith("norm.weight") or ".ffn_gate_inp." in name:
            assert t.tensor_type == F32, name
        else:
            assert t.tensor_type == _rule(name, n), (name, t.tensor_type.name)
    assert tensors["blk.1.attn_v.weight"].tensor_type == Q6_K and tensors["blk.0.attn_v.weight"].tensor_type == Q4_K
    assert tensors["blk.1.ffn_down_exps.weight"].tensor_type == Q6_K
    assert tensors["token_embd.weight"].tensor_type == Q4_K and tensors["output.weight"].tensor_type == Q6_K
    assert list(tensors["token_embd.weight"].shape) == [2048, 151936]
    assert list(tensors["blk.0.attn_q.weight"].shape) == [2048, 4096]
    assert list(tensors["blk.0.attn_k.weight"].shape) == [2048, 512]
    assert list(tensors["blk.0.attn_q_norm.weight"].shape) == [128]
    assert list(tensors["blk.0.ffn_down_exps.weight"].shape) == [768, 2048, 128]
    assert list(tensors["blk.0.ffn_gate_exps.weight"].shape) == [2048, 768, 128]
    fields = reader.fields
    assert float(fields["qwen3moe.rope.freq_base"].parts[-1][0]) == 1e6
    assert int(fields["qwen3moe.expert_feed_forward_length"].parts[-1][0]) == 768
    assert int(fields["qwen3moe.attention.key_length"].parts[-1][0]) == 128
    assert int(fields["qwen3moe.attention.value_length"].parts[-1][0]) == 128
    assert list(tensors["blk.0.attn_output.weight"].shape) == [4096, 2048]
    assert len(fields["tokenizer.ggml.tokens"].data) == 151936
    # Q6_K and Q4_K experts both have the planned deviation of ffn_down, and mean 0
    plan_std = Plan(two_layers.config).down_std
    for il, qtype in ((1, Q6_K), (0, Q4_K)):
        down = gguf.quants.dequantize(tensors[f"blk.{il}.ffn_down_exps.weight"].data[0], qtype)
        assert abs(down.mean()) < 0.02 * down.std(), il
        assert abs(down.std() / plan_std - 1) < 0.02, (il, down.std(), plan_std)


def test_llama_cpp_runs_it_and_discovery_and_the_cache_agree_with_independent_counts(
        two_layers: synth.SynthInfo) -> None:
    path = two_layers.path
    config = two_layers.config
    layout = discover_layout(str(path))
    assert (layout.arch, layout.n_layers, layout.n_experts, layout.n_experts_used) == ("qwen3moe", 2, 128, 8)
    unit = np.zeros((2, 128), dtype=np.int64)
    experts = []
    for t in gguf.GGUFReader(path).tensors:
        if "_exps." in t.name:
            experts.append(t.name)
            unit[int(t.name.split(".")[1])] += int(t.n_bytes) // 128
    assert sorted(layout.expert_tensors) == sorted(experts) and len(experts) == 6
    assert layout.expert_bytes == int(unit.sum()) == two_layers.expert_bytes
    for il in range(2):
        for e in (0, 127):
            assert sum(size for _, size, _, _ in layout.unit_slices(il, e)) == unit[il, e]
    assert unit[1, 0] > unit[0, 0]  # layer 1's ffn_down_exps is Q6_K

    prompt = synth.topic_prompt(synth.read_topics(path), 1, 8, seed=0)
    budget = int(layout.unit_bytes.sum()) // 3
    with MoEEngine(path, budget, n_ctx=N_CTX, n_threads=N_THREADS, n_batch=N_BATCH) as engine:
        result = engine.generate(prompt, max_tokens=N_TOKENS)
    assert len(result.tokens) == N_TOKENS
    topic = set(synth.read_topics(path)[1])
    words = result.text.split()
    assert words and sum(w in topic for w in words) >= 0.8 * len(words), result.text
    # the routing computed from the routers (cluster.models.synth_routing, which calibrated the preset) is llama.cpp's
    assert agreement(result.trace.decode_steps(), result.tokens, decode_selections(Plan(config))) > 0.9
    seen = observer.observe(path, prompt, max_tokens=N_TOKENS, n_layers=config.n_layers,
                            n_experts=config.n_experts, n_ctx=N_CTX, n_batch=N_BATCH, n_threads=N_THREADS)
    assert seen.tokens == result.tokens
    np.testing.assert_array_equal(result.expert_counts, seen.counts)
    per_layer = seen.counts.sum(axis=1)  # the last layer computes only the rows whose logits are read
    assert (per_layer > 0).all() and (per_layer % 8 == 0).all() and per_layer[1] == 8 * N_TOKENS, per_layer


def test_q8_0_two_layers_have_every_matrix_in_q8_0_and_llama_cpp_generates_with_them(
        two_layers_q8_0: synth.SynthInfo) -> None:
    path = two_layers_q8_0.path
    tensors = {t.name: t for t in gguf.GGUFReader(path).tensors}
    for name, t in tensors.items():  # llama.cpp's quantizer keeps norms and the router (ffn_gate_inp) F32
        expected = F32 if name.endswith("norm.weight") or ".ffn_gate_inp." in name else Q8_0
        assert t.tensor_type == expected, (name, t.tensor_type.name)
    assert {"token_embd.weight", "output.weight", "blk.1.ffn_down_exps.weight", "blk.1.attn_v.weight"} <= set(tensors)
    assert list(tensors["blk.0.ffn_down_exps.weight"].shape) == [768, 2048, 128]
    # the experts have the planned deviation and mean 0
    plan_std = Plan(two_layers_q8_0.config).down_std
    down = gguf.quants.dequantize(tensors["blk.1.ffn_down_exps.weight"].data[0], Q8_0)
    assert abs(down.mean()) < 0.02 * down.std() and abs(down.std() / plan_std - 1) < 0.02, (down.std(), plan_std)

    topics = synth.read_topics(path)
    prompt = synth.topic_prompt(topics, 1, 8, seed=0)
    with MoEEngine(path, int(discover_layout(str(path)).unit_bytes.sum()) // 3, n_ctx=N_CTX, n_threads=N_THREADS,
                   n_batch=N_BATCH) as engine:
        result = engine.generate(prompt, max_tokens=N_TOKENS)
    words = result.text.split()
    assert len(result.tokens) == N_TOKENS
    assert words and sum(w in set(topics[1]) for w in words) >= 0.8 * len(words), result.text


def test_the_whole_q8_0_file_would_be_about_32_gb_by_its_layout() -> None:
    """The 48-layer q8_0 file's tensor bytes as planned (nothing written) equal a count from the layout;
    `pytest -s` prints them."""
    c = dataclasses.replace(FULL, dtype="q8_0")
    planned = sum(spec.nbytes for spec in Plan(c).tensors)
    head = c.head_dim
    q8_0_weights = c.n_layers * (2 * c.n_embd * c.n_head * head + 2 * c.n_embd * c.n_head_kv * head  # q, o; k, v
                                 + 3 * c.n_experts * c.n_ff * c.n_embd) + 2 * c.n_vocab * c.n_embd  # experts; embd, out
    f32_weights = c.n_layers * (c.n_experts * c.n_embd + 2 * c.n_embd + 2 * head) + c.n_embd  # router, norms
    counted = q8_0_weights * 34 // 32 + 4 * f32_weights  # block_q8_0: f16 d, 32 int8 codes
    print(f"qwen3-30b-a3b --dtype q8_0: {planned / 1e9:.1f} GB of tensors ({planned / 2**30:.1f} GiB)")
    assert planned == counted
    assert 30e9 < planned < 34e9  # the ~32 GB Q8_0 variant of issue 22
