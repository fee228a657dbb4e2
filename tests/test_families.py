"""Synthetic models of each MoE family (`cluster.models.synth_families`) at the `tiny` preset's scale, and the
expert cache on each: llama.cpp loads the file, discovery's expert tensors, units and bytes equal a count made
from the GGUF header with the gguf package, the cache's selection counts equal the independent observer's,
the byte budget holds in the page cache (mincore), text at temperature 0 is the same with and without the
cache, and the predictor predicts with the family's own selection rule (router bias, gating, selection bias,
expert groups): its precision is counted, and its arithmetic on a layer's own router input picks exactly the
experts llama.cpp picked there."""

from __future__ import annotations

import dataclasses
import math
import re
from pathlib import Path

import gguf
import numpy as np
import observer
import pagecache
import pytest

from cluster.engine.cache import discover_layout
from cluster.engine.moe_engine import MoEEngine
from cluster.models import synth
from cluster.models.synth_config import ARCHS
from cluster.models.synth_families import FAMILIES, Family

N_CTX, N_THREADS, N_BATCH, N_TOKENS = 256, 2, 16, 24


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family_model(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[Family, Path]:
    arch = request.param
    config = dataclasses.replace(synth.PRESETS["tiny"], arch=arch)
    info = synth.synthesize(tmp_path_factory.mktemp("family") / f"{arch}.gguf", config, progress=False)
    return FAMILIES[arch], info.path


def _prompt(path: Path) -> str:
    return synth.topic_prompt(synth.read_topics(path), 1, 12, seed=0)


def _header_count(path: Path, n_layers: int, n_experts: int) -> tuple[list[str], np.ndarray, dict[str, list[str]]]:
    """From the gguf package alone: the routed-expert tensors (3-D or 2-D with n_experts outermost, named
    blk.<il>.*_exps.*), each unit's bytes [layer, expert], and the other per-block tensors by kind."""
    reader = gguf.GGUFReader(path)
    experts: list[str] = []
    unit = np.zeros((n_layers, n_experts), dtype=np.int64)
    kinds: dict[str, list[str]] = {"shared": [], "dense": [], "router": [], "selection_bias": []}
    for t in reader.tensors:
        m = re.fullmatch(r"blk\.(\d+)\.(.+)", t.name)
        if m is None:
            continue
        il, rest = int(m.group(1)), m.group(2)
        if "_exps." in rest:
            assert int(t.shape[-1]) == n_experts, t.name  # ggml ne: experts outermost
            experts.append(t.name)
            unit[il] += int(t.n_bytes) // n_experts
        elif re.fullmatch(r"ffn_(gate|up|down)_shexp\.weight", rest):
            kinds["shared"].append(t.name)
        elif rest.startswith(("ffn_gate.", "ffn_up.", "ffn_down.")):
            kinds["dense"].append(t.name)
        elif rest.startswith("ffn_gate_inp."):
            kinds["router"].append(t.name)
        elif rest.startswith("exp_probs_b."):
            kinds["selection_bias"].append(t.name)
    return experts, unit, kinds


def _moe_layers(family: Family, n_layers: int) -> np.ndarray:
    return np.array([family.is_moe_layer(il) for il in range(n_layers)])


def test_every_family_is_a_synth_arch() -> None:
    assert set(FAMILIES) <= set(ARCHS) and {"llama", "qwen3moe"} <= set(ARCHS)


def test_discovery_equals_the_header_count_and_leaves_shared_dense_and_router_bytes_out(
        family_model: tuple[Family, Path]) -> None:
    family, path = family_model
    config = synth.read_config(path)
    layout = discover_layout(str(path))
    assert (layout.arch, layout.n_layers, layout.n_experts, layout.n_experts_used) == (
        family.arch, config.n_layers, config.n_experts, config.n_experts_used)
    experts, unit, kinds = _header_count(path, config.n_layers, config.n_experts)
    assert sorted(layout.expert_tensors) == sorted(experts)
    assert layout.expert_bytes == int(unit.sum())
    for il in range(config.n_layers):
        for e in (0, config.n_experts - 1):
            assert sum(size for _, size, _, _ in layout.unit_slices(il, e)) == unit[il, e]
    moe = _moe_layers(family, config.n_layers)
    assert (layout.unit_bytes[~moe] == 0).all() and (layout.unit_bytes[moe] > 0).all()
    assert (unit[~moe] == 0).all() and (unit[moe] > 0).all()
    n_moe = int(moe.sum())
    assert len(kinds["shared"]) == 3 * n_moe * family.shared_experts  # gate/up/down per shared expert
    assert len(kinds["dense"]) == 3 * (config.n_layers - n_moe)
    assert len([n for n in kinds["router"] if n.endswith(".weight")]) == n_moe
    assert len(kinds["selection_bias"]) == (n_moe if family.selection_bias else 0)
    # the predictor repeats every family's selection rule (router bias, gating, selection bias, groups)
    assert layout.predictor_off == ""
    rule = layout.selection_rule
    assert (rule["router_bias"], rule["selection_bias"], rule["expert_groups"]) == (
        family.router_bias, family.selection_bias, family.expert_groups)
    if family.selection_bias or family.expert_groups[0] > 1:  # where the gating changes the top-k
        assert rule["gating"] == family.gating


def test_cache_keeps_text_counts_every_selection_and_holds_its_budget(family_model: tuple[Family, Path]) -> None:
    family, path = family_model
    layout = discover_layout(str(path))
    prompt = _prompt(path)
    with MoEEngine(path, None, n_ctx=N_CTX, n_threads=N_THREADS, n_batch=N_BATCH) as plain:
        expected = plain.generate(prompt, max_tokens=N_TOKENS)
    assert len(expected.tokens) == N_TOKENS
    topic = set(synth.read_topics(path)[1])
    words = expected.text.split()
    assert sum(w in topic for w in words) >= 0.8 * len(words), expected.text  # routing follows the topic

    budget = int(layout.unit_bytes.sum()) // 3
    pagecache.drop_file(path)
    with MoEEngine(path, budget, n_ctx=N_CTX, n_threads=N_THREADS, n_batch=N_BATCH) as engine:
        result = engine.generate(prompt, max_tokens=N_TOKENS)
        stats = engine.cache_stats()
        measured = engine.measured_resident_bytes()
        resident = pagecache.resident_bytes(path)
    assert result.tokens == expected.tokens and result.text == expected.text
    assert result.cache["n_evictions"] > 0
    assert stats["resident_bytes"] <= budget and measured <= budget
    assert resident <= budget + layout.non_expert_bytes, (resident, budget, layout.non_expert_bytes)

    seen = observer.observe(path, prompt, max_tokens=N_TOKENS, n_layers=layout.n_layers, n_experts=layout.n_experts,
                            n_ctx=N_CTX, n_batch=N_BATCH, n_threads=N_THREADS)
    assert seen.tokens == result.tokens
    np.testing.assert_array_equal(result.expert_counts, seen.counts)
    moe = _moe_layers(family, layout.n_layers)
    assert not seen.counts[~moe].any() and (seen.counts[moe].sum(axis=1) > 0).all()

    # predicting with the family's rule: its precision is counted
    assert stats["predictor_on"] == 1.0
    assert stats["n_predicted"] > 0 and math.isfinite(stats["prefetch_precision"])
    assert stats["prefetch_precision"] > 0.3, stats["prefetch_precision"]
    print(f"{family.arch}: prefetch_precision {stats['prefetch_precision']:.3f} "
          f"recall {stats.get('prefetch_recall', float('nan')):.3f}")


def _capture_routing(path: Path, prompt: str) -> list[tuple[int, np.ndarray, np.ndarray, np.ndarray]]:
    """Decodes `prompt` with llama.cpp (the observer's tensor mirror, no project code) and returns, for every MoE
    block of every ubatch, (layer, router input [n, n_embd], llama.cpp's router logits [n, n_experts] (the
    `ffn_moe_logits-<il>` mat-mul, before any router bias), llama.cpp's chosen experts [n, k])."""
    import ctypes

    import llama_cpp

    observer.check_ggml_header()
    out: list[tuple[int, np.ndarray, np.ndarray, np.ndarray]] = []
    pending: dict[int, tuple[np.ndarray, np.ndarray]] = {}
    errors: list[str] = []

    def f32(t: observer.GgmlTensor) -> np.ndarray:
        assert t.type == 0 and int(t.nb[0]) == 4, (t.name, t.type)  # GGML_TYPE_F32, rows contiguous
        n0, n1, nb1 = int(t.ne[0]), int(t.ne[1]), int(t.nb[1])
        raw = ctypes.string_at(t.data, (n1 - 1) * nb1 + n0 * 4)
        return np.ndarray((n1, n0), dtype=np.float32, buffer=raw, strides=(nb1, 4)).copy()

    def on_eval(t_addr: int, ask: bool, user_data: int) -> bool:
        t = ctypes.cast(t_addr, ctypes.POINTER(observer.GgmlTensor)).contents
        is_logits = t.name.startswith(b"ffn_moe_logits-")
        if not (is_logits or t.name.startswith(observer.TOPK_PREFIX)):
            return not ask
        if ask:
            return True
        try:
            layer = int(t.name.split(b"-")[-1])
            if is_logits:  # src[1]: the router input, alive while the node is (the expert mat-muls read it next)
                x = ctypes.cast(t.src[1], ctypes.POINTER(observer.GgmlTensor)).contents
                pending[layer] = (f32(x), f32(t))
            else:
                k, n, nb0, nb1 = int(t.ne[0]), int(t.ne[1]), int(t.nb[0]), int(t.nb[1])
                raw = ctypes.string_at(t.data, (n - 1) * nb1 + (k - 1) * nb0 + 4)
                ids = np.ndarray((n, k), dtype=np.int32, buffer=raw, strides=(nb1, nb0)).copy()
                out.append((layer, *pending.pop(layer), ids))
        except Exception as exc:  # noqa: BLE001  (nothing may escape a C callback)
            errors.append(repr(exc))
        return True

    with observer.llama_context(path, on_eval, n_ctx=N_CTX, n_batch=N_BATCH, n_threads=N_THREADS) as (model, ctx,
                                                                                                    batch):
        tokens = model.tokenize(prompt.encode("utf-8"), add_bos=bool(model.add_bos_token()), special=False)
        for start in range(0, len(tokens), N_BATCH):
            batch.set_batch(tokens[start:start + N_BATCH], n_past=start, logits_all=False)
            assert llama_cpp.llama_decode(ctx.ctx, batch.batch) == 0
            assert not errors, errors
    return out


def test_the_predictors_rule_picks_llama_cpps_experts(family_model: tuple[Family, Path]) -> None:
    """The predictor's arithmetic (router read from the file, router bias, gating, selection bias, expert
    groups) on a layer's own router input picks exactly the experts llama.cpp picked there: the exact check of
    the rule (the cache itself only ever predicts layers il+1.. from layer il's input, which is not exact)."""
    family, path = family_model
    layout = discover_layout(str(path))
    captured = _capture_routing(path, _prompt(path))
    moe = _moe_layers(family, layout.n_layers)
    assert {layer for layer, *_ in captured} == set(np.flatnonzero(moe))
    biases = {t.name: np.array(t.data, dtype=np.float32) for t in gguf.GGUFReader(path).tensors
              if t.name.endswith("exp_probs_b.bias")}
    k = layout.n_experts_used
    n_rows = plain_agrees = ungrouped_agrees = 0
    for layer, x, logits, ids in captured:
        chosen = np.sort(ids, axis=1)
        np.testing.assert_array_equal(np.sort(layout.select_experts(layer, logits), axis=1), chosen)
        np.testing.assert_array_equal(np.sort(layout.route(layer, x), axis=1), chosen)
        plain = np.sort(np.argsort(-logits, axis=1, kind="stable")[:, :k], axis=1)
        plain_agrees += int((plain == chosen).all(axis=1).sum())
        if family.expert_groups[0] > 1:  # the rule without its groups: top-k of sigmoid + selection bias
            scores = 1.0 / (1.0 + np.exp(-logits)) + biases[f"blk.{layer}.exp_probs_b.bias"]
            ungrouped = np.sort(np.argsort(-scores, axis=1, kind="stable")[:, :k], axis=1)
            ungrouped_agrees += int((ungrouped == chosen).all(axis=1).sum())
        n_rows += len(ids)
    assert n_rows >= layout.n_layers
    # the rule matters in these files, so a predictor that left a part of it out would fail above
    if family.selection_bias or family.expert_groups[0] > 1:  # the plain top-k of the logits misses most rows
        assert plain_agrees < 0.5 * n_rows, (plain_agrees, n_rows)
    if family.expert_groups[0] > 1:  # and so does the rule without the groups
        assert ungrouped_agrees < 0.5 * n_rows, (ungrouped_agrees, n_rows)


def test_discovery_refuses_a_family_file_it_cannot_map_in_one_line(tmp_path: Path) -> None:
    """An expert tensor whose outermost dimension is not expert_count cannot be cut per expert."""
    from cluster.errors import ModelFileError

    path = tmp_path / "bad.gguf"
    w = gguf.GGUFWriter(str(path), "qwen2moe")
    w.add_block_count(1)
    w.add_embedding_length(64)
    w.add_head_count(4)
    w.add_expert_count(8)
    w.add_expert_used_count(2)
    w.add_tensor("blk.0.ffn_gate_inp.weight", np.zeros((8, 64), np.float32))
    w.add_tensor("blk.0.ffn_up_exps.weight", np.zeros((6, 32, 64), np.float16))  # 6 slices, 8 experts
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(ModelFileError) as info:
        discover_layout(str(path))
    message = str(info.value)
    assert "\n" not in message and "blk.0.ffn_up_exps.weight" in message and "8 experts" in message


@pytest.mark.parametrize("arch, gating, expected", [
    ("dots1", None, "gating function of dots1"),  # reads the key with no default of its own
    ("glm4moe", 7, "expert_gating_func=7"),  # a gating llama.cpp does not have
    ("glm4moe", None, ""),  # glm4moe's default: sigmoid
    ("deepseek2", 2, ""),
])
def test_predictor_is_off_only_where_the_selection_rule_is_unknown(
        tmp_path: Path, arch: str, gating: int | None, expected: str) -> None:
    """A selection bias makes the gating matter; without a gating the predictor knows it stays off, with why."""
    path = tmp_path / "rule.gguf"
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(1)
    w.add_embedding_length(64)
    w.add_head_count(4)
    w.add_expert_count(8)
    w.add_expert_used_count(2)
    if gating is not None:
        w.add_uint32(f"{arch}.expert_gating_func", gating)
    w.add_tensor("blk.0.ffn_gate_inp.weight", np.zeros((8, 64), np.float32))
    w.add_tensor("blk.0.exp_probs_b.bias", np.zeros(8, np.float32))
    w.add_tensor("blk.0.ffn_up_exps.weight", np.zeros((8, 32, 64), np.float16))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    layout = discover_layout(str(path))
    if expected:
        assert expected in layout.predictor_off and "\n" not in layout.predictor_off
    else:
        assert layout.predictor_off == "" and layout.selection_rule["gating"] == "sigmoid"


@pytest.mark.parametrize("arch", ["qwen3next", "qwen35moe"])
def test_qwen3next_is_the_hybrid_llama_cpp_loads(tmp_path: Path, arch: str) -> None:
    """synth --arch qwen3next|qwen35moe: gated-delta-net blocks with every fourth block full attention, and
    llama.cpp loads it as a hybrid (recurrent state beside the KV cache), so the text checks above run through
    both kinds of block."""
    import llama_cpp
    from llama_cpp import _internals

    config = dataclasses.replace(synth.PRESETS["tiny"], arch=arch, n_layers=8)
    path = synth.synthesize(tmp_path / "qwen3next.gguf", config, progress=False).path
    names = {t.name for t in gguf.GGUFReader(path).tensors}
    full = [il for il in range(config.n_layers) if f"blk.{il}.attn_q.weight" in names]
    linear = [il for il in range(config.n_layers) if f"blk.{il}.ssm_conv1d.weight" in names]
    assert full == [3, 7] and linear == [0, 1, 2, 4, 5, 6]
    assert all(f"blk.{il}.ffn_gate_inp_shexp.weight" in names for il in range(config.n_layers))
    ba = ("ssm_beta.weight", "ssm_alpha.weight") if arch == "qwen35moe" else ("ssm_ba.weight",)
    assert all(f"blk.{il}.{name}" in names for il in linear for name in ba)
    mparams = llama_cpp.llama_model_default_params()
    mparams.n_gpu_layers = 0
    model = _internals.LlamaModel(path_model=str(path), params=mparams, verbose=False)
    try:
        assert llama_cpp.llama_model_is_hybrid(model.model) and not llama_cpp.llama_model_is_recurrent(model.model)
    finally:
        model.close()
