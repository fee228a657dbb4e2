"""Writes routing-benchmark results as docs/routing.md (live) and docs/simulation.md, PNG plots and JSON.

Only numbers present in the result dict are written: each report is a rendering of one run.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from cluster.bench.report import MIB, _fmt  # noqa: E402
from cluster.routing.decision_audit import WARMEST_TOLERANCE  # noqa: E402

KIB = 1 << 10
BASELINES = ("round_robin", "least_loaded")
RATIO_KEYS = ("bytes_read_per_token", "hit_rate", "tok_s", "p99_latency_s")


def _ratio(a: Any, b: Any) -> float | None:
    if a is None or b is None or b == 0:
        return None
    return float(a) / float(b)


def targets(policies: dict[str, dict[str, Any]]) -> dict[str, dict[str, float | None]]:
    """``{"<policy>_vs_<baseline>": {metric: policy / baseline}}`` for each baseline that ran."""
    out: dict[str, dict[str, float | None]] = {}
    for baseline in BASELINES:
        if baseline not in policies:
            continue
        for name, metrics in policies.items():
            if name == baseline or (name in BASELINES and BASELINES.index(name) < BASELINES.index(baseline)):
                continue  # a baseline against itself, or the same pair the other way round
            out[f"{name}_vs_{baseline}"] = {key: _ratio(metrics.get(key), policies[baseline].get(key))
                                            for key in RATIO_KEYS}
    return out


def _pct(value: Any) -> str:
    return "n/a" if value is None else f"{100 * value:.1f} %"


def _mib(value: Any, digits: int = 2) -> str:
    return "n/a" if value is None else f"{value / MIB:.{digits}f}"


def _kib(value: Any) -> str:
    return "n/a" if value is None else f"{value / KIB:.0f}"


def _short(node_id: str) -> str:
    """``sniper-node-3`` -> ``node 3``."""
    return "node " + node_id.rsplit("-", 1)[-1]


def _plot(policies: dict[str, dict[str, Any]], path: Path, title: str, time_unit: str) -> None:
    names = list(policies)
    xs = range(len(names))
    fig, axes = plt.subplots(1, 4, figsize=(17, 3.8))
    axes[0].bar(names, [100 * (policies[n]["hit_rate"] or 0) for n in names], color="#4a4")
    axes[0].set_ylabel("cache hit rate (%)")
    axes[0].set_ylim(0, 101)
    width = 0.38
    axes[1].bar([x - width / 2 for x in xs], [(policies[n]["bytes_read_per_token_prefill"] or 0) / KIB for n in names],
                width, label="per prefilled token")
    axes[1].bar([x + width / 2 for x in xs], [(policies[n]["bytes_read_per_token_decode"] or 0) / KIB for n in names],
                width, label="per decoded token")
    axes[1].set_xticks(list(xs), names)
    axes[1].set_ylabel("expert KiB read")
    axes[1].legend(fontsize=8)
    axes[2].bar(names, [(policies[n]["bytes_read_per_token"] or 0) / MIB for n in names], color="#c84")
    axes[2].set_ylabel("expert MiB read per generated token")
    axes[3].bar([x - width / 2 for x in xs], [policies[n]["p50_latency_s"] or 0 for n in names], width, label="p50")
    axes[3].bar([x + width / 2 for x in xs], [policies[n]["p99_latency_s"] or 0 for n in names], width, label="p99")
    axes[3].set_xticks(list(xs), names)
    axes[3].set_ylabel(f"latency ({time_unit})")
    axes[3].legend(fontsize=8)
    for ax in axes:
        ax.tick_params(axis="x", labelsize=8)
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _policy_table(policies: dict[str, dict[str, Any]]) -> list[str]:
    lines = [
        "| policy | hit rate | decode hit rate | MiB read / generated token | KiB read / prefilled token | "
        "KiB read / decoded token | prompt tokens reused | tok/s | p50 latency s | p99 latency s | "
        "TTFT p50/p99 s | prediction precision | prediction recall | errors |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, p in policies.items():
        lines.append(
            f"| {name} | {_pct(p['hit_rate'])} | {_pct(p['decode_hit_rate'])} | {_mib(p['bytes_read_per_token'])} | "
            f"{_kib(p['bytes_read_per_token_prefill'])} | {_kib(p['bytes_read_per_token_decode'])} | "
            f"{_pct(p['reused_prompt_fraction'])} | {_fmt(p['tok_s'], 1)} | {_fmt(p['p50_latency_s'], 2)} | "
            f"{_fmt(p['p99_latency_s'], 2)} | {_fmt(p.get('p50_ttft_s'), 2)}/{_fmt(p.get('p99_ttft_s'), 2)} | "
            f"{_pct(p['prediction_precision'])} | {_pct(p['prediction_recall'])} | "
            f"{p['errors']} |")
    return lines


def _audit_lines(policies: dict[str, dict[str, Any]]) -> list[str]:
    """The decisions checked against the nodes' warmth (``cluster.routing.decision_audit``), one row per policy."""
    audited = {name: p.get("decision_audit") or {} for name, p in policies.items()}
    if not any(a.get("n") for a in audited.values()):
        return []
    lines = [
        "Decisions checked against the nodes' warmth (`status()[\"decision_audit\"]`): for every request, the share of "
        "the expert selections it then made (prefill and decode) whose expert was resident, by the nodes' last reports "
        "when the router decided, on the node that served it, on the best candidate and on an average candidate; and "
        f"how often the served node was the warmest, within {100 * WARMEST_TOLERANCE:.0f} points of the best (requests "
        "with more than one candidate).",
        "",
        "| policy | requests checked | served node | best candidate | average candidate | warmest node chosen |",
        "|---|---|---|---|---|---|",
    ]
    for name, a in audited.items():
        if a.get("n"):
            lines.append(f"| {name} | {a['n']} | {_pct(a['served_coverage'])} | {_pct(a['best_coverage'])} | "
                         f"{_pct(a['mean_coverage'])} | {_pct(a['warmest_share'])} of {a['n_choices']} |")
    lines.append("")
    weighed = {name: p["policy_state"] for name, p in policies.items()
               if (p.get("policy_state") or {}).get("warmth_weight") is not None}
    for name, state in weighed.items():
        lines += [f"What `{name}` concluded at the end of the run (`status().policy_state`): warmth separation "
                  f"{100 * state['warmth_separation']:.1f} points (coverage on the node it expected warmest minus the "
                  f"candidates' mean, over {state['warmth_audits']} audited requests), so expected expert misses count "
                  f"with weight {state['warmth_weight']:.2f} of 1 in its choice.", ""]
    return lines


