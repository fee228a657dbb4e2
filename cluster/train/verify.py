"""llama.cpp against PyTorch on the exported GGUF: next-token argmax agreement and bits per token.

Both sides run the same weights: the PyTorch model (model.MoETransformer, float32) is loaded from
the GGUF itself (export.read_gguf; F16 tensors widened to float32), and llama.cpp (through
llama-cpp-python) loads the same file. Both read the same token ids: the held-out windows of
every domain (data.heldout_windows, `<|bos|>` + n_ctx - 1 tokens), evaluated from an empty KV
cache with logits for every position. Per domain the report gives:

* `argmax_agreement`: the fraction of positions where both pick the same next token;
* `bits_per_token_torch` / `bits_per_token_llama`: mean -log2 p(target) under each;
* `max_abs_logit_diff`: the largest logit difference seen;
* `max_top2_margin_where_argmax_differs`: where the two argmaxes differ, the largest gap between
  PyTorch's two best logits (small: the disagreements are near-ties).

It also checks the tokenizers: the held-out documents tokenized by `tokenizers` (training) and
by llama.cpp (the GGUF's vocabulary, merges and `qwen2` pre-tokenizer), as the fraction of
documents tokenized identically and of tokens in them. And it checks the experts: the top-k
sets llama.cpp selects (read by the project's own engine, `cluster.engine.moe_engine`, while it prefills
the start of each domain's first held-out document and decodes greedily) against the sets the
PyTorch model selects on the same tokens (`experts`: the share of identical sets and the mean
overlap |S_llama ∩ S_torch| / k). llama.cpp computes F16 matrix products with activations
rounded to F16, so small logit differences are expected (and a near-tie between two experts
can go either way); the acceptance bar is argmax agreement >= `min_agreement` over all
positions.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import llama_cpp
import numpy as np
import torch

from cluster.train.corpus import corpus_domains, read_documents
from cluster.train.data import heldout_windows, load_streams
from cluster.train.export import read_gguf
from cluster.train.model import MoEConfig, MoETransformer
from cluster.train.tokenizer import BOS, load_tokenizer

if TYPE_CHECKING:
    from tokenizers import Tokenizer


VERIFY_FILE = "verify.json"


def torch_model_from_gguf(path: Path) -> MoETransformer:
    """The PyTorch model holding the GGUF's weights (float32)."""
    hparams, tensors = read_gguf(path)
    model = MoETransformer(MoEConfig(**hparams))
    model.load_gguf_tensors({k: torch.from_numpy(v) for k, v in tensors.items()})
    model.eval()
    return model


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))


def _bits(logits: np.ndarray, targets: np.ndarray) -> float:
    logp = _log_softmax(logits.astype(np.float64))
    return float(-logp[np.arange(targets.shape[0]), targets].mean() / math.log(2))


def _tokenizer_agreement(llm: llama_cpp.Llama, tok: Tokenizer, work: Path, max_docs: int) -> dict:
    report = {}
    for domain in corpus_domains(work):
        docs = read_documents(work, domain, "heldout")[:max_docs]
        same_docs = same_tokens = total_tokens = 0
        for doc in docs:
            ours = tok.encode(doc.text, add_special_tokens=False).ids
            theirs = llm.tokenize(doc.text.encode("utf-8"), add_bos=False, special=False)
            total_tokens += len(ours)
            if ours == theirs:
                same_docs += 1
                same_tokens += len(ours)
        report[domain] = {"documents": len(docs), "identical_documents": same_docs,
                          "tokens": total_tokens, "tokens_in_identical_documents": same_tokens}
    return report


def _expert_agreement(model: MoETransformer, gguf_path: Path, prompts: dict[str, str], max_tokens: int,
                      threads: int) -> dict:
    """Top-k sets llama.cpp selected (read by the project's engine) against PyTorch's, per domain.

    Each prompt is prefilled and `max_tokens` tokens are decoded greedily by `cluster.engine.moe_engine`
    (with a cache budget holding the whole model, so nothing is evicted); PyTorch then runs the
    same tokens (prompt with BOS, then every generated token fed back). Compared: every prompt
    token in every layer but the last (llama.cpp's last layer keeps only the rows whose logits it
    needs), the last prompt token in the last layer, and every decode step in every layer.
    """
    from cluster.engine.moe_engine import MoEEngine

    n_layer, k = model.cfg.n_layer, model.cfg.n_expert_used
    report = {}
    for domain, prompt in prompts.items():
        with MoEEngine(gguf_path, cache_bytes=2 * gguf_path.stat().st_size, n_ctx=model.cfg.n_ctx, n_threads=threads,
                       n_batch=model.cfg.n_ctx, predict=False) as engine:  # a fresh context: no reused prefix
            gen = engine.generate(prompt, max_tokens=max_tokens, temperature=0.0)
            prompt_ids = engine.tokenize(prompt)
        n_fed = len(gen.tokens) if gen.finish_reason == "stop" else len(gen.tokens) - 1  # the last one is not decoded
        fed = [*prompt_ids, *gen.tokens[:n_fed]]
        with torch.no_grad():
            routing = model(torch.tensor([fed])).routing
        ours = np.stack([r.selected.numpy() for r in routing], axis=1)  # [T, L, k] (batch of one)
        prefill, _ = gen.trace.split_prefill(len(prompt_ids), n_layer, model.cfg.n_expert)  # [P, L, k], -1 unseen
        theirs = [(t, layer, prefill[t, layer]) for t in range(len(prompt_ids)) for layer in range(n_layer)
                  if prefill[t, layer, 0] >= 0]
        decode_steps = list(gen.trace.ubatches())[1:]  # the first step is the prompt's ubatch
        if len(decode_steps) != n_fed:
            raise RuntimeError(f"{domain}: {len(decode_steps)} decode steps in llama.cpp's trace, expected {n_fed}")
        theirs += [(len(prompt_ids) + s, layer, ids[0]) for s, step in enumerate(decode_steps) for layer, ids in step]
        same = [set(ours[t, layer].tolist()) == set(ids.tolist()) for t, layer, ids in theirs]
        overlap = [len(set(ours[t, layer].tolist()) & set(ids.tolist())) / k for t, layer, ids in theirs]
        report[domain] = {"prompt_tokens": len(prompt_ids), "decoded_tokens": n_fed, "selections": len(theirs),
                          "identical_sets": round(float(np.mean(same)), 5), "mean_overlap": round(float(np.mean(overlap)), 5)}
    return report


