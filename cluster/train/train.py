"""The training loop: AdamW with warmup and cosine decay, CPU only, resumable, JSON-lines log.

Per step: one balanced batch (`data.training_batch`), loss = cross-entropy + aux_coef * the
mean load-balancing loss over layers (`model`; over the whole batch or per sequence, as
`balance_scope` says), gradient clipping, AdamW, then -- with `bias_rate` > 0 -- each layer's
selection bias moves by bias_rate * sign(mean load - load) on the step's selections
(DeepSeek-V3's auxiliary-loss-free balancing; the bias is saved with the model). Learning rate rises
linearly for `warmup_steps`, then follows a cosine from `lr` down to `lr * min_lr_ratio` at
`steps`. Weight decay applies to matrices and expert tensors, not to norms.

The log (`train-log.jsonl`) gets one JSON object per line:

* every `log_every` steps: ``{"kind": "step", "step", "loss", "aux_loss", "lr", "tokens",
  "tokens_per_s", "elapsed_s", "cpu_s"}`` (loss and aux_loss averaged over the steps since the
  last line; elapsed_s is wall time spent training, summed over resumed runs; tokens_per_s is
  over the last interval of wall time);
* every `eval_every` steps and at the end: ``{"kind": "eval", "step", "domains": {domain:
  {"loss", "bits_per_token"}}, "experts": {"used_per_layer", "max_load_per_layer"}}`` on the
  fixed held-out windows; used_per_layer counts experts given at least a quarter of a uniform
  share of the held-out selections, max_load_per_layer is the busiest expert's share over the
  uniform share.

Checkpoints (`checkpoints/last.pt` under the work directory, by default `OUT/work`, written
atomically every `checkpoint_every` steps and at the end) hold model, optimizer, step and clocks; a
run started again on the same directory resumes from there, truncating log lines past the
checkpoint's step.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from cluster.train.data import heldout_windows, load_streams, training_batch
from cluster.train.model import BALANCE_SCOPES, MoEConfig, MoETransformer

LOG_FILE = "train-log.jsonl"
CHECKPOINT_DIR = "checkpoints"
CHECKPOINT_FILE = "last.pt"


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation knobs.

    Attributes:
        steps: optimizer steps in the whole run (the cosine ends here).
        batch_size: sequences per step, a multiple of the number of domains keeps batches balanced.
        lr: peak learning rate.
        min_lr_ratio: final learning rate as a fraction of `lr`.
        warmup_steps: linear warmup from 0.
        weight_decay: AdamW decay on matrices and expert tensors.
        betas: AdamW betas.
        grad_clip: max global gradient norm.
        aux_coef: weight of the load-balancing loss.
        balance_scope: "global" (the loss over every token of the step's batch) or "sequence" (per
            sequence, averaged).
        bias_rate: step of the auxiliary-loss-free selection bias per training step; 0 = no bias.
            Positive needs model.selection_bias, and model.selection_bias needs it positive.
        seed: initial weights and batch offsets.
        threads: torch intra-op threads.
        log_every: steps between step log lines.
        eval_every: steps between held-out evaluations.
        eval_windows: held-out windows per domain in an evaluation.
        checkpoint_every: steps between checkpoints.
        model: the model's shapes.
    """

    steps: int = 2000
    batch_size: int = 10
    lr: float = 2e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 100
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    grad_clip: float = 1.0
    aux_coef: float = 0.01
    seed: int = 0
    threads: int = 2
    log_every: int = 10
    eval_every: int = 250
    eval_windows: int = 8
    checkpoint_every: int = 50
    model: MoEConfig = field(default_factory=MoEConfig)
    balance_scope: str = "global"
    bias_rate: float = 0.0

    def validate(self) -> None:
        """Raises ValueError naming the first field out of range."""
        self.model.validate()
        for name in ("steps", "batch_size", "threads", "log_every", "eval_every", "eval_windows", "checkpoint_every"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if not 0 <= self.warmup_steps < self.steps:
            raise ValueError(f"warmup_steps must be in [0, steps), got {self.warmup_steps}")
        if self.lr <= 0 or not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"lr must be positive and min_lr_ratio in [0, 1], got {self.lr}, {self.min_lr_ratio}")
        if self.aux_coef < 0:
            raise ValueError(f"aux_coef must not be negative, got {self.aux_coef}")
        if self.balance_scope not in BALANCE_SCOPES:
            raise ValueError(f"balance_scope must be one of {BALANCE_SCOPES}, got '{self.balance_scope}'")
        if self.bias_rate < 0:
            raise ValueError(f"bias_rate must not be negative, got {self.bias_rate}")
        if (self.bias_rate > 0) != self.model.selection_bias:
            raise ValueError(f"bias_rate ({self.bias_rate}) > 0 and model.selection_bias ({self.model.selection_bias}) "
                             "must go together")

    def to_dict(self) -> dict:
        return asdict(self)

    @staticmethod
    def from_dict(data: dict) -> TrainConfig:
        data = dict(data)
        data["model"] = MoEConfig(**data["model"])
        data["betas"] = tuple(data["betas"])
        return TrainConfig(**data)