def _crash_lines(policies: dict[str, dict[str, Any]]) -> list[str]:
    """What the failure injected by ``--kill-node-after`` cost each policy's run."""
    crashes = {name: p["node_crash"] for name, p in policies.items() if p.get("node_crash")}
    if not crashes:
        return []
    first = next(iter(crashes.values()))
    lines = [f"Failure injected (`--kill-node-after {first['after_s']:g}`): in each policy's run, the process of "
             f"`{first['node']}` was killed with SIGKILL {first['after_s']:g} s after the run started (as a crash or the "
             "kernel's OOM killer would end it). Back: when the router had the node again, a new process reporting. "
             "Requests restarted or retried: answers started again on another node after their node died "
             "(the caller had seen nothing).", "",
             "| policy | killed | back after s | requests restarted or retried | errors |", "|---|---|---|---|---|"]
    for name, c in crashes.items():
        back = "run ended first" if not c["killed"] else _fmt(c["back_after_s"], 1) if c["back_after_s"] is not None \
            else f"not within {c['timeout_s']:g} s"
        lines.append(f"| {name} | {c['killed']} | {back} | {policies[name]['retried_requests']} | "
                     f"{policies[name]['errors']} |")
    return lines + [""]


def _targets_lines(result: dict[str, Any]) -> list[str]:
    t = result["targets"]
    if not t:
        return ["No baseline policy (round_robin, least_loaded) ran, so there are no ratios.", ""]
    lines = ["| comparison | bytes read / token | hit rate | tok/s | p99 latency |", "|---|---|---|---|---|"]
    for name, r in t.items():
        lines.append(f"| {name.replace('_vs_', ' ÷ ')} | " + " | ".join(_fmt(r[k], 3) for k in RATIO_KEYS) + " |")
    return lines + [""]


