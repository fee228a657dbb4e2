"""``python -m cluster bench quality``: what cache-aware expert selection costs in quality, and what it buys.

Every setting scores the same held-out token windows (``cluster.bench.heldout_text``: every domain
of a trained model's corpus) by teacher forcing (``MoEEngine.score``: one token per step, the
decode regime, so each token's selections meet the cache as a decoded token's do), each on a
fresh engine:

* ``exact`` at the full budget (every expert resident): the reference;
* ``exact`` at the bounded budget (``--budget-fraction`` of the expert bytes, a third by
  default): the same output, the reads a budget costs;
* ``cache-aware`` at the bounded budget, ``max_changed_weight`` in ``MAX_CHANGED_WEIGHTS`` with
  ``min_score_ratio`` 0.5, and with ``min_score_ratio`` 0 (always replace, never skip) at
  ``ALWAYS_REPLACE_WEIGHTS``.

Per setting: bits per token (mean over every position, and per domain), its increase over the
reference in % of the reference's bits per token, greedy agreement (the share of positions whose
argmax is the reference's), expert MiB read per token, scoring tok/s, and the selections the
cache changed (replaced or skipped). A setting that fails (a build without the native side of
cache-aware selection may refuse it) is recorded with its error instead of ending the run.
``cluster.bench.quality_report`` writes ``quality.json``, ``quality.md`` and ``quality.png``.
"""

from __future__ import annotations

import os
import platform
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from cluster import _native
from cluster.bench import command_line, log_progress, out_flag
from cluster.bench.heldout_text import TextWindows, heldout_windows
from cluster.engine.cache import check_budget, discover_layout
from cluster.engine.expert_selection import CACHE_AWARE, ExpertSelection
from cluster.engine.generation import SELECTIONS_REPLACED, SELECTIONS_SKIPPED
from cluster.engine.node_memory import MIB
from cluster.errors import InvalidParameterError, ModelFileError

MAX_CHANGED_WEIGHTS = (0.05, 0.1, 0.2, 0.3, 0.4, 0.5)
MIN_SCORE_RATIO = 0.5
ALWAYS_REPLACE_WEIGHTS = (0.2, 0.3, 0.5)  # the always-replace settings' max_changed_weight (min_score_ratio 0)
DEFAULT_BUDGET_FRACTION = 1 / 3
DEFAULT_WINDOWS, DEFAULT_WINDOW_TOKENS = 2, 128
QUICK_WINDOWS, QUICK_WINDOW_TOKENS = 1, 64
TRAINED_MODEL = Path(__file__).resolve().parents[2] / "trained" / "moe-5domains.gguf"


@dataclass(frozen=True)
class Setting:
    """One row of the sweep: a selection at a budget."""

    name: str
    selection: ExpertSelection
    bounded: bool  # at the bounded budget (else the full one)


def settings() -> list[Setting]:
    """The sweep, reference first (module docstring)."""
    rows = [Setting("exact, full budget", ExpertSelection(), bounded=False),
            Setting("exact", ExpertSelection(), bounded=True)]
    rows += [Setting(f"cache-aware w={w:g} r={MIN_SCORE_RATIO:g}",
                     ExpertSelection(CACHE_AWARE, max_changed_weight=w, min_score_ratio=MIN_SCORE_RATIO), bounded=True)
             for w in MAX_CHANGED_WEIGHTS]
    rows += [Setting(f"cache-aware w={w:g} r=0", ExpertSelection(CACHE_AWARE, max_changed_weight=w, min_score_ratio=0.0),
                     bounded=True) for w in ALWAYS_REPLACE_WEIGHTS]
    return rows


def default_model() -> str:
    """The trained model of the repository if it is there, else the generated bench model."""
    if TRAINED_MODEL.is_file():
        relative = os.path.relpath(TRAINED_MODEL)
        return relative if not relative.startswith("..") else str(TRAINED_MODEL)  # the report names it as typed
    from cluster.models.synth import default_model as synth_default

    return str(synth_default("bench"))


def _cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo``), else the machine type."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.partition(":")[2].strip()
    except OSError:
        pass
    return platform.machine()


def check_args(model: str, budget_fraction: float, n_windows: int, window_tokens: int) -> None:
    """Raises a one-line error for input the bench cannot run with."""
    if not os.path.isfile(model):
        raise ModelFileError(f"no model file at '{model}'")
    if not 0.0 < budget_fraction <= 1.0:
        raise InvalidParameterError(f"--budget-fraction must be in (0, 1], got {budget_fraction:g}")
    if n_windows < 1:
        raise InvalidParameterError(f"--windows must be at least 1, got {n_windows}")
    if window_tokens < 2:
        raise InvalidParameterError(f"--window-tokens must be at least 2 (one token to predict), got {window_tokens}")


