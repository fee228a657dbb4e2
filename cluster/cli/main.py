"""Command line: ``python -m cluster`` / ``sniper`` — synth, run, demo and bench subcommands.

Every subcommand validates its arguments up front and exits with status 2 and a one-line
message naming the bad input (no stack trace) when the input is wrong.
"""

from __future__ import annotations

import argparse
import contextlib
import inspect
import json
import os
import signal
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable, NoReturn, Sequence

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

from cluster.bench import DEFAULT_OUT  # noqa: E402
from cluster.cli.sampling_flags import add_sampling_flags, logprob_json, params_from_flags  # noqa: E402
from cluster.errors import InvalidParameterError, SniperError  # noqa: E402
from cluster.engine.model_file import check_model_file  # noqa: E402
from cluster.engine.node_memory import MIB, parse_cache_mb  # noqa: E402
from cluster.cli.status_table import status_table  # noqa: E402
from cluster.distributed.status import jsonable  # noqa: E402
from cluster.models.synth import default_model  # noqa: E402

def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _port(text: str) -> int:
    value = _positive_int(text)
    if value > 65535:
        raise argparse.ArgumentTypeError(f"expected a TCP port in [1, 65535], got {value}")
    return value


def _cache_mb(text: str) -> int | str:
    """``--cache-mb``: MiB or ``auto`` (``node_memory.parse_cache_mb``, the rule of every surface)."""
    try:
        return parse_cache_mb(text)  # type: ignore[return-value]  (a flag's text is never None)
    except InvalidParameterError as exc:
        raise argparse.ArgumentTypeError(str(exc).removeprefix("cache_mb must be ")) from None


def _env(name: str, parse: Callable[[str], Any]) -> Any:
    """An environment variable's value as a flag's default, parsed as the flag is (None if unset)."""
    value = os.environ.get(name)
    if not value:
        return None
    try:
        return parse(value)
    except argparse.ArgumentTypeError as exc:
        raise SystemExit(f"error: ${name}: {exc}") from None


def _non_negative_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not value >= 0.0:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {text}")
    return value


def synth_presets() -> list[str]:
    from cluster.models import synth

    return list(synth.PRESETS)


# -- synth ---------------------------------------------------------------------------------

def _cmd_synth(args: argparse.Namespace) -> int:
    from cluster.models import synth

    config = synth.config_from_args(
        args.preset, layers=args.layers, experts=args.experts, top_k=args.top_k, dim=args.dim, ff=args.ff,
        dtype=args.dtype, arch=args.arch, specialization=args.specialization, seed=args.seed,
        chat_template=args.chat_template)
    info = synth.synthesize(args.out, config, progress=not args.quiet)
    result: dict[str, Any] = {"path": str(info.path), "n_bytes": info.n_bytes, "expert_bytes": info.expert_bytes,
                              "config": json.loads(config.to_json())}
    if config.n_experts > 0 and not args.no_report:
        from cluster.bench.routing_stats import measure_reuse

        result.update(measure_reuse(str(info.path), progress=not args.quiet))
    _emit(result, args, _synth_summary)
    return 0


def _synth_summary(r: dict[str, Any]) -> str:
    text = f"wrote {r['path']}: {r['n_bytes'] / MIB:.1f} MiB, experts {r['expert_bytes'] / MIB:.1f} MiB"
    if "reuse_rate" in r:
        text += (f"\nnext-token expert reuse: {100 * r['reuse_rate']:.1f} % (chance {100 * r['chance_reuse']:.1f} %),"
                 f" decode selections in the hottest 40 % of experts: {100 * r['top40_coverage']:.1f} %")
    return text


# -- run -----------------------------------------------------------------------------------

