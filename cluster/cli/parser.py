"""The command line's grammar: every subcommand of ``python -m cluster`` / ``sniper``, its flags and
how each flag's text is parsed (one line naming the bad input, exit status 2). ``main`` runs the
command it names."""

from __future__ import annotations

import argparse
import os
from typing import Any, Callable, NoReturn

from cluster.bench import DEFAULT_OUT
from cluster.cli.sampling_flags import add_sampling_flags
from cluster.engine.expert_selection import SELECTION_MODES, ExpertSelection
from cluster.engine.node_memory import parse_cache_mb
from cluster.errors import InvalidParameterError

DESCRIPTION = "Expert Sniper Cluster: serve Mixture-of-Experts GGUF models on a Ray cluster"


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


def _selection_bound(name: str) -> Callable[[str], float]:
    """The type of a flag setting ``ExpertSelection.<name>``: a number its ``validate`` accepts (the
    rule of every surface)."""
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number in [0, 1], got {text!r}") from None
        try:
            ExpertSelection(**{name: value}).validate()
        except InvalidParameterError:
            raise argparse.ArgumentTypeError(f"expected a number in [0, 1], got {text}") from None
        return value

    return parse


def _add_expert_selection_flags(p: argparse.ArgumentParser) -> None:
    """run's and serve's ``--expert-selection`` and its bounds (``cluster.engine.expert_selection``)."""
    default = ExpertSelection()
    group = p.add_argument_group("expert selection (cache-aware changes the model's output within its bounds: "
                                 "docs/quality.md says what each setting costs)")
    group.add_argument("--expert-selection", choices=SELECTION_MODES, default=default.mode,
                       help="exact (default): llama.cpp's experts, output bit-identical to llama.cpp; cache-aware: "
                            "an expert missing from the cache is replaced by a resident one with a close router score "
                            "or skipped, within the two bounds below (needs the expert cache: not with --no-cache)")
    group.add_argument("--selection-max-weight", type=_selection_bound("max_changed_weight"), metavar="X",
                       default=default.max_changed_weight,
                       help="cache-aware: share of a token's top-k router weight that may be changed, in [0, 1] "
                            f"(default {default.max_changed_weight:g})")
    group.add_argument("--selection-min-ratio", type=_selection_bound("min_score_ratio"), metavar="X",
                       default=default.min_score_ratio,
                       help="cache-aware: a resident stand-in's router score must be at least this fraction of the "
                            f"missing expert's, else the expert is skipped, in [0, 1] (default {default.min_score_ratio:g})")


def expert_selection_from_flags(args: argparse.Namespace) -> ExpertSelection:
    """The ``ExpertSelection`` run's or serve's flags ask for."""
    return ExpertSelection(args.expert_selection, args.selection_max_weight, args.selection_min_ratio)


def synth_presets() -> list[str]:
    from cluster.models import synth

    return list(synth.PRESETS)


def synth_archs() -> tuple[str, ...]:
    from cluster.models import synth_config

    return synth_config.ARCHS


