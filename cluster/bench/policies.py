"""``python -m cluster bench policies``: the cache's eviction policies on recorded traces of every model here.

For every model (``--models``, default every one this machine has or can generate: the synthetic
presets ``tiny``, ``demo``, ``bench`` (``large`` where it is already generated), the full-size preset
``qwen3-30b-a3b`` cut to its first 4 layers (written under ``--work-dir`` and deleted afterwards
unless ``--keep-models``), and the trained models ``moe-5domains`` and ``moe-8domains``), a chat
workload is generated with the whole model resident and its routing trace recorded (the
predictor's PREDICT events included), then replayed by ``engine_bench.policy_table`` through the
policy core at budgets of 10-80 % of the expert bytes: the online policies of
``engine_bench.POLICIES`` (ours, scan_resistant, lru) without the predictor, ours once more with it
(``ours+prefetch``: reads ahead count as bytes read), Belady's MIN and the best static set, in the
views ``decode`` and ``request``. The figure compared is expert bytes read per decoded token: every
byte the decode steps read, on demand or ahead.

Workloads: a synthetic model's is the engine benchmark's ``chat`` workload (topic prompts after a
mixed-topic preamble, ``engine_bench.workloads``); a trained model's is conversations cut from its
corpus' held-out text (``cluster.bench.heldout_chat``), or a JSONL workload given by ``--prompts-5``
/ ``--prompts-8`` (its conversations' turns one after another). ``cluster.bench.policies_report``
writes ``policies.json``, ``policies.md`` and ``policies.png``.
"""

from __future__ import annotations

import os
import platform
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from cluster.bench import command_line, log_progress, out_flag
from cluster.bench.engine_bench import POLICY_BUDGETS, policy_table, workloads
from cluster.bench.heldout_chat import heldout_chat
from cluster.bench.workload import conversation_prompt
from cluster.engine.cache import RoutingTrace, discover_layout
from cluster.errors import InvalidParameterError, ModelFileError

REPO = Path(__file__).resolve().parents[2]
TRAINED = {"moe-5domains": REPO / "trained" / "moe-5domains.gguf",
           "moe-8domains": REPO / "trained" / "moe-8domains" / "moe-8domains.gguf"}
SYNTHETIC = ("tiny", "demo", "bench", "large")
TRUNCATED_PRESET, TRUNCATED_LAYERS = "qwen3-30b-a3b", 4
TRUNCATED = f"{TRUNCATED_PRESET}-{TRUNCATED_LAYERS}L"
MODELS = (*SYNTHETIC, TRUNCATED, *TRAINED)
QUICK_MODELS = ("tiny", "moe-5domains")
DEFAULT_WORK_DIR = Path("/var/tmp")


@dataclass(frozen=True)
class Sizes:
    """How big each model's workload is."""

    synthetic_requests: int = 8  # engine_bench's chat workload
    conversations: int = 2  # per domain of a trained model
    turns: int = 3
    chars_per_turn: int = 600
    max_tokens: int = 48


FULL = Sizes()
QUICK = Sizes(synthetic_requests=4, conversations=1, turns=2, chars_per_turn=400, max_tokens=24)


def parse_models(spec: str | None, *, quick: bool) -> tuple[list[str], bool]:
    """The model names of ``--models`` (a comma list of ``MODELS``), and whether they were named (else the
    default: every model, ``QUICK_MODELS`` with --quick).

    Raises:
        InvalidParameterError: an unknown or repeated name.
    """
    if spec is None:
        return list(QUICK_MODELS if quick else MODELS), False
    names = [n.strip() for n in spec.split(",") if n.strip()]
    unknown = [n for n in names if n not in MODELS]
    if unknown or not names:
        raise InvalidParameterError(f"--models: unknown model {unknown[0]!r}; known: {', '.join(MODELS)}" if unknown
                                    else f"--models names no model; known: {', '.join(MODELS)}")
    if len(set(names)) != len(names):
        raise InvalidParameterError(f"--models names a model twice: {spec!r}")
    return names, True


def check_prompts(prompts: dict[str, str | None], models: list[str]) -> None:
    """A workload file must exist and its model be among those run (one-line errors)."""
    for model, path in prompts.items():
        if path is None:
            continue
        flag = f"--prompts-{model.split('-')[1][0]}"
        if model not in models:
            raise InvalidParameterError(f"{flag} is the workload of {model}, which --models leaves out")
        if not os.path.isfile(path):
            raise ModelFileError(f"{flag}: no workload file at '{path}'")


