"""Tool calls (cluster.api.tool_calls): the JSON of one call read by the rule every format shares, and
Hermes-style answers taken apart whole and streamed by the formats' parser (cluster.api.formats)."""

from __future__ import annotations

import json

import pytest

from cluster.api.formats.answer import AnswerStream, parse_answer
from cluster.api.tool_calls import ParsedCall, is_function_name, parse_call
from cluster.engine.chat_format import format_named

ANSWER = ('Let me look.\n<tool_call>\n{"name": "lookup", "arguments": {"word": "kalo"}}\n</tool_call>\n'
          '<tool_call>\n{"name": "count", "arguments": "{\\"n\\": 2}"}\n</tool_call>')
HERMES = format_named("hermes")
TOOLS = [{"type": "function", "function": {"name": name, "parameters": {"type": "object"}}} for name in ("lookup", "count")]


def test_a_call_is_an_object_with_a_name_and_object_arguments_possibly_serialised():
    call = parse_call('{"name": "count", "arguments": "{\\"n\\": 2}"}')
    assert call is not None and call.name == "count" and json.loads(call.arguments) == {"n": 2}
    assert parse_call('{"name": "f", "parameters": {"a": 1}}').arguments == '{"a": 1}'
    for body in ("not json", '{"arguments": {}}', '{"name": "", "arguments": {}}', '{"name": "f", "arguments": [1]}',
                 '{"name": "f", "arguments": "not json"}', "[1, 2]"):
        assert parse_call(body) is None, body
    assert is_function_name("get_weather-2") and not is_function_name("a b") and not is_function_name("x" * 65)


def test_a_hermes_answer_gives_every_call_and_keeps_the_text():
    parsed = parse_answer(ANSWER, HERMES, TOOLS)
    assert parsed.content == "Let me look.\n\n"
    assert [(c.name, json.loads(c.arguments)) for c in parsed.calls] == [("lookup", {"word": "kalo"}),
                                                                          ("count", {"n": 2})]
    assert all(c.id.startswith("call_") for c in parsed.calls) and parsed.calls[0].id != parsed.calls[1].id


@pytest.mark.parametrize("text", [
    "plain answer", "<tool_call>\nnot json\n</tool_call>", '<tool_call>{"arguments": {}}</tool_call>',
    '<tool_call>\n{"name": "cut", "arguments": {"a": 1', "a < b and <tool_ca",
])
def test_text_that_is_not_a_complete_call_stays_text(text):
    parsed = parse_answer(text, HERMES, TOOLS)
    assert (parsed.content, parsed.calls) == (text, [])


@pytest.mark.parametrize("size", [1, 2, 5, 13, 1000])
def test_streaming_in_any_piece_size_gives_the_same_answer_and_never_shows_a_tag(size):
    stream = AnswerStream(HERMES, TOOLS)
    events: list = []
    for i in range(0, len(ANSWER), size):
        out = stream.feed(ANSWER[i:i + size])
        events += out
        assert "<tool_call>" not in "".join(e for e in out if isinstance(e, str))
    events += stream.finish()
    assert "".join(e for e in events if isinstance(e, str)) == "Let me look.\n\n"
    assert [e.name for e in events if isinstance(e, ParsedCall)] == ["lookup", "count"]