class _Parser(argparse.ArgumentParser):
    """Bad arguments get one line, as every other bad input does (not the whole usage block)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"error: {message} (see: {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    """Every subcommand and its flags; ``args.command`` names the one given (``main.COMMANDS`` runs it)."""
    parser = _Parser(prog="python -m cluster", description=DESCRIPTION)
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
    p.add_argument("--dtype", choices=("f16", "q8_0", "q4_k", "q4_k_m"))
    p.add_argument("--arch", choices=synth_archs(), help="GGUF architecture (MoE family) to write")
    p.add_argument("--specialization", help="number >= 0, or 'realistic'")
    p.add_argument("--seed", type=int)
    p.add_argument("--chat-template", choices=("chatml", "llama3"),
                   help="write this chat format's template and control tokens (a synthetic chat model)")
    p.add_argument("--no-report", action="store_true", help="skip measuring the routing statistics")
    p.add_argument("--quiet", action="store_true")
    p.add_argument("--json", action="store_true")

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
    _add_expert_selection_flags(p)
    p.add_argument("--json", action="store_true")

    p = sub.add_parser("demo", help="the quick-start job: a local Ray cluster serving the demo model")
    p.add_argument("--model")
    p.add_argument("--cache-mb", type=_positive_int, help="expert cache budget per node (default: 40 %% of experts)")
    p.add_argument("--requests", type=_positive_int, default=12)
    p.add_argument("--nodes", type=_positive_int, default=3)
    p.add_argument("--policy", default="warmth")
    p.add_argument("--keep", action="store_true", help="leave the cluster serving (stop it with: shutdown --stop-local)")

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
    _add_expert_selection_flags(p)
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

    p = sub.add_parser("generate", help="send one request to the running deployment")
    p.add_argument("text")
    p.add_argument("--chat", action="store_true", help="the text is a user turn, rendered with the chat template")
    p.add_argument("--stream", action="store_true")
    p.add_argument("--session")
    add_sampling_flags(p)
    _cluster_args(p)

    p = sub.add_parser("status", help="where requests went and how warm each node is")
    p.add_argument("--plot", help="write a per-node expert-warmth heat map (PNG)")
    _cluster_args(p)

    p = sub.add_parser("shutdown", help="remove the deployment")
    p.add_argument("--stop-local", action="store_true", help="also stop the local Ray cluster started by serve")
    _cluster_args(p)

    p = sub.add_parser("bench", help="benchmarks (engine: docs/benchmarks.md; routing: docs/routing.md; "
                                      "simulate: docs/simulation.md; serving: docs/serving.md; regimes: docs/regimes.md; "
                                      "chaos: docs/chaos.md; batch: docs/batching.md; router: docs/router-latency.md; "
                                      "scale: docs/scale.md; quality: docs/quality.md; policies: docs/policies.md)")
    p.add_argument("suite", choices=("engine", "routing", "simulate", "serving", "regimes", "chaos", "batch", "router",
                                     "scale", "quality", "policies"))
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
    scale = p.add_argument_group("scale (issue 22: the whole service at real size against llama-server behind a "
                                 "round-robin proxy; also takes --model, --nodes, --node-memory-mb, --concurrency, "
                                 "--window-s, --max-tokens, --llama-server, --quick, --out)")
    scale.add_argument("--dtype", choices=("q4_k_m", "q8_0"),
                       help="scale: the generated preset's type (default q4_k_m, ~18.6 GB; q8_0 ~32 GB)")
    scale.add_argument("--warmup-s", type=_non_negative_float, help="scale: seconds before each window (default 20)")
    scale.add_argument("--ctx", type=_positive_int, help="scale: tokens per slot (default 1024)")
    scale.add_argument("--work-dir", help="scale: where the generated model is written (default /var/tmp/sniper-scale); "
                                          "policies: where the truncated qwen3-30b-a3b preset is written (in a "
                                          "temporary folder under it; default /var/tmp)")
    scale.add_argument("--keep-model", action="store_true", help="scale: keep the generated model afterwards")
    scale.add_argument("--no-unlimited", action="store_true", help="scale: skip the cluster runs without memory limits")
    scale.add_argument("--parts", help="scale: node (one node against llama.cpp under 25 %%/50 %% limits and none), "
                                       "cluster (the service against the llama-server deployment); default both. "
                                       "engine: overhead, bounded, auto, policy; default all")
    quality = p.add_argument_group("quality (cache-aware expert selection against exact: bits per token and greedy "
                                   "agreement on held-out text, expert bytes per token; also takes --model (default: "
                                   "trained/moe-5domains.gguf), --quick, --out)")
    quality.add_argument("--budget-fraction", type=float, metavar="F",
                         help="quality: the bounded cache budget, a fraction in (0, 1] of the expert bytes (default 1/3)")
    quality.add_argument("--windows", type=_positive_int, help="quality: held-out windows per domain (default 2; --quick 1)")
    quality.add_argument("--window-tokens", type=_positive_int,
                         help="quality: tokens per window (default 128; --quick 64)")
    quality.add_argument("--threads", type=_positive_int,
                         help="quality: compute threads of each engine (default: all cores; on a machine other work "
                              "shares, 1 keeps ggml's spinning threads from stalling and tok/s comparable); policies: "
                              "of the engine that records the traces")
    policies = p.add_argument_group("policies (eviction policies replayed on recorded traces of every model: expert "
                                    "bytes per decoded token against LRU and Belady's MIN; also takes --work-dir, "
                                    "--max-tokens, --threads, --quick, --out)")
    policies.add_argument("--models", help="policies: comma-separated models of tiny, demo, bench, large, "
                                           "qwen3-30b-a3b-4L, moe-5domains, moe-8domains (default: all this machine has "
                                           "or can generate, large only where already generated; --quick: tiny, "
                                           "moe-5domains)")
    policies.add_argument("--prompts-5", help="policies: JSONL workload of moe-5domains (default: conversations cut "
                                              "from its held-out text)")
    policies.add_argument("--prompts-8", help="policies: JSONL workload of moe-8domains (default: conversations cut "
                                              "from its held-out text)")
    policies.add_argument("--keep-models", action="store_true",
                          help="policies: keep the truncated qwen3-30b-a3b preset written under --work-dir")
    return parser


def _cluster_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--address", help="Ray cluster address (default: the local one)")
    p.add_argument("--namespace", default=os.environ.get("SNIPER_NAMESPACE", "sniper"))
    p.add_argument("--json", action="store_true")


