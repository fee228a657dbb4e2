"""Writes benchmark results as docs/benchmarks.md, PNG plots and the raw JSON.

Only numbers present in the result dict are written: the report is a rendering of one run.
"""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

MIB = 1 << 20


ROUTING_POINTER = ("The cluster's benchmarks have their own reports: `routing.md` (`bench routing`: routing policies "
                   "on a live local cluster, and the router's decision cost), `routing-memlimit/routing.md` (the same "
                   "with memory-limited nodes), `routing-spec0/routing.md` (the same on a model whose routing ignores "
                   "topics), `routing-6nodes/routing.md` (the demo on 6 nodes), `simulation.md` (`bench simulate`: "
                   "many simulated nodes) and "
                   "`simulation-demo3/simulation.md` (the live demo setting, simulated, with the decode-miss floor of a "
                   "hindsight oracle).")

def _fmt(value: Any, digits: int = 2) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


POLICY_COLUMNS = (("ours", "ours (adaptive)"), ("ours+prefetch", "ours + prefetch"), ("lru", "LRU"),
                  ("scan_resistant", "scan-resistant"), ("min", "Belady MIN"), ("static_best", "best static"))


def _plot_policy(policy: dict[str, Any], path: Path) -> None:
    panels = [(name, view, data["views"][view]) for name, data in policy["workloads"].items() for view in data["views"]]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.6 * len(panels), 4), squeeze=False)
    for ax, (name, view, data) in zip(axes[0], panels):
        rows = [r for r in data["rows"] if "error" not in r]
        xs = [100 * r["fraction"] for r in rows]
        for key, label in POLICY_COLUMNS:
            ax.plot(xs, [100 * r[key]["decode_hit_rate"] for r in rows], marker="o", label=label)
        ax.set_title(f"{name}, {view}")
        ax.set_xlabel("budget (% of expert bytes)")
        ax.set_ylabel("decode hit rate (%)")
        ax.set_ylim(0, 101)
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def policy_lines(policy: dict[str, Any]) -> list[str]:
    """The policy tables: every workload, both views, every policy at every budget."""
    lines: list[str] = []
    for name, data in policy["workloads"].items():
        lines += [f"### Workload `{name}` ({data['n_decode_tokens']} decode tokens; live prefetch precision "
                  f"{_fmt(data.get('prefetch_precision'), 3)}, recall {_fmt(data.get('prefetch_recall'), 3)})", ""]
        for view, vdata in data["views"].items():
            lines += [f"View `{view}`: decode hit rate (expert MiB read per decoded token)", "",
                      "| budget | " + " | ".join(label for _, label in POLICY_COLUMNS) + " |",
                      "|---|" + "---|" * len(POLICY_COLUMNS)]
            third = None
            for r in vdata["rows"]:
                if "error" in r:
                    lines.append(f"| {100 * r['fraction']:.0f} % | {r['error']} |" + " |" * (len(POLICY_COLUMNS) - 1))
                    continue
                lines.append(f"| {100 * r['fraction']:.0f} % | " + " | ".join(
                    f"{_fmt(r[key]['decode_hit_rate'], 3)} ({_fmt(r[key]['decode_bytes_read_per_token'] / MIB, 2)})"
                    for key, _ in POLICY_COLUMNS) + " |")
                if abs(r["fraction"] - 1 / 3) < 1e-6:
                    third = r
            if third is not None:
                ours, lru, best = third["ours"], third["lru"], third["min"]
                bytes_ratio = ours["decode_bytes_read_per_token"] / max(1, lru["decode_bytes_read_per_token"])
                lines += ["", f"At a one-third budget: ours − LRU = "
                          f"{100 * (ours['decode_hit_rate'] - lru['decode_hit_rate']):+.1f} points of decode hit rate, "
                          f"bytes per decoded token {_fmt(bytes_ratio, 2)}× LRU's; "
                          f"MIN − ours = {100 * (best['decode_hit_rate'] - ours['decode_hit_rate']):+.1f} points."]
            lines.append("")
    return lines


