"""Command line: ``python -m cluster`` / ``sniper`` — what each subcommand does (``COMMANDS``; its
flags are in ``cluster.cli.parser``, ``bench`` in ``cluster.cli.bench_command``).

Every subcommand validates its arguments up front and exits with status 2 and a one-line
message naming the bad input (no stack trace) when the input is wrong.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import sys
from dataclasses import asdict
from typing import Any, Callable, Sequence

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

from cluster.cli.bench_command import run_bench  # noqa: E402
from cluster.cli.output import emit  # noqa: E402
from cluster.cli.parser import build_parser, expert_selection_from_flags  # noqa: E402
from cluster.cli.sampling_flags import logprob_json, params_from_flags  # noqa: E402
from cluster.cli.status_table import status_table  # noqa: E402
from cluster.distributed.status import jsonable  # noqa: E402
from cluster.engine.model_file import check_model_file  # noqa: E402
from cluster.engine.node_memory import MIB  # noqa: E402
from cluster.errors import InvalidParameterError, SniperError  # noqa: E402
from cluster.models.synth import default_model  # noqa: E402

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
    emit(result, args, _synth_summary)
    return 0


def _synth_summary(r: dict[str, Any]) -> str:
    text = f"wrote {r['path']}: {r['n_bytes'] / MIB:.1f} MiB, experts {r['expert_bytes'] / MIB:.1f} MiB"
    if "reuse_rate" in r:
        text += (f"\nnext-token expert reuse: {100 * r['reuse_rate']:.1f} % (chance {100 * r['chance_reuse']:.1f} %),"
                 f" decode selections in the hottest 40 % of experts: {100 * r['top40_coverage']:.1f} %")
    return text


# -- run -----------------------------------------------------------------------------------

def _cmd_run(args: argparse.Namespace) -> int:
    from cluster.distributed.deploy import read_chat_template
    from cluster.engine.chat import ChatMessage, ChatPrompt, ChatRenderer
    from cluster.engine.generation import selection_counts
    from cluster.engine.moe_engine import EngineConfig, MoEEngine
    from cluster.engine.startup import Startup, print_phases

    params = params_from_flags(args)
    override = read_chat_template(args.chat_template)
    if override is not None and not args.chat:
        raise ValueError("--chat-template renders a conversation: add --chat")
    model = args.model or str(default_model("demo", progress=not args.json))
    selection = expert_selection_from_flags(args)
    config = EngineConfig(model, _cache_budget(args, model), n_ctx=args.ctx, n_threads=args.threads,
                          expert_selection=selection)
    _checked(config.validate, _RUN_FLAGS)  # before the model loads
    startup = Startup(print_phases(), progress_bars=sys.stderr.isatty())  # a line per phase (an auto budget's says how)
    with MoEEngine.from_config(config, startup) as engine:
        startup.ready()
        prompt, special, origin = args.prompt, False, None
        if args.chat:  # the prompt is one user turn, rendered as a deployment's edge renders chat requests
            renderer = ChatRenderer(engine.tokenizer, override)
            rendered = renderer.render(ChatPrompt((ChatMessage("user", args.prompt),)))
            prompt, special, origin = rendered.text, rendered.special, rendered.origin
            params = renderer.chat_params(params)
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
            "expert_selection": asdict(selection),
            "selections_changed": None,  # cache-aware: over every choice (as a node's usage counts them)
            "selections_skipped": None,
        }
        if selection.cache_aware:
            result["selections_changed"], result["selections_skipped"] = selection_counts(gens)
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
    emit(jsonable(result), args, _run_summary)
    return 0


_RUN_FLAGS = {"n_ctx": "--ctx", "n_threads": "--threads", "expert_selection": "--expert-selection",
              "max_changed_weight": "--selection-max-weight", "min_score_ratio": "--selection-min-ratio"}
"""The run flag that sets each checked engine setting (``InvalidParameterError.param``), named in its error."""


def _checked(check: Callable[[], Any], flags: dict[str, str]) -> Any:
    """``check()``; an InvalidParameterError it raises names the flag that set the bad setting (``flags``)."""
    try:
        return check()
    except InvalidParameterError as exc:
        flag = flags.get(exc.param or "")
        raise InvalidParameterError(f"{flag}: {exc}" if flag else str(exc), param=exc.param) from None


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
    if r["selections_changed"] is not None:
        s = r["expert_selection"]
        lines.append(f"expert selection: cache-aware (max weight {s['max_changed_weight']:g}, min ratio "
                     f"{s['min_score_ratio']:g}): {r['selections_changed']} selections changed, "
                     f"{r['selections_skipped']} of them skipped")
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
    from cluster.api.openai_api import Limits
    from cluster.distributed import connection, deploy, local_cluster

    # the whole configuration is checked before a local cluster (or anything) starts for nothing
    model = args.model or str(default_model("demo").resolve())
    cache_bytes = _cache_budget(args, model)
    chat_template = deploy.read_chat_template(args.chat_template)
    selection = expert_selection_from_flags(args)
    memory_limit_bytes = args.node_memory_mb * MIB if args.node_memory_mb else None
    n_nodes = args.nodes or args.local_nodes or 1
    if args.local_nodes and n_nodes > args.local_nodes:
        raise ValueError(f"--nodes {n_nodes}: a local cluster of --local-nodes {args.local_nodes} holds at most "
                         f"{args.local_nodes} node actors (one per Ray node)")
    _checked(lambda: deploy.check_deployment(model, cache_bytes=cache_bytes, policy=args.policy, n_slots=args.slots,
                                             max_queue=args.max_queue, memory_limit_bytes=memory_limit_bytes,
                                             n_threads=args.threads, chat_template=chat_template,
                                             expert_selection=selection), _SERVE_FLAGS)
    limits = _checked(lambda: Limits(max_tokens=args.max_tokens_limit, max_prompt_tokens=args.max_prompt_tokens),
                      _SERVE_FLAGS) if args.http else None
    started: list[str] = []
    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        if args.local_nodes:
            address = local_cluster.start(args.local_nodes)
            started.append("local")
            print(f"started a local Ray cluster of {args.local_nodes} nodes at {address}", file=sys.stderr)
        connection.connect(args.address, args.namespace, log_to_driver=True)  # the nodes' start-up phases, as they end
        if args.http:
            from cluster.api.gateway import check_route_free

            check_route_free(args.namespace)
        info = deploy.deploy(model, n_nodes, cache_bytes=cache_bytes, policy=args.policy, namespace=args.namespace,
                             n_slots=args.slots, max_queue=args.max_queue, n_threads=args.threads,
                             chat_template=chat_template, memory_limit_bytes=memory_limit_bytes,
                             expert_selection=selection).as_json()
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
    emit(info, args, lambda r: f"serving {model} on {len(r['nodes'])} nodes ({_ready_times(r['nodes'])}), "
                               f"policy {r['policy']}, expert selection {selection.describe()}"
                               + (f"; OpenAI-compatible API at {r['http']}/v1 (API key: {r['api_key']})"
                                  if "http" in r else ""))
    return 0


def _ready_times(nodes: list[dict[str, Any]]) -> str:
    """Each node's start-up time, from its ``ready`` phase (``NodeReady.startup``)."""
    return ", ".join(f"{n['node']} ready in {n['startup'][-1]['elapsed_s']:.1f} s" for n in nodes if n["startup"])


