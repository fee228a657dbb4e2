"""Command line of the training pipeline: ``python -m cluster.train STAGE --out DIR [options]``.

Stages, in the order `all` runs them (each reads what the previous ones wrote under DIR):

| stage | reads | writes |
| --- | --- | --- |
| `corpus` | files on this machine | `WORK/corpus/`, `DIR/corpus-manifest.json` |
| `tokenizer` | the corpus' training split | `DIR/tokenizer.json` |
| `train` | corpus, tokenizer | `WORK/tokens/`, `WORK/checkpoints/last.pt`, `DIR/train-log.jsonl` |
| `export` | checkpoint, tokenizer | `DIR/moe-<N>domains.gguf` (N from `DIR/corpus-manifest.json`; or `--gguf`) |
| `verify` | GGUF, held-out tokens | `DIR/verify.json` (exit status 1 below the agreement bar) |
| `routing` | GGUF, held-out tokens | `DIR/routing.json` |
| `prompts` | the corpus' held-out split | `WORK/prompts.jsonl` (a benchmark workload; not part of `all`) |

WORK is `--work` (default `DIR/work`): a run that must outlive its checkout keeps it outside.
`--domains` picks the corpus' domain set (`corpus.DOMAIN_SETS`, default the first model's five);
every later stage takes the domains from the corpus manifest. `all` skips the corpus and the
tokenizer when they exist, and resumes training from the last checkpoint. Everything heavy runs
on `--threads` CPU threads (default 2), with passive OpenMP waiting; run it under
``nice -n 19`` on a shared machine.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from pathlib import Path

# Idle OpenMP threads sleep instead of spinning: on a shared machine a nice'd run's threads are
# often preempted, and each one spinning at a barrier while the other waits for a core burnt
# about 30x the CPU time of an uncontended step (measured on the expert products here). Set
# before torch loads its OpenMP runtime; an explicit OMP_WAIT_POLICY in the environment wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from typing import TYPE_CHECKING

from cluster.train.corpus import DOMAIN_SETS, CorpusConfig

if TYPE_CHECKING:  # torch stays unimported until a stage needs it
    from cluster.train.train import TrainConfig

DEFAULT_OUT = Path("trained")
CORPUS_MANIFEST = "corpus-manifest.json"
STAGES = ("corpus", "tokenizer", "train", "export", "verify", "routing")


def _parser() -> argparse.ArgumentParser:
    from cluster.train.export import GGUF_FILE

    p = argparse.ArgumentParser(prog="python -m cluster.train", description=__doc__.split("\n")[0])
    p.add_argument("stage", choices=(*STAGES, "prompts", "all"))
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output directory (default: %(default)s)")
    p.add_argument("--work", type=Path, default=None, help="work directory: corpus, tokens, checkpoints (default: OUT/work)")
    p.add_argument("--threads", type=int, default=2, help="CPU threads for torch and llama.cpp (default: %(default)s)")
    g = p.add_argument_group("corpus")
    g.add_argument("--domains", choices=tuple(DOMAIN_SETS), default="5domains",
                   help="domain set: " + "; ".join(f"{k} = {', '.join(v)}" for k, v in DOMAIN_SETS.items())
                   + " (default: %(default)s)")
    g.add_argument("--train-bytes", type=int, default=CorpusConfig.train_bytes, help="per domain (default: %(default)s)")
    g.add_argument("--heldout-bytes", type=int, default=CorpusConfig.heldout_bytes, help="per domain (default: %(default)s)")
    g = p.add_argument_group("tokenizer")
    g.add_argument("--vocab-size", type=int, default=8192, help="(default: %(default)s)")
    g = p.add_argument_group("train")
    g.add_argument("--steps", type=int, default=2000, help="(default: %(default)s)")
    g.add_argument("--batch-size", type=int, default=10, help="sequences per step (default: %(default)s)")
    g.add_argument("--lr", type=float, default=2e-3, help="peak learning rate (default: %(default)s)")
    g.add_argument("--warmup-steps", type=int, default=100, help="(default: %(default)s)")
    g.add_argument("--eval-every", type=int, default=250, help="steps between held-out evaluations (default: %(default)s)")
    g.add_argument("--aux-coef", type=float, default=0.01, help="load-balancing loss weight (default: %(default)s)")
    g.add_argument("--balance-scope", choices=("global", "sequence"), default="global",
                   help="load-balancing loss over the whole batch or per sequence (default: %(default)s)")
    g.add_argument("--bias-rate", type=float, default=0.0,
                   help="auxiliary-loss-free selection bias step per training step; 0 = no bias (default: %(default)s)")
    g.add_argument("--checkpoint-every", type=int, default=50, help="steps between checkpoints (default: %(default)s)")
    g.add_argument("--seed", type=int, default=0, help="(default: %(default)s)")
    g.add_argument("--n-ctx", type=int, default=256, help="(default: %(default)s)")
    g.add_argument("--n-layer", type=int, default=6, help="(default: %(default)s)")
    g.add_argument("--n-embd", type=int, default=192, help="(default: %(default)s)")
    g.add_argument("--n-head", type=int, default=6, help="(default: %(default)s)")
    g.add_argument("--n-head-kv", type=int, default=2, help="(default: %(default)s)")
    g.add_argument("--head-dim", type=int, default=32, help="(default: %(default)s)")
    g.add_argument("--n-expert", type=int, default=64, help="(default: %(default)s)")
    g.add_argument("--n-expert-used", type=int, default=4, help="(default: %(default)s)")
    g.add_argument("--n-ff-exp", type=int, default=128, help="(default: %(default)s)")
    g = p.add_argument_group("prompts")
    g.add_argument("--conversations", type=int, default=3, help="held-out documents per domain (default: %(default)s)")
    g.add_argument("--single-shot", action="store_true",
                   help="each turn a request of its own, no session (writes WORK/prompts-single.jsonl)")
    g = p.add_argument_group("export, verify, routing")
    g.add_argument("--gguf", type=Path, default=None,
                   help=f"model file (default: OUT/moe-<N>domains.gguf, N from OUT's corpus manifest; {GGUF_FILE} without one)")
    g.add_argument("--windows", type=int, default=16, help="held-out windows per domain (default: %(default)s)")
    g.add_argument("--min-agreement", type=float, default=0.99, help="verify's bar (default: %(default)s)")
    return p


def _train_config(args: argparse.Namespace, n_vocab: int) -> TrainConfig:
    from cluster.train.model import MoEConfig
    from cluster.train.train import TrainConfig

    model = MoEConfig(n_vocab=n_vocab, n_ctx=args.n_ctx, n_embd=args.n_embd, n_layer=args.n_layer, n_head=args.n_head,
                      n_head_kv=args.n_head_kv, head_dim=args.head_dim, n_expert=args.n_expert,
                      n_expert_used=args.n_expert_used, n_ff_exp=args.n_ff_exp, selection_bias=args.bias_rate > 0)
    return TrainConfig(steps=args.steps, batch_size=args.batch_size, lr=args.lr, warmup_steps=args.warmup_steps,
                       eval_every=args.eval_every, aux_coef=args.aux_coef, seed=args.seed, threads=args.threads,
                       checkpoint_every=args.checkpoint_every, model=model, balance_scope=args.balance_scope,
                       bias_rate=args.bias_rate)


def work_dir(args: argparse.Namespace) -> Path:
    """`--work`, or OUT/work."""
    return args.work if args.work is not None else args.out / "work"


def default_gguf(out: Path) -> Path:
    """OUT/moe-<N>domains.gguf, N the number of domains in OUT's corpus manifest (moe-5domains.gguf without one)."""
    import json

    from cluster.train.export import GGUF_FILE

    manifest = out / CORPUS_MANIFEST
    if not manifest.exists():
        return out / GGUF_FILE
    with open(manifest, encoding="utf-8") as f:
        return out / f"moe-{len(json.load(f)['domains'])}domains.gguf"


