"""Start-up progress (cluster.engine.startup): each phase of opening an engine reported once, in
order, with its seconds; the command line prints one line per phase; a node returns its phases
from ready(); a phase that reads the model file shows a bar of the file's bytes in memory."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from cluster.distributed.node import NodeConfig, NodeServer
from cluster.engine.moe_engine import MoEEngine
from cluster.engine.startup import Startup, StartupPhase
from cluster.errors import CacheBudgetError

ENGINE_PHASES = ["layout", "preload", "load", "context", "attach", "engine"]


def _budget(layout, fraction: float) -> int:
    return int(layout.unit_bytes.sum() * fraction)


def test_engine_reports_each_phase_once_in_order_with_its_seconds(tiny_model: Path, tiny_layout) -> None:
    phases: list[StartupPhase] = []
    startup = Startup(phases.append)
    with MoEEngine(tiny_model, _budget(tiny_layout, 0.4), n_ctx=256, n_threads=1, startup=startup) as engine:
        assert [p.name for p in phases] == ENGINE_PHASES
        ready = startup.ready()
        assert engine.generate("x", max_tokens=1).n_generated == 1
    assert phases[-1] is ready and ready.name == "ready"
    assert all(p.elapsed_s >= 0 for p in phases)
    ends = [p.since_start_s for p in phases]
    assert ends == sorted(ends) and ready.elapsed_s >= sum(p.elapsed_s for p in phases[:-1])
    layout = phases[0].detail
    assert f"{tiny_layout.n_layers} layers x {tiny_layout.n_experts} experts" in layout, layout
    assert "budget" in phases[ENGINE_PHASES.index("attach")].detail


def test_an_auto_budget_is_a_phase_saying_how_it_was_derived(tiny_model: Path) -> None:
    phases: list[StartupPhase] = []
    with MoEEngine(tiny_model, "auto", n_ctx=256, n_threads=1, startup=Startup(phases.append)) as engine:
        budget = next(p for p in phases if p.name == "budget")
        assert budget.detail == engine.auto_budget.explain()
    assert [p.name for p in phases] == ["layout", "preload", "load", "context", "budget", "attach", "engine"]


def test_no_cache_has_no_cache_phases_and_a_failed_phase_is_not_reported(tiny_model: Path, tiny_layout) -> None:
    phases: list[StartupPhase] = []
    with MoEEngine(tiny_model, None, n_ctx=256, n_threads=1, startup=Startup(phases.append)):
        assert [p.name for p in phases] == ["layout", "load", "context", "engine"]
    phases.clear()
    with pytest.raises(CacheBudgetError):  # the budget is refused while the layout phase runs
        MoEEngine(tiny_model, 1, n_ctx=256, n_threads=1, startup=Startup(phases.append))
    assert phases == []


def test_a_phase_reading_the_model_shows_a_bar_of_its_bytes_in_memory(tiny_model: Path, tiny_layout,
                                                                       capsys: pytest.CaptureFixture[str]) -> None:
    with MoEEngine(tiny_model, _budget(tiny_layout, 0.4), n_ctx=256, n_threads=1,
                   startup=Startup(progress_bars=True)):
        pass
    err = capsys.readouterr().err
    assert f"preload {tiny_model.name} (in memory)" in err and f"load {tiny_model.name} (in memory)" in err, err


def test_run_prints_one_line_per_phase_with_its_seconds(tiny_model: Path) -> None:
    done = subprocess.run([sys.executable, "-m", "cluster", "run", "--model", str(tiny_model), "--prompt", "x",
                           "--max-tokens", "1", "--cache-mb", "auto", "--threads", "1", "--json"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    lines = re.findall(r"^\[\s*(\d+\.\d) s\] (\w+)(?:: .*)? \((\d+\.\d) s\)$", done.stderr, re.MULTILINE)
    assert [name for _, name, _ in lines] == ["layout", "preload", "load", "context", "budget", "attach", "engine",
                                              "ready"], done.stderr
    assert "auto cache budget" in done.stderr  # the budget's line says how it was derived


def test_a_node_returns_its_start_up_phases_from_ready(tiny_model: Path, capfd: pytest.CaptureFixture[str]) -> None:
    server = NodeServer("sniper-node-0", NodeConfig.create(str(tiny_model), cache_bytes=1 << 20, n_ctx=256,
                                                           n_threads=1, heartbeat_s=60.0))
    try:
        phases = server.ready().startup
    finally:
        server.close()
    assert [p.name for p in phases] == ENGINE_PHASES + ["ready"]
    err = capfd.readouterr().err  # the node's log: a line per phase, named after the node
    assert all(f"sniper-node-0 {p.name}" in err for p in phases), err