_SERVE_FLAGS = {"policy": "--policy", "n_slots": "--slots", "max_queue": "--max-queue", "n_threads": "--threads",
                "memory_limit_bytes": "--node-memory-mb", "expert_selection": "--expert-selection",
                "max_changed_weight": "--selection-max-weight", "min_score_ratio": "--selection-min-ratio"}
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
    emit(result, args, lambda r: "\n---\n".join(c["text"] for c in r.get("choices", [r]))
          + f"\n[{r['node']}, {r['usage']['completion_tokens']} tokens]")
    return 0


def _cmd_status(args: argparse.Namespace) -> int:
    client = _client(args)
    status = client.status()
    if args.plot:
        from cluster.cli.status_plot import plot_heat  # matplotlib only when asked

        plot_heat(client.heat(), args.plot)
    emit(status.as_json(), args, lambda _: status_table(status))
    return 0


def _cmd_shutdown(args: argparse.Namespace) -> int:
    from cluster.distributed import connection, deploy, local_cluster

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
    emit({"removed": removed}, args, lambda r: f"removed {', '.join(r['removed']) or 'nothing'}")
    return 0


# -- plumbing ------------------------------------------------------------------------------

COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {
    "synth": _cmd_synth, "run": _cmd_run, "demo": _cmd_demo, "serve": _cmd_serve, "generate": _cmd_generate,
    "status": _cmd_status, "shutdown": _cmd_shutdown, "bench": run_bench,
}


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
            return int(COMMANDS[args.command](args) or 0)
    except (SniperError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted (what this command had started is removed)", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