def _cmd_run(args: argparse.Namespace) -> int:
    from cluster.engine.chat import ChatMessage, ChatPrompt, ChatRenderer
    from cluster.distributed.deploy import read_chat_template
    from cluster.engine.moe_engine import MoEEngine

    params = params_from_flags(args)
    override = read_chat_template(args.chat_template)
    if override is not None and not args.chat:
        raise ValueError("--chat-template renders a conversation: add --chat")
    model = args.model or str(default_model("demo", progress=not args.json))
    cache_bytes = _cache_budget(args, model)
    with MoEEngine(model, cache_bytes, n_ctx=args.ctx, n_threads=args.threads) as engine:
        if engine.auto_budget is not None:
            print(engine.auto_budget.explain(), file=sys.stderr)
        prompt, special, origin = args.prompt, False, None
        if args.chat:  # the prompt is one user turn, rendered as a deployment's edge renders chat requests
            renderer = ChatRenderer(engine.tokenizer, override)
            rendered = renderer.render(ChatPrompt((ChatMessage("user", args.prompt),)))
            prompt, special, origin = rendered.text, rendered.special, rendered.origin
            params = renderer.with_end_of_turn(params)
        gens = [engine.generate(prompt, choice, special=special) for choice in params.choices()]
        gen = gens[0]
        result: dict[str, Any] = {
            "text": gen.text,
            "n_prompt_tokens": gen.n_prompt_tokens,
            "n_generated": gen.n_generated,
            "finish_reason": gen.finish_reason,
            "prefill_s": gen.prefill_s,
            "decode_tok_s": gen.decode_tok_s,
            "cache": None,
            "expert_counts": None,
        }
        if args.chat:
            result["chat_template"] = origin
        if len(gens) > 1:
            result["choices"] = [{"index": i, "text": g.text, "finish_reason": g.finish_reason} for i, g in enumerate(gens)]
        if params.logprobs:
            result["logprobs"] = [logprob_json(e) for e in gen.logprobs or ()]
        if engine.has_cache:
            keys = ("hits", "misses", "hit_rate", "bytes_read", "resident_bytes", "budget_bytes",
                    "prefetch_precision", "prefetch_recall", "n_evictions", "bytes_prefetched")
            result["cache"] = {k: gen.cache[k] for k in keys}
            result["expert_counts"] = gen.expert_counts.tolist()
    _emit(jsonable(result), args, _run_summary)
    return 0


def _cache_budget(args: argparse.Namespace, model: str) -> int | None:
    """--no-cache: None; --cache-mb: that; else room for every expert of the model."""
    if args.no_cache:
        return None
    from cluster.distributed.deploy import cache_budget

    return cache_budget(model, args.cache_mb)


def _run_summary(r: dict[str, Any]) -> str:
    texts = [c["text"] for c in r["choices"]] if "choices" in r else [r["text"]]
    lines = ["\n---\n".join(texts), "",
             f"{r['n_prompt_tokens']} prompt tokens, {r['n_generated']} generated ({r['finish_reason']}), "
             f"decode {r['decode_tok_s'] or 0:.1f} tok/s"]
    if r["cache"]:
        c = r["cache"]
        lines.append(f"cache: {c['hits']} hits, {c['misses']} misses, {c['bytes_read'] / MIB:.1f} MiB read, "
                     f"resident {c['resident_bytes'] / MIB:.1f}/{c['budget_bytes'] / MIB:.1f} MiB, "
                     f"prefetch precision {c['prefetch_precision'] or 0:.2f} recall {c['prefetch_recall'] or 0:.2f}")
    return "\n".join(lines)


# -- demo ----------------------------------------------------------------------------------

def _cmd_demo(args: argparse.Namespace) -> int:
    from cluster.cli.demo import run_demo

    return run_demo(model=args.model, cache_mb=args.cache_mb, n_requests=args.requests, n_nodes=args.nodes,
                    policy=args.policy, keep=args.keep)


# -- cluster -------------------------------------------------------------------------------

