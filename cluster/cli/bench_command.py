"""``python -m cluster bench SUITE``: runs one benchmark suite with the flags it takes, and prints
its result (one line of JSON with --json, else a summary)."""

from __future__ import annotations

import argparse
import inspect
from pathlib import Path
from typing import Any, Sequence

from cluster.cli.output import emit
from cluster.distributed.status import jsonable
from cluster.engine.node_memory import MIB
from cluster.models.synth import default_model


def run_bench(args: argparse.Namespace) -> int:
    only = {"routing": ("decision_cost", "kill_node_after"),
            "simulate": ("traces", "save_traces", "warmth_knob"), "chaos": ("duration",),
            "batch": ("no_limit", "topics"),
            "scale": ("dtype", "warmup_s", "ctx", "keep_model", "no_unlimited"),
            "quality": ("budget_fraction", "windows", "window_tokens"),
            "policies": ("models", "prompts_5", "prompts_8", "keep_models")}
    for suite, names in only.items():
        given = [n for n in names if getattr(args, n) not in (None, False)]
        if given and args.suite != suite:
            raise ValueError(f"--{given[0].replace('_', '-')} is a flag of 'bench {suite}', not 'bench {args.suite}'")
    if args.work_dir is not None and args.suite not in ("scale", "policies"):
        raise ValueError(f"--work-dir is a flag of 'bench scale' and 'bench policies', not 'bench {args.suite}'")
    if args.threads is not None and args.suite not in ("quality", "policies"):
        raise ValueError(f"--threads is a flag of 'bench quality' and 'bench policies', not 'bench {args.suite}'")
    if args.parts and args.suite not in ("engine", "scale"):
        raise ValueError(f"--parts is a flag of 'bench engine' and 'bench scale', not 'bench {args.suite}'")
    if args.node_memory_mb is not None and args.suite not in ("routing", "scale"):
        raise ValueError(f"--node-memory-mb is a flag of 'bench routing' and 'bench scale', not 'bench {args.suite}'")
    if args.concurrency and args.suite not in ("routing", "batch", "serving", "scale"):
        raise ValueError(f"--concurrency is a flag of 'bench routing', 'bench batch', 'bench serving' and 'bench scale', "
                         f"not 'bench {args.suite}'")
    if args.window_s is not None and args.suite not in ("batch", "serving", "scale"):
        raise ValueError(f"--window-s is a flag of 'bench batch', 'bench serving' and 'bench scale', "
                         f"not 'bench {args.suite}'")
    if args.concurrency and args.suite == "routing" and not args.concurrency.isdigit():
        raise ValueError(f"--concurrency of 'bench routing' is one number of clients, got {args.concurrency!r}")
    if args.llama_server and args.suite not in ("serving", "batch", "scale"):
        raise ValueError(f"--llama-server is a flag of 'bench serving', 'bench batch' and 'bench scale', "
                         f"not 'bench {args.suite}'")
    if args.prompts and args.suite in ("simulate", "serving", "chaos"):
        raise ValueError(f"--prompts is a flag of 'bench engine', 'bench routing', 'bench regimes' and 'bench batch', "
                         f"not 'bench {args.suite}'")
    shared = ("nodes", "cache_mb", "policies", "requests", "rate", "max_tokens", "seed")
    given = [n for n in shared if getattr(args, n) is not None]
    if args.suite == "batch":
        foreign = [n for n in given if n != "max_tokens"]
        if foreign:
            raise ValueError(f"--{foreign[0].replace('_', '-')} is not a flag of 'bench batch' (it takes --model, "
                             f"--prompts, --topics, --concurrency, --max-tokens, --window-s, --no-limit, --llama-server, "
                             f"--out)")
        if args.topics and args.prompts:
            raise ValueError("--topics draws the synthetic model's own prompts: it does not go with --prompts")
        from cluster.bench import batch_bench

        concurrency = tuple(int(c) for c in (args.concurrency or "1,2,4,8,16").split(","))
        if not concurrency or min(concurrency) < 1 or max(concurrency) > 64:
            raise ValueError(f"--concurrency must be comma-separated integers in [1, 64], got {args.concurrency!r}")
        report = batch_bench.main(args.model or str(default_model("bench", progress=not args.json)),
                                  prompts_file=args.prompts, n_topics=args.topics, concurrency=concurrency,
                                  max_tokens=args.max_tokens or 64, n_threads=2,
                                  window_s=args.window_s or (8.0 if args.quick else 20.0),
                                  limit_fraction=None if args.no_limit else 0.5, llama_server=args.llama_server,
                                  out_dir=Path(args.out) if args.out else None, progress=not args.json)
        emit({"report": report["report"], "targets": report["targets"]}, args, lambda r: f"wrote {r['report']}")
        return 0
    if args.suite == "scale":
        foreign = [n for n in given if n not in ("nodes", "max_tokens")] + (["prompts"] if args.prompts else [])
        if foreign:
            raise ValueError(f"--{foreign[0].replace('_', '-')} is not a flag of 'bench scale'")
        from cluster.bench import scale

        concurrency = tuple(int(c) for c in (args.concurrency or ("1,8" if args.quick else "1,4,8,16")).split(","))
        if not concurrency or min(concurrency) < 1 or max(concurrency) > 64:
            raise ValueError(f"--concurrency must be comma-separated integers in [1, 64], got {args.concurrency!r}")
        parts = tuple(args.parts.split(",")) if args.parts else scale.PARTS
        if not parts or not set(parts) <= set(scale.PARTS):
            raise ValueError(f"--parts must be comma-separated names of {', '.join(scale.PARTS)}, got {args.parts!r}")
        params = scale.ScaleParams(
            n_nodes=args.nodes or 3, node_memory_mb=args.node_memory_mb or 6144, concurrency=concurrency,
            warmup_s=args.warmup_s if args.warmup_s is not None else (10.0 if args.quick else 20.0),
            window_s=args.window_s or (30.0 if args.quick else 90.0), max_tokens=args.max_tokens or 32,
            n_ctx=args.ctx or 1024, unlimited=not args.no_unlimited, parts=parts)
        result = scale.run_scale(args.model, Path(args.out) if args.out else None, dtype=args.dtype, params=params,
                                 llama_server=args.llama_server, work_dir=args.work_dir or scale.DEFAULT_WORK_DIR,
                                 keep_model=args.keep_model, progress=not args.json)
        emit({"report": result.get("report"), "wall_s": result["wall_s"]}, args,
             lambda r: f"wrote {r['report']} in {r['wall_s'] / 60:.0f} min")
        return 0
    if args.suite == "quality":
        foreign = given + (["prompts"] if args.prompts else [])
        if foreign:
            raise ValueError(f"--{foreign[0].replace('_', '-')} is not a flag of 'bench quality' (it takes --model, "
                             f"--budget-fraction, --windows, --window-tokens, --threads, --quick, --out)")
        from cluster.bench import quality

        result = quality.run_quality(args.model, Path(args.out), quick=args.quick,
                                     budget_fraction=quality.DEFAULT_BUDGET_FRACTION if args.budget_fraction is None
                                     else args.budget_fraction, n_windows=args.windows,
                                     window_tokens=args.window_tokens, n_threads=args.threads,
                                     progress=not args.json)
        emit({"report": result["report"], "settings": result["settings"]}, args, _quality_summary)
        return 0
    if args.suite == "policies":
        foreign = [n for n in given if n != "max_tokens"] + (["model"] if args.model else []) + (
            ["prompts"] if args.prompts else [])
        if foreign:
            raise ValueError(f"--{foreign[0].replace('_', '-')} is not a flag of 'bench policies' (it takes --models, "
                             f"--prompts-5, --prompts-8, --work-dir, --keep-models, --max-tokens, --threads, --quick, "
                             f"--out)")
        from cluster.bench import policies

        result = policies.run_policies(Path(args.out), models=args.models, prompts_5=args.prompts_5,
                                       prompts_8=args.prompts_8, work_dir=args.work_dir, keep_models=args.keep_models,
                                       quick=args.quick, max_tokens=args.max_tokens, n_threads=args.threads,
                                       progress=not args.json)
        emit({"report": result["report"], "target": result["target"], "wall_s": result["wall_s"]}, args,
             lambda r: f"wrote {r['report']} in {r['wall_s'] / 60:.1f} min")
        return 0
    if args.suite == "router":
        foreign = [n for n in given if n != "requests"] + (["prompts"] if args.prompts else [])
        if foreign:
            raise ValueError(f"--{foreign[0].replace('_', '-')} is not a flag of 'bench router' (it takes --model, "
                             f"--requests, --quick, --out)")
        from cluster.bench import router_latency

        report = router_latency.main(args.model or str(default_model("demo", progress=not args.json)),
                                     requests=args.requests or (200 if args.quick else 500), out_dir=args.out,
                                     progress=not args.json)
        emit({"report": str(report)}, args, lambda r: f"wrote {r['report']}")
        return 0
    if args.suite == "chaos":
        if given:
            raise ValueError(f"--{given[0].replace('_', '-')} is not a flag of 'bench chaos' (it takes --model, "
                             f"--duration, --out)")
        from cluster.bench import chaos

        report = chaos.main(args.model or str(default_model("demo", progress=not args.json)),
                            duration_s=float(args.duration or (40 if args.quick else 120)), out_dir=args.out,
                            progress=not args.json)
        emit({"report": str(report)}, args, lambda r: f"wrote {r['report']}")
        return 0
    if args.suite == "regimes":
        if given:
            raise ValueError(f"--{given[0].replace('_', '-')} is not a flag of 'bench regimes' (it takes --model, "
                             f"--prompts, --quick, --out)")
        from cluster.bench import regimes

        report = regimes.main(args.model or str(default_model("bench", progress=not args.json)), args.prompts,
                              args.out, quick=args.quick, progress=not args.json)
        emit({"report": str(report)}, args, lambda r: f"wrote {r['report']}")
        return 0
    if args.suite == "serving":
        foreign = [n for n in given if n != "max_tokens"]
        if foreign:
            raise ValueError(f"--{foreign[0].replace('_', '-')} is not a flag of 'bench serving' (it takes --model, "
                             f"--max-tokens, --concurrency, --window-s, --llama-server, --quick, --out)")
        from cluster.bench import serving_bench

        concurrency = tuple(int(c) for c in args.concurrency.split(",")) if args.concurrency else ()
        if concurrency and (min(concurrency) < 1 or max(concurrency) > 64):
            raise ValueError(f"--concurrency must be comma-separated integers in [1, 64], got {args.concurrency!r}")
        report = serving_bench.main(args.model or str(default_model("demo", progress=not args.json)),
                                    n_tokens=args.max_tokens or 128, rounds=2 if args.quick else 5, n_threads=2,
                                    llama_server=args.llama_server, out_dir=args.out, concurrency=concurrency,
                                    window_s=args.window_s or 8.0)
        emit({"report": str(report)}, args, lambda r: f"wrote {r['report']}")
        return 0
    if args.suite == "engine":
        if given:
            raise ValueError(f"--{given[0].replace('_', '-')} is a flag of 'bench routing' and 'bench simulate'")
        from cluster.bench.engine_bench import ENGINE_PARTS, run_engine_bench

        parts = tuple(args.parts.split(",")) if args.parts else ENGINE_PARTS
        if not parts or not set(parts) <= set(ENGINE_PARTS):
            raise ValueError(f"--parts of 'bench engine' must be comma-separated names of {', '.join(ENGINE_PARTS)}, "
                             f"got {args.parts!r}")
        result = run_engine_bench(model=args.model, out_dir=Path(args.out), prompts=args.prompts, quick=args.quick,
                                  progress=not args.json, parts=parts)
        emit(result, args, lambda r: f"wrote {r['report']}")
        return 0
    if args.seed is not None and args.seed < 0:
        raise ValueError(f"--seed must be >= 0, got {args.seed}")

    def _routing_summary(r: dict[str, Any]) -> str:
        rows = [f"{'policy':13} {'hit rate':>8} {'MiB/token':>9} {'tok/s':>7} {'p50 s':>6} {'p99 s':>6} {'errors':>6}"]
        for name, p in r["policies"].items():
            rows.append(f"{name:13} {100 * (p['hit_rate'] or 0):7.1f}% {(p['bytes_read_per_token'] or 0) / MIB:9.3f} "
                        f"{p['tok_s'] or 0:7.1f} {p['p50_latency_s'] or 0:6.2f} {p['p99_latency_s'] or 0:6.2f} "
                        f"{p['errors']:6}")
        if r.get("decision_cost"):
            rows.append(_decision_cost_summary(r))
        if r.get("report"):
            rows.append(f"wrote {r['report']}")
        return "\n".join(rows)

    def _decision_cost_summary(r: dict[str, Any]) -> str:
        d = r["decision_cost"]
        return (f"router decision at {d['n_nodes']} nodes x {d['n_layers']} layers x {d['n_experts']} experts: "
                f"p50 {d['p50_ms']:.3f} ms, p99 {d['p99_ms']:.3f} ms, {d['decisions_per_s']:.1f} decisions/s "
                f"(median of rounds: {', '.join(f'{x:.0f}' for x in d.get('round_decisions_per_s', []))}) "
                f"(target p99 <= {d['targets']['p99_ms_max']:g} ms, >= {d['targets']['decisions_per_s_min']:g}/s: "
                f"{'met' if d['targets']['met'] else 'not met'})")

    policies = [p for p in (args.policies or "").split(",") if p]
    if args.suite == "routing":
        from cluster.bench import routing_bench
        from cluster.bench.decision_cost import run_decision_cost

        if args.decision_cost:
            result = run_decision_cost(quick=args.quick)
            emit(jsonable(result), args, _decision_cost_summary)
            return 0
        result = routing_bench.run_routing_bench(
            args.model, Path(args.out), prompts=args.prompts, n_nodes=args.nodes or 3, cache_mb=args.cache_mb,
            node_memory_mb=args.node_memory_mb, policies=policies or routing_bench.DEFAULT_POLICIES,
            n_requests=args.requests, rate=args.rate, max_tokens=args.max_tokens, seed=args.seed or 0,
            quick=args.quick, kill_node_after_s=args.kill_node_after,
            concurrency=int(args.concurrency) if args.concurrency else None, progress=not args.json)
        emit(jsonable(result), args, _routing_summary)
        return 0
    if args.suite == "simulate":
        from cluster.bench.simulate import run_simulate_bench

        if args.model and args.traces:
            raise ValueError("--model and --traces exclude each other (traces already name their model)")
        result = run_simulate_bench(
            args.model, Path(args.out), traces_path=args.traces, save_traces=args.save_traces,
            n_nodes=args.nodes or 256, policies=policies, n_requests=args.requests, rate=args.rate,
            cache_mb=args.cache_mb, max_tokens=args.max_tokens, seed=args.seed or 0, quick=args.quick,
            warmth_knobs=_warmth_knobs(args.warmth_knob or []), progress=not args.json)
        emit(jsonable(result), args, _routing_summary)
        return 0
    raise SystemExit(f"unknown bench suite {args.suite!r}")