def record_trace(model_path: str, turns: list[tuple[str, str]], *, max_tokens: int, n_threads: int | None,
                 progress: bool) -> tuple[RoutingTrace, dict[str, Any]]:
    """Generates ``turns`` in order on an engine with the whole model resident (each turn sent as its conversation
    so far, as ``engine_bench.record_traces`` does, on ``n_threads`` compute threads); the routing trace with the
    predictor's events, and the live predictor's precision and recall."""
    from cluster.engine.moe_engine import MoEEngine

    layout = discover_layout(model_path)
    parts, history = [], {}
    n_prompt = n_generated = 0
    t0 = time.perf_counter()
    with MoEEngine(model_path, int(layout.unit_bytes.sum() * 1.05), n_ctx=4096, predict="always",
                   n_threads=n_threads) as engine:
        for i, (conversation, prompt) in enumerate(turns):
            gen = engine.generate(conversation_prompt(history.get(conversation, []), prompt), max_tokens=max_tokens)
            history.setdefault(conversation, []).append((prompt, gen.text))
            parts.append(gen.trace)
            n_prompt += gen.n_prompt_tokens
            n_generated += gen.n_generated
            log_progress(progress, f"    request {i + 1}/{len(turns)}: {gen.n_prompt_tokens} prompt tokens, "
                                   f"{gen.n_generated} generated")
        stats = engine.cache_stats()
    trace = RoutingTrace.concat(parts)
    return trace, {"prefetch_precision": stats["prefetch_precision"], "prefetch_recall": stats["prefetch_recall"],
                   "n_requests": len(turns), "n_conversations": len({c for c, _ in turns}),
                   "n_prompt_tokens": n_prompt, "n_generated": n_generated, "n_events": len(trace),
                   "record_s": time.perf_counter() - t0}


def _chat_turns(name: str, model_path: str, prompts: str | None, sizes: Sizes, progress: bool) -> tuple[list, str]:
    """A model's chat workload (module docstring) and a sentence saying what it is."""
    if prompts:
        return workloads(model_path, prompts, 1).policy["chat"], f"`{prompts}`: its conversations' turns in turn"
    if name in TRAINED:
        chat = heldout_chat(model_path, conversations=sizes.conversations, turns=sizes.turns,
                            chars_per_turn=sizes.chars_per_turn, log=lambda line: log_progress(progress, f"    {line}"))
        skipped = f"; domains skipped: {'; '.join(f'{k}: {v}' for k, v in chat.skipped.items())}" if chat.skipped else ""
        return chat.turns, (f"{chat.n_conversations} conversations of {sizes.turns} turns of {sizes.chars_per_turn} "
                            f"characters ({sizes.conversations} per domain, round the domains) from {chat.origin}"
                            f"{skipped}")
    turns = workloads(model_path, None, sizes.synthetic_requests).policy["chat"]
    return turns, (f"{len(turns)} synthetic topic prompts (`bench engine`'s chat workload: a mixed-topic preamble, "
                   "then a topic question; the topics in runs)")


def _truncated_model(work_dir: Path, progress: bool) -> Path:
    from cluster.models import synth

    path = work_dir / f"{TRUNCATED}.gguf"
    if not path.exists():
        log_progress(progress, f"  writing {path}")
        synth.synthesize(path, synth.config_from_args(TRUNCATED_PRESET, layers=TRUNCATED_LAYERS), progress=False)
    return path


def resolve_model(name: str, work_dir: Path, *, named: bool, progress: bool) -> tuple[Path | None, str | None]:
    """The model file of ``name`` (generated where it is a synthetic one not yet written), or None and why it is
    left out (a default model this machine does not have)."""
    from cluster.models.synth import DEFAULT_MODEL_DIR, default_model

    if name in TRAINED:
        path = TRAINED[name]
        if path.is_file():
            return path, None
        if named:
            raise ModelFileError(f"--models {name}: no model file at '{path}'")
        return None, f"no model file at '{path}'"
    if name == "large" and not named and not (DEFAULT_MODEL_DIR / "large.gguf").exists():
        return None, f"not generated in {DEFAULT_MODEL_DIR} (3.1 GB; name it in --models to generate it)"
    if name == TRUNCATED:
        return _truncated_model(work_dir, progress), None
    return default_model(name, progress=progress), None