def _cmd_serve(args: argparse.Namespace) -> int:
    """Starts everything or nothing: whatever fails or is interrupted (SIGINT, SIGTERM) after the
    checks removes what this command had started (the gateway, the deployment, the local cluster)."""
    from cluster.distributed import connection
    from cluster.distributed import deploy
    from cluster.distributed import local_cluster
    from cluster.errors import InvalidParameterError
    from cluster.api.openai_api import Limits

    # the whole configuration is checked before a local cluster (or anything) starts for nothing
    model = args.model or str(default_model("demo").resolve())
    cache_bytes = _cache_budget(args, model)
    chat_template = deploy.read_chat_template(args.chat_template)
    memory_limit_bytes = args.node_memory_mb * MIB if args.node_memory_mb else None
    n_nodes = args.nodes or args.local_nodes or 1
    if args.local_nodes and n_nodes > args.local_nodes:
        raise ValueError(f"--nodes {n_nodes}: a local cluster of --local-nodes {args.local_nodes} holds at most "
                         f"{args.local_nodes} node actors (one per Ray node)")
    try:
        deploy.check_deployment(model, cache_bytes=cache_bytes, policy=args.policy, n_slots=args.slots,
                                max_queue=args.max_queue, memory_limit_bytes=memory_limit_bytes,
                                n_threads=args.threads, chat_template=chat_template)
        limits = Limits(max_tokens=args.max_tokens_limit, max_prompt_tokens=args.max_prompt_tokens) if args.http else None
    except InvalidParameterError as exc:
        flag = _SERVE_FLAGS.get(exc.param or "")
        raise InvalidParameterError(f"{flag}: {exc}" if flag else str(exc), param=exc.param) from None
    started: list[str] = []
    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        if args.local_nodes:
            address = local_cluster.start(args.local_nodes)
            started.append("local")
            print(f"started a local Ray cluster of {args.local_nodes} nodes at {address}", file=sys.stderr)
        connection.connect(args.address, args.namespace)
        if args.http:
            from cluster.api.gateway import check_route_free

            check_route_free(args.namespace)
        info = deploy.deploy(model, n_nodes, cache_bytes=cache_bytes, policy=args.policy, namespace=args.namespace,
                             n_slots=args.slots, max_queue=args.max_queue, n_threads=args.threads,
                             chat_template=chat_template, memory_limit_bytes=memory_limit_bytes).as_json()
        started.append("deployment")  # deploy removes what it started itself when it fails
        if limits is not None:
            from cluster.api.gateway import GatewayConfig, start_http

            info["http"] = start_http(GatewayConfig(namespace=args.namespace, api_key=args.api_key, limits=limits),
                                      args.http_host, args.http_port)
            info["api_key"] = "required" if args.api_key else "none"
    except BaseException:
        if "deployment" in started and "local" not in started:  # a local cluster goes whole, below
            deploy.shutdown(args.namespace)
        if "local" in started:
            local_cluster.stop()
        raise
    finally:
        signal.signal(signal.SIGTERM, previous)
    _emit(info, args, lambda r: f"serving {model} on {len(r['nodes'])} nodes, policy {r['policy']}"
                                     + (f"; OpenAI-compatible API at {r['http']}/v1 (API key: {r['api_key']})"
                                        if "http" in r else ""))
    return 0


_SERVE_FLAGS = {"policy": "--policy", "n_slots": "--slots", "max_queue": "--max-queue", "n_threads": "--threads",
                "memory_limit_bytes": "--node-memory-mb"}
"""The serve flag that sets each checked setting (``InvalidParameterError.param``), named in its error."""


def _interrupt(*_: object) -> None:
    raise KeyboardInterrupt


def _client(args: argparse.Namespace):  # type: ignore[no-untyped-def]
    from cluster.distributed.client import Client

    return Client.connect(args.address, args.namespace)


def _cmd_generate(args: argparse.Namespace) -> int:
    from cluster.engine.chat import ChatMessage, ChatPrompt

    params = params_from_flags(args)
    client = _client(args)
    prompt = ChatPrompt((ChatMessage("user", args.text),)) if args.chat else args.text
    if args.stream:
        for piece in client.stream(prompt, params, session_id=args.session):
            print(piece, end="", flush=True, file=args.result_stream)
        print(file=args.result_stream)
        return 0
    done = client.generate(prompt, params, session_id=args.session)
    result: dict[str, Any] = {"text": done.text, "node": done.node, "finish_reason": done.finish_reason,
                              "usage": asdict(done.usage), "routing": done.routing}
    if len(done.choices) > 1:
        result["choices"] = [{"index": c.index, "text": c.text, "finish_reason": c.finish_reason} for c in done.choices]
    if params.logprobs:
        result["logprobs"] = [logprob_json(e) for e in done.choices[0].logprobs]
    if done.chat_template is not None:
        result["chat_template"] = done.chat_template
    _emit(result, args, lambda r: "\n---\n".join(c["text"] for c in r.get("choices", [r]))
          + f"\n[{r['node']}, {r['usage']['completion_tokens']} tokens]")
    return 0


