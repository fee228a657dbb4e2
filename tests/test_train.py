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


def test_domain_sets_keep_the_first_models_five_in_order() -> None:
    from cluster.train.corpus import DOMAIN_SETS, DOMAINS, default_sources

    assert DOMAIN_SETS["5domains"] == DOMAINS == ("python", "c", "javascript", "english", "german")
    assert DOMAIN_SETS["8domains"][:5] == DOMAINS and len(DOMAIN_SETS["8domains"]) == 8
    assert set(DOMAIN_SETS["8domains"]) <= set(default_sources())


def test_build_corpus_rejects_unknown_or_repeated_domains(tmp_path: Path) -> None:
    from cluster.train.corpus import build_corpus

    with pytest.raises(ValueError, match="unknown domains"):
        build_corpus(tmp_path, domains=("python", "klingon"))
    with pytest.raises(ValueError, match="distinct"):
        build_corpus(tmp_path, domains=("c", "c"))


def test_cpp_sources_leave_h_files_to_c() -> None:
    from cluster.train.corpus import default_sources

    if not Path("/usr/include/c++").is_dir():
        pytest.skip("no /usr/include/c++ here")
    files = default_sources()["cpp"].list_files()
    assert files and not any(p.suffix == ".h" for p in files)


def test_balance_scopes_differ_on_a_batch_whose_sequences_each_use_one_expert() -> None:
    torch = pytest.importorskip("torch")
    from cluster.train.model import balancing_loss

    # sequence 0 sends every token to expert 0, sequence 1 to expert 1 (k = 1 of 4 experts)
    probs = torch.zeros(2, 3, 4)
    probs[0, :, 0] = 1.0
    probs[1, :, 1] = 1.0
    selected = torch.tensor([[[0]] * 3, [[1]] * 3])
    assert balancing_loss(probs, selected, 4, "global").item() == pytest.approx(2.0)  # balanced over the batch
    assert balancing_loss(probs, selected, 4, "sequence").item() == pytest.approx(4.0)  # each sequence collapsed
    with pytest.raises(ValueError, match="balance scope"):
        balancing_loss(probs, selected, 4, "token")


def test_global_scope_is_the_first_models_loss_and_sequence_scope_differs() -> None:
    torch = pytest.importorskip("torch")
    from cluster.train.model import MoE, MoEConfig, balancing_loss

    torch.manual_seed(0)
    moe = MoE(MoEConfig(n_embd=16, n_expert=8, n_expert_used=2, n_ff_exp=8))
    for p in (moe.w_gate_up, moe.w_down):
        torch.nn.init.normal_(p)
    x = torch.randn(3, 5, 16)
    _, glob = moe(x)
    _, seq = moe(x, "sequence")
    probs = torch.softmax(moe.router(x.reshape(-1, 16)), -1)
    load = torch.bincount(glob.selected.reshape(-1), minlength=8).float() / (15 * 2)
    assert glob.aux_loss.item() == pytest.approx(8 * torch.sum(load * probs.mean(0)).item(), rel=1e-6)
    assert glob.aux_loss.item() == pytest.approx(
        balancing_loss(probs.view(3, 5, 8), glob.selected.view(3, 5, 2), 8, "global").item(), rel=1e-6)
    assert seq.aux_loss.item() > glob.aux_loss.item()  # fewer tokens per estimate: never more balanced
    assert torch.equal(seq.selected, glob.selected)  # the scope changes the loss, not the routing


def test_selection_bias_chooses_experts_but_does_not_weigh_them() -> None:
    torch = pytest.importorskip("torch")
    from cluster.train.model import MoE, MoEConfig

    torch.manual_seed(0)
    cfg = MoEConfig(n_embd=16, n_expert=8, n_expert_used=2, n_ff_exp=8, selection_bias=True)
    moe = MoE(cfg)
    for p in (moe.w_gate_up, moe.w_down):
        torch.nn.init.normal_(p)
    assert "selection_bias" in moe.state_dict() and all(p is not moe.selection_bias for p in moe.parameters())
    x = torch.randn(4, 16)
    plain, r0 = moe(x)
    moe.selection_bias[5] = 10.0  # expert 5 wins every selection
    biased, r1 = moe(x)
    assert (r1.selected == 5).any(-1).all() and not torch.equal(r0.selected, r1.selected)
    # the same output as an unbiased layer that happened to pick these experts: weights from the plain softmax
    probs = torch.softmax(moe.router(x), -1)
    w = probs.gather(1, r1.selected)
    w = w / w.sum(-1, keepdim=True)
    gate, up = moe.gate_up_views()
    expected = torch.zeros_like(x)
    for t in range(4):
        for j, e in enumerate(r1.selected[t].tolist()):
            h = torch.nn.functional.silu(gate[e] @ x[t]) * (up[e] @ x[t])
            expected[t] += w[t, j] * (moe.w_down[e] @ h)
    assert torch.allclose(biased, expected, atol=1e-5)


