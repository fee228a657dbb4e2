"""Routing benchmarks: workloads (cluster.bench.workload), the simulator, decision cost, report ratios."""

from __future__ import annotations

import json
import os
from pathlib import Path

import gguf
import numpy as np
import pytest
from foreign_models import write_foreign_model

from cluster.models import synth
from cluster.bench import decision_cost, routing_bench, simulate, workload
from cluster.bench.routing_report import targets
from cluster.cli.main import main

# -- workloads -----------------------------------------------------------------------------


def _write_lines(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_jsonl_groups_lines_of_a_session_into_turns_in_file_order(tmp_path: Path) -> None:
    path = _write_lines(tmp_path / "w.jsonl", [
        json.dumps({"prompt": "a1", "session": "a", "domain": "math"}),
        json.dumps({"prompt": "solo"}),
        "",
        json.dumps({"prompt": "a2", "session": "a"}),
        json.dumps({"prompt": "b1", "session": 7}),
    ])
    w = workload.load_jsonl(path, rate=2.0, seed=1)
    assert [(t.conversation, t.index, t.prompt) for t in w.turns] == [
        ("a", 0, "a1"), ("line2", 0, "solo"), ("a", 1, "a2"), ("7", 0, "b1")]
    assert w.turns[0].domain == "math" and w.turns[2].domain is None
    arrivals = [t.arrival_s for t in w.turns]
    assert all(0 < a < b for a, b in zip(arrivals, arrivals[1:], strict=False))
    assert [t.prompt for t in w.conversations()["a"]] == ["a1", "a2"]


@pytest.mark.parametrize("bad, expected", [
    ('{"prompt": "x", ', "not valid JSON"),
    ('["x"]', "expected a JSON object"),
    ('{"session": "a"}', '"prompt" must be a non-empty string'),
    ('{"prompt": ""}', '"prompt" must be a non-empty string'),
    ('{"prompt": "x", "sesion": "a"}', "unknown key(s) 'sesion'"),
    ('{"prompt": "x", "session": true}', '"session" must be'),
    ('{"prompt": "x", "domain": 3}', '"domain" must be a string'),
])
def test_jsonl_malformed_line_error_names_the_line_and_the_problem(tmp_path: Path, bad: str, expected: str) -> None:
    path = _write_lines(tmp_path / "w.jsonl", [json.dumps({"prompt": "ok"}), "", bad])
    with pytest.raises(ValueError) as info:
        workload.load_jsonl(path, rate=1.0)
    assert "w.jsonl:3: " in str(info.value)
    assert expected in str(info.value)


def test_jsonl_empty_or_missing_file_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="no requests"):
        workload.load_jsonl(_write_lines(tmp_path / "empty.jsonl", ["", "  "]), rate=1.0)
    with pytest.raises(ValueError, match="not found"):
        workload.load_jsonl(tmp_path / "missing.jsonl", rate=1.0)


TOPICS = [[f"w{t}x{i}" for i in range(16)] for t in range(4)]


def test_synthetic_workload_is_deterministic_per_seed() -> None:
    a = workload.synthetic(TOPICS, 40, rate=3.0, seed=5)
    b = workload.synthetic(TOPICS, 40, rate=3.0, seed=5)
    c = workload.synthetic(TOPICS, 40, rate=3.0, seed=6)
    assert a == b
    assert [t.arrival_s for t in a.turns] != [t.arrival_s for t in c.turns]
    assert len(a.turns) == 40


def test_synthetic_conversations_stay_on_one_topic_with_two_to_four_turns() -> None:
    w = workload.synthetic(TOPICS, 60, rate=3.0, seed=0, words_per_turn=20)
    convs = list(w.conversations().values())
    for turns in convs:
        assert [t.index for t in turns] == list(range(len(turns)))
        assert len({t.domain for t in turns}) == 1
        topic = int(turns[0].domain.removeprefix("topic"))
        assert all(set(t.prompt.split()) <= set(TOPICS[topic]) and len(t.prompt.split()) == 20 for t in turns)
    assert all(2 <= len(turns) <= 4 for turns in convs[:-1])  # only the last may be cut short
    assert np.mean(np.diff([t.arrival_s for t in w.turns])) == pytest.approx(1 / 3.0, rel=0.5)