def _cmd_status(args: argparse.Namespace) -> int:
    client = _client(args)
    status = client.status()
    if args.plot:
        from cluster.cli.status_plot import plot_heat  # matplotlib only when asked

        plot_heat(client.heat(), args.plot)
    _emit(status.as_json(), args, lambda _: status_table(status))
    return 0


def _cmd_shutdown(args: argparse.Namespace) -> int:
    from cluster.distributed import connection
    from cluster.distributed import deploy
    from cluster.distributed import local_cluster

    try:
        connection.connect(args.address, args.namespace)
        removed = deploy.shutdown(args.namespace)
    except (ConnectionError, SniperError) as exc:  # nothing answers: there is no deployment to remove
        print(f"no deployment removed: {exc}", file=sys.stderr)
        removed = []
    if args.stop_local:
        if local_cluster.stop():
            removed.append("the local Ray cluster")
    elif local_cluster.state(announce=False) is not None:
        print("the local Ray cluster is still running (stop it with: python -m cluster shutdown --stop-local)",
              file=sys.stderr)
    _emit({"removed": removed}, args, lambda r: f"removed {', '.join(r['removed']) or 'nothing'}")
    return 0


# -- bench ---------------------------------------------------------------------------------

def _cmd_bench(args: argparse.Namespace) -> int:
    only = {"routing": ("node_memory_mb", "decision_cost", "kill_node_after"),
            "simulate": ("traces", "save_traces", "warmth_knob"), "chaos": ("duration",),
            "batch": ("no_limit", "topics")}
    for suite, names in only.items():
        given = [n for n in names if getattr(args, n) not in (None, False)]
        if given and args.suite != suite:
            raise ValueError(f"--{given[0].replace('_', '-')} is a flag of 'bench {suite}', not 'bench {args.suite}'")
    if args.concurrency and args.suite not in ("routing", "batch", "serving"):
        raise ValueError(f"--concurrency is a flag of 'bench routing', 'bench batch' and 'bench serving', "
                         f"not 'bench {args.suite}'")
    if args.window_s is not None and args.suite not in ("batch", "serving"):
        raise ValueError(f"--window-s is a flag of 'bench batch' and 'bench serving', not 'bench {args.suite}'")
    if args.concurrency and args.suite == "routing" and not args.concurrency.isdigit():
        raise ValueError(f"--concurrency of 'bench routing' is one number of clients, got {args.concurrency!r}")
    if args.llama_server and args.suite not in ("serving", "batch"):
        raise ValueError(f"--llama-server is a flag of 'bench serving' and 'bench batch', not 'bench {args.suite}'")
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
        _emit({"report": report["report"], "targets": report["targets"]}, args, lambda r: f"wrote {r['report']}")
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
        _emit({"report": str(report)}, args, lambda r: f"wrote {r['report']}")
        return 0
    if args.suite == "chaos":
        if given:
            raise ValueError(f"--{given[0].replace('_', '-')} is not a flag of 'bench chaos' (it takes --model, "
                             f"--duration, --out)")
        from cluster.bench import chaos

        report = chaos.main(args.model or str(default_model("demo", progress=not args.json)),
                            duration_s=float(args.duration or (40 if args.quick else 120)), out_dir=args.out,
                            progress=not args.json)
        _emit({"report": str(report)}, args, lambda r: f"wrote {r['report']}")
        return 0
    if args.suite == "regimes":
        if given:
            raise ValueError(f"--{given[0].replace('_', '-')} is not a flag of 'bench regimes' (it takes --model, "
                             f"--prompts, --quick, --out)")
        from cluster.bench import regimes

        report = regimes.main(args.model or str(default_model("bench", progress=not args.json)), args.prompts,
                              args.out, quick=args.quick, progress=not args.json)
        _emit({"report": str(report)}, args, lambda r: f"wrote {r['report']}")
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
        _emit({"report": str(report)}, args, lambda r: f"wrote {r['report']}")
        return 0
    if args.suite == "engine":
        if given:
            raise ValueError(f"--{given[0].replace('_', '-')} is a flag of 'bench routing' and 'bench simulate'")
        from cluster.bench.engine_bench import run_engine_bench

        result = run_engine_bench(model=args.model, out_dir=Path(args.out), prompts=args.prompts, quick=args.quick,
                                  progress=not args.json)
        _emit(result, args, lambda r: f"wrote {r['report']}")
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

        if args.decision_cost:
            result = routing_bench.run_decision_cost(quick=args.quick)
            _emit(jsonable(result), args, _decision_cost_summary)
            return 0
        result = routing_bench.run_routing_bench(
            args.model, Path(args.out), prompts=args.prompts, n_nodes=args.nodes or 3, cache_mb=args.cache_mb,
            node_memory_mb=args.node_memory_mb, policies=policies or routing_bench.DEFAULT_POLICIES,
            n_requests=args.requests, rate=args.rate, max_tokens=args.max_tokens, seed=args.seed or 0,
            quick=args.quick, kill_node_after_s=args.kill_node_after,
            concurrency=int(args.concurrency) if args.concurrency else None, progress=not args.json)
        _emit(jsonable(result), args, _routing_summary)
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
        _emit(jsonable(result), args, _routing_summary)
        return 0
    raise SystemExit(f"unknown bench suite {args.suite!r}")


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