def score_setting(model: str, setting: Setting, budget: int, windows: TextWindows, n_ctx: int,
                  n_threads: int | None) -> dict[str, Any]:
    """Scores every window on a fresh engine of ``setting``; per domain the log2-probabilities and
    argmaxes of every position (concatenated), and the cache counters and seconds summed."""
    from cluster.engine.moe_engine import MoEEngine

    out: dict[str, Any] = {"log2_probs": {}, "argmax": {}, "cache": {}, "seconds": 0.0}
    with MoEEngine(model, cache_bytes=budget, expert_selection=setting.selection, n_ctx=n_ctx,
                   n_threads=n_threads) as engine:
        for domain, domain_windows in windows.windows.items():
            probs, picks = [], []
            for tokens in domain_windows:
                scored = engine.score(tokens)
                probs.append(scored.log2_probs)
                picks.append(scored.argmax)
                out["seconds"] += scored.seconds
                for key, value in scored.cache.items():
                    out["cache"][key] = out["cache"].get(key, 0) + value
            out["log2_probs"][domain] = np.concatenate(probs)
            out["argmax"][domain] = np.concatenate(picks)
    return out


def summarise(setting: Setting, budget: int, scored: dict[str, Any],
              reference: dict[str, Any] | None) -> dict[str, Any]:
    """One row of the report from a setting's scores and the reference's (None: this is it)."""
    reference = reference or scored
    domains = list(scored["log2_probs"])
    bits = {d: float(-scored["log2_probs"][d].mean()) for d in domains}
    all_probs = np.concatenate([scored["log2_probs"][d] for d in domains])
    ref_probs = np.concatenate([reference["log2_probs"][d] for d in domains])
    picks = np.concatenate([scored["argmax"][d] for d in domains])
    ref_picks = np.concatenate([reference["argmax"][d] for d in domains])
    mean_bits, ref_bits = float(-all_probs.mean()), float(-ref_probs.mean())
    c = scored["cache"]
    n = int(all_probs.shape[0])
    selections = c.get("n_hits_prefill", 0) + c.get("n_hits_decode", 0) + c.get("n_misses_prefill", 0) + \
        c.get("n_misses_decode", 0)
    hits = c.get("n_hits_prefill", 0) + c.get("n_hits_decode", 0)
    replaced, skipped = c.get(SELECTIONS_REPLACED, 0), c.get(SELECTIONS_SKIPPED, 0)
    bytes_read = c.get("bytes_read_prefill", 0) + c.get("bytes_read_decode", 0)
    return {
        "setting": setting.name,
        "mode": setting.selection.mode,
        "max_changed_weight": setting.selection.max_changed_weight if setting.selection.cache_aware else None,
        "min_score_ratio": setting.selection.min_score_ratio if setting.selection.cache_aware else None,
        "budget_bytes": budget,
        "bounded": setting.bounded,
        "positions": n,
        "bits_per_token": mean_bits,
        "bits_per_token_by_domain": bits,
        "bits_increase_pct": 100.0 * (mean_bits - ref_bits) / ref_bits,
        "agreement": float((picks == ref_picks).mean()),
        "agreement_by_domain": {d: float((scored["argmax"][d] == reference["argmax"][d]).mean()) for d in domains},
        "bytes_read": int(bytes_read),
        "mib_per_token": bytes_read / n / MIB,
        "tok_s": n / scored["seconds"] if scored["seconds"] > 0 else None,
        "hit_rate": hits / selections if selections else None,
        "selections": int(selections),
        "selections_replaced": int(replaced),
        "selections_skipped": int(skipped),
        "changed_fraction": (replaced + skipped) / selections if selections else None,
        "error": None,
    }


