"""The OpenAI wire format (cluster.api.openai_api) and the metrics exposition, without a server."""

from __future__ import annotations

from dataclasses import replace

import pytest
from prometheus_client.parser import text_string_to_metric_families

from cluster.engine.chat import ChatMessage, ChatPrompt, ToolCall
from cluster.distributed.client import Choice
from cluster.errors import (
    ChatTemplateError,
    InvalidParameterError,
    NodeFailedError,
    NoNodesError,
    OverloadedError,
    PromptTooLongError,
)
from cluster.api.metrics import GatewayMetrics
from cluster.api.openai_api import (
    APIError,
    Limits,
    error_from_exception,
    parse_chat,
    parse_completion,
    parse_detokenize,
    parse_tokenize,
)
from cluster.api.openai_responses import StreamChunks, chunk, response
from cluster.distributed.protocol import ChoiceEnd, Finished, Usage
from cluster.engine.sampling import TokenLogprob, TopLogprob

LIMITS = Limits(max_tokens=64, default_max_tokens=16)


def completion(**fields):
    return parse_completion({"model": "m", "prompt": "hello", **fields}, LIMITS, "m")


def chat(**fields):
    return parse_chat({"model": "m", "messages": [{"role": "user", "content": "x"}], **fields}, LIMITS, "m")


def test_completion_defaults_and_fields():
    gen = completion(max_tokens=5, temperature=0, top_p=0.5, seed=3, stop=["\n"], user="u1")
    p = gen.params
    assert (gen.prompt, p.max_tokens, p.temperature, p.top_p, p.seed, p.stop, gen.session_id) == \
        ("hello", 5, 0.0, 0.5, 3, ("\n",), "u1")
    default = completion()
    assert default.params.max_tokens == 16 and default.params.temperature == 1.0 and not default.stream
    assert completion(stop="pumane").params.stop == ("pumane",)  # one stop string, not six characters
    assert parse_completion({"model": "m", "prompt": ["one"]}, LIMITS, "m").prompt == "one"


def test_sampling_fields_map_onto_sampling_params():
    p = completion(top_k=5, min_p=0.1, repetition_penalty=1.3, repeat_last_n=32, presence_penalty=0.5,
                   frequency_penalty=-0.5, logit_bias={"17": -100, "3": 2}, n=2, logprobs=3, seed=9).params
    assert (p.top_k, p.min_p, p.repeat_penalty, p.penalty_last_n, p.presence_penalty, p.frequency_penalty) == \
        (5, 0.1, 1.3, 32, 0.5, -0.5)
    assert (p.logit_bias, p.n, p.logprobs, p.top_logprobs, p.seed) == (((3, 2), (17, -100)), 2, True, 3, 9)
    c = chat(max_completion_tokens=7, logprobs=True, top_logprobs=4, repeat_penalty=1.1).params
    assert (c.max_tokens, c.logprobs, c.top_logprobs, c.repeat_penalty) == (7, True, 4, 1.1)
    assert completion().params.seed != completion().params.seed  # no seed: a fresh one per request
    assert "root ::=" in chat(response_format={"type": "json_object"}).params.grammar
    schema = {"type": "object", "properties": {"w": {"enum": ["kalo", "meni"]}}, "required": ["w"]}
    grammar = chat(response_format={"type": "json_schema", "json_schema": {"name": "w", "schema": schema}}).params.grammar
    assert '"\\"kalo\\""' in grammar and chat(response_format={"type": "text"}).params.grammar is None