def test_selection_bias_updates_move_the_load_toward_balance() -> None:
    torch = pytest.importorskip("torch")
    from cluster.train.model import MoE, MoEConfig

    torch.manual_seed(0)
    moe = MoE(MoEConfig(n_embd=16, n_expert=8, n_expert_used=2, n_ff_exp=8, selection_bias=True))
    for p in (moe.w_gate_up, moe.w_down):
        torch.nn.init.normal_(p)
    with torch.no_grad():
        moe.router.weight.normal_()
        moe.router.weight[0, 0] += 3.0  # with feature 0 fixed at 1: expert 0's logit is 3 higher for every token
    x = torch.randn(512, 16)
    x[:, 0] = 1.0
    _, first = moe(x)
    assert first.load.argmax() == 0 and first.load.max() > 1.8 / 8
    for _ in range(300):
        _, r = moe(x)
        moe.update_selection_bias(r.load, 0.002)
    _, last = moe(x)
    assert last.load.max() < 1.5 / 8 and last.load[0] < 1.1 / 8  # measured: 0.179 at most, expert 0 at 0.128
    assert moe.selection_bias[0] < 0  # the overloaded expert was pushed down
    with pytest.raises(RuntimeError, match="no selection bias"):
        MoE(MoEConfig(n_embd=16, n_expert=8, n_expert_used=2, n_ff_exp=8)).update_selection_bias(last.load, 0.1)


def test_lever_defaults_are_the_first_models_config() -> None:
    pytest.importorskip("torch")
    from dataclasses import asdict

    from cluster.train.model import MoEConfig, MoETransformer
    from cluster.train.train import TrainConfig

    cfg = TrainConfig()
    assert (cfg.aux_coef, cfg.balance_scope, cfg.bias_rate, cfg.model.selection_bias) == (0.01, "global", 0.0, False)
    old = asdict(cfg)  # a checkpoint written before the levers existed has none of their keys
    for key in ("balance_scope", "bias_rate"):
        del old[key]
    del old["model"]["selection_bias"]
    assert TrainConfig.from_dict(old) == cfg
    assert not any("selection_bias" in k for k in MoETransformer(MoEConfig(n_layer=1)).state_dict())
    with pytest.raises(ValueError, match="must go together"):
        TrainConfig(bias_rate=0.001).validate()
    with pytest.raises(ValueError, match="must go together"):
        TrainConfig(model=MoEConfig(selection_bias=True)).validate()
    with pytest.raises(ValueError, match="balance_scope"):
        TrainConfig(balance_scope="token").validate()
    with pytest.raises(ValueError, match="bias_rate"):
        TrainConfig(bias_rate=-1.0).validate()


def _tiny_run(root: Path, tokenizer: Path, domains: tuple[str, ...]) -> tuple[Path, Path]:
    """An OUT folder with the tokenizer and a WORK folder elsewhere with a manifest and token streams."""
    import json
    import shutil

    out, work = root / "out", root / "work"
    (work / "corpus").mkdir(parents=True)
    (work / "tokens").mkdir()
    out.mkdir()
    shutil.copyfile(tokenizer, out / "tokenizer.json")
    (work / "corpus" / "manifest.json").write_text(json.dumps({"config": {}, "domains": {d: {} for d in domains}}))
    rng = np.random.default_rng(1)
    for i, d in enumerate(domains):  # each domain its own slice of the vocabulary
        for split, n in (("train", 4000), ("heldout", 400)):
            np.save(work / "tokens" / f"{d}.{split}.npy", rng.integers(4 + 30 * i, 34 + 30 * i, n).astype(np.uint16))
    return out, work