def learning_rate(cfg: TrainConfig, step: int) -> float:
    """The learning rate of `step` (0-based): linear warmup, then cosine to lr * min_lr_ratio."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    floor = cfg.lr * cfg.min_lr_ratio
    return floor + (cfg.lr - floor) * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def _optimizer(model: MoETransformer, cfg: TrainConfig) -> torch.optim.AdamW:
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas)


@torch.no_grad()
def evaluate(model: MoETransformer, windows: dict[str, tuple[np.ndarray, np.ndarray]]) -> dict:
    """Held-out loss per domain and expert usage per layer (the "eval" log entry, without step).

    Args:
        model: the model, switched to eval mode for the call.
        windows: per domain, inputs and targets [n, n_ctx] (data.heldout_windows).
    """
    was_training = model.training
    model.eval()
    domains = {}
    n_expert = model.cfg.n_expert
    counts = torch.zeros(model.cfg.n_layer, n_expert)
    for domain, (x, y) in windows.items():
        out = model(torch.from_numpy(x))
        loss = F.cross_entropy(out.logits.reshape(-1, out.logits.shape[-1]), torch.from_numpy(y).reshape(-1)).item()
        domains[domain] = {"loss": round(loss, 5), "bits_per_token": round(loss / math.log(2), 5)}
        for layer, r in enumerate(out.routing):
            counts[layer] += torch.bincount(r.selected.reshape(-1), minlength=n_expert).float()
    share = counts / counts.sum(1, keepdim=True) * n_expert  # 1.0 = a uniform share
    model.train(was_training)
    return {
        "domains": domains,
        "experts": {
            "used_per_layer": (share >= 0.25).sum(1).tolist(),
            "max_load_per_layer": [round(v, 3) for v in share.max(1).values.tolist()],
        },
    }


def checkpoint_path(out_dir: Path, work: Path | None = None) -> Path:
    """The checkpoint of a run: `work/checkpoints/last.pt`, `work` defaulting to `out_dir/work`."""
    return (out_dir / "work" if work is None else work) / CHECKPOINT_DIR / CHECKPOINT_FILE


def _save_checkpoint(path: Path, model: MoETransformer, opt: torch.optim.Optimizer, cfg: TrainConfig, step: int,
                     clocks: dict[str, float]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save({"config": cfg.to_dict(), "model": model.state_dict(), "optimizer": opt.state_dict(), "step": step,
                "clocks": clocks}, tmp)
    os.replace(tmp, path)


def load_model(path: Path) -> tuple[MoETransformer, TrainConfig, int]:
    """The model of a checkpoint, its training config and the number of steps it had done.

    Raises:
        FileNotFoundError: no checkpoint at `path`.
    """
    if not path.exists():
        raise FileNotFoundError(f"no checkpoint at {path}: run `python -m cluster.train train` first")
    state = torch.load(path, map_location="cpu", weights_only=False)
    cfg = TrainConfig.from_dict(state["config"])
    model = MoETransformer(cfg.model)
    model.load_state_dict(state["model"])
    return model, cfg, int(state["step"])


def _truncate_log(path: Path, last_step: int) -> None:
    if not path.exists():
        return
    with open(path, encoding="utf-8") as f:
        kept = [line for line in f if line.strip() and json.loads(line).get("step", 0) <= last_step]
    with open(path, "w", encoding="utf-8") as f:
        f.writelines(kept)


def train(out_dir: Path, cfg: TrainConfig, log: Callable[[str], None] = print, work: Path | None = None) -> Path:
    """Trains (or resumes) the model under `out_dir` and returns the final checkpoint's path.

    Reads `work/tokens/` and writes `out_dir/train-log.jsonl` and `work/checkpoints/last.pt`;
    `work` defaults to `out_dir/work` (a run that must outlive its checkout keeps it elsewhere).

    Raises:
        ValueError: a checkpoint exists with a different config.
    """
    cfg.validate()
    torch.set_num_threads(cfg.threads)
    work = out_dir / "work" if work is None else work
    log_path = out_dir / LOG_FILE
    ckpt = checkpoint_path(out_dir, work)
    from cluster.train.tokenizer import BOS, TOKENIZER_FILE, load_tokenizer

    bos = int(load_tokenizer(out_dir / TOKENIZER_FILE).token_to_id(BOS))
    train_streams = load_streams(work, "train")
    windows = {d: heldout_windows(s, cfg.eval_windows, cfg.model.n_ctx, bos) for d, s in load_streams(work, "heldout").items()}

    torch.manual_seed(cfg.seed)
    model = MoETransformer(cfg.model)
    model.init_weights(torch.Generator().manual_seed(cfg.seed))
    opt = _optimizer(model, cfg)
    step, clocks = 0, {"elapsed_s": 0.0, "cpu_s": 0.0}
    if ckpt.exists():
        state = torch.load(ckpt, map_location="cpu", weights_only=False)
        if replace(TrainConfig.from_dict(state["config"]), threads=cfg.threads) != cfg:  # threads may change on resume
            raise ValueError(f"checkpoint {ckpt} was trained with another config; remove it to start over")
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        step, clocks = int(state["step"]), dict(state["clocks"])
        _truncate_log(log_path, step)
        log(f"resuming at step {step}")
    else:
        log_path.unlink(missing_ok=True)
        log(f"model: {model.n_params()} parameters, {cfg.model}")

    tokens_per_step = cfg.batch_size * cfg.model.n_ctx
    model.train()
    with open(log_path, "a", encoding="utf-8") as log_file:
        def write(entry: dict) -> None:
            log_file.write(json.dumps(entry) + "\n")
            log_file.flush()

        sums = {"loss": 0.0, "aux": 0.0, "n": 0}
        wall0, cpu0 = time.perf_counter(), time.process_time()
        interval_start = wall0
        while step < cfg.steps:
            x, y = training_batch(train_streams, step, cfg.seed, cfg.batch_size, cfg.model.n_ctx, bos)
            lr = learning_rate(cfg, step)
            for group in opt.param_groups:
                group["lr"] = lr
            out = model(torch.from_numpy(x), cfg.balance_scope)
            ce = F.cross_entropy(out.logits.reshape(-1, cfg.model.n_vocab), torch.from_numpy(y).reshape(-1))
            loss = ce + cfg.aux_coef * out.aux_loss
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            opt.step()
            if cfg.bias_rate > 0:
                for block, routing in zip(model.blocks, out.routing):
                    block.moe.update_selection_bias(routing.load, cfg.bias_rate)
            step += 1
            sums["loss"] += ce.item()
            sums["aux"] += out.aux_loss.item()
            sums["n"] += 1

            now = time.perf_counter()
            elapsed = clocks["elapsed_s"] + now - wall0
            cpu = clocks["cpu_s"] + time.process_time() - cpu0
            if step % cfg.log_every == 0 or step == cfg.steps:
                entry = {"kind": "step", "step": step, "loss": round(sums["loss"] / sums["n"], 5),
                         "aux_loss": round(sums["aux"] / sums["n"], 5), "lr": lr, "tokens": step * tokens_per_step,
                         "tokens_per_s": round(sums["n"] * tokens_per_step / (now - interval_start), 1),
                         "elapsed_s": round(elapsed, 1), "cpu_s": round(cpu, 1)}
                write(entry)
                log(json.dumps(entry))
                sums = {"loss": 0.0, "aux": 0.0, "n": 0}
                interval_start = time.perf_counter()
            if step % cfg.eval_every == 0 or step == cfg.steps:
                entry = {"kind": "eval", "step": step, **evaluate(model, windows)}
                write(entry)
                log(json.dumps(entry))
                interval_start = time.perf_counter()
            if step % cfg.checkpoint_every == 0 or step == cfg.steps:
                now = time.perf_counter()
                clocks = {"elapsed_s": clocks["elapsed_s"] + now - wall0,
                          "cpu_s": clocks["cpu_s"] + time.process_time() - cpu0}
                wall0, cpu0 = now, time.process_time()
                _save_checkpoint(ckpt, model, opt, cfg, step, clocks)
                interval_start = time.perf_counter()
    return ckpt
