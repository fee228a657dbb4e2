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


def _disk_bound(run: dict[str, Any], rate: float) -> float | None:
    """Decode tok/s the disk allows at the bytes a decoded token needed read."""
    per_token = run.get("decode_expert_bytes_per_token") or run.get("disk_bytes_per_token")
    return rate / per_token if per_token else None


def node_lines(result: dict[str, Any]) -> list[str]:
    """The single-node part: ours and stock llama.cpp per regime, and the machine's physical bounds."""
    node = result.get("node")
    if not node:
        return []
    rate = result["machine"]["disk_read_bytes_per_s"]
    lines = [f"## One node on the whole file (`{result['commands'].get('node', result['command'])}`)", "",
             "Ours: `MoEEngine(model, \"auto\")` in a child process, exact, then with cache-aware selection at its default "
             "bounds (it changes the output: docs/quality.md); stock: `llama-server` (llama.cpp's own mmap load), "
             "the same prompt and length, from a cold page cache; all cores. Expert and disk MiB/token count the prompt's "
             "reads too; the disk bound is the disk's rate over the expert bytes read per token while decoding (or, where "
             "that was not recorded, over the disk bytes per token)."]
    bound = result.get("compute_bound") or {}
    if bound.get("tok_s"):
        lines += ["", f"In-RAM compute bound of these shapes: {bound['tok_s']:.2f} tok/s (layer-truncated copies in RAM: "
                  + ", ".join(f"{k} layers {v:.2f} tok/s" for k, v in bound["layers"].items())
                  + f"; {bound['seconds_per_layer'] * 1e3:.0f} ms per layer per token plus {bound['seconds_fixed'] * 1e3:.0f} ms"
                  " extrapolated to every layer)."]
    lines += ["", "| regime | system | start s | TTFT s | decode tok/s | expert MiB/token | disk MiB/token | disk bound tok/s | "
              "peak GiB | OOM kills |", "|---|---|---|---|---|---|---|---|---|---|"]
    for name, r in node.items():
        for who, d in (("ours", r["ours"]), ("ours, cache-aware", r.get("ours_cache_aware")), ("llama-server", r["stock"])):
            if d is None:
                continue
            if "failed" in d or "skipped" in d:
                why = (d.get("failed") or d.get("skipped") or "").strip().splitlines()[-1][:160].replace("|", "/")
                lines.append(f"| {name} | {who} | {why} |")
                continue
            disk_bound = _disk_bound(d, rate)
            cut = f" ({d['tokens']} tokens in the time allowed)" if d.get("cut") else ""
            lines.append(
                f"| {name} | {who} | {_fmt(d.get('open_s', d.get('start_s')), 1, 1)} | {_fmt(d.get('ttft_s'), 1, 1)} | "
                f"{_fmt(d.get('decode_tok_s'))}{cut} | {_fmt(d.get('expert_bytes_per_token'), 1 / MIB, 1)} | "
                f"{_fmt(d.get('disk_bytes_per_token'), 1 / MIB, 1)} | {_fmt(disk_bound)} | {_fmt(d.get('peak_bytes'), 1 / GIB)} | "
                f"{d.get('oom_kills', 0)} |")
    return lines + [""]


def node_targets(result: dict[str, Any]) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    rate = result["machine"]["disk_read_bytes_per_s"]
    compute = (result.get("compute_bound") or {}).get("tok_s")
    for name, r in (result.get("node") or {}).items():
        ours, stock = r["ours"], r["stock"]
        if "failed" in ours:
            out.append({"target": f"node, {name}: ours runs", "value": "failed", "wanted": "runs", "met": False})
            continue
        ratio = _ratio(ours.get("decode_tok_s"), stock.get("decode_tok_s"))
        out.append({"target": f"node, {name}: decode vs stock llama.cpp on the same file", "value": ratio,
                    "wanted": "≥ 10×", "met": ratio is not None and ratio >= 10.0,
                    "note": "stock did not finish its tokens in the time allowed: its rate is what it reached"
                    if stock.get("cut") else None})
        disk_bound = _disk_bound(ours, rate)
        tighter = min(b for b in (disk_bound, compute) if b) if (disk_bound or compute) else None
        value = _ratio(tighter, ours.get("decode_tok_s"))
        out.append({"target": f"node, {name}: the tighter physical bound over our decode rate", "value": value,
                    "wanted": "≤ 1.5×", "met": value is not None and value <= 1.5})
    return out