def _plot_bounded(bounded: dict[str, Any], path: Path) -> None:
    runs = bounded["runs"]
    names = [n for n in ("plain_limited", "cache_limited", "cache_aware_limited", "cache_unlimited")
             if "error" not in runs.get(n, {"error": 1})]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4))
    axes[0].bar(names, [runs[n]["decode_tok_s"] for n in names], color=["#c44", "#4a4", "#a84", "#48c"][: len(names)])
    axes[0].set_ylabel("decode tok/s")
    axes[0].set_title(f"limit {bounded['limit_bytes'] / MIB:.0f} MiB = 50 % of the model")
    width = 0.38
    xs = range(len(names))
    axes[1].bar([x - width / 2 for x in xs], [runs[n]["prefill_read_bytes_per_token"] / MIB for n in names], width,
                label="prefill")
    axes[1].bar([x + width / 2 for x in xs], [runs[n]["decode_read_bytes_per_token"] / MIB for n in names], width,
                label="decode")
    axes[1].set_xticks(list(xs), names)
    axes[1].set_ylabel("MiB read from disk per token")
    axes[1].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_engine_report(result: dict[str, Any], out_dir: Path) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "bench-engine.json").write_text(json.dumps(result, indent=1, default=float))
    m, model = result["machine"], result["model"]
    lines = [
        "# Benchmarks",
        "",
        f"Produced by `{result['command']}` on {result['started']} "
        f"({m['cpus']} CPUs, {m['mem_total_bytes'] / (1 << 30):.0f} GiB, Linux {m['kernel']}). "
        "Raw numbers: `bench-engine.json`. Timings are ratios of runs made side by side in this one run.",
        "",
        ROUTING_POINTER,
        "",
        f"Model: `{model['path']}` — {model['arch']}, {model['n_layers']} layers × {model['n_experts']} experts "
        f"(top-{model['n_experts_used']}), file {model['file_bytes'] / MIB:.0f} MiB, experts "
        f"{model['expert_bytes'] / MIB:.0f} MiB, non-expert pages {model['non_expert_bytes'] / MIB:.0f} MiB.",
        "",
    ]
    o = result.get("overhead")
    lines += [] if o is None else [
        "## Engine overhead (no memory pressure)",
        "",
        f"Two engines on the same model in one process, generations alternated ({o['pairs']} pairs, "
        f"{o['max_tokens']} tokens each); the cache's budget covers the whole model.",
        "",
        "| | decode tok/s (median) |",
        "|---|---|",
        f"| plain llama.cpp | {_fmt(statistics.median(o['plain_tok_s']), 1)} |",
        f"| with expert cache | {_fmt(statistics.median(o['cache_tok_s']), 1)} |",
        "",
        f"**Ratio with/without cache: {_fmt(o['ratio_median'], 3)}** (median of per-pair ratios; "
        f"ratio of medians {_fmt(o['ratio_of_medians'], 3)}). Same text both ways: {o['same_text']}.",
        "",
    ]
    if o is not None and "callback_ms_per_step" in o:
        c = o["callback_ms_per_step"]
        lines += [
            "Where the time goes, per decode step: plain llama.cpp "
            f"{_fmt(o['plain_ms_per_step'], 3)} ms, with the cache {_fmt(o['cache_ms_per_step'], 3)} ms; of that, the "
            f"eval callback's own work (reading the top-k ids, the policy, the trace) {_fmt(c['ns_callback'], 4)} ms, "
            f"of which the next-layer predictor {_fmt(c['ns_predict'], 4)} ms (it skips layers whose experts are all "
            "resident). The rest of the difference is the graph split at each top-k node (the scheduler computes "
            "the nodes up to it, synchronises, then calls back).",
            "",
        ]
    b = result.get("bounded_memory")
    if b is not None:
        lines += ["## Bounded memory", ""]
    if b is None:
        pass
    elif "skipped" in b or "error" in b:
        lines += [f"Not measured: {b.get('skipped') or b.get('error')}.", ""]
    else:
        lines += [
            f"Each run is a fresh process; the model file's page cache is dropped first. Limited runs are "
            f"in a cgroup with memory limit {b['limit_bytes'] / MIB:.0f} MiB (50 % of the "
            f"{b['file_bytes'] / MIB:.0f} MiB file; page cache counts). The cache's budget under the limit is "
            f"`--cache-mb auto`: {b.get('auto_budget') or 'n/a'}. "
            f"Workload: {b['n_requests']} requests (mixed-topic preamble + topic question), {b['max_tokens']} tokens each. "
            f"Disk: {_fmt(b['disk_bytes_per_s'] / MIB, 0)} MiB/s (cold sequential read of the model file).",
            "",
            "| run | load s | prefill s | decode tok/s | disk MiB/token prefill | disk MiB/token decode | cache decode hit rate |",
            "|---|---|---|---|---|---|---|",
        ]
        for name, r in b["runs"].items():
            if "error" in r:
                lines.append(f"| {name} | failed: {r['error']} | | | | | |")
                continue
            lines.append(
                f"| {name} | {_fmt(r['load_s'], 1)} | {_fmt(r['prefill_s'], 1)} | {_fmt(r['decode_tok_s'], 2)} | "
                f"{_fmt(r['prefill_read_bytes_per_token'] / MIB, 2)} | {_fmt(r['decode_read_bytes_per_token'] / MIB, 2)} | "
                f"{_fmt(r.get('cache_decode_hit_rate'), 3)} |")
        if "speedup_vs_plain" in b:
            lines += [
                "",
                f"**Cache under the limit vs plain mmap under the limit: {_fmt(b['speedup_vs_plain'], 2)}× decode tok/s.** "
                f"**Cache under the limit vs the same engine with no limit: {_fmt(b['fraction_of_unlimited'], 2)}×.** "
                f"Identical text in the three exact runs: {b['same_text']}. At the disk bytes it read per decoded token, the "
                f"disk alone allows {_fmt(b['disk_bound_tok_s'], 1)} tok/s (bandwidth ÷ bytes per token).",
            ]
            aware = b.get("cache_aware")
            if aware is not None:
                sel = aware["selection"]
                lines += [
                    "",
                    f"**Cache-aware selection under the limit** (`cache_aware_limited`: max changed weight "
                    f"{sel['max_changed_weight']:g}, min score ratio {sel['min_score_ratio']:g}; its quality cost: "
                    f"`python -m cluster bench quality`, docs/quality.md): **{_fmt(aware['fraction_of_unlimited'], 2)}× "
                    f"the unlimited engine's decode tok/s**; the disk alone allows {_fmt(aware['disk_bound_tok_s'], 1)} "
                    f"tok/s at its bytes per token. Same text as exact: {aware['same_text_as_exact']} (it changes the "
                    f"model's output by design).",
                ]
        _plot_bounded(b, out_dir / "bounded_memory.png")
        lines += ["", "![bounded memory](bounded_memory.png)", ""]
    a = result.get("auto_budget")
    if a is not None:
        lines += ["## `--cache-mb auto` against manual budgets", ""]
        if "skipped" in a:
            lines += [f"Not measured: {a['skipped']}.", ""]
        else:
            lines += [
                "Each run a fresh process under a cgroup memory limit (page cache dropped first); the manual budgets are "
                f"{', '.join(f'{100 * f:.0f} %' for f in a['budget_fractions_of_limit'])} of the limit (at least one "
                "decode step, at most every expert). Decode tok/s; `killed` is a run the kernel's OOM killer ended.",
                "",
                "| limit | " + " | ".join(f"manual {100 * f:.0f} %" for f in a["budget_fractions_of_limit"])
                + " | auto | auto ÷ best manual |",
                "|---|" + "---|" * (len(a["budget_fractions_of_limit"]) + 2),
            ]
            for entry in a["limits"]:
                def cell(run: dict[str, Any]) -> str:
                    if "error" in run:
                        return "killed" if "out of memory" in run["error"] else "failed"
                    return f"{_fmt(run['decode_tok_s'], 1)} ({run['budget_bytes'] / MIB:.0f} MiB)"
                lines.append(f"| {100 * entry['limit_fraction']:.0f} % ({entry['limit_bytes'] / MIB:.0f} MiB) | "
                             + " | ".join(cell(r) for r in entry["manual"]) + f" | {cell(entry['auto'])} | "
                             f"{_fmt(entry.get('auto_vs_best'), 2)} |")
            lines += ["", "Auto's reasoning in each run: " + "; ".join(
                f"{100 * e['limit_fraction']:.0f} %: {e['auto'].get('auto_budget', 'n/a')}" for e in a["limits"]), ""]
    p = result.get("policy")
    lines += [] if p is None else [
        "## Cache policy (trace replay)",
        "",
        "Routing traces recorded from the model, replayed through the policy core (the same code the "
        "eval callback drives) at each budget. "
        + (f"Workload: `{result['workload']}`; `chat`: each conversation's turns one after another (what a node sees "
           "when the router keeps a conversation on it), each turn sent as the conversation so far; `interleaved`: "
           "the file's order, conversations alternating. "
           if result.get("workload", "synthetic topic prompts") != "synthetic topic prompts" else
           "`chat`: one conversation's turns after another (what a node "
           "sees when the router keeps a conversation on it), each turn starting with a long mixed-topic preamble "
           "(a prefill that touches most experts) before the topic question. `interleaved`: two conversations of "
           "topic words alternate, two turns each, no preamble. ")
        + "View `decode`: the decode steps alone (as if the "
        "prompts had been prefilled elsewhere); view `request`: prefill and decode as they came. Online "
        "policies replay without the predictor (eviction alone); `ours + prefetch` adds the predictor's "
        "reads ahead (used ones count as hits, all as bytes). Belady's MIN (evict what is needed farthest "
        "ahead) and the best static set know the whole trace: MIN is the ceiling of any eviction policy.",
        "",
    ]
    if p is not None:
        lines += policy_lines(p)
        _plot_policy(p, out_dir / "policy_hit_rate.png")
        lines += ["![policy hit rate](policy_hit_rate.png)", ""]
    path = out_dir / "benchmarks.md"
    path.write_text("\n".join(lines))
    return path