def _prompt(text: str, max_chars: int = 300) -> str:
    """The whole lines of `text` within its first `max_chars` characters (at least one line)."""
    head = text[:max_chars]
    return head[: head.rfind("\n") + 1] if "\n" in head else head


def verify(out_dir: Path, gguf_path: Path, n_windows: int = 16, min_agreement: float = 0.99, threads: int = 2,
           max_docs: int = 50, expert_tokens: int = 32, log: Callable[[str], None] = print,
           work: Path | None = None) -> dict:
    """Runs the comparison and writes `out_dir/verify.json`.

    Args:
        out_dir: the training directory (tokenizer.json, work/corpus, work/tokens).
        gguf_path: the exported model.
        n_windows: held-out windows per domain (n_ctx positions each).
        min_agreement: the acceptance bar on argmax agreement over all positions.
        threads: compute threads for torch and llama.cpp.
        max_docs: held-out documents per domain in the tokenizer check.
        expert_tokens: tokens decoded per domain in the expert-selection check.
        log: receives one line per domain.
        work: the work directory (corpus, tokens; default `out_dir/work`); the domains are its corpus'.

    Returns:
        The report (also written), with `passed` = agreement >= min_agreement.
    """
    from cluster.train.tokenizer import TOKENIZER_FILE

    work = out_dir / "work" if work is None else work
    domains_list = corpus_domains(work)
    torch.set_num_threads(threads)
    model = torch_model_from_gguf(gguf_path)
    n_ctx = model.cfg.n_ctx
    tok = load_tokenizer(out_dir / TOKENIZER_FILE)
    bos = int(tok.token_to_id(BOS))
    streams = load_streams(work, "heldout")
    llm = llama_cpp.Llama(model_path=str(gguf_path), n_ctx=n_ctx, n_batch=n_ctx, n_ubatch=n_ctx, logits_all=True,
                          n_threads=threads, n_threads_batch=threads, verbose=False)
    try:
        domains = {}
        agree_all = positions_all = 0
        for domain in domains_list:
            x, y = heldout_windows(streams[domain], n_windows, n_ctx, bos)
            with torch.no_grad():
                torch_logits = model(torch.from_numpy(x)).logits.numpy()
            agree = 0
            max_diff = max_margin = 0.0
            bits_torch = bits_llama = 0.0
            for i in range(x.shape[0]):
                llm.reset()
                llm.eval(x[i].tolist())
                llama_logits = np.array(llm.scores[:n_ctx], dtype=np.float32)
                differ = llama_logits.argmax(-1) != torch_logits[i].argmax(-1)
                agree += int((~differ).sum())
                if differ.any():  # how close PyTorch's own top two were where the two sides disagree
                    top2 = np.sort(torch_logits[i][differ], axis=-1)[:, -2:]
                    max_margin = max(max_margin, float((top2[:, 1] - top2[:, 0]).max()))
                max_diff = max(max_diff, float(np.abs(llama_logits - torch_logits[i]).max()))
                bits_torch += _bits(torch_logits[i], y[i])
                bits_llama += _bits(llama_logits, y[i])
            positions = x.shape[0] * n_ctx
            domains[domain] = {
                "positions": positions,
                "argmax_agreement": round(agree / positions, 5),
                "bits_per_token_torch": round(bits_torch / x.shape[0], 4),
                "bits_per_token_llama": round(bits_llama / x.shape[0], 4),
                "max_abs_logit_diff": round(max_diff, 4),
                "max_top2_margin_where_argmax_differs": round(max_margin, 4),
            }
            agree_all += agree
            positions_all += positions
            log(f"verify {domain}: {json.dumps(domains[domain])}")
        tokenizer = _tokenizer_agreement(llm, tok, work, max_docs)
    finally:
        llm.close()
    prompts = {d: _prompt(read_documents(work, d, "heldout")[0].text) for d in domains_list}
    experts = _expert_agreement(model, gguf_path, prompts, expert_tokens, threads)
    for domain, entry in experts.items():
        log(f"verify experts {domain}: {json.dumps(entry)}")
    agreement = agree_all / positions_all
    report = {
        "gguf": str(gguf_path),
        "windows_per_domain": n_windows,
        "n_ctx": n_ctx,
        "argmax_agreement": round(agreement, 5),
        "min_agreement": min_agreement,
        "passed": agreement >= min_agreement,
        "domains": domains,
        "experts": experts,
        "tokenizer": tokenizer,
    }
    with open(out_dir / VERIFY_FILE, "w", encoding="utf-8") as f:
        json.dump(report, f, indent=2)
        f.write("\n")
    return report
