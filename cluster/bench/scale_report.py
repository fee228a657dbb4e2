"""``docs/scale.md`` from a ``bench scale`` result: the tables, two plots, and every target of issue 22 met or missed."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

MIB = 1 << 20
GIB = 1 << 30
TARGET_C = "8"


def _fmt(value: Any, scale: float = 1.0, digits: int = 2) -> str:
    return "—" if value is None else f"{value * scale:.{digits}f}"


def _ratio(a: Any, b: Any) -> float | None:
    return a / b if a is not None and b else None


def _budget_bytes(line: str) -> int | None:
    """The MiB figure of an ``AutoBudget.explain`` line."""
    m = re.match(r"auto cache budget (\d+) MiB", line or "")
    return int(m.group(1)) * MIB if m else None


def targets(result: dict[str, Any]) -> list[dict[str, Any]]:
    """Each target of the issue's cluster part: measured value, what was wanted, met or not, and why where known."""
    out: list[dict[str, Any]] = []
    regimes = result["regimes"]

    def run(regime: str, system: str, c: str = TARGET_C) -> dict[str, Any]:
        return regimes.get(regime, {}).get("systems", {}).get(system, {}).get("runs", {}).get(c, {})

    lim_s, lim_l = run("limited", "sniper"), run("limited", "llama-server")
    if lim_s or lim_l:
        ratio = _ratio(lim_s.get("tok_s"), lim_l.get("tok_s"))
        out.append({"target": f"per-node limits, C = {TARGET_C}: aggregate tok/s vs the llama-server deployment",
                    "value": ratio, "wanted": "≥ 5×", "met": ratio is not None and ratio >= 5.0})
        ours, theirs = lim_s.get("ttft_p99_s"), lim_l.get("ttft_p99_s")
        out.append({"target": f"per-node limits, C = {TARGET_C}: p99 TTFT no worse than the deployment's",
                    "value": _ratio(ours, theirs), "wanted": "≤ 1×",
                    "met": ours is not None and theirs is not None and ours <= theirs,
                    "note": "the deployment's p99 is censored at the window's end (requests with no first token yet)"
                    if lim_l.get("ttft_censored") else None})
    un_s, un_l = run("unlimited", "sniper"), run("unlimited", "llama-server")
    if un_s or un_l:
        ratio = _ratio(un_s.get("tok_s"), un_l.get("tok_s"))
        out.append({"target": f"no limits, C = {TARGET_C}: aggregate tok/s vs the llama-server deployment",
                    "value": ratio, "wanted": "≥ 0.9×", "met": ratio is not None and ratio >= 0.9})
    failures = [(f"{regime}/{system}", data) for regime, r in regimes.items() for system, data in r["systems"].items()]
    errors = sum(run_.get("errors", 0) for _, d in failures for run_ in d.get("runs", {}).values())
    ooms = sum(d.get("oom_kills", 0) for _, d in failures)
    failed = [name for name, d in failures if "failed" in d]
    out.append({"target": "zero OOM kills and zero failed requests in every run", "value": f"{ooms} OOM, {errors} errors"
                + (f", {len(failed)} systems failed to run" if failed else ""), "wanted": "0, 0",
                "met": ooms == 0 and errors == 0 and not failed})
    rate = result["machine"]["disk_read_bytes_per_s"]
    for regime, r in regimes.items():
        ours = r["systems"].get("sniper", {})
        if "start_to_first_answer_s" not in ours:
            continue
        budget = max((_budget_bytes(b) or 0 for b in ours.get("budgets", [])), default=0)
        reference = (result["model"]["non_expert_bytes"] + budget) / rate
        value = ours["start_to_first_answer_s"] / reference
        out.append({"target": f"{regime}: from start to the first answer vs reading the non-expert weights and one "
                              f"node's budget once ({reference:.1f} s at the disk's rate)",
                    "value": value, "wanted": "≤ 1.5×", "met": value <= 1.5,
                    "note": "the time includes starting the local Ray cluster and the gateway"})
    return out


