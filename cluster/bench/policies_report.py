"""Writes ``bench policies``' result as ``policies.json``, ``policies.md`` and ``policies.png``.

Every figure is read from the result dict (``cluster.bench.policies``): bytes per decoded token of
each policy relative to LRU's at the same budget, the target of the trained models checked from
those ratios, and the full tables of ``report.policy_lines``.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from cluster.bench.report import MIB, POLICY_COLUMNS, _fmt, policy_lines  # noqa: E402

THIRD = 1 / 3
TARGET_RATIO = 0.75  # ours' bytes per decoded token at a third of the experts, as a multiple of LRU's
TARGET_MODELS = ("moe-5domains", "moe-8domains")
VIEWS = ("request", "decode")
ONLINE_DEMAND = ("ours", "scan_resistant", "lru")  # online, no reads ahead: MIN bounds their misses
PLOT_CEILING = 2.0


def bytes_per_token(row: dict[str, Any], policy: str) -> float:
    return float(row[policy]["decode_bytes_read_per_token"])


def ratio(row: dict[str, Any], policy: str) -> float:
    """``policy``'s bytes per decoded token over LRU's in one row (nan where LRU read nothing)."""
    lru = bytes_per_token(row, "lru")
    return bytes_per_token(row, policy) / lru if lru > 0 else math.nan


def rows(entry: dict[str, Any], view: str) -> list[dict[str, Any]]:
    """A model's replayed rows of one view (a budget below one decode step has none)."""
    return [r for r in entry["policy"]["workloads"]["chat"]["views"][view]["rows"] if "error" not in r]


def third_row(entry: dict[str, Any], view: str) -> dict[str, Any] | None:
    return next((r for r in rows(entry, view) if abs(r["fraction"] - THIRD) < 1e-9), None)


def worst(entry: dict[str, Any], view: str, policy: str = "ours") -> tuple[float, float | None]:
    """The largest ``policy``/LRU ratio over the budgets of a view, and its budget fraction."""
    found = [(ratio(r, policy), r["fraction"]) for r in rows(entry, view) if not math.isnan(ratio(r, policy))]
    return max(found, default=(math.nan, None))


def target(result: dict[str, Any]) -> dict[str, Any]:
    """The issue's target on every trained model run: ours' (and ours + prefetch's) ratio to LRU at a third,
    per view, and whether each is at most ``TARGET_RATIO``."""
    checks = []
    for name in TARGET_MODELS:
        entry = result["models"].get(name)
        if entry is None:
            continue
        for view in VIEWS:
            row = third_row(entry, view)
            for policy in ("ours", "ours+prefetch"):
                value = ratio(row, policy) if row is not None else math.nan
                checks.append({"model": name, "view": view, "policy": policy, "ratio": value,
                               "met": bool(value <= TARGET_RATIO)})
    return {"ratio": TARGET_RATIO, "checks": checks}


def _model_label(name: str, entry: dict[str, Any]) -> str:
    return (f"`{name}` ({entry['n_layers']} × {entry['n_experts']}, top-{entry['n_experts_used']}; "
            f"{entry['policy']['workloads']['chat']['n_decode_tokens']} decoded tokens)")


def summary_lines(result: dict[str, Any]) -> list[str]:
    """The summary table: per model, ratios to LRU at a third in both views, and ours' worst ratio."""
    head = ("| model | " + " | ".join(f"{p} / LRU ({v})" for v in VIEWS for p in ("ours", "ours + prefetch", "MIN"))
            + " | worst ours / LRU, 10-80 % (request) | worst ours / LRU, 10-80 % (decode) |")
    lines = [head, "|---|" + "---|" * 8]
    for name, entry in result["models"].items():
        cells = []
        for view in VIEWS:
            row = third_row(entry, view)
            cells += [_fmt(ratio(row, p)) if row is not None else "n/a" for p in ("ours", "ours+prefetch", "min")]
        for view in VIEWS:
            value, fraction = worst(entry, view)
            cells.append(f"{_fmt(value)} (at {100 * fraction:.0f} %)" if fraction is not None else "n/a")
        lines.append(f"| {_model_label(name, entry)} | " + " | ".join(cells) + " |")
    return lines


