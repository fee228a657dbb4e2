"""The OpenAI wire format (cluster.openai_api) and the metrics exposition, without a server."""

from __future__ import annotations

import pytest
from prometheus_client.parser import text_string_to_metric_families

from cluster.errors import InvalidParameterError, PromptTooLongError
from cluster.metrics import GatewayMetrics
from cluster.node import NodeFailedError, NoNodesError, OverloadedError
from cluster.openai_api import APIError, Limits, chat_prompt, chunk, error_from_exception, parse_chat, parse_completion, response

LIMITS = Limits(max_tokens=64, default_max_tokens=16)


def completion(**fields):
    return parse_completion({"model": "m", "prompt": "hello", **fields}, LIMITS, "m")


def test_completion_defaults_and_fields():
    gen = completion(max_tokens=5, temperature=0, top_p=0.5, seed=3, stop=["\n"], user="u1")
    assert (gen.prompt, gen.max_tokens, gen.temperature, gen.top_p, gen.seed, gen.stop, gen.session_id) == \
        ("hello", 5, 0.0, 0.5, 3, ("\n",), "u1")
    default = completion()
    assert default.max_tokens == 16 and default.temperature == 1.0 and not default.stream
    assert parse_completion({"model": "m", "prompt": ["one"]}, LIMITS, "m").prompt == "one"


@pytest.mark.parametrize("fields, param", [
    ({"max_tokens": 65}, "max_tokens"), ({"max_tokens": 0}, "max_tokens"), ({"max_tokens": True}, "max_tokens"),
    ({"temperature": -1}, "temperature"), ({"temperature": float("nan")}, "temperature"),
    ({"top_p": 0}, "top_p"), ({"seed": -1}, "seed"), ({"seed": 2**32}, "seed"),
    ({"stop": ["a"] * 5}, "stop"), ({"stop": [""]}, "stop"), ({"stream": "yes"}, "stream"),
    ({"n": 2}, "n"), ({"best_of": 3}, "best_of"), ({"logprobs": 2}, "logprobs"),
    ({"presence_penalty": 0.5}, "presence_penalty"), ({"prompt": ""}, "prompt"), ({"prompt": ["a", "b"]}, "prompt"),
    ({"prompt": 7}, "prompt"), ({"temperatur": 1}, "temperatur"), ({"stream_options": {"include_usage": True}}, "stream_options"),
])
def test_bad_completion_fields_are_400_naming_the_field(fields, param):
    with pytest.raises(APIError) as info:
        completion(**fields)
    assert info.value.status == 400 and info.value.param == param
    assert info.value.body()["error"]["message"]


def test_model_must_be_given_and_served():
    with pytest.raises(APIError) as info:
        parse_completion({"prompt": "x"}, LIMITS, "m")
    assert info.value.status == 400 and info.value.param == "model"
    with pytest.raises(APIError) as info:
        parse_completion({"model": "other", "prompt": "x"}, LIMITS, "m")
    assert info.value.status == 404 and info.value.code == "model_not_found"
    with pytest.raises(APIError):
        parse_completion(["not", "an", "object"], LIMITS, "m")


def test_chat_renders_roles_and_accepts_text_parts():
    messages = [{"role": "system", "content": "be brief"},
                {"role": "user", "content": [{"type": "text", "text": "hi "}, {"type": "text", "text": "there"}]}]
    gen = parse_chat({"model": "m", "messages": messages, "max_completion_tokens": 4, "stream": True,
                      "stream_options": {"include_usage": True}}, LIMITS, "m")
    assert gen.prompt == "system: be brief\nuser: hi there\nassistant:" == chat_prompt(messages)
    assert gen.max_tokens == 4 and gen.stream and gen.include_usage
    for bad in ([], [{"role": "robot", "content": "x"}], [{"role": "user", "content": 3}],
                [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]):
        with pytest.raises(APIError) as info:
            parse_chat({"model": "m", "messages": bad}, LIMITS, "m")
        assert info.value.status == 400
    with pytest.raises(APIError):
        parse_chat({"model": "m", "messages": messages, "max_tokens": 2, "max_completion_tokens": 2}, LIMITS, "m")


def test_limits_are_checked():
    with pytest.raises(InvalidParameterError):
        Limits(max_tokens=0)
    with pytest.raises(InvalidParameterError):
        Limits(max_tokens=8, default_max_tokens=16)


