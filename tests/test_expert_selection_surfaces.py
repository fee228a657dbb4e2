"""Cache-aware expert selection on every user surface: run's and serve's flags, build_app's
arguments, the nodes' config, and the changed selections each response counts (``Usage``, the
OpenAI ``usage`` body). No Ray cluster: a node is driven as ``NodeServer``."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cluster.api.gateway import build_app, expert_selection_arg
from cluster.api.openai_api import Limits, parse_chat, parse_completion
from cluster.api.openai_responses import StreamChunks, response, usage_body
from cluster.cli.main import main
from cluster.cli.parser import build_parser, expert_selection_from_flags
from cluster.distributed.client import Choice
from cluster.distributed.deploy import check_deployment
from cluster.distributed.node import NodeConfig, NodeServer
from cluster.distributed.protocol import ChoiceEnd, Finished, NodeRequest, Usage
from cluster.engine.engine_config import EngineConfig
from cluster.engine.expert_selection import ExpertSelection
from cluster.engine.sampling import SamplingParams
from cluster.errors import InvalidParameterError

CACHE_AWARE = ExpertSelection("cache-aware", 0.3, 0.25)


# -- command line ----------------------------------------------------------------------------

@pytest.mark.parametrize("command", [["run", "--prompt", "x"], ["serve"]])
def test_run_and_serve_default_to_exact_selection_and_take_the_bounds(command: list[str]) -> None:
    parser = build_parser()
    assert expert_selection_from_flags(parser.parse_args(command)) == ExpertSelection()
    args = parser.parse_args(command + ["--expert-selection", "cache-aware", "--selection-max-weight", "0.3",
                                        "--selection-min-ratio", "0.25"])
    assert expert_selection_from_flags(args) == CACHE_AWARE
    edges = parser.parse_args(command + ["--selection-max-weight", "0", "--selection-min-ratio", "1"])
    assert (edges.selection_max_weight, edges.selection_min_ratio) == (0.0, 1.0)


@pytest.mark.parametrize("flags, message", [
    (["--expert-selection", "approximate"], "argument --expert-selection: invalid choice: 'approximate'"),
    (["--selection-max-weight", "1.5"], "argument --selection-max-weight: expected a number in [0, 1], got 1.5"),
    (["--selection-max-weight", "-0.1"], "argument --selection-max-weight: expected a number in [0, 1], got -0.1"),
    (["--selection-min-ratio", "half"], "argument --selection-min-ratio: expected a number in [0, 1], got 'half'"),
    (["--selection-min-ratio", "nan"], "argument --selection-min-ratio: expected a number in [0, 1], got nan"),
])
@pytest.mark.parametrize("command", [["run", "--prompt", "x"], ["serve"]])
def test_a_bad_selection_flag_is_one_line_and_exit_status_2(command: list[str], flags: list[str], message: str,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        build_parser().parse_args(command + flags)
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"error: {message}"), err


def test_help_says_cache_aware_changes_the_output_and_where_its_cost_is(capsys: pytest.CaptureFixture[str],
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COLUMNS", "1000")  # no line breaks inside words ("bit-", "identical")
    for command in ("run", "serve"):
        with pytest.raises(SystemExit):
            build_parser().parse_args([command, "--help"])
        text = " ".join(capsys.readouterr().out.split())
        assert "changes the model's output within its bounds" in text and "docs/quality.md" in text, text
        assert "bit-identical to llama.cpp" in text


@pytest.mark.parametrize("command", [["run", "--prompt", "x"], ["serve"]])
def test_cache_aware_without_a_cache_is_refused_before_anything_starts(
        command: list[str], tiny_model: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc = main(command + ["--model", str(tiny_model), "--no-cache", "--expert-selection", "cache-aware"])
    err = capsys.readouterr().err
    assert rc == 2
    assert err.startswith("error: --expert-selection: cache-aware expert selection needs the expert cache"), err
    assert err.count("\n") == 1 and "Traceback" not in err


def test_run_json_says_the_selection_and_counts_its_changes(qwen_model: Path, capsys: pytest.CaptureFixture[str]) -> None:
    common = ["run", "--model", str(qwen_model), "--prompt", "hello world", "--max-tokens", "6", "--threads", "1",
              "--cache-mb", "1", "--json"]
    assert main(common) == 0
    exact = json.loads(capsys.readouterr().out)
    assert exact["expert_selection"] == {"mode": "exact", "max_changed_weight": ExpertSelection().max_changed_weight,
                                          "min_score_ratio": ExpertSelection().min_score_ratio}
    assert exact["selections_changed"] is None and exact["selections_skipped"] is None
    assert main(common + ["--expert-selection", "cache-aware", "--selection-max-weight", "0.3",
                          "--selection-min-ratio", "0.25", "--n", "2", "--temperature", "1", "--seed", "1"]) == 0
    aware = json.loads(capsys.readouterr().out)
    assert aware["expert_selection"] == {"mode": "cache-aware", "max_changed_weight": 0.3, "min_score_ratio": 0.25}
    changed, skipped = aware["selections_changed"], aware["selections_skipped"]
    assert isinstance(changed, int) and isinstance(skipped, int) and 0 <= skipped <= changed, aware


# -- build_app ---------------------------------------------------------------------------------

def test_build_app_reads_the_selection_from_a_serve_configs_values() -> None:
    assert expert_selection_arg({}) == ExpertSelection()
    assert expert_selection_arg({"expert_selection": "cache-aware", "selection_max_weight": "0.3",
                                 "selection_min_ratio": 0.25}) == CACHE_AWARE
    assert expert_selection_arg({"expert_selection": "exact", "selection_max_weight": 1}).max_changed_weight == 1


@pytest.mark.parametrize("args, param, message", [
    ({"expert_selection": "cache_aware"}, "expert_selection", "expert_selection: expert selection must be one of"),
    ({"expert_selection": 1}, "expert_selection", "must be one of exact, cache-aware"),
    ({"selection_max_weight": "lots"}, "selection_max_weight",
     "selection_max_weight: max_changed_weight must be a number in [0, 1], got 'lots'"),
    ({"selection_max_weight": 1.5}, "selection_max_weight", "got 1.5"),
    ({"selection_max_weight": True}, "selection_max_weight", "got True"),
    ({"selection_min_ratio": "-1"}, "selection_min_ratio",
     "selection_min_ratio: min_score_ratio must be a number in [0, 1], got -1.0"),
])
def test_build_app_refuses_a_bad_selection_naming_its_argument(tiny_model: Path, args: dict, param: str,
                                                               message: str) -> None:
    with pytest.raises(InvalidParameterError) as info:
        build_app({"model": str(tiny_model), **args})  # refused before anything is deployed
    assert info.value.param == param and message in str(info.value), str(info.value)


@pytest.mark.parametrize("name", ["expert_selection", "selection_max_weight", "selection_min_ratio"])
def test_build_app_takes_a_selection_only_for_the_deployment_it_creates(name: str) -> None:
    with pytest.raises(InvalidParameterError, match=f"{name} is a setting of the deployment build_app creates"):
        build_app({name: "0.5"})


# -- the nodes' config -------------------------------------------------------------------------

def test_a_nodes_engine_carries_the_selection_and_a_deployment_checks_it(tiny_model: Path) -> None:
    assert NodeConfig.create(str(tiny_model)).engine.expert_selection == ExpertSelection()
    config = NodeConfig.create(str(tiny_model), cache_bytes="auto", expert_selection=CACHE_AWARE)
    assert config.engine.expert_selection == CACHE_AWARE
    config.validate()
    checked = check_deployment(str(tiny_model), cache_bytes=1 << 20, expert_selection=CACHE_AWARE)
    assert checked.engine.expert_selection == CACHE_AWARE
    with pytest.raises(InvalidParameterError, match="needs the expert cache") as info:
        check_deployment(str(tiny_model), cache_bytes=None, expert_selection=CACHE_AWARE)
    assert info.value.param == "expert_selection"
    with pytest.raises(InvalidParameterError, match="min_score_ratio must be a number in"):
        NodeConfig.create(str(tiny_model), cache_bytes=1 << 20,
                          expert_selection=ExpertSelection("cache-aware", 0.2, 2.0)).validate()


def test_the_engine_refuses_cache_aware_selection_without_a_cache() -> None:
    EngineConfig("/nonexistent/model.gguf", None).validate()  # exact: with or without a cache
    EngineConfig("/nonexistent/model.gguf", "auto", expert_selection=CACHE_AWARE).validate()
    with pytest.raises(InvalidParameterError, match="needs the expert cache") as info:
        EngineConfig("/nonexistent/model.gguf", None, expert_selection=CACHE_AWARE).validate()
    assert info.value.param == "expert_selection"


# -- usage -------------------------------------------------------------------------------------

LIMITS = Limits(max_tokens=64, max_prompt_tokens=512)
OPENAI_USAGE = {"prompt_tokens", "completion_tokens", "total_tokens"}


def test_usage_body_keeps_openais_shape_for_exact_selection_and_counts_changes_for_cache_aware() -> None:
    assert usage_body(Usage(3, 2)) == {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}
    aware = usage_body(Usage(3, 2, selections_changed=7, selections_skipped=0))
    assert aware == {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5, "expert_selections_changed": 7,
                     "expert_selections_skipped": 0}  # 0 is a count, not an absence
    req = parse_completion({"model": "m", "prompt": "x"}, LIMITS, "m")
    assert response(req, [Choice(0, "y", "stop")], Usage(1, 1, selections_changed=4, selections_skipped=1),
                    "n")["usage"]["expert_selections_skipped"] == 1
    stream_req = parse_chat({"model": "m", "messages": [{"role": "user", "content": "x"}], "stream": True,
                             "stream_options": {"include_usage": True}}, LIMITS, "m")
    for usage, extra in ((Usage(1, 1), set()),
                         (Usage(1, 1, 2, selections_changed=5, selections_skipped=2),
                          {"expert_selections_changed", "expert_selections_skipped"})):
        stream = StreamChunks(stream_req)
        stream.piece(0, "y")
        last = stream.end(Finished("n", (ChoiceEnd(0, "stop", 1),), usage))[-1]
        assert last["choices"] == [] and set(last["usage"]) == OPENAI_USAGE | extra, last


def test_a_cache_aware_node_counts_its_changed_selections_in_each_requests_usage(qwen_model: Path) -> None:
    """Through a node (engine, sequences, Finished) into the usage body: counts over both choices,
    non-negative integers (how many depends on the cache, not asserted), none on an exact node."""
    for selection in (CACHE_AWARE, ExpertSelection()):
        server = NodeServer("sniper-node-0", NodeConfig.create(str(qwen_model), cache_bytes=1 << 20, n_ctx=256,
                                                               n_threads=1, heartbeat_s=60.0,
                                                               expert_selection=selection))
        try:
            tokens = tuple(server.engine.tokenize("hello world"))
            done = list(server.stream(NodeRequest("r", tokens, SamplingParams(max_tokens=6, n=2, temperature=1.0,
                                                                              seed=3))))[-1]
        finally:
            server.close()
        assert isinstance(done, Finished), done
        body = usage_body(done.usage)
        if selection.cache_aware:
            changed, skipped = body["expert_selections_changed"], body["expert_selections_skipped"]
            assert type(changed) is int and type(skipped) is int and 0 <= skipped <= changed, body
        else:
            assert done.usage.selections_changed is None and done.usage.selections_skipped is None
            assert set(body) == OPENAI_USAGE
