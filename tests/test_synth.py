"""Tests for cluster.models.synth: the deterministic synthetic MoE GGUF generator (tiny models only)."""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import math
from collections.abc import Iterator
from pathlib import Path

import gguf
import llama_cpp
import numpy as np
import pytest

from cluster.engine.cache import discover_layout
from cluster.engine.moe_engine import MoEEngine
from cluster.models import synth

TINY = synth.PRESETS["tiny"]


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _write(factory: pytest.TempPathFactory, name: str, config: synth.SynthConfig) -> synth.SynthInfo:
    return synth.synthesize(factory.mktemp("synth") / f"{name}.gguf", config, progress=False)


def _load(path: Path) -> llama_cpp.Llama:
    return llama_cpp.Llama(model_path=str(path), n_ctx=512, verbose=False, use_mmap=True)


def _tensors(path: Path) -> dict[str, gguf.ReaderTensor]:
    return {t.name: t for t in gguf.GGUFReader(path).tensors}


def _greedy_words(llm: llama_cpp.Llama, prompt: str, n_tokens: int = 16) -> list[str]:
    out = llm(prompt, max_tokens=n_tokens, temperature=0.0)
    return out["choices"][0]["text"].split()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> synth.SynthInfo:
    return _write(tmp_path_factory, "tiny", TINY)