def lru_lines(result: dict[str, Any]) -> list[str]:
    """Where ours reads more bytes per decoded token than LRU, over every model, view and budget."""
    above = [(name, view, r["fraction"], ratio(r, "ours")) for name, entry in result["models"].items()
             for view in VIEWS for r in rows(entry, view) if ratio(r, "ours") > 1.0]
    n_rows = sum(len(rows(entry, view)) for entry in result["models"].values() for view in VIEWS)
    if not above:
        return [f"Ours reads no more bytes per decoded token than LRU in any of the {n_rows} rows (every model, view "
                "and budget).", ""]
    return [f"Ours reads more bytes per decoded token than LRU in {len(above)} of the {n_rows} rows: " + "; ".join(
        f"`{name}` {view} at {100 * fraction:.0f} % ({value:.2f}×)" for name, view, fraction, value in above) + ".", ""]


def below_min_lines(result: dict[str, Any]) -> list[str]:
    """The request-view rows where an online policy without reads ahead read fewer decode bytes than MIN (which
    minimises every miss, prefill's too, not decode's alone)."""
    below = [(name, r["fraction"], policy) for name, entry in result["models"].items() for r in rows(entry, "request")
             for policy in ONLINE_DEMAND
             if bytes_per_token(r, policy) < bytes_per_token(r, "min")]
    if not below:
        return ["In every row of both views MIN read the fewest bytes per decoded token of the policies without reads "
                "ahead.", ""]
    return ["In the request view MIN minimises every miss, prefill's included, not the decode steps' alone: an online "
            "policy read fewer bytes per decoded token than MIN in " + "; ".join(
                f"`{name}` at {100 * fraction:.0f} % ({policy})" for name, fraction, policy in below)
            + ". In the decode view MIN is the bound.", ""]


def target_lines(result: dict[str, Any]) -> list[str]:
    t = result["target"]
    if not t["checks"]:
        return [f"The target (expert bytes per decoded token at a third of the experts ≤ {t['ratio']:.2f}× LRU's on "
                "the trained models) is not checked: no trained model was run.", ""]
    lines = [f"**Target: expert bytes per decoded token at a third of the experts ≤ {t['ratio']:.2f}× LRU's on the "
             "trained models.**", ""]
    for policy in ("ours", "ours+prefetch"):
        for view in VIEWS:
            checks = [c for c in t["checks"] if c["policy"] == policy and c["view"] == view]
            verdict = "met" if all(c["met"] for c in checks) else "not met"
            lines.append(f"- {policy}, view `{view}`: **{verdict}** (" + "; ".join(
                f"{c['model']} {_fmt(c['ratio'])}×" for c in checks) + ")")
    missing = [m for m in TARGET_MODELS if m not in result["models"]]
    if missing:
        lines.append(f"- not run: {', '.join(missing)}")
    return lines + [""]


def ratio_lines(entry: dict[str, Any]) -> list[str]:
    """Every policy's bytes per decoded token over LRU's at every budget, both views."""
    lines = []
    for view in VIEWS:
        lines += [f"View `{view}`: bytes per decoded token ÷ LRU's (LRU's MiB per decoded token in the last column)",
                  "", "| budget | " + " | ".join(label for key, label in POLICY_COLUMNS if key != "lru")
                  + " | LRU MiB |", "|---|" + "---|" * len(POLICY_COLUMNS)]
        for r in rows(entry, view):
            lines.append(f"| {100 * r['fraction']:.0f} % | " + " | ".join(
                _fmt(ratio(r, key)) for key, _ in POLICY_COLUMNS if key != "lru")
                + f" | {_fmt(bytes_per_token(r, 'lru') / MIB, 3)} |")
        lines.append("")
    return lines


