"""``python -m cluster bench policies --quick`` (the tiny preset and the committed trained 5-domain model): the
report's files, Belady's MIN the bound of every online policy without reads ahead in every row, ours under LRU on the trained
model at a third of the experts, and one line for bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cluster.bench.heldout_chat import heldout_chat
from cluster.bench.policies import TRAINED, run_policies
from cluster.bench.policies_report import ONLINE_DEMAND, ratio, third_row
from cluster.cli.main import main

pytestmark = pytest.mark.skipif(not TRAINED["moe-5domains"].is_file(), reason="the trained model is not committed here")


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("policies")
    # one compute thread: ggml's threads spin at their barriers, so on a shared 2-core machine another
    # process's load would stall the recording engine
    result = run_policies(out, quick=True, n_threads=1, progress=False)
    assert result["report"] == str(out / "policies.md")
    return out, json.loads((out / "policies.json").read_text())


def test_policies_writes_its_report(report: tuple[Path, dict]) -> None:
    out, result = report
    assert (out / "policies.png").stat().st_size > 0
    text = (out / "policies.md").read_text()
    assert f"python -m cluster bench policies --quick --out {out}" in text
    assert result["command"] in text
    assert list(result["models"]) == ["tiny", "moe-5domains"]
    for name in result["models"]:
        assert f"| `{name}` (" in text  # a summary row and a section per model
    assert "Target: expert bytes per decoded token at a third of the experts" in text
    trained = result["models"]["moe-5domains"]
    assert "held-out split of the model's corpus" in trained["workload"]
    chat = trained["policy"]["workloads"]["chat"]
    assert chat["n_conversations"] >= 1 and chat["n_requests"] == 2 * chat["n_conversations"]  # --quick: 2 turns each
    checks = result["target"]["checks"]
    assert {(c["view"], c["policy"]) for c in checks} == {(v, p) for v in ("request", "decode")
                                                          for p in ("ours", "ours+prefetch")}
    assert all(c["met"] == (c["ratio"] <= 0.75) for c in checks)


def test_min_is_the_bound_of_every_online_policy_without_reads_ahead(report: tuple[Path, dict]) -> None:
    """MIN has the fewest misses of the whole replay: in the decode view (units of one size) the fewest bytes per
    decoded token; in the request view the highest hit rate over prefill and decode (a policy that shields the
    decode set from prefill may read fewer decode bytes there, as the scan-resistant rule does on the qwen3 preset)."""
    _, result = report
    n_rows = 0
    for entry in result["models"].values():
        views = entry["policy"]["workloads"]["chat"]["views"]
        for view, data in views.items():
            for row in data["rows"]:
                assert "error" not in row, row
                for policy in ONLINE_DEMAND:
                    if view == "decode":
                        assert row["min"]["decode_bytes_read_per_token"] <= \
                            row[policy]["decode_bytes_read_per_token"] * (1 + 1e-12), (row["fraction"], policy)
                    assert row["min"]["hit_rate"] >= row[policy]["hit_rate"] - 1e-12, (view, row["fraction"], policy)
                n_rows += 1
    assert n_rows == 2 * 2 * len(result["budget_fractions"])


def test_ours_reads_fewer_bytes_than_lru_on_the_trained_model(report: tuple[Path, dict]) -> None:
    _, result = report
    row = third_row(result["models"]["moe-5domains"], "request")
    assert row["ours"]["decode_bytes_read_per_token"] > 0
    assert ratio(row, "ours") < 1.0
    assert ratio(row, "min") < ratio(row, "ours")


def test_heldout_conversations_follow_their_documents() -> None:
    chat = heldout_chat(TRAINED["moe-5domains"], conversations=2, turns=3, chars_per_turn=100)
    domains = {c.rsplit("-", 1)[0] for c, _ in chat.turns}
    assert domains and chat.n_conversations == 2 * len(domains)
    assert all(len(prompt) == 100 for _, prompt in chat.turns)
    by_conversation: dict[str, list[str]] = {}
    for conversation, prompt in chat.turns:
        by_conversation.setdefault(conversation, []).append(prompt)
    assert all(len(turns) == 3 for turns in by_conversation.values())
    assert [c for c, _ in chat.turns[:3]] == ["python-0"] * 3  # round the domains, the corpus' order


@pytest.mark.parametrize("argv, said", [
    (["--models", "tiny,nope"], "--models: unknown model 'nope'"),
    (["--models", "tiny", "--prompts-5", "/tmp/w5/none.jsonl"], "which --models leaves out"),
    (["--prompts-5", "/nonexistent/prompts.jsonl"], "no workload file at '/nonexistent/prompts.jsonl'"),
    (["--model", str(TRAINED["moe-5domains"])], "--model is not a flag of 'bench policies'"),
    (["--nodes", "2"], "--nodes is not a flag of 'bench policies'"),
])
def test_bad_input_gets_one_line(argv: list[str], said: str, tmp_path: Path,
                                 capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bench", "policies", *argv, "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert said in err and "\n" not in err
    assert not (tmp_path / "policies.md").exists()