def test_synthetic_preamble_is_shared_by_every_first_turn() -> None:
    w = workload.synthetic(TOPICS, 20, rate=1.0, seed=0, preamble_words=16)
    firsts = [turns[0].prompt for turns in w.conversations().values()]
    preamble = os.path.commonprefix(firsts)
    assert len(preamble.split()) >= 16
    assert all(not t.prompt.startswith(preamble) for t in w.turns if t.index > 0)


def test_conversation_prompt_is_history_then_new_prompt() -> None:
    assert workload.conversation_prompt([(" a b", " c"), (" d", " e f")], " g") == " a b c d e f g"
    assert workload.conversation_prompt([], " g") == " g"


def test_dump_jsonl_round_trips(tmp_path: Path) -> None:
    w = workload.synthetic(TOPICS, 12, rate=2.0, seed=3)
    workload.dump_jsonl(w, tmp_path / "w.jsonl")
    back = workload.load_jsonl(tmp_path / "w.jsonl", rate=2.0, seed=3)
    assert [(t.conversation, t.index, t.prompt, t.domain) for t in back.turns] == \
        [(t.conversation, t.index, t.prompt, t.domain) for t in w.turns]


def test_poisson_arrivals_refuse_a_rate_that_is_not_positive() -> None:
    with pytest.raises(ValueError, match="rate"):
        workload.poisson_arrivals(3, 0.0, seed=0)


# -- traces and simulator ------------------------------------------------------------------