def targets(result: dict[str, Any]) -> list[dict[str, Any]]:
    """Each target of the issue's cluster part: measured value, what was wanted, met or not, and why where known."""
    out: list[dict[str, Any]] = node_targets(result)
    regimes = result.get("regimes") or {}

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
    ooms = sum(d.get("oom_kills", 0) for _, d in failures) + sum(
        (r["ours"].get("oom_kills") or 0) + (r["stock"].get("oom_kills") or 0) for r in (result.get("node") or {}).values())
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
        for regime, r in (result.get("regimes") or {}).items():
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


def merge_earlier_parts(result: dict[str, Any], earlier: dict[str, Any]) -> dict[str, Any]:
    """``result`` with the parts only an earlier run of the same model measured (``bench scale --parts``), each
    keeping the command that produced it."""
    merged = dict(result)
    commands = dict(earlier.get("commands") or {})
    same_model = earlier.get("model", {}).get("file_bytes") == result["model"]["file_bytes"]
    for part, keys in (("node", ("node", "compute_bound")), ("cluster", ("regimes",))):
        ran = any(result.get(k) for k in keys)
        if ran:
            commands[part] = result["command"]
        elif same_model and any(earlier.get(k) for k in keys):
            for k in keys:
                merged[k] = earlier.get(k)
            commands.setdefault(part, earlier.get("command"))
    merged["commands"] = commands
    return merged


def write_scale_report(result: dict[str, Any], out_dir: Path) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    earlier_file = out_dir / "scale.json"
    earlier = json.loads(earlier_file.read_text()) if earlier_file.exists() else {}
    result = merge_earlier_parts(result, earlier)
    (out_dir / "scale.json").write_text(json.dumps(result, indent=1, default=str))
    plots = _plots(result, out_dir) if result.get("regimes") else []
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
        f"{p['max_tokens']} tokens per answer; a warm-up, then a measured window (`--warmup-s`, `--window-s` of each "
        "part's command). "
        "Both systems map one copy of the file (three copies do not fit the disk): the page cache is shared, a page "
        "charged to the cgroup that first read it.", ""]
    lines += node_lines(result)
    if result.get("regimes"):
        lines += [f"## The cluster part (`{result['commands'].get('cluster', result['command'])}`)", ""]
    for r in (result.get("regimes") or {}).values():
        title = (f"Each node limited to {r['node_limit_bytes'] / GIB:.1f} GiB" if r["node_limit_bytes"]
                 else "No limits (the file in the page cache)")
        lines += [f"### {title}", ""]
        probe = r.get("default_llama_server")
        if probe:
            lines += ["llama-server with its default options (weights repacked into private memory at load) under this "
                      "limit: " + (f"started in {probe['seconds']:.0f} s" if probe["started"] else
                                    f"did not start: {probe.get('error', '')} ({probe['oom_kills']} OOM kills, "
                                    f"{probe['seconds']:.0f} s)") + "; the runs below give it `--no-repack`, the weights "
                      "in the file mapping, as a user must run it there.", ""]
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
    lines += ["## Targets (issue 22)", "", "| target | measured | wanted | met |", "|---|---|---|---|"]
    for t in targets(result):
        value = t["value"] if isinstance(t["value"], str) else _fmt(t["value"])
        met = "yes" if t["met"] else "no" + (f" ({t['note']})" if t.get("note") else "")
        lines.append(f"| {t['target']} | {value} | {t['wanted']} | {met} |")
    lines += ["", *[f"![{path.stem}]({path.name})" for path in plots], ""]
    path = out_dir / "scale.md"
    path.write_text("\n".join(lines))
    return path
