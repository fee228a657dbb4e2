"""Hermes-style tool calls in model output (cluster.api.tool_calls), whole and streamed."""

from __future__ import annotations

import json

import pytest

from cluster.api.tool_calls import ParsedCall, ToolCallStream, split_tool_calls

ANSWER = ('Let me look.\n<tool_call>\n{"name": "lookup", "arguments": {"word": "kalo"}}\n</tool_call>\n'
          '<tool_call>\n{"name": "count", "arguments": "{\\"n\\": 2}"}\n</tool_call>')


def test_split_finds_every_call_and_keeps_the_text():
    text, calls = split_tool_calls(ANSWER)
    assert text == "Let me look.\n\n"
    assert [(c.name, json.loads(c.arguments)) for c in calls] == [("lookup", {"word": "kalo"}), ("count", {"n": 2})]
    assert all(c.id.startswith("call_") for c in calls) and calls[0].id != calls[1].id


@pytest.mark.parametrize("text", [
    "plain answer", "<tool_call>\nnot json\n</tool_call>", '<tool_call>{"arguments": {}}</tool_call>',
    '<tool_call>\n{"name": "cut", "arguments": {"a": 1', "a < b and <tool_ca",
])
def test_text_that_is_not_a_complete_call_stays_text(text):
    assert split_tool_calls(text) == (text, [])


@pytest.mark.parametrize("size", [1, 2, 5, 13, 1000])
def test_streaming_in_any_piece_size_gives_the_same_events_and_holds_only_a_possible_tag(size):
    stream = ToolCallStream()
    events: list = []
    for i in range(0, len(ANSWER), size):
        piece = ANSWER[i:i + size]
        out = stream.feed(piece)
        events += out
        assert "<tool_call>" not in "".join(e for e in out if isinstance(e, str))
    events += stream.finish()
    texts = [e for e in events if isinstance(e, str)]
    calls = [e for e in events if isinstance(e, ParsedCall)]
    assert "".join(texts) == "Let me look.\n\n" and [c.name for c in calls] == ["lookup", "count"]
    assert stream.calls == 2
    # text far from a tag is released at once
    early = ToolCallStream()
    assert early.feed("hello <tool") == ["hello "] and early.feed(" no") == ["<tool no"]
