"""``python -m cluster bench regimes``: which routing regime a model is in, so every figure can say.

One model per run: the engine benchmark's ``chat`` workload (synthetic topic prompts, or a JSONL
workload's conversations with ``--prompts``) is generated with the whole model resident and its
routing trace read for what makes expert caching and warmth routing pay or not:

* next-token reuse: of the experts a layer selects for a decoded token, the share it also
  selected for the token before (chance: k / n_experts);
* top-third mass: the share of decode selections that fall on each layer's most used third of
  experts over the workload;
* prefill share: the share of all (layer, expert) units a request's prompt touches;
* decode hit rates of LRU, the project's policy and Belady's MIN at a third of the expert bytes;
* the published Qwen3-30B-A3B statistics' own measures: LRU's decode hit rate at 40 % of the expert
  bytes, the share of each layer's experts that covers 90 % of the workload's decode selections,
  and the median reuse distance (decoded tokens between two selections of one expert of a layer
  within a request).

The report puts a reference row of those published figures (``PUBLISHED_QWEN3``, quoted, not
measured here) under the measured rows.

Each run writes ``<out>/regimes/<model>.json``; ``<out>/regimes.md`` is rewritten from every JSON
there, one row per model, with the command that produced it. A synthetic preset written with fewer layers
(``synth --preset P --layers N``: a full-size preset's widths and routing in a file that fits) says so in its
row, with the ``synth`` command that wrote it.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import numpy as np

from cluster.bench import command_line, log_progress, offline, out_flag
from cluster.bench.engine_bench import replay_policy, workloads
from cluster.bench.routing_stats import hot_set_coverage
from cluster.bench.workload import conversation_prompt
from cluster.engine.cache import RoutingTrace, discover_layout, reuse_rate

BUDGET_FRACTION = 1 / 3
PUBLISHED_BUDGET_FRACTION = 0.4
COVERED_SELECTIONS = 0.9
# Published Qwen3-30B-A3B routing statistics (as cited in the project's issues 22 and 27): ranges, not measured here.
PUBLISHED_QWEN3 = {"lru_at_40": (0.90, 0.95), "experts_covering_90": 0.5, "median_reuse_distance": 2}


def experts_covering(trace: RoutingTrace, n_layers: int, n_experts: int, share: float = COVERED_SELECTIONS) -> float:
    """Mean over layers of the fewest experts (as a share of the layer's experts) whose decode selections
    over the whole trace reach ``share`` of the layer's selections."""
    counts = np.zeros((n_layers, n_experts), dtype=np.int64)
    for step in trace.decode_steps():
        for layer, ids in step.items():
            np.add.at(counts[layer], ids.ravel(), 1)
    shares = []
    for row in counts:
        total = row.sum()
        if total:
            cumulative = np.cumsum(np.sort(row)[::-1])
            shares.append((int(np.searchsorted(cumulative, share * total)) + 1) / n_experts)
    return float(np.mean(shares)) if shares else float("nan")


def median_reuse_distance(traces: list[RoutingTrace]) -> float:
    """Median, over every decode selection of an expert its layer selected before in the same request, of the
    number of decoded tokens since that previous selection (1: selected for the token before)."""
    distances: list[int] = []
    for trace in traces:
        last: dict[tuple[int, int], int] = {}
        for t, step in enumerate(trace.decode_steps()):
            for layer, ids in step.items():
                for e in np.unique(ids).tolist():
                    if (layer, e) in last:
                        distances.append(t - last[(layer, e)])
                    last[(layer, e)] = t
    return float(np.median(distances)) if distances else float("nan")


def published_statistics(traces: list[RoutingTrace], unit_bytes: np.ndarray, k: int) -> dict[str, float]:
    """The published Qwen3-30B-A3B statistics' own measures over requests' traces (one trace per request, in
    order): LRU's decode hit rate with ``PUBLISHED_BUDGET_FRACTION`` of the expert bytes (``unit_bytes``:
    [n_layers, n_experts]), ``experts_covering`` 90 % and ``median_reuse_distance``."""
    n_layers, n_experts = unit_bytes.shape
    every = RoutingTrace.concat(traces)
    decode = every.select(decode_only=True, predictions=False)
    budget = int(PUBLISHED_BUDGET_FRACTION * unit_bytes.sum())
    return {"lru_at_40": replay_policy(decode, unit_bytes, k, budget, "lru")["decode_hit_rate"],
            "experts_covering_90": experts_covering(every, n_layers, n_experts),
            "median_reuse_distance": median_reuse_distance(traces)}


def routing_statistics(traces: list[RoutingTrace], n_layers: int, n_experts: int, k: int) -> dict[str, float]:
    """The statistics of the module docstring but the published ones over requests' traces (one trace per
    request)."""
    prefill_shares = []
    for trace in traces:
        touched = {layer * n_experts + int(e) for ubatch in trace.ubatches() if ubatch[0][1].shape[0] > 1
                   for layer, ids in ubatch for e in np.unique(ids)}
        if touched:
            prefill_shares.append(len(touched) / (n_layers * n_experts))
    third = max(1, int(round(n_experts / 3)))
    return {"next_token_reuse": float(np.nanmean([reuse_rate(t) for t in traces])), "chance_reuse": k / n_experts,
            "top_third_mass": hot_set_coverage(RoutingTrace.concat(traces), n_layers, n_experts, 1 / 3),
            "chance_top_third": third / n_experts,
            "prefill_share": float(np.mean(prefill_shares)) if prefill_shares else float("nan"),
            "n_decode_tokens": sum(len(t.decode_steps()) for t in traces)}


def measure(model_path: str, prompts: str | None, *, n_requests: int = 8, max_tokens: int = 64,
            progress: bool = True) -> dict[str, Any]:
    from cluster.engine.moe_engine import MoEEngine

    layout = discover_layout(model_path)
    unit_bytes = np.asarray(layout.unit_bytes, dtype=np.int64)
    n_layers, n_experts = unit_bytes.shape
    turns = workloads(model_path, prompts, n_requests).policy["chat"]
    traces: list[RoutingTrace] = []
    history: dict[str, list[tuple[str, str]]] = {}
    with MoEEngine(model_path, int(unit_bytes.sum() * 1.05), n_ctx=2048) as engine:
        for conversation, prompt in turns:
            gen = engine.generate(conversation_prompt(history.get(conversation, []), prompt), max_tokens=max_tokens)
            history.setdefault(conversation, []).append((prompt, gen.text))
            traces.append(gen.trace)
    log_progress(progress, f"  recorded {len(traces)} requests")
    stats = routing_statistics(traces, n_layers, n_experts, layout.n_experts_used)
    decode = RoutingTrace.concat(traces).select(decode_only=True, predictions=False)
    budget = int(BUDGET_FRACTION * unit_bytes.sum())
    hits = {name: replay_policy(decode, unit_bytes, layout.n_experts_used, budget, mode)["decode_hit_rate"]
            for name, mode in (("lru", "lru"), ("ours", "ours"))}
    hits["min"] = offline.belady_min(offline.accesses(decode, n_experts), unit_bytes, budget, n_layers)["decode_hit_rate"]
    published = published_statistics(traces, unit_bytes, layout.n_experts_used)
    return {"model": model_path, "prompts": prompts or "synthetic topic prompts", "n_layers": n_layers,
            "n_experts": n_experts, "k": layout.n_experts_used, "n_requests": len(turns), "max_tokens": max_tokens,
            **_truncated_preset(model_path), **stats, "decode_hit_rate_at_third": hits, **published}


def _truncated_preset(model_path: str) -> dict[str, Any]:
    """``{"preset": name, "preset_layers": its layer count}`` for a synthetic preset written with fewer layers
    (``synth --preset P --layers N``), whose row then says which part of P it measured; else ``{}``."""
    from cluster.models.synth import read_config
    from cluster.models.synth_config import preset_of

    try:
        config = read_config(model_path)
    except ValueError:  # not a synthetic model
        return {}
    found = preset_of(config)
    if found is None or config.n_layers == found[1]:
        return {}
    return {"preset": found[0], "preset_layers": found[1]}


def write_report(result: dict[str, Any], out_dir: Path, command: str) -> Path:
    result = {**result, "command": command, "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
              "kernel": os.uname().release}
    rows_dir = out_dir / "regimes"
    rows_dir.mkdir(parents=True, exist_ok=True)
    name = Path(result["model"]).stem
    (rows_dir / f"{name}.json").write_text(json.dumps(result, indent=1) + "\n")
    rows = [json.loads(p.read_text()) for p in sorted(rows_dir.glob("*.json"))]
    lines = ["# Routing regimes: what each benchmark model's routing looks like", "",
             "Which regime a figure comes from decides how much it says about a real deployment: synthetic "
             "models route by designed topics (high locality), a trained MoE routes like published ones "
             "(recency carries most of the reuse, topics little). Each row: `python -m cluster bench regimes` "
             "on one model (command below the table), the engine benchmark's `chat` workload, decode steps.", "",
             "| model | layers × experts (top-k) | next-token reuse (chance) | top-third mass (chance) | "
             "prefill share | LRU @ ⅓ | ours @ ⅓ | MIN @ ⅓ | LRU @ 40 % | experts covering 90 % | "
             "median reuse distance |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        h = r["decode_hit_rate_at_third"]
        lines.append(f"| `{Path(r['model']).name}`{_truncation_note(r)} | {r['n_layers']} × {r['n_experts']} (top-{r['k']}) | "
                     f"{r['next_token_reuse']:.3f} ({r['chance_reuse']:.3f}) | {r['top_third_mass']:.3f} "
                     f"({r['chance_top_third']:.3f}) | {r['prefill_share']:.3f} | {h['lru']:.3f} | {h['ours']:.3f} | "
                     f"{h['min']:.3f} | {_cell(r, 'lru_at_40', '.3f')} | {_cell(r, 'experts_covering_90', '.2f')} | "
                     f"{_cell(r, 'median_reuse_distance', 'g')} |")
    q = PUBLISHED_QWEN3
    lines.append(f"| *Qwen3-30B-A3B, published* | 48 × 128 (top-8) | | | | | | | {q['lru_at_40'][0]:.2f}–"
                 f"{q['lru_at_40'][1]:.2f} | about {q['experts_covering_90']:.2f} | {q['median_reuse_distance']} |")
    lines += ["", "Hit rates: decode hit rate of a cache holding a third (or 40 %) of the expert bytes, replayed over "
              "the workload's decode steps (the policy core for LRU and ours; Belady's MIN offline). The engine "
              "benchmarks' policy tables give the whole curves. Experts covering 90 %: per layer, the fewest experts "
              "whose decode selections over the workload reach 90 % of the layer's, as a share of its experts, "
              "averaged over layers. Median reuse distance: decoded tokens between two selections of one expert of "
              "a layer within a request. The last row quotes the published Qwen3-30B-A3B figures these three columns "
              "are compared with; it is not measured here. A — is a row recorded before the column existed.", "",
              "Produced by:", ""]
    lines += [f"- {_written_by(r)}`{r['command']}` ({r['date']}, Linux {r['kernel']}; {r['n_requests']} requests, "
              f"{r['n_decode_tokens']} decoded tokens; prompts: {r['prompts']})" for r in rows]
    path = out_dir / "regimes.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def _truncation_note(row: dict[str, Any]) -> str:
    if "preset" not in row:
        return ""
    return f" (preset `{row['preset']}` cut to its first {row['n_layers']} of {row['preset_layers']} layers)"


def _written_by(row: dict[str, Any]) -> str:
    if "preset" not in row:
        return ""
    return (f"`python -m cluster synth {row['model']} --preset {row['preset']} --layers {row['n_layers']} "
            f"--no-report`, then ")


def _cell(row: dict[str, Any], key: str, spec: str) -> str:
    return format(row[key], spec) if key in row else "—"


def main(model: str, prompts: str | None, out_dir: str | None, *, quick: bool, progress: bool) -> Path:
    result = measure(model, prompts, n_requests=4 if quick else 8, max_tokens=24 if quick else 64, progress=progress)
    command = command_line("regimes", [("--model", model), ("--prompts", prompts), ("--quick", quick),
                                       ("--out", out_flag(out_dir))])
    return write_report(result, Path(out_dir or "docs"), command)