@pytest.mark.parametrize("fields, param", [
    ({"max_tokens": 65}, "max_tokens"), ({"max_tokens": 0}, "max_tokens"), ({"max_tokens": True}, "max_tokens"),
    ({"temperature": -1}, "temperature"), ({"temperature": float("nan")}, "temperature"),
    ({"top_p": 0}, "top_p"), ({"seed": -1}, "seed"), ({"seed": 2**32}, "seed"),
    ({"stop": ["a"] * 5}, "stop"), ({"stop": [""]}, "stop"), ({"stream": "yes"}, "stream"),
    ({"n": 0}, "n"), ({"n": 17}, "n"), ({"best_of": 3}, "best_of"), ({"logprobs": 21}, "logprobs"),
    ({"logprobs": True}, "logprobs"), ({"logprobs": 2, "echo": True}, "echo"), ({"suffix": "x"}, "suffix"),
    ({"presence_penalty": 2.5}, "presence_penalty"), ({"frequency_penalty": "x"}, "frequency_penalty"),
    ({"top_k": -1}, "top_k"), ({"min_p": 2}, "min_p"), ({"repeat_penalty": 0}, "repeat_penalty"),
    ({"repetition_penalty": 11}, "repetition_penalty"), ({"repeat_penalty": 1.1, "repetition_penalty": 1.1}, "repetition_penalty"),
    ({"logit_bias": {"5": 101}}, "logit_bias"), ({"logit_bias": {"abc": 1}}, "logit_bias"), ({"logit_bias": [1]}, "logit_bias"),
    ({"prompt": ""}, "prompt"), ({"prompt": ["a", "b"]}, "prompt"), ({"grammar": ""}, "grammar"),
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


def test_chat_messages_become_a_chat_prompt_and_accept_text_parts_tools_and_tool_results():
    messages = [{"role": "developer", "content": "be brief"},
                {"role": "user", "content": [{"type": "text", "text": "hi "}, {"type": "text", "text": "there"}]},
                {"role": "assistant", "content": None,
                 "tool_calls": [{"id": "call_1", "type": "function", "function": {"name": "f", "arguments": "{\"a\": 1}"}}]},
                {"role": "tool", "tool_call_id": "call_1", "content": "2"}]
    gen = parse_chat({"model": "m", "messages": messages, "max_completion_tokens": 4, "stream": True,
                      "stream_options": {"include_usage": True}}, LIMITS, "m")
    assert gen.prompt == ChatPrompt((ChatMessage("system", "be brief"), ChatMessage("user", "hi there"),
                                     ChatMessage("assistant", None, tool_calls=(ToolCall("call_1", "f", '{"a": 1}'),)),
                                     ChatMessage("tool", "2", tool_call_id="call_1")))
    assert gen.params.max_tokens == 4 and gen.stream and gen.include_usage and not gen.parse_tools
    for bad, param in (([], "messages"), ([{"role": "robot", "content": "x"}], "messages[0].role"),
                       ([{"role": "user", "content": 3}], "messages[0].content"),
                       ([{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}], "messages[0].content"),
                       ([{"role": "tool", "content": "x"}], "messages[0].tool_call_id"),
                       ([{"role": "user", "content": "x", "audio": {}}], "messages[0].audio"),
                       ([{"role": "assistant", "content": None, "tool_calls": [{"function": {"name": "f", "arguments": "{"}}]}],
                        "messages[0].tool_calls[0].function.arguments")):
        with pytest.raises(APIError) as info:
            parse_chat({"model": "m", "messages": bad}, LIMITS, "m")
        assert info.value.status == 400 and info.value.param == param, (bad, info.value.message)
    with pytest.raises(APIError):
        parse_chat({"model": "m", "messages": messages, "max_tokens": 2, "max_completion_tokens": 2}, LIMITS, "m")


TOOLS = [{"type": "function", "function": {"name": "lookup", "parameters": {"type": "object", "properties": {
    "word": {"type": "string", "maxLength": 8}}, "required": ["word"]}}},
    {"type": "function", "function": {"name": "count", "description": "count things"}}]


def test_tools_and_tool_choice():
    auto = chat(tools=TOOLS)
    assert auto.parse_tools and len(auto.prompt.tools) == 2 and auto.params.grammar is None
    named = chat(tools=TOOLS, tool_choice={"type": "function", "function": {"name": "count"}})
    assert "count" in named.params.grammar and "lookup" not in named.params.grammar
    required = chat(tools=TOOLS, tool_choice="required")
    assert "count" in required.params.grammar and "lookup" in required.params.grammar
    none = chat(tools=TOOLS, tool_choice="none")
    assert not none.parse_tools and none.prompt.tools == ()
    for fields, param in (({"tool_choice": "auto"}, "tool_choice"), ({"tools": []}, "tools"),
                          ({"tools": [{"type": "retrieval"}]}, "tools[0]"),
                          ({"tools": TOOLS + [TOOLS[0]]}, "tools[2].function.name"),
                          ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
                          ({"tools": TOOLS, "tool_choice": "always"}, "tool_choice"),
                          ({"tools": TOOLS, "tool_choice": "required", "response_format": {"type": "json_object"}}, "tool_choice"),
                          ({"tools": TOOLS, "parallel_tool_calls": "yes"}, "parallel_tool_calls")):
        with pytest.raises(APIError) as info:
            chat(**fields)
        assert info.value.status == 400 and info.value.param == param, (fields, info.value.message)


@pytest.mark.parametrize("name", ['say "hi"', "look up", "", "x" * 65, "naïve", 7])
def test_a_tool_name_outside_openais_rule_is_a_400_naming_the_field_and_the_rule(name):
    tools = [TOOLS[0], {"type": "function", "function": {"name": name}}]
    with pytest.raises(APIError) as info:
        chat(tools=tools, tool_choice="required")
    assert info.value.status == 400 and info.value.param == "tools[1].function.name"
    assert info.value.message.startswith("tools[1].function.name must match ^[a-zA-Z0-9_-]{1,64}$")
    assert chat(tools=[{"type": "function", "function": {"name": "A-z_09" + "x" * 58}}]).parse_tools


@pytest.mark.parametrize("fields, param", [
    ({"response_format": {"type": "xml"}}, "response_format"),
    ({"response_format": {"type": "json_schema", "json_schema": {"schema": {}}}}, "response_format"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object"}}},
      "grammar": "root ::= \"a\""}, "grammar"),
    ({"logprobs": True, "top_logprobs": 21}, "top_logprobs"), ({"top_logprobs": 2}, "top_logprobs"),
    ({"logprobs": "yes"}, "logprobs"), ({"max_completion_tokens": 65}, "max_completion_tokens"),
    ({"store": True}, "store"), ({"service_tier": "flex"}, "service_tier"), ({"functions": []}, "functions"),
])
def test_bad_chat_fields_are_400_naming_the_field(fields, param):
    with pytest.raises(APIError) as info:
        chat(**fields)
    assert info.value.status == 400 and info.value.param == param, info.value.message


def test_limits_are_checked():
    with pytest.raises(InvalidParameterError):
        Limits(max_tokens=0)
    with pytest.raises(InvalidParameterError):
        Limits(max_tokens=8, default_max_tokens=16)


@pytest.mark.parametrize("exc, status, code", [
    (PromptTooLongError("long"), 400, "context_length_exceeded"), (InvalidParameterError("bad"), 400, None),
    (ChatTemplateError("the model chat template refused the conversation: no", param="messages"), 400, None),
    (OverloadedError("full"), 429, "overloaded"), (NoNodesError("none"), 503, "no_nodes"),
    (NodeFailedError("died"), 503, "node_failed"), (RuntimeError("boom"), 500, None),
])
def test_errors_map_to_http_statuses(exc, status, code):
    error = error_from_exception(exc)
    assert (error.status, error.code) == (status, code)
    assert "Traceback" not in error.message
    assert error.param == getattr(exc, "param", error.param)
    if status == 500:  # an unexpected error's text (a Ray error's names and ids) stays in the log
        assert "boom" not in error.message and "RuntimeError" not in error.message


def _entry(token: int, text: str, logprob: float, offset: int) -> TokenLogprob:
    return TokenLogprob(token, text.encode(), logprob, offset, (TopLogprob(token, text.encode(), logprob, text),
                                                                 TopLogprob(99, b"\xe2", -3.0, "")), text)


def _finished(usage: Usage, *ends: tuple[str, int]) -> Finished:
    return Finished("n", tuple(ChoiceEnd(i, reason, n) for i, (reason, n) in enumerate(ends)), usage)


def test_response_and_chunks_follow_the_openai_shapes():
    usage = Usage(prompt_tokens=3, completion_tokens=2, reused_prompt_tokens=1)
    gen = completion(echo=True)
    body = response(gen, [Choice(0, " world", "length")], usage, "sniper-node-0")
    assert body["object"] == "text_completion" and body["id"].startswith("cmpl-")
    assert body["choices"][0]["text"] == "hello world" and body["choices"][0]["finish_reason"] == "length"
    assert body["usage"] == {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}
    c = chat(stream=True, stream_options={"include_usage": True})
    stream = StreamChunks(c)
    first, second = stream.piece(0, "a"), stream.piece(0, "b")
    assert first[0]["object"] == "chat.completion.chunk"
    assert first[0]["choices"][0]["delta"] == {"role": "assistant", "content": "a"}
    assert second[0]["choices"][0]["delta"] == {"content": "b"}
    last, usage_chunk = stream.end(_finished(usage, ("stop", 2)))
    assert last["choices"][0]["delta"] == {} and last["choices"][0]["finish_reason"] == "stop"
    assert last["system_fingerprint"] == "n"
    assert usage_chunk["choices"] == [] and usage_chunk["usage"]["total_tokens"] == 5
    assert chunk(c, [], usage=usage)["usage"]["total_tokens"] == 5


def test_n_choices_and_logprobs_in_both_endpoints_shapes():
    entries = (_entry(5, " hi", -0.5, 0), _entry(6, " yo", -1.5, 3))
    comp = completion(n=2, logprobs=1)
    body = response(comp, [Choice(1, " b", "length"), Choice(0, " hi yo", "stop", entries)],
                    Usage(prompt_tokens=1, completion_tokens=3), "n")
    assert [c["index"] for c in body["choices"]] == [0, 1]
    assert body["choices"][0]["logprobs"] == {"tokens": [" hi", " yo"], "token_logprobs": [-0.5, -1.5],
                                              "top_logprobs": [{" hi": -0.5, "": -3.0}, {" yo": -1.5, "": -3.0}],
                                              "text_offset": [0, 3]}
    c = chat(logprobs=True, top_logprobs=1)
    content = response(c, [Choice(0, " hi yo", "stop", entries)], Usage(0, 0), "n")["choices"][0]["logprobs"]["content"]
    assert content[0] == {"token": " hi", "logprob": -0.5, "bytes": [32, 104, 105],
                          "top_logprobs": [{"token": " hi", "logprob": -0.5, "bytes": [32, 104, 105]},
                                           {"token": "", "logprob": -3.0, "bytes": [226]}]}
    stream = StreamChunks(chat(n=2, logprobs=True, stream=True))
    out = stream.piece(1, " yo", entries[1:]) + stream.piece(0, " hi", entries[:1])
    assert [o["choices"][0]["index"] for o in out] == [1, 0]
    assert all(o["choices"][0]["delta"]["role"] == "assistant" for o in out)  # each choice's first chunk
    assert out[0]["choices"][0]["logprobs"]["content"][0]["token"] == " yo"
    ends = stream.end(_finished(Usage(0, 0), ("stop", 1), ("length", 1)))
    assert [(e["choices"][0]["index"], e["choices"][0]["finish_reason"]) for e in ends] == [(0, "stop"), (1, "length")]


def test_logprob_tokens_put_together_are_the_answer_with_split_and_invalid_utf8_and_bytes_are_raw(tiny_model):
    """Byte tokens of the synthetic vocabulary, through a node (engine, sequence, pieces) into both
    endpoints' shapes: 0xC3 0xA9 (é split over two tokens), a lone 0x80 or 0xC3 (U+FFFD), "a"."""
    from cluster.distributed.node import NodeConfig, NodeServer
    from cluster.distributed.protocol import NodeRequest, Piece

    server = NodeServer("sniper-node-0", NodeConfig.create(str(tiny_model), cache_bytes=None, n_ctx=256, n_threads=1,
                                                    heartbeat_s=60.0))
    try:
        tokenizer = server.engine.tokenizer
        byte_token = {}
        for token in range(tokenizer.n_vocab):
            piece = tokenizer.piece(token)
            if len(piece) == 1:
                byte_token.setdefault(piece[0], token)
        bias = {byte_token[b]: 100 for b in (0xC3, 0xA9, 0x80, ord("a"))}  # these bytes only, drawn at random
        seen: set[str] = set()
        for seed, stop in [(s, ()) for s in (0, 5, 10)] + [(s, ("a",)) for s in (1, 4, 10)]:
            fields = {"max_tokens": 12, "temperature": 1.0, "seed": seed, "logit_bias": bias, "stop": list(stop)}
            comp = completion(logprobs=3, **fields)
            items = list(server.stream(NodeRequest(f"r{seed}{stop}", tuple(server.engine.tokenize(" x")), comp.params)))
            pieces, done = [i for i in items if isinstance(i, Piece)], items[-1]
            text, entries = "".join(p.text for p in pieces), tuple(e for p in pieces for e in p.logprobs)
            legacy = response(comp, [Choice(0, text, done.finish_reason, entries)], done.usage, "n")["choices"][0]
            assert "".join(legacy["logprobs"]["tokens"]) == legacy["text"] == text, (seed, stop, legacy)
            chat_req = chat(logprobs=True, top_logprobs=3, **fields)
            body = response(chat_req, [Choice(0, text, done.finish_reason, entries)], done.usage, "n")["choices"][0]
            content = body["logprobs"]["content"]
            assert "".join(c["token"] for c in content) == body["message"]["content"] == text, (seed, stop, content)
            assert [bytes(c["bytes"]) for c in content] == [tokenizer.piece(e.token) for e in entries]
            for c in content[:-1]:  # an alternative shows the text it would have added there: the chosen one's own
                assert all(t["token"] == c["token"] for t in c["top_logprobs"] if t["bytes"] == c["bytes"]), c
            stream = StreamChunks(replace(chat_req, stream=True))
            chunks = [c for p in pieces for c in stream.piece(0, p.text, p.logprobs)] + stream.end(done)
            streamed = [c["choices"][0] for c in chunks]
            assert "".join(c["delta"].get("content", "") for c in streamed) == text
            assert "".join(t["token"] for c in streamed if c["logprobs"] for t in c["logprobs"]["content"]) == text
            raw = b"".join(tokenizer.piece(e.token) for e in entries)
            if b"\xc3\xa9" in raw and "é" in text:
                seen.add("split")
            if "\ufffd" in text:
                seen.add("invalid")
            if done.finish_reason == "length" and raw.endswith(b"\xc3"):
                seen.add("cut mid-character")
            if stop and entries and not entries[-1].text.endswith("a") and raw.endswith(b"a"):
                seen.add("stop inside a token")  # "\ufffda" (a lone 0xC3, then "a") cut before its "a"
        assert seen == {"split", "invalid", "cut mid-character", "stop inside a token"}, seen
    finally:
        server.close()


CALL = '<tool_call>\n{"name": "lookup", "arguments": {"word": "kalo"}}\n</tool_call>'


def test_tool_calls_come_back_as_tool_calls_whole_and_streamed():
    req = chat(tools=TOOLS)
    message = response(req, [Choice(0, "Sure.\n" + CALL, "stop")], Usage(0, 0), "n")["choices"][0]
    assert message["finish_reason"] == "tool_calls" and message["message"]["content"] == "Sure."
    (call,) = message["message"]["tool_calls"]
    assert call["type"] == "function" and call["id"].startswith("call_")
    assert call["function"] == {"name": "lookup", "arguments": '{"word": "kalo"}'}
    assert response(chat(), [Choice(0, CALL, "stop")], Usage(0, 0), "n")["choices"][0]["message"]["content"] == CALL
    stream = StreamChunks(chat(tools=TOOLS, stream=True))
    out = [c for i in range(0, len(CALL), 7) for c in stream.piece(0, CALL[i:i + 7])]
    out += stream.end(_finished(Usage(0, 0), ("stop", 1)))
    deltas = [c["choices"][0]["delta"] for c in out]
    assert deltas[0]["role"] == "assistant" and "content" not in deltas[0]
    assert deltas[0]["tool_calls"][0]["function"] == {"name": "lookup", "arguments": ""} and deltas[0]["tool_calls"][0]["id"]
    assert deltas[1]["tool_calls"] == [{"index": 0, "function": {"arguments": '{"word": "kalo"}'}}]
    assert out[-1]["choices"][0]["finish_reason"] == "tool_calls" and len(out) == 3


def test_tokenizer_endpoint_bodies():
    assert parse_tokenize({"content": "hi", "with_pieces": True}).with_pieces
    assert parse_tokenize({"content": "hi"}).parse_special and not parse_tokenize({"content": "hi"}).add_special
    assert parse_detokenize({"tokens": [1, 2]}) == [1, 2]
    for bad, param in (({"content": 3}, "content"), ({"content": "x", "add_special": 1}, "add_special"),
                       ({"content": "x", "extra": 1}, "extra")):
        with pytest.raises(APIError) as info:
            parse_tokenize(bad)
        assert info.value.param == param
    with pytest.raises(APIError, match="'tokens'"):
        parse_detokenize({"tokens": ["a"]})


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
    from cluster.distributed.status import NodeStatus, PredictionScore, RouterStatus
    from cluster.routing.base import PolicyState
    from cluster.routing.decision_audit import AuditSummary

    node = NodeStatus(name="a", alive=True, load=2, capacity=8, served=5, hit_rate=0.75, decode_hit_rate=None,
                      bytes_read=1024, generated_tokens=40, warm_fraction=0.5, resident_bytes=10, budget_bytes=20,
                      sessions=1)
    status = RouterStatus(
        model="m", pid=1, n_routes=5, route_s=0.01, policy="warmth", started_at=0.0, nodes=(node,),
        decisions={("warmth", "ranked"): 4, ("warmth", "overloaded"): 1},
        prediction=PredictionScore(n=4, precision=0.9, recall=None),
        decision_audit=AuditSummary(n=4, served_coverage=0.8, best_coverage=0.85, mean_coverage=0.4, n_choices=4,
                                    warmest_share=0.75),
        policy_state=PolicyState(warmth_weight=0.25, warmth_separation=0.025, warmth_audits=40))
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
    assert f["sniper_routing_warmth_weight"][()] == 0.25 and f["sniper_routing_warmth_separation"][()] == 0.025
    down = _families(metrics.exposition(None))
    assert down["sniper_router_up"][()] == 0 and "sniper_node_queue_depth" not in down
