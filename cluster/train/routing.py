"""A first look at the trained model's learned routing (a sanity check, not the project's benchmark).

Selections come from the PyTorch model on the held-out windows of every domain (the same
windows `verify` uses), read as if each domain's windows were decoded one token after another
on one node: a trace of shape [n_steps, n_layer, k] per domain. From those traces:

* `next_token_reuse`: mean over layers and steps of |S_t ∩ S_{t-1}| / k inside a window
  (chance: k / n_expert);
* `top_third_mass`: per domain, the share of its selections that fall on the third of each
  layer's experts it uses most (1/3 if spread evenly); `effective_experts`: exp(entropy) of its
  per-layer selection distribution, averaged over layers;
* `prefill_touched_share`: the share of a layer's experts that one window (n_ctx tokens, as a
  prompt) selects at least once;
* `experts_used`: experts given at least a quarter of a uniform share of all selections, per
  layer (a collapsed router shows here);
* hit rates of a per-layer cache holding `budget * n_expert` experts, LRU and Belady's MIN
  (evicts the expert used farthest in the future), over each domain's trace with the cache
  kept across windows; every access counts, the first misses included. Experts selected in
  the current step are never evicted for one another (the step needs all of them).

`mixed` repeats these on one trace that takes the windows round robin over the domains (a
node whose requests change topic every n_ctx tokens); its `top_third_mass` is then the
concentration of all domains together.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # the simulations need numpy only; torch is imported where the model runs
    from cluster.train.model import MoETransformer

ROUTING_FILE = "routing.json"
BUDGETS: tuple[float, ...] = (0.1, 0.2, 1 / 3, 0.4, 0.5)


def simulate_lru(trace: np.ndarray, capacity: int) -> float:
    """Hit rate of an LRU cache of `capacity` experts over one layer's trace [n_steps, k]."""
    last_use: dict[int, int] = {}
    hits = accesses = 0
    for t, selected in enumerate(trace):
        current = set(int(e) for e in selected)
        for e in current:
            accesses += 1
            if e in last_use:
                hits += 1
        for e in current:
            last_use[e] = t
        while len(last_use) > capacity:
            victim = min((e for e in last_use if e not in current), key=last_use.__getitem__)
            del last_use[victim]
    return hits / accesses


def simulate_min(trace: np.ndarray, capacity: int) -> float:
    """Hit rate of Belady's MIN (offline optimum) with `capacity` experts over one layer's trace."""
    n_steps = trace.shape[0]
    next_use = np.full(trace.shape, n_steps, dtype=np.int64)  # next step selecting trace[t, j], after t
    seen: dict[int, int] = {}
    for t in range(n_steps - 1, -1, -1):
        for j, e in enumerate(trace[t]):
            next_use[t, j] = seen.get(int(e), n_steps)
        for e in trace[t]:
            seen[int(e)] = t
    resident: dict[int, int] = {}  # expert -> its next use
    hits = accesses = 0
    for t in range(n_steps):
        current = set()
        for j, e in enumerate(trace[t]):
            e = int(e)
            accesses += 1
            if e in resident:
                hits += 1
            resident[e] = int(next_use[t, j])
            current.add(e)
        while len(resident) > capacity:
            victim = max((e for e in resident if e not in current), key=resident.__getitem__)
            del resident[victim]
    return hits / accesses