# -- plumbing ------------------------------------------------------------------------------

def _emit(result: dict[str, Any], args: argparse.Namespace, summary: Callable[[dict[str, Any]], str]) -> None:
    """The command's result on standard output: one line of JSON with --json, else its summary."""
    print(json.dumps(result) if args.json else summary(result), file=args.result_stream)


class _Parser(argparse.ArgumentParser):
    """Bad arguments get one line, as every other bad input does (not the whole usage block)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"error: {message} (see: {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="python -m cluster", description=__doc__.splitlines()[0])
    parser.set_defaults(json=False)  # commands without --json print their summary
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    p = sub.add_parser("synth", help="write a deterministic synthetic MoE GGUF")
    p.add_argument("out", help="output .gguf path")
    p.add_argument("--preset", choices=tuple(synth_presets()), default="tiny")
    p.add_argument("--layers", type=_positive_int)
    p.add_argument("--experts", type=int, help="experts per layer (0: a dense model)")
    p.add_argument("--top-k", type=_positive_int)
    p.add_argument("--dim", type=_positive_int)
    p.add_argument("--ff", type=_positive_int)
    p.add_argument("--dtype", choices=("f16", "q8_0", "q4_k"))
    p.add_argument("--arch", choices=("llama", "qwen3moe"))
    p.add_argument("--specialization", help="number >= 0, or 'realistic'")
    p.add_argument("--seed", type=int)
    p.add_argument("--chat-template", choices=("chatml", "llama3"),
                   help="write this chat format's template and control tokens (a synthetic chat model)")
    p.add_argument("--no-report", action="store_true", help="skip measuring the routing statistics")
    p.add_argument("--quiet", action="store_true")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_cmd_synth)

    p = sub.add_parser("run", help="generate once on this machine and print text and cache statistics")
    p.add_argument("--model", help="GGUF MoE model (default: the generated demo model)")
    p.add_argument("--prompt", required=True)
    p.add_argument("--chat", action="store_true", help="the prompt is a user turn, rendered with the chat template")
    p.add_argument("--chat-template", metavar="FILE", help="with --chat: this Jinja template instead of the model's")
    budget = p.add_mutually_exclusive_group()
    budget.add_argument("--cache-mb", type=_cache_mb,
                        help="expert cache budget in MiB, or 'auto' (from the memory this machine or cgroup has; "
                             "default: whole model)")
    budget.add_argument("--no-cache", action="store_true", help="plain llama.cpp, no expert cache")
    add_sampling_flags(p)
    p.add_argument("--threads", type=_positive_int)
    p.add_argument("--ctx", type=_positive_int, default=2048)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_cmd_run)

    p = sub.add_parser("demo", help="the quick-start job: a local Ray cluster serving the demo model")
    p.add_argument("--model")
    p.add_argument("--cache-mb", type=_positive_int, help="expert cache budget per node (default: 40 %% of experts)")
    p.add_argument("--requests", type=_positive_int, default=12)
    p.add_argument("--nodes", type=_positive_int, default=3)
    p.add_argument("--policy", default="warmth")
    p.add_argument("--keep", action="store_true", help="leave the cluster serving (stop it with: shutdown --stop-local)")
    p.set_defaults(func=_cmd_demo)

    p = sub.add_parser("serve", help="start node actors and the router on a Ray cluster (detached)")
    p.add_argument("--model", default=os.environ.get("SNIPER_MODEL"),
                   help="GGUF MoE model (default: $SNIPER_MODEL, else the generated demo model)")
    p.add_argument("--nodes", type=_positive_int, help="node actors, one per Ray node (default: --local-nodes or 1)")
    budget = p.add_mutually_exclusive_group()
    budget.add_argument("--cache-mb", type=_cache_mb, default=_env("SNIPER_CACHE_MB", _cache_mb),
                        help="expert cache budget per node in MiB, or 'auto' (from each node's memory or cgroup "
                             "limit; default: $SNIPER_CACHE_MB, else the whole model)")
    budget.add_argument("--no-cache", action="store_true")
    p.add_argument("--policy", default="warmth", help="warmth (default), least_loaded, round_robin, random")
    p.add_argument("--local-nodes", type=_positive_int, help="first start a local Ray cluster of N nodes on loopback")
    p.add_argument("--node-memory-mb", type=_positive_int, help="cgroup memory limit of each node actor (root)")
    p.add_argument("--slots", type=_positive_int, default=4,
                   help="sequences each node decodes together (continuous batching; default 4)")
    p.add_argument("--max-queue", type=_positive_int, default=8, help="requests running or waiting per node")
    p.add_argument("--threads", type=_positive_int, help="compute threads per node (default: all cores)")
    http = p.add_argument_group("HTTP gateway (OpenAI-compatible, Ray Serve)")
    http.add_argument("--http", action="store_true", help="also serve the HTTP API")
    http.add_argument("--http-host", default="127.0.0.1")
    http.add_argument("--http-port", type=_port, default=8000)
    http.add_argument("--api-key", default=os.environ.get("SNIPER_API_KEY") or None,
                      help="require 'Authorization: Bearer KEY' on /v1/ (default: $SNIPER_API_KEY)")
    http.add_argument("--max-tokens-limit", type=_positive_int, default=512, help="largest max_tokens a request may ask")
    http.add_argument("--max-prompt-tokens", type=_positive_int, default=1536, help="longest prompt accepted, in tokens")
    p.add_argument("--chat-template", metavar="FILE",
                   help="render chat requests with this Jinja template instead of the model's own")
    _cluster_args(p)
    p.set_defaults(func=_cmd_serve)

    p = sub.add_parser("generate", help="send one request to the running deployment")
    p.add_argument("text")
    p.add_argument("--chat", action="store_true", help="the text is a user turn, rendered with the chat template")
    p.add_argument("--stream", action="store_true")
    p.add_argument("--session")
    add_sampling_flags(p)
    _cluster_args(p)
    p.set_defaults(func=_cmd_generate)

    p = sub.add_parser("status", help="where requests went and how warm each node is")
    p.add_argument("--plot", help="write a per-node expert-warmth heat map (PNG)")
    _cluster_args(p)
    p.set_defaults(func=_cmd_status)

    p = sub.add_parser("shutdown", help="remove the deployment")
    p.add_argument("--stop-local", action="store_true", help="also stop the local Ray cluster started by serve")
    _cluster_args(p)
    p.set_defaults(func=_cmd_shutdown)

    p = sub.add_parser("bench", help="benchmarks (engine: docs/benchmarks.md; routing: docs/routing.md; "
                                      "simulate: docs/simulation.md; serving: docs/serving.md; regimes: docs/regimes.md; "
                                      "chaos: docs/chaos.md; batch: docs/batching.md; router: docs/router-latency.md)")
    p.add_argument("suite", choices=("engine", "routing", "simulate", "serving", "regimes", "chaos", "batch", "router"))
    p.add_argument("--model", help="GGUF MoE model (default: the generated bench / demo / tiny model)")
    p.add_argument("--out", default=str(DEFAULT_OUT), help="directory for the report, plots and JSON")
    p.add_argument("--quick", action="store_true", help="smaller workloads (for a smoke test)")
    p.add_argument("--json", action="store_true")
    routing = p.add_argument_group("routing and simulate")
    routing.add_argument("--nodes", type=_positive_int, help="nodes (routing: Ray nodes, default 3; simulate: 256)")
    routing.add_argument("--cache-mb", type=_positive_int, help="expert-cache budget per node (default: a third of "
                                                                "the model's expert bytes)")
    routing.add_argument("--policies",
                         help="comma-separated routing policies (default warmth,least_loaded,round_robin)")
    routing.add_argument("--requests", type=_positive_int, help="requests in the workload")
    routing.add_argument("--rate", type=_non_negative_float, help="Poisson arrival rate, requests per second")
    routing.add_argument("--max-tokens", type=_positive_int, help="tokens generated per request at most")
    routing.add_argument("--seed", type=int, help="workload seed (default 0)")
    routing.add_argument("--prompts", help="engine, routing and regimes: JSONL workload {prompt, session?, domain?} per line "
                                           "(a trained model's: python -m cluster.train prompts --out trained)")
    routing.add_argument("--node-memory-mb", type=_positive_int, help="routing: cgroup memory limit per node actor")
    routing.add_argument("--kill-node-after", type=_non_negative_float, metavar="SECONDS",
                         help="routing: SIGKILL the last node actor's process this long into each policy's run "
                              "(failure injection; the report says what it cost)")
    routing.add_argument("--decision-cost", action="store_true",
                         help="routing: only measure RouterCore.choose at 64 nodes x 48 layers x 128 experts")
    routing.add_argument("--traces", help="simulate: replay traces saved by --save-traces instead of recording")
    routing.add_argument("--save-traces", help="simulate: write the recorded traces here (.npz)")
    routing.add_argument("--warmth-knob", action="append", metavar="NAME=VALUE",
                         help="simulate: a knob of the warmth policy (cluster/routing/warmth.py), e.g. warm_margin=0; "
                              "repeatable")
    chaos = p.add_argument_group("chaos")
    chaos.add_argument("--duration", type=_positive_int, help="seconds of steady load with faults (default 120)")
    serving = p.add_argument_group("serving and batch")
    serving.add_argument("--llama-server", help="llama.cpp's llama-server binary (default: .venv/bin/llama-server, "
                                                "built by scripts/build-llama-server.sh; batch builds it if missing)")
    batch = p.add_argument_group("batch")
    batch.add_argument("--concurrency", help="batch: comma-separated client counts (default 1,2,4,8,16); routing: "
                                             "a closed loop of this many clients instead of Poisson arrivals; serving: "
                                             "comma-separated caller counts (e.g. 1,8) after the one-stream table")
    batch.add_argument("--window-s", type=_non_negative_float, help="measured seconds per run (batch: default 20; serving: 8)")
    batch.add_argument("--no-limit", action="store_true", help="skip the runs under a 50 %% cgroup memory limit")
    batch.add_argument("--topics", type=_positive_int,
                       help="prompts of the synthetic model's first N topics only (users of N domains; default: all)")
    p.set_defaults(func=_cmd_bench)
    return parser


def _cluster_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--address", help="Ray cluster address (default: the local one)")
    p.add_argument("--namespace", default=os.environ.get("SNIPER_NAMESPACE", "sniper"))
    p.add_argument("--json", action="store_true")


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    args.result_stream = sys.stdout
    try:
        if getattr(args, "model", None):  # run, demo, serve, bench: the model is checked before anything starts
            check_model_file(args.model)
        # with --json, standard output carries the JSON alone: anything else printed there (Ray
        # prints worker deaths on it, for one) goes to standard error
        with contextlib.redirect_stdout(sys.stderr) if args.json else contextlib.nullcontext():
            return int(args.func(args) or 0)
    except (SniperError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted (what this command had started is removed)", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