def plot(result: dict[str, Any], path: Path) -> None:
    """Per model (columns) and view (rows): every policy's bytes per decoded token ÷ LRU's against the budget."""
    names = list(result["models"])
    fig, axes = plt.subplots(len(VIEWS), max(1, len(names)), figsize=(3.8 * max(1, len(names)), 7.2), squeeze=False)
    for col, name in enumerate(names):
        entry = result["models"][name]
        for row_i, view in enumerate(VIEWS):
            ax = axes[row_i][col]
            data = rows(entry, view)
            xs = [100 * r["fraction"] for r in data]
            for key, label in POLICY_COLUMNS:
                ys = [min(ratio(r, key), PLOT_CEILING) for r in data]
                ax.plot(xs, ys, marker="o", markersize=3, label=label,
                        linestyle="--" if key in ("min", "static_best") else "-")
            ax.set_title(f"{name}, {view}", fontsize=9)
            ax.set_xlabel("budget (% of expert bytes)", fontsize=8)
            ax.set_ylim(0, PLOT_CEILING * 1.02)
            ax.grid(alpha=0.3)
            if col == 0:
                ax.set_ylabel(f"bytes / decoded token ÷ LRU's (≤ {PLOT_CEILING:g})", fontsize=8)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_report(result: dict[str, Any], out_dir: Path) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    result["target"] = target(result)
    (out_dir / "policies.json").write_text(json.dumps(result, indent=1, default=float) + "\n")
    plot(result, out_dir / "policies.png")
    m = result["machine"]
    lines = ["# Eviction policies on every model: expert bytes read per decoded token", "",
             f"Produced by `{result['command']}` on {result['started']} ({m['cpu']}, {m['cpus']} CPUs, "
             f"{m['mem_total_bytes'] / (1 << 30):.0f} GiB, Linux {m['kernel']}), in {result['wall_s'] / 60:.1f} min. "
             "Raw numbers: `policies.json`.", "",
             "Each model's chat workload is generated with every expert resident and its routing trace recorded "
             "(the predictor's events included), then replayed through the policy core (the code the eval callback "
             "drives) at budgets of "
             + ", ".join(f"{100 * f:.0f} %" for f in result["budget_fractions"])
             + " of the expert bytes: `ours` (the default: adaptive, each node taking from its own accesses LFU "
             "with a half-life of 8 steps, LFU with one of 2, or LRU, whichever its shadow replays say reads the "
             "fewest bytes), `scan-resistant` (the "
             "previous default), LRU — all without the predictor (eviction alone) — and ours once more with it "
             "(`ours + prefetch`); Belady's MIN and the best static set know the whole trace. Bytes per decoded "
             "token: the expert bytes the decode steps read (demand reads, and for ours + prefetch every read "
             "ahead made during decode, used or not) over the decoded tokens; prefill steps' reads are counted "
             "per prompt token and left out of both views. View `request`: prefill and decode as they came; view "
             "`decode`: the decode steps alone (as if the prompts had been prefilled elsewhere). MIN has the fewest "
             "misses any policy without reads ahead can have over the replay (prefill's included in the request view), "
             "so in the decode view, units being of one size, no online policy without reads ahead reads fewer bytes; "
             "ours + prefetch is not bounded by it, and the best static set is loaded before the replay (its first "
             "reads are not counted).", "",
             "## Summary at a third of the expert bytes", "",
             "Bytes per decoded token as a multiple of LRU's at the same budget (below 1: fewer bytes than LRU). "
             "The last two columns: ours' largest ratio to LRU over every budget (above 1: where it reads more than "
             "LRU).", ""]
    lines += summary_lines(result) + [""]
    lines += lru_lines(result)
    lines += below_min_lines(result)
    lines += target_lines(result)
    if result["left_out"]:
        lines += ["Models left out: " + "; ".join(f"`{k}`: {v}" for k, v in result["left_out"].items()) + ".", ""]
    lines += ["![bytes per decoded token relative to LRU](policies.png)", "", "## Models and workloads", ""]
    for name, entry in result["models"].items():
        chat = entry["policy"]["workloads"]["chat"]
        line = (f"- `{name}`: `{entry['path']}` ({entry['arch']}, file {entry['file_bytes'] / MIB:.0f} MiB, experts "
                f"{entry['expert_bytes'] / MIB:.0f} MiB). Workload: {entry['workload']}; {chat['n_requests']} "
                f"requests, {chat['n_prompt_tokens']} prompt tokens, {chat['n_generated']} generated (at most "
                f"{entry['max_tokens']} each); recorded in {chat['record_s']:.0f} s, replayed in {chat['replay_s']:.0f} s.")
        generated = entry.get("generated")
        if generated:
            line += (f" Written by `{generated['command']}` (the preset's widths and routing, its first layers): "
                     f"{generated['disk_bytes'] / MIB:.0f} MiB of disk, "
                     + ("kept." if generated["kept"] else "deleted afterwards."))
        lines.append(line)
    lines.append("")
    for name, entry in result["models"].items():
        lines += [f"## {_model_label(name, entry)}", ""]
        lines += ratio_lines(entry)
        lines += ["Decode hit rate (expert MiB read per decoded token):", ""]
        lines += policy_lines(entry["policy"])
    path = out_dir / "policies.md"
    path.write_text("\n".join(lines) + "\n")
    return path