def collect_traces(model: MoETransformer, windows: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Per domain, the selected experts [n_windows, n_ctx, n_layer, k] of the model on its windows."""
    import torch

    traces = {}
    with torch.no_grad():
        for domain, x in windows.items():
            out = model(torch.from_numpy(x))
            b, t = x.shape
            traces[domain] = np.stack([r.selected.reshape(b, t, -1).numpy() for r in out.routing], axis=2)
    return traces


def summarise(traces: dict[str, np.ndarray], n_expert: int, budgets: tuple[float, ...] = BUDGETS) -> dict:
    """The statistics of the module docstring from traces [n_windows, n_ctx, n_layer, k] per domain."""
    domains = {}
    all_counts = None
    for domain, tr in traces.items():
        n_windows, n_ctx, n_layer, k = tr.shape
        prev, cur = tr[:, :-1], tr[:, 1:]
        overlap = (prev[..., :, None] == cur[..., None, :]).any(-1).sum(-1)  # [w, t-1, layer]
        counts = np.stack([np.bincount(tr[:, :, layer].reshape(-1), minlength=n_expert) for layer in range(n_layer)])
        all_counts = counts if all_counts is None else all_counts + counts
        probs = counts / counts.sum(1, keepdims=True)
        top = np.sort(probs, axis=1)[:, ::-1][:, : round(n_expert / 3)].sum(1)
        entropy = -(np.where(probs > 0, probs * np.log(np.where(probs > 0, probs, 1)), 0)).sum(1)
        touched = np.mean([[len(np.unique(tr[w, :, layer])) / n_expert for layer in range(n_layer)] for w in range(n_windows)])
        flat = tr.reshape(n_windows * n_ctx, n_layer, k)
        hit_rates = {}
        for budget in budgets:
            capacity = max(k, round(budget * n_expert))
            lru = np.mean([simulate_lru(flat[:, layer], capacity) for layer in range(n_layer)])
            opt = np.mean([simulate_min(flat[:, layer], capacity) for layer in range(n_layer)])
            hit_rates[f"{budget:.3f}"] = {"capacity": capacity, "lru": round(float(lru), 4), "min": round(float(opt), 4)}
        domains[domain] = {
            "steps": n_windows * n_ctx,
            "next_token_reuse": round(float(overlap.mean() / k), 4),
            "top_third_mass": round(float(top.mean()), 4),
            "effective_experts": round(float(np.exp(entropy).mean()), 2),
            "prefill_touched_share": round(float(touched), 4),
            "hit_rates": hit_rates,
        }
    share = all_counts / all_counts.sum(1, keepdims=True) * n_expert
    k = next(iter(traces.values())).shape[-1]
    mean = {key: round(float(np.mean([d[key] for d in domains.values()])), 4)
            for key in ("next_token_reuse", "top_third_mass", "effective_experts", "prefill_touched_share")}
    mean["hit_rates"] = {b: {m: round(float(np.mean([d["hit_rates"][b][m] for d in domains.values()])), 4)
                             for m in ("lru", "min")} for b in next(iter(domains.values()))["hit_rates"]}
    return {
        "chance_next_token_reuse": round(k / n_expert, 4),
        "experts_used_per_layer": (share >= 0.25).sum(1).tolist(),
        "max_load_per_layer": [round(float(v), 3) for v in share.max(1)],
        "mean_over_domains": mean,
        "domains": domains,
    }


def routing_report(out_dir: Path, gguf_path: Path, n_windows: int = 16, threads: int = 2,
                   log: Callable[[str], None] = print, work: Path | None = None) -> dict:
    """Collects traces from the GGUF's weights in PyTorch, summarises them, writes `out_dir/routing.json`.

    The domains are those of the corpus under `work` (default `out_dir/work`), in its manifest's order.
    """
    import torch

    from cluster.train.data import heldout_windows, load_streams
    from cluster.train.tokenizer import BOS, TOKENIZER_FILE, load_tokenizer
    from cluster.train.verify import torch_model_from_gguf

    torch.set_num_threads(threads)
    model = torch_model_from_gguf(gguf_path)
    bos = int(load_tokenizer(out_dir / TOKENIZER_FILE).token_to_id(BOS))
    streams = load_streams(out_dir / "work" if work is None else work, "heldout")
    windows = {d: heldout_windows(s, n_windows, model.cfg.n_ctx, bos)[0] for d, s in streams.items()}
    traces = collect_traces(model, windows)
    mixed = np.stack([traces[d][w] for w in range(n_windows) for d in traces])  # windows round robin over domains
    report = {"gguf": str(gguf_path), "windows_per_domain": n_windows, **summarise(traces, model.cfg.n_expert),
              "mixed": summarise({"mixed": mixed}, model.cfg.n_expert)["domains"]["mixed"]}
    with open(out_dir / ROUTING_FILE, "w", encoding="utf-8") as f:
        json.dump(report, f, indent=2)
        f.write("\n")
    log(json.dumps(report["mean_over_domains"]))
    return report