def _plots(result: dict[str, Any], out_dir: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    for key, label in (("tok_s", "aggregate tok/s"), ("ttft_p99_s", "TTFT p99 (s)")):
        fig, ax = plt.subplots(figsize=(6, 3.6))
        for regime, r in result["regimes"].items():
            for system, data in r["systems"].items():
                runs = data.get("runs", {})
                cs = [int(c) for c in runs if runs[c].get(key) is not None]
                if cs:
                    ax.plot(cs, [runs[str(c)][key] for c in cs], marker="o",
                            linestyle="-" if system == "sniper" else "--", label=f"{system}, {regime}")
        ax.set_xlabel("concurrent chat users (C)")
        ax.set_ylabel(label)
        if key == "ttft_p99_s":
            ax.set_yscale("log")
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
        fig.tight_layout()
        path = out_dir / f"scale-{key.replace('_', '-')}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths


def write_scale_report(result: dict[str, Any], out_dir: Path) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "scale.json").write_text(json.dumps(result, indent=1, default=str))
    plots = _plots(result, out_dir)
    m, p = result["model"], result["params"]
    limit = p["node_memory_mb"]
    lines = [
        "# Real scale: the whole service against one llama-server per node behind a round-robin proxy", "",
        f"Produced by `{result['command']}` in {result['wall_s'] / 60:.0f} minutes on a machine of "
        f"{result['machine']['cpus']} cores and {result['machine']['mem_total_bytes'] / GIB:.1f} GiB; see the docstring "
        "of `cluster/bench/scale.py` for what each figure measures.", "",
        f"Model: `{Path(m['path']).name}`" + (f" (written by `python -m cluster synth --preset {m['preset']}`)"
                                               if m["generated"] else "")
        + f", {m['file_bytes'] / GIB:.2f} GiB, {m['n_layers']} layers × {m['n_experts']} experts, experts "
        f"{m['expert_bytes'] / GIB:.2f} GiB, the rest {m['non_expert_bytes'] / GIB:.2f} GiB. Disk: "
        f"{result['machine']['disk_read_bytes_per_s'] / MIB:.0f} MiB/s sequential from a cold page cache.", "",
        f"{p['n_nodes']} nodes, each {p['n_slots']} slots of {p['n_ctx']} tokens and {p['n_threads']} thread(s); "
        + (f"with limits, each node (actor or llama-server) in a memory cgroup of {limit} MiB; " if limit else "")
        + f"C closed-loop chat users, {p['turns']} turns per conversation over the model's topics, greedy, "
        f"{p['max_tokens']} tokens per answer; {p['warmup_s']:.0f} s of warm-up, then a {p['window_s']:.0f} s window. "
        "Both systems map one copy of the file (three copies do not fit the disk): the page cache is shared, a page "
        "charged to the cgroup that first read it.", ""]
    for r in result["regimes"].values():
        title = (f"Each node limited to {r['node_limit_bytes'] / GIB:.1f} GiB" if r["node_limit_bytes"]
                 else "No limits (the file in the page cache)")
        lines += [f"## {title}", ""]
        for system, data in r["systems"].items():
            if "failed" in data or "skipped" in data:
                lines.append(f"- {system}: {'failed' if 'failed' in data else 'skipped'}: "
                             f"{data.get('failed') or data.get('skipped')}")
                continue
            lines.append(f"- {system}: first answer {data['start_to_first_answer_s']:.1f} s after start"
                         + (f", {data['start_disk_bytes'] / GIB:.2f} GiB read from disk by then"
                            if data.get("start_disk_bytes") is not None else "")
                         + f"; OOM kills {data['oom_kills']}"
                         + (f"; budgets: {'; '.join(b.split(' = ')[0] for b in data['budgets'])}" if data.get("budgets") else ""))
        lines += ["", "| C | system | tok/s | TTFT p50 / p99 s | TPOT p50 / p99 s | requests done | expert MiB/token | "
                  "disk MiB/token | errors | peak GiB per node |", "|---|---|---|---|---|---|---|---|---|---|"]
        cs = sorted({int(c) for d in r["systems"].values() for c in d.get("runs", {})})
        for c in cs:
            for system, data in r["systems"].items():
                w = data.get("runs", {}).get(str(c))
                if w is None:
                    continue
                censored = f" ({w['ttft_censored']} still waiting)" if w.get("ttft_censored") else ""
                peaks = ", ".join(_fmt(b, 1 / GIB) for b in w.get("peak_bytes_per_node", []))
                lines.append(
                    f"| {c} | {system} | {_fmt(w['tok_s'])} | {_fmt(w['ttft_p50_s'], 1, 1)} / {_fmt(w['ttft_p99_s'], 1, 1)}"
                    f"{censored} | {_fmt(w['tpot_p50_s'], 1, 3)} / {_fmt(w['tpot_p99_s'], 1, 3)} | {w['requests_completed']} | "
                    f"{_fmt(w.get('expert_bytes_per_token'), 1 / MIB, 1)} | {_fmt(w.get('disk_bytes_per_token'), 1 / MIB, 1)} | "
                    f"{w['errors']} | {peaks} |")
        lines.append("")
    lines += ["## Targets (issue 22, the cluster part)", "", "| target | measured | wanted | met |", "|---|---|---|---|"]
    for t in targets(result):
        value = t["value"] if isinstance(t["value"], str) else _fmt(t["value"])
        met = "yes" if t["met"] else "no" + (f" ({t['note']})" if t.get("note") else "")
        lines.append(f"| {t['target']} | {value} | {t['wanted']} | {met} |")
    lines += ["", *[f"![{path.stem}]({path.name})" for path in plots], ""]
    path = out_dir / "scale.md"
    path.write_text("\n".join(lines))
    return path
