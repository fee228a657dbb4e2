"""cluster.train: the pipeline's parts on tiny inputs (skipped without the `train` extra, except the numpy-only parts)."""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import pytest

from cluster.train.corpus import _cut, read_mo_strings
from cluster.train.routing import simulate_lru, simulate_min


def _write_mo(path: Path, pairs: list[tuple[str, str]]) -> None:
    """A little-endian GNU .mo catalog holding `pairs` (msgid, msgstr), header entry first."""
    pairs = [("", "Content-Type: text/plain; charset=UTF-8\n"), *pairs]
    n = len(pairs)
    origs = [a.encode() for a, _ in pairs]
    trans = [b.encode() for _, b in pairs]
    off_orig, off_trans = 28, 28 + 8 * n
    data_start = 28 + 16 * n
    table_o, table_t, blob = [], [], b""
    for s in origs:
        table_o.append((len(s), data_start + len(blob)))
        blob += s + b"\0"
    for s in trans:
        table_t.append((len(s), data_start + len(blob)))
        blob += s + b"\0"
    header = struct.pack("<7I", 0x950412DE, 0, n, off_orig, off_trans, 0, 0)
    body = b"".join(struct.pack("<II", *e) for e in table_o) + b"".join(struct.pack("<II", *e) for e in table_t)
    path.write_bytes(header + body + blob)


def test_mo_reader_returns_translations_without_the_header(tmp_path: Path) -> None:
    path = tmp_path / "de.mo"
    _write_mo(path, [("File not found", "Datei nicht gefunden"), ("%d file\0%d files", "%d Datei\0%d Dateien")])
    assert read_mo_strings(path) == ["Datei nicht gefunden", "%d Datei", "%d Dateien"]


def test_mo_reader_rejects_other_files(tmp_path: Path) -> None:
    path = tmp_path / "x.mo"
    path.write_bytes(b"not a catalog at all, not at all")
    with pytest.raises(ValueError, match="not a .mo catalog"):
        read_mo_strings(path)


def test_cut_keeps_whole_lines_within_the_byte_limit() -> None:
    assert _cut("aa\nbb\ncc\n", 100) == "aa\nbb\ncc\n"
    assert _cut("aa\nbb\ncc\n", 7) == "aa\nbb\n"


def test_lru_and_min_hit_rates_on_a_cyclic_trace() -> None:
    trace = np.array([[0], [1], [2]] * 10)  # k = 1, three experts in a cycle
    assert simulate_lru(trace, 2) == 0.0  # LRU always evicts the next one needed
    assert simulate_min(trace, 2) > 0.4  # MIN keeps one of the two others
    assert simulate_lru(trace, 3) == simulate_min(trace, 3) == 27 / 30


def test_min_never_loses_to_lru_on_random_traces() -> None:
    rng = np.random.default_rng(0)
    for _ in range(5):
        trace = np.stack([rng.choice(16, 4, replace=False) for _ in range(200)])
        assert simulate_min(trace, 6) >= simulate_lru(trace, 6)