def run_quality(model: str | None = None, out_dir: Path | None = None, *, quick: bool = False,
                budget_fraction: float = DEFAULT_BUDGET_FRACTION, n_windows: int | None = None,
                window_tokens: int | None = None, n_threads: int | None = None,
                progress: bool = True) -> dict[str, Any]:
    """Runs the sweep on ``model`` (default: ``default_model()``) and writes the report into
    ``out_dir`` (default ``docs``); returns the result, with ``report`` the Markdown file's path.

    Raises:
        ModelFileError, InvalidParameterError: bad input (``check_args``).
        CacheBudgetError: the bounded budget cannot hold one step's experts.
    """
    from cluster.bench.quality_report import write_quality_report
    from cluster.engine.tokenizer import Tokenizer

    model_path = model or default_model()
    n_windows = n_windows or (QUICK_WINDOWS if quick else DEFAULT_WINDOWS)
    window_tokens = window_tokens or (QUICK_WINDOW_TOKENS if quick else DEFAULT_WINDOW_TOKENS)
    check_args(model_path, budget_fraction, n_windows, window_tokens)
    layout = discover_layout(model_path)
    footprint = int(layout.unit_bytes.sum())
    budget = int(footprint * budget_fraction)
    check_budget(layout, budget)
    started = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
    tokenizer = Tokenizer.load(model_path)  # the engine's own tokenization rules, without loading the weights
    windows = heldout_windows(model_path, lambda text: tokenizer.tokenize(text, add_special=False),
                              tokenizer.bos_id if tokenizer.add_bos and tokenizer.bos_id >= 0 else None,
                              n_windows=n_windows, window_tokens=window_tokens,
                              log=lambda line: log_progress(progress, line))
    n_ctx = max(len(w) for ws in windows.windows.values() for w in ws)
    rows: list[dict[str, Any]] = []
    reference: dict[str, Any] | None = None
    for setting in settings():
        setting_budget = budget if setting.bounded else footprint
        log_progress(progress, f"quality: {setting.name} (budget {setting_budget / MIB:.1f} MiB)")
        try:
            scored = score_setting(model_path, setting, setting_budget, windows, n_ctx, n_threads)
        except Exception as exc:  # noqa: BLE001  (recorded for this setting; the reference's failure ends the run)
            if reference is None:
                raise
            rows.append({"setting": setting.name, "mode": setting.selection.mode,
                         "max_changed_weight": setting.selection.max_changed_weight,
                         "min_score_ratio": setting.selection.min_score_ratio, "budget_bytes": setting_budget,
                         "bounded": setting.bounded, "error": f"{type(exc).__name__}: {exc}"})
            log_progress(progress, f"quality: {setting.name} failed: {rows[-1]['error']}")
            continue
        if reference is None:
            reference = scored
        rows.append(summarise(setting, setting_budget, scored, reference))
        r = rows[-1]
        log_progress(progress, f"quality: {setting.name}: {r['bits_per_token']:.4f} bits/token "
                               f"({r['bits_increase_pct']:+.2f} %), agreement {r['agreement']:.4f}, "
                               f"{r['mib_per_token']:.3f} MiB/token, {r['tok_s']:.0f} tok/s")
    defaults = {"budget": budget_fraction == DEFAULT_BUDGET_FRACTION,
                "windows": n_windows == (QUICK_WINDOWS if quick else DEFAULT_WINDOWS),
                "tokens": window_tokens == (QUICK_WINDOW_TOKENS if quick else DEFAULT_WINDOW_TOKENS)}
    result: dict[str, Any] = {
        "command": command_line("quality", [("--model", model), ("--quick", quick),
                                            ("--budget-fraction", None if defaults["budget"] else f"{budget_fraction:g}"),
                                            ("--windows", None if defaults["windows"] else n_windows),
                                            ("--window-tokens", None if defaults["tokens"] else window_tokens),
                                            ("--threads", n_threads),
                                            ("--out", out_flag(out_dir))]),
        "started": started,
        "machine": {"cpus": os.cpu_count(), "kernel": platform.release(), "python": platform.python_version(),
                    "processor": _cpu_model(),
                    "mem_total_bytes": os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")},
        "model": {"path": model_path, "arch": layout.arch, "n_layers": layout.n_layers, "n_experts": layout.n_experts,
                  "n_experts_used": layout.n_experts_used, "expert_bytes": footprint},
        "budget_fraction": budget_fraction,
        "budget_bytes": budget,
        "native_selection": hasattr(_native, "SelectionConfig"),
        "text": {"origin": windows.origin, "trained": windows.trained, "windows_per_domain": n_windows,
                 "window_tokens": window_tokens, "domains": windows.sources, "skipped": windows.skipped,
                 "positions": sum(len(w) - 1 for ws in windows.windows.values() for w in ws)},
        "settings": rows,
    }
    result["report"] = str(write_quality_report(result, out_dir or Path("docs")))
    return result
