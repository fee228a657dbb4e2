"""The quality bench's report: ``quality.json`` (every figure), ``quality.md`` and ``quality.png``.

Everything written comes from the result ``cluster.bench.quality`` measured, including which
setting to pick for a given loss (``picks``: of the settings within the loss, the one that reads
the fewest expert bytes per token).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from cluster.engine.node_memory import MIB

LOSS_BOUNDS_PCT = (1.0, 2.0, 5.0)  # bits-per-token increases the picks paragraph answers for


def _ok(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [r for r in rows if not r.get("error")]


def picks(rows: list[dict[str, Any]], bounds: tuple[float, ...] = LOSS_BOUNDS_PCT) -> dict[float, dict[str, Any] | None]:
    """Per loss bound (in % of the reference's bits per token), the bounded-budget setting whose
    increase is within it and that reads the fewest expert bytes per token (the smaller increase
    on a tie); None where no setting is within it."""
    chosen: dict[float, dict[str, Any] | None] = {}
    for bound in bounds:
        within = [r for r in _ok(rows) if r["bounded"] and r["bits_increase_pct"] <= bound]
        chosen[bound] = min(within, key=lambda r: (r["mib_per_token"], r["bits_increase_pct"])) if within else None
    return chosen


def _exact_bounded(rows: list[dict[str, Any]]) -> dict[str, Any] | None:
    return next((r for r in _ok(rows) if r["bounded"] and r["mode"] == "exact"), None)


def _pick_lines(result: dict[str, Any]) -> list[str]:
    rows = result["settings"]
    exact = _exact_bounded(rows)
    lines = []
    for bound, row in picks(rows).items():
        if row is None:
            lines.append(f"- within {bound:g} % more bits per token: no setting at this budget.")
            continue
        saved = ""
        if exact is not None and row is not exact and exact["mib_per_token"] > 0:
            saved = f", {100 * (1 - row['mib_per_token'] / exact['mib_per_token']):.0f} % fewer than exact"
        nothing_better = " (no cache-aware setting reads fewer bytes within this loss)" if row["mode"] == "exact" else ""
        lines.append(f"- within {bound:g} % more bits per token: **{row['setting']}**{nothing_better}: "
                     f"{row['bits_increase_pct']:+.2f} %, agreement {row['agreement']:.3f}, "
                     f"{row['mib_per_token']:.3f} MiB of experts read per token{saved}.")
    return lines


def _cell(value: Any, spec: str) -> str:
    return "—" if value is None else format(value, spec)


def _table(result: dict[str, Any]) -> list[str]:
    lines = ["| setting | budget MiB | bits/token | increase | greedy agreement | expert MiB/token | tok/s | hit rate | "
             "selections replaced / skipped |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in result["settings"]:
        if r.get("error"):
            lines.append(f"| {r['setting']} | {r['budget_bytes'] / MIB:.1f} | failed: {r['error']} | | | | | | |")
            continue
        changed = f"{r['selections_replaced']} / {r['selections_skipped']}"
        if r["changed_fraction"] is not None:
            changed += f" ({100 * r['changed_fraction']:.2f} % of {r['selections']})"
        lines.append(f"| {r['setting']} | {r['budget_bytes'] / MIB:.1f} | {r['bits_per_token']:.4f} | "
                     f"{r['bits_increase_pct']:+.2f} % | {r['agreement']:.4f} | {r['mib_per_token']:.3f} | "
                     f"{_cell(r['tok_s'], '.0f')} | {_cell(r['hit_rate'], '.3f')} | {changed} |")
    return lines


def _domain_table(result: dict[str, Any]) -> list[str]:
    rows = _ok(result["settings"])
    domains = list(result["text"]["domains"])
    lines = ["| setting | " + " | ".join(domains) + " |", "|---|" + "---:|" * len(domains)]
    for r in rows:
        lines.append(f"| {r['setting']} | " + " | ".join(f"{r['bits_per_token_by_domain'][d]:.4f}" for d in domains) + " |")
    return lines


def write_plot(result: dict[str, Any], path: Path) -> None:
    """Expert MiB read per token (x) against the bits-per-token increase in % (y), one labelled point per setting."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = _ok(result["settings"])
    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    for r in rows:
        exact = r["mode"] == "exact"
        ax.scatter(r["mib_per_token"], r["bits_increase_pct"], marker="s" if exact else "o",
                   color="tab:gray" if exact else "tab:blue")
    ax.margins(x=0.12, y=0.15)
    ax.axhline(0.0, color="black", linewidth=0.5)
    ax.set_xlabel("expert MiB read per token")
    ax.set_ylabel("bits per token, increase over exact (%)")
    ax.text(0.01, 0.98, "squares: exact; circles: cache-aware (w: max changed weight, r: min score ratio)",
            transform=ax.transAxes, fontsize=7, va="top")
    ax.set_title(f"{Path(result['model']['path']).name}: budget {100 * result['budget_fraction']:.0f} % of the experts")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    _place_labels(fig, ax, [(r["setting"].removeprefix("cache-aware "), r["mib_per_token"], r["bits_increase_pct"])
                            for r in rows])  # once the layout is set: where each label lands is known
    fig.savefig(path, dpi=110)
    plt.close(fig)


_LABEL_OFFSETS = ((8, 8), (8, -16), (-8, 8), (-8, -16), (8, 24), (-8, 24), (8, -32), (-8, -32), (8, 40), (-8, 40))


def _place_labels(fig: Any, ax: Any, labels: list[tuple[str, float, float]]) -> None:
    """Annotates each point with its label at the first offset (points) where it overlaps no label placed
    before it (the last offset tried if none is free), with a thin line to its point."""
    renderer = fig.canvas.get_renderer()
    placed: list[Any] = []
    for text, x, y in labels:
        for dx, dy in _LABEL_OFFSETS:
            note = ax.annotate(text, (x, y), textcoords="offset points", xytext=(dx, dy), fontsize=7,
                               ha="left" if dx > 0 else "right",
                               arrowprops={"arrowstyle": "-", "color": "0.6", "linewidth": 0.5})
            box = note.get_window_extent(renderer).expanded(1.05, 1.2)
            if not any(box.overlaps(other) for other in placed) or (dx, dy) == _LABEL_OFFSETS[-1]:
                placed.append(box)
                break
            note.remove()


def write_quality_report(result: dict[str, Any], out_dir: Path) -> Path:
    """Writes ``quality.json``, ``quality.png`` and ``quality.md`` into ``out_dir``; returns the Markdown's path."""
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "quality.json").write_text(json.dumps(result, indent=1) + "\n")
    write_plot(result, out_dir / "quality.png")
    m, model, text = result["machine"], result["model"], result["text"]
    lines = [
        "# Quality of cache-aware expert selection",
        "",
        f"Produced by `{result['command']}` on {result['started']} ({m['cpus']} CPUs, {m['processor']}, "
        f"{m['mem_total_bytes'] / (1 << 30):.0f} GiB, Linux {m['kernel']}, Python {m['python']}). Raw numbers: "
        "`quality.json`; plot: `quality.png`.",
        "",
        f"Model: `{model['path']}`: {model['arch']}, {model['n_layers']} layers × {model['n_experts']} experts "
        f"(top-{model['n_experts_used']}), experts {model['expert_bytes'] / MIB:.1f} MiB. Bounded budget: "
        f"{result['budget_bytes'] / MIB:.1f} MiB ({100 * result['budget_fraction']:.0f} % of the expert bytes).",
        "",
        f"Text: {text['origin']}. Per domain up to {text['windows_per_domain']} window"
        f"{'s' if text['windows_per_domain'] != 1 else ''} of {text['window_tokens']} tokens, "
        f"{text['positions']} positions scored in all:",
        "",
    ]
    lines += [f"- {domain}: {source}" for domain, source in text["domains"].items()]
    lines += [f"- {domain}: **skipped**: {why}" for domain, why in text["skipped"].items()]
    if not result["native_selection"]:
        lines += ["", "**This build has no native cache-aware selection** (`cluster._native` has no `SelectionConfig`): "
                  "the cache-aware settings ran (or failed) without it, so their rows say nothing about it yet."]
    lines += [
        "",
        "Each setting scores every window by teacher forcing on a fresh engine (`MoEEngine.score`: one token per "
        "`llama_decode`, as decoded tokens are evaluated, so each token's selections meet the cache as a decoded "
        "token's do). *bits/token*: mean of -log2 p(next token) over every position; *increase*: relative to the "
        "reference (exact selection at the full budget), in % of its bits per token; *greedy agreement*: the share of "
        "positions whose most probable next token is the reference's; *expert MiB/token*: what the cache read from "
        "the model file per position scored; *tok/s*: positions scored per second (wall time of the steps); "
        "*selections replaced / skipped*: experts the cache-aware selection changed (of every token's top-k in every "
        "layer). A cache-aware setting changes what is not resident when a token needs it, which the prefetch's "
        "timing moves a little: its rows vary slightly from run to run; exact rows do not.",
        "",
        *_table(result),
        "",
        "## Which setting for which loss",
        "",
        "Of the settings at the bounded budget whose bits per token are within the loss, the one that reads the "
        "fewest expert bytes per token:",
        "",
        *_pick_lines(result),
        "",
        "## Bits per token by domain",
        "",
        *_domain_table(result),
        "",
    ]
    path = out_dir / "quality.md"
    path.write_text("\n".join(lines))
    return path