def write_routing_report(result: dict[str, Any], out_dir: Path) -> Path:
    """docs/routing.md, routing.png and bench-routing.json from one ``bench routing`` run."""
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "bench-routing.json").write_text(json.dumps(result, indent=1, default=float))
    m, w, c = result["model"], result["workload"], result["cluster"]
    policies = result["policies"]
    limit = c["node_memory_limit_bytes"]
    lines = [
        "# Routing benchmark",
        "",
        f"Produced by `{result['command']}` on {result['started']} ({result['machine']['cpus']} CPUs shared by every "
        f"node, load average {result['machine']['load_avg_1m_at_start']:.1f} at the start). Raw numbers: "
        "`bench-routing.json`. Every figure below comes from that one run.",
        "",
        f"Model: `{Path(m['path']).name}` — {m['arch']}, {m['n_layers']} layers × {m['n_experts']} experts "
        f"(top-{m['n_experts_used']}), experts {m['expert_bytes'] / MIB:.0f} MiB (whole pages, as the cache counts them).",
        "",
        f"Cluster: for each policy a fresh Ray cluster of {c['nodes']} nodes on 127.0.0.1 "
        "(`ray.cluster_utils.Cluster`), "
        f"one node actor per node, expert-cache budget {c['cache_bytes_per_node'] / MIB:.0f} MiB per node "
        f"({100 * c['cache_bytes_per_node'] / m['expert_bytes']:.0f} % of the expert bytes)"
        + (f", each node actor under a cgroup memory limit of {limit / MIB:.0f} MiB and reading its own copy of "
           "the model file (separate page caches, as on separate machines; dropped before each policy)" if limit else "")
        + "; torn down after.",
        "",
        f"Workload ({w['source']}): {w['n_requests']} requests in {w['n_conversations']} conversations "
        f"(turns per conversation: {', '.join(f'{n}: {k}' for n, k in w['turns_per_conversation'].items())}), "
        f"Poisson arrivals at {w['rate_per_s']:g}/s (seed {w['seed']}), ~{w['mean_prompt_words']:.0f} new words per "
        f"turn, {w['max_tokens']} generated tokens at most, greedy. Each turn is sent at its arrival time or when its "
        "conversation's previous turn finished, whichever is later, with the conversation so far (earlier prompts "
        "and the answers this deployment gave) before the new prompt, and the conversation as `session_id`. "
        f"Identical answers under every policy: {result['same_answers']}.",
        "",
        "## Results",
        "",
        "Hit rate: selected experts already resident or being read ahead, over all requests. Bytes read: expert bytes "
        "the nodes' caches read (demand and prefetch); per generated token from the nodes' counters "
        "(`Client.status()`), per prefilled and per decoded token from the requests' own counters "
        "(`Completion.cache`). Prompt tokens reused: prompt tokens whose KV state the serving node already held. "
        "Latency: request sent → answer received. tok/s: generated tokens ÷ wall time of the run. Prediction: the "
        "router's predicted expert set vs the experts the prefill used (warmth only).",
        "",
        *_policy_table(policies),
        "",
        "Requests per node: " + "; ".join(
            f"{name} {', '.join(f'{_short(n)}: {k}' for n, k in p['requests_per_node'].items())}"
            for name, p in policies.items()) + ".",
        "",
        *_crash_lines(policies),
        *_audit_lines(policies),
        "Ratios (policy ÷ baseline; below 1 is better for bytes and latency, above 1 for hit rate and tok/s):",
        "",
        *_targets_lines(result),
    ]
    for name, p in policies.items():
        if p["error_examples"]:
            lines += [f"Errors under {name}: " + "; ".join(f"`{e}`" for e in p["error_examples"]), ""]
    _plot(policies, out_dir / "routing.png", f"{c['nodes']} nodes, {w['n_requests']} requests", "s")
    lines += ["![routing benchmark](routing.png)", ""]
    d = result.get("decision_cost")
    if d:
        t = d["targets"]
        lines += [
            "## Router decision cost",
            "",
            f"`RouterCore.choose` with the warmth policy, no Ray: {d['n_nodes']} nodes × {d['n_layers']} layers × "
            f"{d['n_experts']} experts (top-{d['k']}), warmth reports encoded by `cluster.engine.warmth_report`, an affinity of "
            f"{d['affinity_tokens']} tokens learned from routing-trace summaries, {d['prompt_tokens']}-token prompts, "
            f"half of them continuing a conversation some node holds; after each decision the chosen node's "
            f"load goes up and the oldest of {d.get('n_in_flight', 16)} requests in flight ends, as in service; "
            f"{d['n_decisions']} decisions in {d.get('n_rounds', 1)} rounds, back to back.",
            "",
            *([f"Decisions/s of each round: {', '.join(_fmt(x, 0) for x in d['round_decisions_per_s'])} "
               "(the machine is shared: a round runs as fast as its neighbours let it). The table gives the median "
               "round; p50 and p99 are over all decisions.", ""] if d.get("round_decisions_per_s") else []),
            *([f"Learning from a report (`RouterCore.on_report` with the routing-trace summary of a "
               f"{d['learn_tokens_per_report']}-token prefill): {_fmt(d['learn_ms_per_report'], 2)} ms.", ""]
              if d.get("learn_ms_per_report") is not None else []),
            "| p50 ms | p99 ms | decisions/s | target | met |",
            "|---|---|---|---|---|",
            f"| {_fmt(d['p50_ms'], 3)} | {_fmt(d['p99_ms'], 3)} | {_fmt(d['decisions_per_s'], 1)} | "
            f"p99 ≤ {t['p99_ms_max']:g} ms, ≥ {t['decisions_per_s_min']:g}/s | {t['met']} |",
            "",
        ]
        prof = d.get("profile")
        if prof:
            lines += [f"Where the time goes (cProfile over {prof['n_decisions']} decisions, "
                      f"{_fmt(prof['ms_per_decision'], 1)} ms each under the profiler; own time):", "",
                      "| function | calls / decision | own ms / decision | share |", "|---|---|---|---|"]
            for r in prof["top_own_time"][:8]:
                lines.append(f"| `{r['function']}` | {_fmt(r['calls_per_decision'], 1)} | "
                             f"{_fmt(r['own_ms_per_decision'], 2)} | {_pct(r['own_share'])} |")
            lines.append("")
    path = out_dir / "routing.md"
    path.write_text("\n".join(lines))
    return path