def test_training_with_every_lever_resumes_to_the_uninterrupted_run(tiny_tokenizer: Path, tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    from cluster.train.data import load_streams
    from cluster.train.export import export_checkpoint
    from cluster.train.model import MoEConfig
    from cluster.train.train import TrainConfig, checkpoint_path, train

    domains = ("python", "c", "perl")
    model = MoEConfig(n_vocab=300, n_ctx=16, n_embd=32, n_layer=2, n_head=2, n_head_kv=1, head_dim=16, n_expert=8,
                      n_expert_used=2, n_ff_exp=16, selection_bias=True)
    cfg = TrainConfig(steps=6, batch_size=6, warmup_steps=1, log_every=1, eval_every=3, eval_windows=2, checkpoint_every=2,
                      aux_coef=0.001, balance_scope="sequence", bias_rate=0.01, threads=1, model=model)
    out_a, work_a = _tiny_run(tmp_path / "a", tiny_tokenizer, domains)
    assert list(load_streams(work_a, "train")) == list(domains)  # the manifest's domains, in its order
    ckpt_a = train(out_a, cfg, log=lambda _: None, work=work_a)
    assert ckpt_a == checkpoint_path(out_a, work_a) and not (out_a / "work").exists()

    class Killed(Exception):
        pass

    def die_at_step_5(line: str) -> None:
        if '"step": 5,' in line:
            raise Killed

    out_b, work_b = _tiny_run(tmp_path / "b", tiny_tokenizer, domains)
    with pytest.raises(Killed):
        train(out_b, cfg, log=die_at_step_5, work=work_b)
    assert torch.load(checkpoint_path(out_b, work_b), weights_only=False)["step"] == 4
    train(out_b, cfg, log=lambda _: None, work=work_b)
    a = torch.load(ckpt_a, weights_only=False)
    b = torch.load(checkpoint_path(out_b, work_b), weights_only=False)
    assert b["step"] == 6 and a["model"].keys() == b["model"].keys()
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert a["model"]["blocks.0.moe.selection_bias"].abs().sum() > 0  # the bias moved and was saved
    steps = [[line.split('"step": ')[1].split(",")[0] for line in (o / "train-log.jsonl").read_text().splitlines()]
             for o in (out_a, out_b)]
    assert steps[0] == steps[1]
    with pytest.raises(ValueError, match="selection bias"):
        export_checkpoint(ckpt_a, out_a / "tokenizer.json", tmp_path / "x.gguf")


def test_prompts_interleave_conversations_as_arrivals_without_a_cycle_round_robin_follows(tmp_path: Path) -> None:
    import json

    from cluster.train.prompts import PromptsConfig, write_prompts

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for domain in ("a", "b", "c", "d"):
        with (corpus / f"{domain}.heldout.jsonl").open("w") as f:
            for doc in range(6):
                f.write(json.dumps({"text": f"{domain}{doc} " * 400}) + "\n")
    lines = [json.loads(line) for line in write_prompts(tmp_path, PromptsConfig(conversations=6, turns=3,
                                                                                 chars_per_turn=50)).open()]
    assert len(lines) == 4 * 6 * 3
    turns: dict[str, list[str]] = {}
    for line in lines:
        turns.setdefault(line["session"], []).append(line["prompt"])
    text = {f"{d}-{i}": f"{d}{i} " * 400 for d in "abcd" for i in range(6)}
    assert all("".join(t) == text[s][:150] for s, t in turns.items())  # each conversation's turns, in order
    # round_robin over 3 nodes (24 conversations): consecutive turns of a conversation land on one node by chance
    # (about a third), not always as under the old fixed cycle over the conversations
    node = {}
    same = 0
    for i, line in enumerate(lines):
        same += node.get(line["session"]) == i % 3
        node[line["session"]] = i % 3
    assert same < 0.6 * (4 * 6 * 2)
    assert lines == [json.loads(line) for line in write_prompts(tmp_path, PromptsConfig(conversations=6, turns=3,
                                                                                         chars_per_turn=50)).open()]