@pytest.fixture(scope="module", params=["llama", "qwen3moe"])
def tiny_model(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[
        tuple[synth.SynthInfo, llama_cpp.Llama]]:
    info = _write(tmp_path_factory, f"tiny-{request.param}", dataclasses.replace(TINY, arch=request.param))
    llm = _load(info.path)
    yield info, llm
    llm.close()


# -- determinism and size ---------------------------------------------------------------------


def test_same_config_writes_byte_identical_files(tiny: synth.SynthInfo, tmp_path: Path) -> None:
    again = synth.synthesize(tmp_path / "again.gguf", TINY, progress=False)
    assert _sha256(again.path) == _sha256(tiny.path)


def test_different_seed_writes_different_bytes(tiny: synth.SynthInfo, tmp_path: Path) -> None:
    other = synth.synthesize(tmp_path / "seed1.gguf", dataclasses.replace(TINY, seed=1), progress=False)
    assert other.n_bytes > 0
    assert _sha256(other.path) != _sha256(tiny.path)
    assert synth.read_topics(other.path) != synth.read_topics(tiny.path)


def test_tiny_preset_is_under_30_mb_and_mostly_experts(tiny: synth.SynthInfo) -> None:
    assert tiny.n_bytes == tiny.path.stat().st_size
    assert tiny.n_bytes < 30 * 2**20
    assert 0.5 < tiny.expert_bytes / tiny.n_bytes < 1.0


def test_expert_bytes_is_the_sum_of_all_exps_tensors(tiny: synth.SynthInfo) -> None:
    tensors = _tensors(tiny.path)
    exps = [t for name, t in tensors.items() if "_exps." in name]
    assert len(exps) == 3 * TINY.n_layers
    assert tiny.expert_bytes == sum(int(t.n_bytes) for t in exps)


def test_expert_tensors_have_ggml_shape_embd_ff_experts(tiny: synth.SynthInfo) -> None:
    tensors = _tensors(tiny.path)
    c = TINY
    assert list(tensors["blk.0.ffn_gate_exps.weight"].shape) == [c.n_embd, c.n_ff, c.n_experts]
    assert list(tensors["blk.0.ffn_up_exps.weight"].shape) == [c.n_embd, c.n_ff, c.n_experts]
    assert list(tensors["blk.0.ffn_down_exps.weight"].shape) == [c.n_ff, c.n_embd, c.n_experts]
    assert list(tensors["blk.0.ffn_gate_inp.weight"].shape) == [c.n_embd, c.n_experts]
    assert tensors["blk.0.ffn_gate_inp.weight"].tensor_type == gguf.GGMLQuantizationType.F32
    assert tensors["blk.0.ffn_norm.weight"].tensor_type == gguf.GGMLQuantizationType.F32
    assert tensors["blk.0.ffn_gate_exps.weight"].tensor_type == gguf.GGMLQuantizationType.F16


# -- llama.cpp loads and generates ------------------------------------------------------------


def test_both_archs_load_and_greedy_decoding_stays_on_the_prompt_topic(
        tiny_model: tuple[synth.SynthInfo, llama_cpp.Llama]) -> None:
    info, llm = tiny_model
    topics = synth.read_topics(info.path)
    for topic in range(len(topics)):
        words = _greedy_words(llm, synth.topic_prompt(topics, topic, n_words=8, seed=3))
        assert len(words) == 16
        assert set(words) <= set(topics[topic]), f"topic {topic}: {words}"
        assert all(a != b for a, b in itertools.pairwise(words)), f"repeats a word: {words}"


def test_topic_word_tokenizes_to_a_single_token(tiny_model: tuple[synth.SynthInfo, llama_cpp.Llama]) -> None:
    info, llm = tiny_model
    for words in synth.read_topics(info.path):
        for word in words:
            ids = llm.tokenize(b" " + word.encode(), add_bos=False)
            assert len(ids) == 1, f"{word!r} -> {ids}"
            assert llm.detokenize(ids) == b" " + word.encode()


def test_q8_0_model_loads_and_stays_on_topic(tmp_path_factory: pytest.TempPathFactory) -> None:
    info = _write(tmp_path_factory, "tiny-q8", dataclasses.replace(TINY, dtype="q8_0"))
    tensors = _tensors(info.path)
    assert tensors["blk.0.ffn_down_exps.weight"].tensor_type == gguf.GGMLQuantizationType.Q8_0
    assert tensors["blk.0.attn_q.weight"].tensor_type == gguf.GGMLQuantizationType.Q8_0
    assert tensors["blk.0.ffn_gate_inp.weight"].tensor_type == gguf.GGMLQuantizationType.F32
    assert info.n_bytes < _write(tmp_path_factory, "tiny-f16", TINY).n_bytes
    topics = synth.read_topics(info.path)
    # Loaded as the engine loads models, without llama.cpp's repacked private copies: on a CPU with
    # AMX, stock llama.cpp repacks Q8_0 weights for its AMX kernels and crashes in decode on this
    # model (llama-cpp-python 0.3.36; seen on a Xeon with amx_int8), which says nothing of the file.
    with MoEEngine(info.path, None, n_ctx=512, n_threads=2) as engine:
        words = engine.generate(synth.topic_prompt(topics, 1, 8, seed=0), max_tokens=16).text.split()
    assert words and set(words) <= set(topics[1])


def test_dense_model_has_no_expert_tensors_and_loads(tmp_path_factory: pytest.TempPathFactory) -> None:
    info = _write(tmp_path_factory, "tiny-dense", dataclasses.replace(TINY, n_experts=0, n_experts_used=0))
    names = set(_tensors(info.path))
    assert info.expert_bytes == 0
    assert not any("_exps." in n or "gate_inp" in n for n in names)
    assert {"blk.0.ffn_gate.weight", "blk.0.ffn_up.weight", "blk.0.ffn_down.weight"} <= names
    fields = gguf.GGUFReader(info.path).fields
    assert "llama.expert_count" not in fields
    llm = _load(info.path)
    try:
        topics = synth.read_topics(info.path)
        assert set(_greedy_words(llm, synth.topic_prompt(topics, 0, 8, seed=0))) <= set(topics[0])
    finally:
        llm.close()


def test_merged_layout_writes_one_gate_up_tensor_with_twice_the_rows(
        tmp_path_factory: pytest.TempPathFactory) -> None:
    info = _write(tmp_path_factory, "tiny-merged", dataclasses.replace(TINY, merged_gate_up=True))
    tensors = _tensors(info.path)
    c = TINY
    for il in range(c.n_layers):
        assert list(tensors[f"blk.{il}.ffn_gate_up_exps.weight"].shape) == [c.n_embd, 2 * c.n_ff, c.n_experts]
        assert f"blk.{il}.ffn_gate_exps.weight" not in tensors
        assert f"blk.{il}.ffn_up_exps.weight" not in tensors
        assert f"blk.{il}.ffn_down_exps.weight" in tensors
    assert info.expert_bytes == sum(int(t.n_bytes) for n, t in tensors.items() if "_exps." in n)


# -- routing structure ------------------------------------------------------------------------


def _embedding_routing(path: Path) -> tuple[list[list[int]], list[np.ndarray], int]:
    """Token ids of each topic's words and, per layer, every token's top-k experts when the
    router sees the (rms-normalised) token embedding itself."""
    reader = gguf.GGUFReader(path)
    config = synth.read_config(path)
    tensors = {t.name: t for t in reader.tensors}
    embd = np.asarray(tensors["token_embd.weight"].data, dtype=np.float64)
    x = embd / np.sqrt(np.mean(embd**2, axis=1, keepdims=True))
    tops = []
    for layer in range(config.n_layers):
        router = np.asarray(tensors[f"blk.{layer}.ffn_gate_inp.weight"].data, dtype=np.float64)
        tops.append(np.argsort(-(x @ router.T), axis=1, kind="stable")[:, : config.n_experts_used])
    vocab = reader.fields["tokenizer.ggml.tokens"]
    token_id = {bytes(vocab.parts[i]).decode(): n for n, i in enumerate(vocab.data)}
    ids = [[token_id["Ġ" + w] for w in words] for words in synth.read_topics(path)]
    return ids, tops, config.n_experts


def test_realistic_routing_reuses_25_to_50_percent_and_concentrates_per_topic(tiny: synth.SynthInfo) -> None:
    k, reuse, coverage = TINY.n_experts_used, [], []
    ids, tops, n_experts = _embedding_routing(tiny.path)
    for top in tops:
        for topic_ids in ids:  # greedy decoding walks a topic's words in order, cyclically
            walk = [set(top[i]) for i in topic_ids]
            reuse += [len(a & b) / k for a, b in itertools.pairwise([*walk, walk[0]])]
            counts = np.bincount(np.concatenate([top[i] for i in topic_ids]), minlength=n_experts)
            hot = set(np.argsort(-counts, kind="stable")[: math.ceil(0.4 * n_experts)])
            coverage.append(np.mean([len(s & hot) / k for s in walk]))
    assert 0.25 <= np.mean(reuse) <= 0.5
    assert np.mean(coverage) >= 0.9


def test_topic_words_route_mostly_into_their_topic_experts(tiny: synth.SynthInfo) -> None:
    k, inside = TINY.n_experts_used, []
    ids, tops, _ = _embedding_routing(tiny.path)
    for layer, top in enumerate(tops):
        groups = synth.topic_experts(TINY, layer)
        inside += [len(set(top[i]) & set(groups[t])) / k for t, topic_ids in enumerate(ids) for i in topic_ids]
    assert np.mean(inside) >= 0.8


def test_topic_experts_are_disjoint_groups_when_experts_suffice() -> None:
    groups = synth.topic_experts(TINY, layer=1)
    assert groups.shape == (TINY.n_topics, synth.topic_group_size(TINY))
    assert len(set(groups.ravel().tolist())) == groups.size
    assert not np.array_equal(groups, synth.topic_experts(TINY, layer=2))
    with pytest.raises(ValueError, match="layer=4"):
        synth.topic_experts(TINY, layer=4)


def test_zero_specialization_routes_at_chance_level(tmp_path_factory: pytest.TempPathFactory) -> None:
    info = _write(tmp_path_factory, "tiny-spec0", dataclasses.replace(TINY, specialization=0.0))
    ids, tops, n_experts = _embedding_routing(info.path)
    k = TINY.n_experts_used
    reuse = [len(set(top[a]) & set(top[b])) / k for top in tops for t in ids for a, b in itertools.pairwise(t)]
    assert np.mean(reuse) < 2 * k / n_experts


# -- metadata and prompts ---------------------------------------------------------------------


def test_read_topics_and_read_config_return_what_was_written(tiny: synth.SynthInfo) -> None:
    topics = synth.read_topics(tiny.path)
    assert len(topics) == TINY.n_topics
    assert all(len(words) == TINY.words_per_topic for words in topics)
    flat = [w for words in topics for w in words]
    assert len(set(flat)) == len(flat)
    assert all(w.isalpha() and w.islower() for w in flat)
    assert synth.read_config(tiny.path) == TINY


def test_topic_prompt_is_deterministic_space_led_words_of_that_topic(tiny: synth.SynthInfo) -> None:
    topics = synth.read_topics(tiny.path)
    prompt = synth.topic_prompt(topics, 2, n_words=12, seed=9)
    assert prompt == synth.topic_prompt(topics, 2, n_words=12, seed=9)
    assert prompt != synth.topic_prompt(topics, 2, n_words=12, seed=10)
    assert prompt.startswith(" ") and not prompt.startswith("  ")
    words = prompt.split()
    assert len(words) == 12 and set(words) <= set(topics[2])


def test_mixed_prompt_concatenates_one_segment_per_topic(tiny: synth.SynthInfo) -> None:
    topics = synth.read_topics(tiny.path)
    words = synth.mixed_prompt(topics, [0, 3], n_words_each=5, seed=1).split()
    assert set(words[:5]) <= set(topics[0]) and set(words[5:]) <= set(topics[3])


def test_topic_prompt_rejects_unknown_topic(tiny: synth.SynthInfo) -> None:
    topics = synth.read_topics(tiny.path)
    with pytest.raises(ValueError, match="topic=4"):
        synth.topic_prompt(topics, 4, n_words=3, seed=0)


def test_read_topics_rejects_a_gguf_without_topic_metadata(tmp_path: Path) -> None:
    path = tmp_path / "plain.gguf"
    writer = gguf.GGUFWriter(path, "llama")
    writer.add_tensor("x", np.zeros(4, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(ValueError, match=r"sniper\.synth\.topics"):
        synth.read_topics(path)


# -- validation and overrides -----------------------------------------------------------------


@pytest.mark.parametrize(("changes", "field"), [
    ({"arch": "mixtral"}, "arch"),
    ({"n_experts_used": 40}, "n_experts_used"),
    ({"n_experts_used": 0}, "n_experts_used"),
    ({"n_experts": 0}, "n_experts_used"),
    ({"arch": "qwen3moe", "n_experts": 0, "n_experts_used": 0}, "n_experts"),
    ({"n_embd": 66}, "n_embd"),
    ({"n_head_kv": 3}, "n_head_kv"),
    ({"dtype": "q4_0"}, "dtype"),
    ({"dtype": "q8_0", "n_embd": 48, "n_head": 4, "n_head_kv": 2}, "n_embd"),
    ({"dtype": "q8_0", "n_ff": 100}, "n_ff"),
    ({"specialization": -1.0}, "specialization"),
    ({"specialization": float("nan")}, "specialization"),
    ({"n_topics": 0}, "n_topics"),
    ({"words_per_topic": 1}, "words_per_topic"),
    ({"n_layers": 0}, "n_layers"),
    ({"n_experts": 0, "n_experts_used": 0, "merged_gate_up": True}, "merged_gate_up"),
    ({"seed": -1}, "seed"),
    ({"chat_template": "vicuna"}, "chat_template"),
])
def test_validate_rejects_bad_config_naming_the_field(changes: dict[str, object], field: str) -> None:
    config = dataclasses.replace(TINY, **changes)
    with pytest.raises(ValueError, match=rf"SynthConfig\.{field}="):
        config.validate()


def test_synthesize_validates_before_writing(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="n_experts_used"):
        synth.synthesize(tmp_path / "bad.gguf", dataclasses.replace(TINY, n_experts_used=99), progress=False)
    assert not any(tmp_path.iterdir())


def test_presets_are_valid_and_sized_as_documented() -> None:
    for name, config in synth.PRESETS.items():
        config.validate()
        if config.expert_window == 0:  # qwen3-30b-a3b: sliding-window routing (tests/test_synth_routing.py)
            assert config.specialization == synth.REALISTIC_SPECIALIZATION, name
    bench = synth.PRESETS["bench"]
    assert bench.arch == "qwen3moe"
    expert_bytes = 3 * bench.n_layers * bench.n_experts * bench.n_embd * bench.n_ff * 2
    assert expert_bytes >= 1.5e9


def test_config_from_args_applies_cli_overrides() -> None:
    config = synth.config_from_args("tiny", layers=2, experts=16, top_k=2, dim=128, ff=64, dtype="q8_0",
                                    arch="qwen3moe", specialization="realistic", seed=5)
    assert (config.n_layers, config.n_experts, config.n_experts_used) == (2, 16, 2)
    assert (config.n_embd, config.n_ff, config.dtype, config.arch, config.seed) == (128, 64, "q8_0", "qwen3moe", 5)
    assert config.specialization == synth.REALISTIC_SPECIALIZATION
    assert synth.config_from_args("demo", specialization="0.5", seed=None) == dataclasses.replace(
        synth.PRESETS["demo"], specialization=0.5)


def test_config_from_args_makes_experts_zero_a_dense_model() -> None:
    config = synth.config_from_args("tiny", experts=0)
    assert (config.n_experts, config.n_experts_used) == (0, 0)


def test_config_from_args_rejects_unknown_preset_override_and_bad_values() -> None:
    with pytest.raises(ValueError, match="preset 'huge'"):
        synth.config_from_args("huge")
    with pytest.raises(ValueError, match="override 'colour'"):
        synth.config_from_args("tiny", colour="red")
    with pytest.raises(ValueError, match="specialization='very'"):
        synth.config_from_args("tiny", specialization="very")
    with pytest.raises(ValueError, match=r"SynthConfig\.n_experts_used="):
        synth.config_from_args("tiny", top_k=64)


def test_a_chat_template_adds_control_tokens_after_bos_eos_and_leaves_plain_models_unchanged(
        tiny: synth.SynthInfo, tmp_path: Path) -> None:
    from cluster.cli.parser import build_parser
    from cluster.engine.chat import SYNTH_TEMPLATES

    args = build_parser().parse_args(["synth", str(tmp_path / "c.gguf"), "--chat-template", "llama3"])
    config = synth.config_from_args(args.preset, chat_template=args.chat_template)
    info = synth.synthesize(tmp_path / "c.gguf", config, progress=False)
    fields = gguf.GGUFReader(info.path).fields
    tokens = [bytes(fields["tokenizer.ggml.tokens"].parts[i]).decode() for i in fields["tokenizer.ggml.tokens"].data]
    controls = SYNTH_TEMPLATES["llama3"][1]
    assert tokens[256:258 + len(controls)] == [synth.BOS_TEXT, synth.EOS_TEXT, *controls]
    types = fields["tokenizer.ggml.token_type"]
    assert {int(types.parts[i][0]) for i in types.data[256:258 + len(controls)]} == {int(gguf.TokenType.CONTROL)}
    assert int(fields["tokenizer.ggml.bos_token_id"].parts[-1][0]) == tokens.index("<|begin_of_text|>")
    assert int(fields["tokenizer.ggml.eot_token_id"].parts[-1][0]) == tokens.index("<|eot_id|>")
    assert synth.read_config(info.path).chat_template == "llama3"
    assert "tokenizer.chat_template" not in gguf.GGUFReader(tiny.path).fields  # no template asked: none written


def test_q4_k_weights_are_valid_blocks_with_the_planned_mean_and_deviation(tmp_path: Path) -> None:
    """gguf has no Q4_K quantiser, so synth writes the blocks itself: gguf's own dequantiser must
    read them back as zero-mean weights of the deviation the float dtypes would have, and
    llama.cpp must run the model (the K-quant layout the `large` preset uses)."""
    config = synth.config_from_args("tiny", dim=256, ff=256, dtype="q4_k", arch="qwen3moe", layers=2)
    path = tmp_path / "q4k.gguf"
    synth.synthesize(path, config, progress=False)
    tensors = {t.name: t for t in gguf.GGUFReader(path).tensors}
    gate = tensors["blk.0.ffn_gate_exps.weight"]
    assert gate.tensor_type == gguf.GGMLQuantizationType.Q4_K
    w = gguf.quants.dequantize(np.asarray(gate.data), gguf.GGMLQuantizationType.Q4_K)
    assert w.shape == (config.n_experts, config.n_ff, config.n_embd)
    assert abs(float(w.mean())) < 0.02 * float(w.std())
    assert float(w.std()) == pytest.approx(1 / np.sqrt(config.n_embd), rel=0.02)
    layout = discover_layout(str(path))
    assert layout.expert_bytes == sum(int(t.n_bytes) for name, t in tensors.items() if "_exps." in name)
    with MoEEngine(path, int(0.5 * layout.unit_bytes.sum()), n_ctx=128, n_threads=2) as engine:
        topics = synth.read_topics(path)
        gen = engine.generate(synth.topic_prompt(topics, 0, 8, seed=1), max_tokens=8)
    assert gen.n_generated == 8 and gen.cache["hits"] + gen.cache["misses"] > 0


def test_large_preset_has_qwen3_30b_a3b_expert_shapes_in_a_k_quant() -> None:
    large = synth.PRESETS["large"]
    assert (large.arch, large.n_embd, large.n_ff, large.n_experts, large.n_experts_used) == ("qwen3moe", 2048, 768, 128, 8)
    assert large.n_head > large.n_head_kv and large.dtype == "q4_k"
    block_weights, block_bytes = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType.Q4_K]
    expert_bytes = 3 * large.n_embd * large.n_ff // block_weights * block_bytes
    assert expert_bytes == 2_654_208  # 2.5 MiB, as in a Q4_K_M file of the published model
    assert 2.5e9 < large.n_layers * large.n_experts * expert_bytes < 3.5e9


# -- unwritable destinations ---------------------------------------------------------------------


def _unwritable(tmp_path: Path) -> list[Path]:
    """Destinations no file can be created at: under a regular file, a directory itself, and
    under /proc (FileNotFoundError on creation, even for root)."""
    (tmp_path / "file").write_bytes(b"")
    (tmp_path / "dir.gguf").mkdir()
    return [tmp_path / "file" / "x.gguf", tmp_path / "dir.gguf", Path("/proc/x.gguf")]


def test_an_unwritable_destination_is_refused_in_one_line_with_status_2_before_generating(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from cluster.cli.main import main
    from cluster.errors import OutputFileError

    for path in _unwritable(tmp_path):
        with pytest.raises(OutputFileError, match=f"cannot write the model to {path}: .*writable directory"):
            synth.synthesize(path, TINY, progress=False)
        assert main(["synth", str(path), "--preset", "tiny", "--quiet"]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"error: cannot write the model to {path}: ") and err.count("\n") == 1, err
        assert not path.with_name(path.name + ".partial").exists()


def test_a_write_failing_midway_is_one_output_error_and_leaves_no_partial_file(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from cluster.errors import OutputFileError

    def disk_full(self: gguf.GGUFWriter, tensor: np.ndarray) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(gguf.GGUFWriter, "write_tensor_data", disk_full)
    with pytest.raises(OutputFileError, match="no space left on device"):
        synth.synthesize(tmp_path / "full.gguf", TINY, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_synth_module_re_exports_the_public_names_of_config_vocab_and_weights_modules() -> None:
    from cluster.models import synth_config, synth_vocab

    for name in synth.__all__:
        assert hasattr(synth, name), name
    for name in synth_config.__all__:
        if name in synth.__all__:
            assert getattr(synth, name) is getattr(synth_config, name), name
    for name in synth_vocab.__all__:
        if name in synth.__all__:
            assert getattr(synth, name) is getattr(synth_vocab, name), name
    assert {"SynthConfig", "PRESETS", "config_from_args", "topic_experts", "topic_prompt", "mixed_prompt"} <= set(synth.__all__)