def write_simulate_report(result: dict[str, Any], out_dir: Path) -> Path:
    """docs/simulation.md, simulation.png and bench-simulate.json from one ``bench simulate`` run."""
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "bench-simulate.json").write_text(json.dumps(result, indent=1, default=float))
    m, w, s = result["model"], result["workload"], result["service_model"]
    policies = result["policies"]
    lines = [
        "# Routing simulation",
        "",
        f"Produced by `{result['command']}` on {result['started']}. Raw numbers: `bench-simulate.json`. Every figure "
        "below comes from that one run.",
        "",
        f"Routing traces recorded once from `{Path(m['path']).name}` ({m['n_layers']} layers × {m['n_experts']} "
        f"experts, top-{m['n_experts_used']}) with llama.cpp: {w['n_requests']} conversation turns "
        f"({w.get('n_conversations', 'n/a')} conversations), each served from an empty context. Then, per policy, "
        f"{result['nodes']} simulated nodes, each with the real expert-cache policy core (`CachePolicy`, budget "
        f"{result['cache_bytes_per_node'] / MIB:.2f} MiB = "
        f"{100 * result['cache_bytes_per_node'] / m['expert_bytes']:.0f} % "
        "of the expert bytes in whole pages), routed by the real `RouterCore` and policy from the nodes' warmth "
        "reports, prefixes and "
        "routing-trace summaries. A node reuses a conversation's KV state as a live node does and replays only the "
        f"prompt tokens it has to prefill. Poisson arrivals at {w['rate_per_s']:g}/s; a conversation's next turn "
        "waits for the previous one."
        + (" Warmth policy knobs changed from their defaults: "
           + ", ".join(f"`{k}={v}`" for k, v in result["warmth_knobs"].items()) + "."
           if result.get("warmth_knobs") else ""),
        "",
        f"Service-time model (simulated seconds a request occupies its node, one request at a time): "
        f"{s['prefill_s_per_token'] * 1e3:g} ms per prefilled token + {s['decode_s_per_token'] * 1e3:g} ms per "
        f"generated token + expert bytes read ÷ {s['read_bytes_per_s'] / 1e9:g} GB/s. Latency and tok/s below are "
        "in simulated time.",
        "",
        *_policy_table(policies),
        "",
        "Spread of requests over nodes: " + "; ".join(
            f"{name} {p['node_spread']['nodes_used']} nodes used, at most {p['node_spread']['max']} requests on one"
            for name, p in policies.items()) + ". Router decision time (wall, per request): " + "; ".join(
            f"{name} p50 {_fmt(p['decision_us_p50'], 0)} µs, p99 {_fmt(p['decision_us_p99'], 0)} µs"
            for name, p in policies.items()) + ".",
        "",
        *_audit_lines(policies),
        "Ratios (policy ÷ baseline):",
        "",
        *_targets_lines(result),
    ]
    oracle = result.get("static_oracle")
    if oracle and oracle["decode_miss_rate"] is not None:
        per = sorted(oracle["by_domain"].values())
        measured = "; ".join(f"{name} {_pct(None if p['decode_hit_rate'] is None else 1 - p['decode_hit_rate'])}"
                             for name, p in policies.items())
        lines += [
            f"Floor, in hindsight: were each of the {oracle['n_domains']} domains given a node of its own whose cache "
            "held, chosen knowing the whole trace, the units its decode steps selected most (as many as fit the "
            f"budget), {_pct(oracle['decode_miss_rate'])} of decode selections would still miss (per domain "
            f"{_pct(per[0])} to {_pct(per[-1])}); a cache that adapts within a conversation can go a little below it. "
            f"Decode misses measured (1 - decode hit rate; read-ahead counts as a hit): {measured}.",
            "",
        ]
    _plot(policies, out_dir / "simulation.png", f"{result['nodes']} simulated nodes, {w['n_requests']} requests",
          "simulated s")
    lines += ["![routing simulation](simulation.png)", ""]
    path = out_dir / "simulation.md"
    path.write_text("\n".join(lines))
    return path