@pytest.fixture(scope="module")
def tiny_tokenizer(tmp_path_factory: pytest.TempPathFactory) -> Path:
    pytest.importorskip("tokenizers")
    from tokenizers import pre_tokenizers, trainers

    from cluster.train.tokenizer import SPECIAL_TOKENS, new_tokenizer

    tok = new_tokenizer()
    texts = ["def f(x):\n    return x + 1\n", "Die Datei wurde nicht gefunden.\n", "int main(void) { return 0; }\n"] * 20
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=list(SPECIAL_TOKENS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    tok.save(str(path))
    return path


def _tiny_model(n_vocab: int):
    torch = pytest.importorskip("torch")
    from cluster.train.model import MoEConfig, MoETransformer

    cfg = MoEConfig(n_vocab=n_vocab, n_ctx=64, n_embd=64, n_layer=2, n_head=4, n_head_kv=2, head_dim=16, n_expert=8,
                    n_expert_used=2, n_ff_exp=32)
    model = MoETransformer(cfg)
    model.init_weights(torch.Generator().manual_seed(0))
    with torch.no_grad():  # larger weights than the init, so logits differ clearly between tokens
        for p in model.parameters():
            if p.ndim >= 2:
                p.mul_(5.0)
    return model.eval()


def test_load_balancing_loss_is_one_when_routing_is_uniform() -> None:
    torch = pytest.importorskip("torch")
    from cluster.train.model import MoE, MoEConfig

    cfg = MoEConfig(n_embd=16, n_expert=8, n_expert_used=2, n_ff_exp=8)
    moe = MoE(cfg)
    torch.nn.init.zeros_(moe.router.weight)  # every probability 1/8, whichever experts top-k picks
    for p in (moe.w_gate_up, moe.w_down):
        torch.nn.init.normal_(p)
    _, routing = moe(torch.randn(3, 16))
    assert routing.selected.shape == (3, 2)
    assert routing.aux_loss.item() == pytest.approx(1.0, abs=1e-5)  # sum_e f_e * (1/8) * 8 = 1 for any f


def test_llama_cpp_computes_what_the_torch_model_computes(tiny_tokenizer: Path, tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    import llama_cpp

    from cluster.train.export import read_gguf, write_gguf
    from cluster.train.tokenizer import read_vocabulary

    model = _tiny_model(len(read_vocabulary(tiny_tokenizer).tokens))
    path = tmp_path / "tiny.gguf"
    write_gguf(path, {k: v.detach().numpy() for k, v in model.gguf_tensors().items()}, model.cfg.to_dict(),
               tiny_tokenizer, name="tiny")
    hparams, tensors = read_gguf(path)
    assert hparams["n_expert"] == 8 and tensors["blk.0.ffn_gate_exps.weight"].shape == (8, 32, 64)
    model.load_gguf_tensors({k: torch.from_numpy(v) for k, v in tensors.items()})  # the F16-rounded weights
    ids = np.random.default_rng(0).integers(4, model.cfg.n_vocab, 48)
    ids[0] = 0  # <|bos|>
    with torch.no_grad():
        expected = model(torch.from_numpy(ids)[None]).logits[0].numpy()
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=64, n_batch=64, n_ubatch=64, logits_all=True, verbose=False)
    try:
        llm.eval(ids.tolist())
        got = np.array(llm.scores[: len(ids)])
    finally:
        llm.close()
    scale = np.abs(expected).max()
    assert np.abs(got - expected).max() < 0.01 * scale  # F16 weights and activations in llama.cpp; measured 0.1 %
    assert (got.argmax(-1) == expected.argmax(-1)).mean() >= 0.95


def test_llama_cpp_tokenizes_like_the_trained_tokenizer(tiny_tokenizer: Path, tmp_path: Path) -> None:
    pytest.importorskip("torch")
    import llama_cpp

    from cluster.train.export import write_gguf
    from cluster.train.tokenizer import load_tokenizer, read_vocabulary

    model = _tiny_model(len(read_vocabulary(tiny_tokenizer).tokens))
    path = tmp_path / "tiny.gguf"
    write_gguf(path, {k: v.detach().numpy() for k, v in model.gguf_tensors().items()}, model.cfg.to_dict(),
               tiny_tokenizer, name="tiny")
    text = "def main(x):\n    return x + 12  # Datei nicht gefunden\n\n\tint y;\n"
    ours = load_tokenizer(tiny_tokenizer).encode(text, add_special_tokens=False).ids
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=64, vocab_only=True, verbose=False)
    try:
        assert llm.tokenize(text.encode(), add_bos=False, special=False) == ours
        assert llm.tokenize(b"x", add_bos=True)[0] == 0  # add_bos_token, <|bos|> = id 0
    finally:
        llm.close()