@pytest.fixture(scope="module")
def specialised_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny preset with routing strongly tied to topics (specialization 4)."""
    path = tmp_path_factory.mktemp("routing") / "tiny-specialised.gguf"
    synth.synthesize(path, synth.config_from_args("tiny", specialization=4.0), progress=False)
    return path


@pytest.fixture(scope="module")
def traces(specialised_model: Path) -> simulate.TraceSet:
    w = workload.for_model(str(specialised_model), None, 96, rate=4.0, seed=0, max_open=8)
    return simulate.record_traces(str(specialised_model), w, max_tokens=16)


def test_trim_prefill_leaves_the_new_tokens_and_the_decode(traces: simulate.TraceSet) -> None:
    recorded = next(r for r in traces.turns if r.turn.index > 0)
    n_prompt = len(recorded.tokens)
    skip = n_prompt // 2
    full_prompt, full_decode = recorded.trace.split_prefill(n_prompt, traces.n_layers, traces.n_experts)
    trimmed = simulate.trim_prefill(recorded.trace, n_prompt, skip)
    prompt, decode = trimmed.split_prefill(n_prompt - skip, traces.n_layers, traces.n_experts)
    np.testing.assert_array_equal(prompt, full_prompt[skip:])
    np.testing.assert_array_equal(decode, full_decode)
    assert simulate.trim_prefill(recorded.trace, n_prompt, 0) is recorded.trace


def test_trace_set_round_trips_through_a_file(traces: simulate.TraceSet, tmp_path: Path) -> None:
    traces.save(tmp_path / "t.npz")
    back = simulate.TraceSet.load(tmp_path / "t.npz")
    assert len(back.turns) == len(traces.turns)
    for a, b in zip(traces.turns, back.turns, strict=True):
        assert (a.turn, a.tokens, a.context_tokens) == (b.turn, b.tokens, b.context_tokens)
        assert a.n_generated == b.n_generated
        np.testing.assert_array_equal(a.trace.ids, b.trace.ids)
        np.testing.assert_array_equal(a.trace.n_tokens, b.trace.n_tokens)
    (tmp_path / "bad.npz").write_bytes(b"not a zip")
    with pytest.raises(ValueError, match="not a trace set"):
        simulate.TraceSet.load(tmp_path / "bad.npz")


def test_simulator_serves_every_request_and_warmth_beats_round_robin(traces: simulate.TraceSet) -> None:
    budget = int(np.asarray(traces.unit_bytes, dtype=np.int64).sum()) // 3
    results = {policy: simulate.simulate(traces, policy, n_nodes=8, cache_bytes=budget, seed=0)
               for policy in ("warmth", "round_robin")}
    for r in results.values():
        assert r["n_requests"] == len(traces.turns) and r["errors"] == 0
        assert sum(r["requests_per_node"].values()) == len(traces.turns)
        assert 0 < r["hit_rate"] <= 1 and r["bytes_read_per_token"] > 0
        assert r["p50_latency_s"] <= r["p99_latency_s"]
    warmth, rr = results["warmth"], results["round_robin"]
    assert warmth["hit_rate"] > rr["hit_rate"]
    assert warmth["bytes_read_per_token"] < rr["bytes_read_per_token"]
    assert warmth["reused_prompt_fraction"] > rr["reused_prompt_fraction"]  # conversations stick to their node
    assert warmth["prediction_precision"] is not None and rr["prediction_precision"] is None
    again = simulate.simulate(traces, "warmth", n_nodes=8, cache_bytes=budget, seed=0)
    assert again["hit_rate"] == warmth["hit_rate"] and again["requests_per_node"] == warmth["requests_per_node"]


# -- decision cost, ratios, CLI --------------------------------------------------------------


def test_decision_cost_returns_sane_numbers_at_small_scale() -> None:
    r = decision_cost.measure_decision_cost(n_nodes=6, n_layers=4, n_experts=16, k=2, n_topics=2, prompt_tokens=40,
                                            n_train=8, n_decisions=25, n_rounds=3)
    assert r["n_decisions"] == 75 and r["n_rounds"] == 3 and r["affinity_tokens"] > 0
    assert r["learn_ms_per_report"] > 0 and r["learn_tokens_per_report"] == 64
    assert 0 < r["p50_ms"] <= r["p99_ms"]
    rates = r["round_decisions_per_s"]
    assert len(rates) == 3 and r["decisions_per_s"] == sorted(rates)[1]  # the median round
    assert min(rates) <= 1e3 / r["mean_ms"] <= max(rates)
    assert r["targets"]["met"] == (r["p99_ms"] <= 1.0 and r["decisions_per_s"] >= 5000)
    assert r["profile"]["top_own_time"] and any("choose" in row["function"] or "demand" in row["function"]
                                                 for row in r["profile"]["top_own_time"])


def test_targets_are_ratios_to_each_baseline_that_ran() -> None:
    base = {"bytes_read_per_token": 100.0, "hit_rate": 0.5, "tok_s": 10.0, "p99_latency_s": 2.0}
    t = targets({"warmth": {"bytes_read_per_token": 50.0, "hit_rate": 0.75, "tok_s": 12.0, "p99_latency_s": 1.0},
                 "round_robin": base, "least_loaded": dict(base, tok_s=0.0)})
    assert t["warmth_vs_round_robin"] == {"bytes_read_per_token": 0.5, "hit_rate": 1.5, "tok_s": 1.2,
                                          "p99_latency_s": 0.5}
    assert t["warmth_vs_least_loaded"]["tok_s"] is None  # division by zero is "no ratio"
    assert "least_loaded_vs_round_robin" in t and "round_robin_vs_least_loaded" not in t


def test_summarise_live_counts_bytes_from_nodes_and_requests() -> None:
    from cluster.distributed.status import NodeStatus, PredictionScore, RouterStatus
    from cluster.routing.base import PolicyState

    def node(name: str, read: int, generated: int) -> NodeStatus:
        return NodeStatus(name=name, alive=True, load=0, capacity=4, bytes_read=read, generated_tokens=generated)

    def status(*nodes: NodeStatus, prediction: PredictionScore = PredictionScore()) -> RouterStatus:
        return RouterStatus(model="m", pid=1, n_routes=0, route_s=0.0, policy="warmth", policy_state=PolicyState(),
                            started_at=0.0, nodes=nodes, prediction=prediction)

    before = status(node("n0", 10, 0), node("n1", 0, 0))
    after = status(node("n0", 410, 8), node("n1", 200, 4), prediction=PredictionScore(n=3, precision=0.5))
    cache = {"hits": 3, "misses": 1, "bytes_read_prefill": 100, "bytes_read_decode": 100, "n_tokens_prefill": 10,
             "n_tokens_decode": 4, "decode_hit_rate": 0.5}
    ok = {"sent_s": 0.0, "done_s": 1.0, "node": "n0", "usage": {"completion_tokens": 4, "prompt_tokens": 10,
                                                                "reused_prompt_tokens": 5}, "cache": cache}
    outcomes = [ok, dict(ok, node="n1", done_s=3.0, routing={"attempts": 2}), dict(ok, done_s=2.0),
                {"sent_s": 0.0, "done_s": 0.1, "error": "X"}]
    r = routing_bench.summarise_live(outcomes, before, after, wall_s=3.0)
    assert r["bytes_read_per_token"] == 600 / 12 and r["bytes_read_requests"] == 600
    assert r["bytes_read_per_token_prefill"] == 10 and r["bytes_read_per_token_decode"] == 25
    assert r["hit_rate"] == 0.75 and r["decode_hit_rate"] == 0.5 and r["reused_prompt_fraction"] == 0.5
    assert r["tok_s"] == 4 and r["requests_per_node"] == {"n0": 2, "n1": 1} and r["errors"] == 1
    assert r["p50_latency_s"] == 2.0 and r["prediction_precision"] == 0.5 and r["retried_requests"] == 1


@pytest.mark.parametrize("argv, message", [
    (["bench", "engine", "--nodes", "3"], "--nodes is a flag of 'bench routing' and 'bench simulate'"),
    (["bench", "simulate", "--prompts", "w.jsonl"],
     "--prompts is a flag of 'bench engine', 'bench routing', 'bench regimes' and 'bench batch'"),
    (["bench", "routing", "--traces", "t.npz"], "--traces is a flag of 'bench simulate'"),
    (["bench", "engine", "--duration", "5"], "--duration is a flag of 'bench chaos'"),
    (["bench", "chaos", "--nodes", "2"], "--nodes is not a flag of 'bench chaos'"),
    (["bench", "serving", "--llama-server", "x", "--rate", "1"], "--rate is not a flag of 'bench serving'"),
    (["bench", "routing", "--policies", "warmth,nearest"], "expected a comma-separated list"),
    (["bench", "routing", "--warmth-knob", "warm_margin=0"], "--warmth-knob is a flag of 'bench simulate'"),
    (["bench", "simulate", "--warmth-knob", "bogus=1"], "unknown knob 'bogus'"),
    (["bench", "simulate", "--warmth-knob", "warm_margin=2"], "warm_margin must be in [0, 1]"),
    (["bench", "simulate", "--warmth-knob", "warm_margin"], "takes NAME=NUMBER"),
    (["bench", "routing", "--topics", "2"], "--topics is a flag of 'bench batch'"),
    (["bench", "batch", "--topics", "2", "--prompts", "w.jsonl"], "--topics draws the synthetic model's own prompts"),
    (["bench", "batch", "--topics", "9"], "--topics 9: "),
])
def test_bench_cli_refuses_flags_of_another_suite(argv: list[str], message: str,
                                                  capsys: pytest.CaptureFixture[str], tiny_model: Path) -> None:
    assert main([*argv, "--model", str(tiny_model)]) == 2
    assert message in capsys.readouterr().err


def test_model_without_topics_needs_a_prompts_file(tmp_path: Path) -> None:
    path = tmp_path / "no-topics.gguf"
    writer = gguf.GGUFWriter(path, "llama")
    writer.add_name("no topics")
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    writer.close()
    with pytest.raises(ValueError, match="pass --prompts FILE.jsonl"):
        workload.for_model(str(path), None, 4, rate=1.0)


def test_static_oracle_floor_shrinks_with_the_budget_and_names_every_domain(traces: simulate.TraceSet) -> None:
    total = int(np.asarray(traces.unit_bytes, dtype=np.int64).sum())
    floors = [simulate.static_oracle_floor(traces, budget) for budget in (0, total // 4, total // 2, total)]
    assert floors[0]["decode_miss_rate"] == 1.0 and floors[-1]["decode_miss_rate"] == 0.0
    rates = [f["decode_miss_rate"] for f in floors]
    assert rates == sorted(rates, reverse=True) and 0 < rates[1] < 1
    assert set(floors[1]["by_domain"]) == {t.turn.domain for t in traces.turns}
    assert floors[1]["n_domains"] == len(floors[1]["by_domain"]) >= 2


def test_simulate_bench_passes_warmth_knobs_to_the_warmth_policy_only(traces: simulate.TraceSet, tmp_path: Path) -> None:
    path = tmp_path / "traces.npz"
    traces.save(path)
    runs = {margin: simulate.run_simulate_bench(None, None, traces_path=str(path), n_nodes=4,
                                                policies=["warmth", "least_loaded"], rate=4.0, progress=False,
                                                warmth_knobs=None if margin is None else {"warm_margin": margin})
            for margin in (None, 0)}
    default, off = runs[None], runs[0]
    assert default["policies"]["warmth"]["decisions"]["warmth"].get("spread", 0) > 0  # new topics spread over idle nodes
    assert "spread" not in off["policies"]["warmth"]["decisions"]["warmth"]  # the rule is off
    assert off["warmth_knobs"] == {"warm_margin": 0} and "--warmth-knob warm_margin=0" in off["command"]
    assert off["policies"]["least_loaded"]["hit_rate"] == default["policies"]["least_loaded"]["hit_rate"]  # untouched


def test_live_bench_on_a_foreign_model_with_a_node_killed_mid_run_loses_nothing(tmp_path: Path,
                                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    """``bench routing`` as an evaluator runs it: a model of an architecture the project never
    wrote (deepseek, dense first layer, shared experts), English multi-turn prompts from a JSONL
    file, one policy on a live 3-node cluster, and the last node's process killed 1 s in."""
    model = write_foreign_model(tmp_path / "deepseek.gguf", "deepseek")
    turns = ["Tell me about the weather in the mountains.", "And what about the coast?", "Thank you, one more thing."]
    prompts = _write_lines(tmp_path / "prompts.jsonl", [json.dumps({"prompt": turns[i % 3], "session": f"c{i // 3}"})
                                                        for i in range(12)])
    out = tmp_path / "report"
    argv = ["bench", "routing", "--model", str(model), "--prompts", str(prompts), "--policies", "warmth",
            "--rate", "4", "--max-tokens", "48", "--kill-node-after", "1", "--quick", "--out", str(out), "--json"]
    assert main(argv) == 0
    result = json.loads(capsys.readouterr().out)  # stdout holds the JSON alone, whatever Ray prints
    warmth = result["policies"]["warmth"]
    assert warmth["errors"] == 0, warmth["error_examples"]
    assert warmth["n_requests"] == 12 and warmth["generated_tokens"] > 0
    assert result["model"]["arch"] == "deepseek" and result["workload"]["n_conversations"] == 4
    crash = warmth["node_crash"]
    assert crash["node"] == "sniper-node-2" and crash["killed"] and crash["back_after_s"] is not None
    assert "--kill-node-after 1" in result["command"]
    report = (out / "routing.md").read_text()
    assert "Failure injected (`--kill-node-after 1`)" in report and "| warmth | True |" in report
