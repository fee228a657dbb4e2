"""``python -m cluster bench quality --quick`` on the committed trained model: the report's files, exact
selection's rows (bit-identical to the reference at any budget), and the cache-aware rows where the
native selection is built; bad input gets one line."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from cluster import _native
from cluster.bench.quality import run_quality, settings
from cluster.cli.main import main

TRAINED = Path(__file__).resolve().parent.parent / "trained" / "moe-5domains.gguf"


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("quality")
    # one compute thread: ggml's threads spin at their barriers, which on a shared 2-core machine turns
    # another process's load into long stalls; the command line runs the same code with its defaults
    result = run_quality(str(TRAINED), out, quick=True, n_threads=1, progress=False)
    assert result["report"] == str(out / "quality.md")
    return out, json.loads((out / "quality.json").read_text())


def _row(result: dict, name: str) -> dict:
    return next(r for r in result["settings"] if r["setting"] == name)


def test_quality_writes_its_report(report: tuple[Path, dict]) -> None:
    out, result = report
    assert (out / "quality.png").stat().st_size > 0
    text = (out / "quality.md").read_text()
    assert f"python -m cluster bench quality --model {TRAINED} --quick --threads 1 --out {out}" in text
    assert result["command"] in text
    assert "Which setting for which loss" in text
    assert set(result["text"]["domains"]) | set(result["text"]["skipped"]) == \
        {"python", "c", "javascript", "english", "german"}  # the manifest's domains, each scored or skipped
    assert result["text"]["trained"] and "python" in result["text"]["domains"]
    assert len(result["settings"]) == len(settings())


def test_exact_selection_costs_nothing_at_a_bounded_budget(report: tuple[Path, dict]) -> None:
    _, result = report
    full, exact = _row(result, "exact, full budget"), _row(result, "exact")
    assert full["error"] is None and exact["error"] is None
    assert math.isfinite(full["bits_per_token"]) and full["bits_per_token"] > 0
    assert full["positions"] == exact["positions"] == result["text"]["positions"] > 0
    assert exact["budget_bytes"] < full["budget_bytes"]
    assert exact["bits_increase_pct"] == 0.0
    assert exact["agreement"] == 1.0
    assert exact["bits_per_token_by_domain"] == full["bits_per_token_by_domain"]
    assert exact["mib_per_token"] > 0
    assert exact["selections_replaced"] == exact["selections_skipped"] == 0


@pytest.mark.skipif(not hasattr(_native, "SelectionConfig"), reason="the native cache-aware selection is not built")
def test_cache_aware_rows_trade_bits_for_bytes(report: tuple[Path, dict]) -> None:
    _, result = report
    assert result["native_selection"]
    exact = _row(result, "exact")
    aware = [r for r in result["settings"] if r["mode"] == "cache-aware"]
    assert len(aware) == sum(s.selection.cache_aware for s in settings())
    for r in aware:
        assert r["error"] is None, r["error"]
        assert math.isfinite(r["bits_per_token"])
        assert 0.0 <= r["agreement"] <= 1.0
        assert r["budget_bytes"] == exact["budget_bytes"]
    widest = _row(result, "cache-aware w=0.5 r=0.5")
    assert widest["mib_per_token"] < exact["mib_per_token"]
    assert widest["selections_replaced"] + widest["selections_skipped"] > 0
    assert _row(result, "cache-aware w=0.2 r=0")["selections_skipped"] == 0  # ratio 0: always replace


@pytest.mark.parametrize("argv, said", [
    (["--budget-fraction", "0"], "--budget-fraction must be in (0, 1], got 0"),
    (["--budget-fraction", "1.5"], "--budget-fraction must be in (0, 1], got 1.5"),
    (["--model", "/nonexistent/model.gguf"], "not found"),
    (["--window-tokens", "1"], "--window-tokens must be at least 2"),
    (["--nodes", "2"], "--nodes is not a flag of 'bench quality'"),
])
def test_bad_input_gets_one_line(argv: list[str], said: str, tmp_path: Path,
                                 capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bench", "quality", *argv, "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert said in err and "\n" not in err
    assert not (tmp_path / "quality.md").exists()