def model_entry(name: str, model_path: Path, prompts: str | None, sizes: Sizes, *, n_threads: int | None,
                progress: bool, fractions: tuple[float, ...] = POLICY_BUDGETS) -> dict[str, Any]:
    """One model's workload recorded and replayed (module docstring)."""
    layout = discover_layout(str(model_path))
    unit_bytes = np.asarray(layout.unit_bytes, dtype=np.int64)
    turns, source = _chat_turns(name, str(model_path), prompts, sizes, progress)
    log_progress(progress, f"  recording {len(turns)} requests of {name}")
    trace, live = record_trace(str(model_path), turns, max_tokens=sizes.max_tokens, n_threads=n_threads,
                               progress=progress)
    t0 = time.perf_counter()
    views = policy_table(trace, unit_bytes, layout.n_experts_used, fractions)
    live["replay_s"] = time.perf_counter() - t0
    log_progress(progress, f"  replayed {name} in {live['replay_s']:.0f} s")
    shown = model_path.relative_to(REPO) if model_path.is_relative_to(REPO) else model_path
    return {"path": str(shown), "file_bytes": layout.file_size, "expert_bytes": int(unit_bytes.sum()),
            "arch": layout.arch, "n_layers": layout.n_layers, "n_experts": layout.n_experts,
            "n_experts_used": layout.n_experts_used, "workload": source, "max_tokens": sizes.max_tokens,
            "policy": {"workloads": {"chat": {"views": views, "n_decode_tokens": len(trace.decode_steps()),
                                              **live}}}}


def _machine() -> dict[str, Any]:
    cpu = platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.partition(":")[2].strip()
                break
    except OSError:
        pass
    return {"cpu": cpu, "cpus": os.cpu_count(), "kernel": platform.release(), "python": platform.python_version(),
            "mem_total_bytes": os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")}


def run_policies(out_dir: Path, *, models: str | None = None, prompts_5: str | None = None,
                 prompts_8: str | None = None, work_dir: str | None = None, keep_models: bool = False,
                 quick: bool = False, max_tokens: int | None = None, n_threads: int | None = None,
                 progress: bool = True, log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Records and replays every model of ``models`` (module docstring); writes the report into ``out_dir``
    and returns the result (``report``: the Markdown file)."""
    names, named = parse_models(models, quick=quick)
    prompts = {"moe-5domains": prompts_5, "moe-8domains": prompts_8}
    check_prompts(prompts, names)
    if max_tokens is not None and max_tokens < 1:
        raise InvalidParameterError(f"--max-tokens must be at least 1, got {max_tokens}")
    sizes = QUICK if quick else FULL
    if max_tokens is not None:
        sizes = Sizes(**{**sizes.__dict__, "max_tokens": max_tokens})
    started = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
    t0 = time.perf_counter()
    base = Path(work_dir) if work_dir else DEFAULT_WORK_DIR
    base.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="sniper-policies-", dir=base)) if TRUNCATED in names else None
    result: dict[str, Any] = {
        "command": command_line("policies", [("--models", models), ("--prompts-5", prompts_5),
                                             ("--prompts-8", prompts_8), ("--work-dir", work_dir),
                                             ("--keep-models", keep_models), ("--max-tokens", max_tokens),
                                             ("--quick", quick), ("--out", out_flag(out_dir))]),
        "started": started, "machine": _machine(), "budget_fractions": list(POLICY_BUDGETS),
        "sizes": sizes.__dict__, "models": {}, "left_out": {}}
    try:
        for name in names:
            log_progress(progress, f"{name}")
            path, why = resolve_model(name, work or base, named=named, progress=progress)
            if path is None:
                result["left_out"][name] = why
                log_progress(progress, f"  left out: {why}")
                continue
            entry = model_entry(name, path, prompts.get(name), sizes, n_threads=n_threads, progress=progress)
            if name == TRUNCATED:
                entry["generated"] = {"command": f"python -m cluster synth {path} --preset {TRUNCATED_PRESET} "
                                                 f"--layers {TRUNCATED_LAYERS} --no-report",
                                      "disk_bytes": path.stat().st_size, "kept": keep_models}
            result["models"][name] = entry
    finally:
        if work is not None and not keep_models:
            shutil.rmtree(work, ignore_errors=True)
    result["wall_s"] = time.perf_counter() - t0
    from cluster.bench.policies_report import write_report

    result["report"] = str(write_report(result, out_dir))
    return result