def run_stage(stage: str, args: argparse.Namespace) -> int:
    """Runs one stage; returns the process exit status."""
    from cluster.train.tokenizer import TOKENIZER_FILE

    out: Path = args.out
    work = work_dir(args)
    gguf_path: Path = args.gguf or default_gguf(out)
    tokenizer_path = out / TOKENIZER_FILE
    if stage == "corpus":
        from cluster.train.corpus import build_corpus

        out.mkdir(parents=True, exist_ok=True)
        build_corpus(work, CorpusConfig(train_bytes=args.train_bytes, heldout_bytes=args.heldout_bytes),
                     domains=DOMAIN_SETS[args.domains])
        shutil.copyfile(work / "corpus" / "manifest.json", out / CORPUS_MANIFEST)
    elif stage == "tokenizer":
        from cluster.train.tokenizer import TokenizerConfig, train_tokenizer

        train_tokenizer(work, tokenizer_path, TokenizerConfig(vocab_size=args.vocab_size))
        print(f"tokenizer: {tokenizer_path}")
    elif stage == "train":
        from cluster.train.data import tokenize_corpus
        from cluster.train.tokenizer import load_tokenizer
        from cluster.train.train import train

        counts = tokenize_corpus(work, tokenizer_path)
        print(f"tokens: {counts}")
        train(out, _train_config(args, load_tokenizer(tokenizer_path).get_vocab_size()), work=work)
    elif stage == "export":
        from cluster.train.export import export_checkpoint
        from cluster.train.train import checkpoint_path

        export_checkpoint(checkpoint_path(out, work), tokenizer_path, gguf_path)
        print(f"gguf: {gguf_path} ({gguf_path.stat().st_size} bytes)")
    elif stage == "verify":
        from cluster.train.data import tokenize_corpus
        from cluster.train.verify import verify

        tokenize_corpus(work, tokenizer_path)
        report = verify(out, gguf_path, n_windows=args.windows, min_agreement=args.min_agreement, threads=args.threads,
                        work=work)
        print(f"argmax agreement {report['argmax_agreement']:.4f} (bar {args.min_agreement}): "
              f"{'passed' if report['passed'] else 'FAILED'}")
        return 0 if report["passed"] else 1
    elif stage == "prompts":
        from cluster.train.prompts import PromptsConfig, write_prompts

        print(f"prompts: {write_prompts(work, PromptsConfig(conversations=args.conversations, single_shot=args.single_shot))}")
    elif stage == "routing":
        from cluster.train.data import tokenize_corpus
        from cluster.train.routing import routing_report

        tokenize_corpus(work, tokenizer_path)
        routing_report(out, gguf_path, n_windows=args.windows, threads=args.threads, work=work)
    else:
        raise ValueError(f"unknown stage '{stage}'")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.stage != "all":
        return run_stage(args.stage, args)
    from cluster.train.tokenizer import TOKENIZER_FILE

    for stage in STAGES:
        if stage == "corpus" and (work_dir(args) / "corpus" / "manifest.json").exists():
            from cluster.train.corpus import corpus_domains

            built = corpus_domains(work_dir(args))
            if built != DOMAIN_SETS[args.domains]:
                print(f"corpus under {work_dir(args)} holds {', '.join(built)}, not the '{args.domains}' set: "
                      "remove it or pick that set", file=sys.stderr)
                return 2
            print("corpus: already built, skipped")
            continue
        if stage == "tokenizer" and (args.out / TOKENIZER_FILE).exists():
            print("tokenizer: already trained, skipped")
            continue
        status = run_stage(stage, args)
        if status:
            return status
    return 0


if __name__ == "__main__":
    sys.exit(main())