@pytest.mark.parametrize("exc, status, code", [
    (PromptTooLongError("long"), 400, "context_length_exceeded"), (InvalidParameterError("bad"), 400, None),
    (OverloadedError("full"), 429, "overloaded"), (NoNodesError("none"), 503, "no_nodes"),
    (NodeFailedError("died"), 503, "node_failed"), (RuntimeError("boom"), 500, None),
])
def test_errors_map_to_http_statuses(exc, status, code):
    error = error_from_exception(exc)
    assert (error.status, error.code) == (status, code)
    assert "Traceback" not in error.message


def test_response_and_chunks_follow_the_openai_shapes():
    usage = {"prompt_tokens": 3, "completion_tokens": 2, "reused_prompt_tokens": 1}
    gen = completion(echo=True)
    body = response(gen, " world", "length", usage, "sniper-node-0")
    assert body["object"] == "text_completion" and body["id"].startswith("cmpl-")
    assert body["choices"][0]["text"] == "hello world" and body["choices"][0]["finish_reason"] == "length"
    assert body["usage"] == {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}
    chat = parse_chat({"model": "m", "messages": [{"role": "user", "content": "x"}]}, LIMITS, "m")
    first = chunk(chat, "a", first=True)
    assert first["object"] == "chat.completion.chunk" and first["choices"][0]["delta"] == {"role": "assistant", "content": "a"}
    assert chunk(chat, "b")["choices"][0]["delta"] == {"content": "b"}
    last = chunk(chat, None, "stop", node="n")
    assert last["choices"][0]["delta"] == {} and last["choices"][0]["finish_reason"] == "stop"
    assert chunk(chat, usage=usage)["choices"] == [] and chunk(chat, usage=usage)["usage"]["total_tokens"] == 5


def _families(text: bytes) -> dict[str, dict[tuple, float]]:
    out: dict[str, dict[tuple, float]] = {}
    for family in text_string_to_metric_families(text.decode()):
        for sample in family.samples:
            out.setdefault(sample.name, {})[tuple(sorted(sample.labels.items()))] = sample.value
    return out


def test_metrics_exposition_includes_router_status():
    metrics = GatewayMetrics()
    metrics.requests.labels("/v1/completions", "200").inc(3)
    metrics.latency.labels("/v1/completions").observe(0.3)
    status = {"nodes": [{"name": "a", "alive": True, "load": 2, "capacity": 8, "served": 5, "hit_rate": 0.75,
                         "decode_hit_rate": None, "bytes_read": 1024, "generated_tokens": 40, "warm_fraction": 0.5,
                         "resident_bytes": 10, "budget_bytes": 20, "sessions": 1}],
              "decisions": {"warmth:ranked": 4, "warmth:overloaded": 1}, "prediction": {"precision": 0.9, "recall": None},
              "decision_audit": {"n": 4, "served_coverage": 0.8, "best_coverage": 0.85, "mean_coverage": 0.4,
                                 "n_choices": 4, "warmest_share": 0.75}}
    f = _families(metrics.exposition(status))
    assert f["sniper_http_requests_total"][(("endpoint", "/v1/completions"), ("status", "200"))] == 3
    assert f["sniper_request_duration_seconds_count"][(("endpoint", "/v1/completions"),)] == 1
    assert f["sniper_router_up"][()] == 1
    assert f["sniper_node_queue_depth"][(("node", "a"),)] == 2
    assert f["sniper_node_expert_hit_rate"][(("node", "a"),)] == 0.75
    assert f["sniper_node_expert_bytes_read_total"][(("node", "a"),)] == 1024
    assert "sniper_node_expert_decode_hit_rate" not in f  # unknown values are left out, not zero
    assert f["sniper_routing_decisions_total"][(("outcome", "overloaded"), ("policy", "warmth"))] == 1
    assert f["sniper_routing_prediction_precision"][()] == 0.9 and "sniper_routing_prediction_recall" not in f
    assert f["sniper_routing_audit_served_coverage"][()] == 0.8 and f["sniper_routing_audit_warmest_share"][()] == 0.75
    down = _families(metrics.exposition(None))
    assert down["sniper_router_up"][()] == 0 and "sniper_node_queue_depth" not in down