def _quality_summary(result: dict[str, Any]) -> str:
    rows = [f"{'setting':26} {'bits/token':>10} {'increase':>9} {'agreement':>9} {'MiB/token':>9} {'tok/s':>7}"]
    for r in result["settings"]:
        if r.get("error"):
            rows.append(f"{r['setting']:26} failed: {r['error']}")
            continue
        rows.append(f"{r['setting']:26} {r['bits_per_token']:10.4f} {r['bits_increase_pct']:+8.2f}% "
                    f"{r['agreement']:9.4f} {r['mib_per_token']:9.3f} {r['tok_s'] or 0:7.0f}")
    rows.append(f"wrote {result['report']}")
    return "\n".join(rows)


def _warmth_knobs(pairs: Sequence[str]) -> dict[str, float]:
    """``NAME=VALUE`` pairs as warmth-policy keyword arguments, checked by building the policy once."""
    from cluster.routing.warmth import WarmthPolicy

    knobs: dict[str, float] = {}
    for pair in pairs:
        name, sep, value = pair.partition("=")
        try:
            number = float(value) if sep else None
        except ValueError:
            number = None
        if number is None or not name:
            raise ValueError(f"--warmth-knob takes NAME=NUMBER, got {pair!r}")
        knobs[name] = int(number) if number.is_integer() and "." not in value else number
    names = [n for n, p in inspect.signature(WarmthPolicy).parameters.items() if p.kind is p.KEYWORD_ONLY]
    unknown = sorted(set(knobs) - set(names))
    if unknown:
        raise ValueError(f"--warmth-knob: unknown knob {unknown[0]!r}; the warmth policy has {', '.join(names)}")
    WarmthPolicy(**knobs)  # its own checks of the values (ValueError)
    return knobs


