"""Chat formats (cluster.engine.chat_format, cluster.api.formats): each family's template detected
by its markers, its answers taken apart into reasoning, text and tool calls, and the same answer
streamed in random pieces taken apart the same way."""

from __future__ import annotations

import json
import random

import pytest

from cluster.api.formats import AnswerStream, ParsedAnswer, collect, parse_answer
from cluster.api.formats.syntaxes import _SYNTAXES
from cluster.api.openai_api import APIError, Limits, parse_chat
from cluster.api.openai_responses import StreamChunks, response
from cluster.distributed.client import Choice
from cluster.distributed.protocol import ChoiceEnd, Finished, Usage
from cluster.engine.chat import CHATML_TEMPLATE, LLAMA3_TEMPLATE
from cluster.engine.chat_format import CONTENT, PARSED_FORMATS, ChatFormat, detect_format

TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"}}}}},
    {"type": "function", "function": {"name": "search", "parameters": {
        "type": "object", "properties": {"query": {"type": "string"}}}}}]

PARIS = ("get_weather", {"city": "Paris", "days": 3})
ROME = ("search", {"query": "Rome {curly} [x] <b>?"})

# format, answer, content, reasoning, calls (name, arguments), ids the model gave (None: ours)
CASES = [
    ("hermes", 'Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "days": 3}}\n'
               '</tool_call>\n<tool_call>\n{"name": "search", "arguments": {"query": "Rome {curly} [x] <b>?"}}\n'
               '</tool_call>', "Let me check.\n\n", None, [PARIS], None),
    ("hermes", '<tool_call>{"name": "search", "arguments": {"query": "a </tool_call> in a string"}}</tool_call>', "",
     None, [("search", {"query": "a </tool_call> in a string"})], None),
    ("hermes", '<think>\nThe user wants weather.\n</think>\n\n<tool_call>\n{"name": "get_weather", "arguments": '
               '{"city": "Paris", "days": 3}}\n</tool_call>', "", "The user wants weather.", [PARIS], None),
    ("qwen3_coder", "Sure.\n<tool_call>\n<function=get_weather>\n<parameter=city>\nParis\n</parameter>\n"
                    "<parameter=days>\n3\n</parameter>\n</function>\n</tool_call>\n<tool_call>\n<function=search>\n"
                    "<parameter=query>\nRome {curly} [x] <b>?\n</parameter>\n</function>\n</tool_call>",
     "Sure.\n\n", None, [PARIS], None),
    ("qwen3_coder", "<function=search>\n<parameter=query>\n123\n</parameter>\n</function>", "", None,
     [("search", {"query": "123"})], None),
    ("glm45", "<think>weather first</think>\n<tool_call>get_weather\n<arg_key>city</arg_key>\n<arg_value>Paris"
              "</arg_value>\n<arg_key>days</arg_key>\n<arg_value>3</arg_value>\n</tool_call>", "", "weather first",
     [PARIS], None),
    ("deepseek", "<think>ok</think>\n\nOn it.<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>get_weather\n"
                 "```json\n{\"city\": \"Paris\", \"days\": 3}\n```<｜tool▁call▁end｜>\n<｜tool▁call▁begin｜>function"
                 "<｜tool▁sep｜>search\n```json\n{\"query\": \"Rome {curly} [x] <b>?\"}\n```<｜tool▁call▁end｜>"
                 "<｜tool▁calls▁end｜>", "On it.", "ok", [PARIS, ROME], None),
    ("deepseek", "<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>get_weather<｜tool▁sep｜>{\"city\": \"Paris\", \"days\": 3}"
                 "<｜tool▁call▁end｜><｜tool▁calls▁end｜>", "", None, [PARIS], None),
    ("kimi_k2", "Checking.<|tool_calls_section_begin|><|tool_call_begin|>functions.get_weather:0"
                "<|tool_call_argument_begin|>{\"city\": \"Paris\", \"days\": 3}<|tool_call_end|><|tool_call_begin|>"
                "functions.search:1<|tool_call_argument_begin|>{\"query\": \"Rome {curly} [x] <b>?\"}"
                "<|tool_call_end|><|tool_calls_section_end|>", "Checking.", None, [PARIS, ROME],
     ["functions.get_weather:0", "functions.search:1"]),
    ("mistral", '[TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Paris", "days": 3}, "id": "a1b2c3d4e"}, '
                '{"name": "search", "arguments": {"query": "Rome {curly} [x] <b>?"}, "id": "f5g6h7i8j"}]', "", None,
     [PARIS, ROME], ["a1b2c3d4e", "f5g6h7i8j"]),
    ("mistral", '[THINK]plan[/THINK]Here.[TOOL_CALLS]get_weather[ARGS]{"city": "Paris", "days": 3}[TOOL_CALLS]search'
                '[CALL_ID]k9l8m7n6o[ARGS]{"query": "Rome {curly} [x] <b>?"}', "Here.", "plan", [PARIS, ROME],
     [None, "k9l8m7n6o"]),
    ("llama3_json", '{"name": "get_weather", "parameters": {"city": "Paris", "days": 3}}; {"type": "function", '
                    '"name": "search", "parameters": {"query": "Rome {curly} [x] <b>?"}}', "", None, [PARIS, ROME], None),
    ("llama3_json", '<|python_tag|>search.call(query="Rome {curly} [x] <b>?")', "", None, [ROME], None),
    ("gpt_oss", "<|channel|>analysis<|message|>Need the weather.<|end|><|start|>assistant<|channel|>commentary "
                "to=functions.get_weather <|constrain|>json<|message|>{\"city\": \"Paris\", \"days\": 3}<|call|>", "",
     "Need the weather.", [PARIS], None),
    ("gpt_oss", "<|channel|>analysis<|message|>Simple.<|end|><|start|>assistant<|channel|>final<|message|>Hello "
                "<|there|>!<|return|>", "Hello <|there|>!", "Simple.", [], None),
    ("gpt_oss", "<|start|>assistant to=functions.search<|channel|>commentary json<|message|>{\"query\": \"Rome {curly} "
                "[x] <b>?\"}<|call|>", "", None, [ROME], None),
]
# hermes answers in these cases hold 2 calls where listed, 1 where the second was left out above
CASES[0] = CASES[0][:4] + ([PARIS, ROME], None)
CASES[3] = CASES[3][:4] + ([PARIS, ROME], None)


def fmt_of(name: str) -> ChatFormat:
    return ChatFormat(name, None) if name == "gpt_oss" else \
        ChatFormat(name, ("[THINK]", "[/THINK]")) if name == "mistral" else ChatFormat(name)


def streamed(text: str, fmt: ChatFormat, cuts: list[int], **kw) -> ParsedAnswer:
    stream = AnswerStream(fmt, TOOLS, **kw)
    events, last = [], 0
    for cut in sorted(cuts) + [len(text)]:
        events += stream.feed(text[last:cut])
        last = cut
    return collect(events + stream.finish())


def random_cuts(text: str, rng: random.Random) -> list[int]:
    n = rng.choice([1, 2, 5, len(text) // 3, len(text)])
    return rng.sample(range(1, len(text)), min(n, len(text) - 1))


def calls(answer: ParsedAnswer) -> list[tuple[str, dict]]:
    return [(c.name, json.loads(c.arguments)) for c in answer.calls]


@pytest.mark.parametrize("name,text,content,reasoning,expected,ids", CASES,
                         ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES)])
def test_whole_and_streamed(name, text, content, reasoning, expected, ids):
    fmt = fmt_of(name)
    whole = parse_answer(text, fmt, TOOLS)
    assert (whole.content, whole.reasoning, calls(whole)) == (content, reasoning, expected)
    if ids is not None:
        assert [c.id if i is not None else None for c, i in zip(whole.calls, ids)] == ids
    assert all(c.id for c in whole.calls)
    rng = random.Random(name + text[:20])
    for _ in range(60):
        part = streamed(text, fmt, random_cuts(text, rng))
        assert (part.content, part.reasoning, calls(part)) == (content, reasoning, expected)
    one_by_one = streamed(text, fmt, list(range(1, len(text))))
    assert (one_by_one.content, one_by_one.reasoning, calls(one_by_one)) == (content, reasoning, expected)


def test_streaming_holds_only_what_may_start_a_marker():
    stream = AnswerStream(fmt_of("hermes"), TOOLS)
    assert stream.feed("Hello <tool") == ["Hello "]  # '<tool' may begin <tool_call>
    assert stream.feed("s are> here") == ["<tools are> here"]
    stream = AnswerStream(fmt_of("deepseek"), TOOLS)
    assert stream.feed("Plain text, no markers.") == ["Plain text, no markers."]
    stream = AnswerStream(fmt_of("gpt_oss"), TOOLS)
    assert stream.feed("<|channel|>analysis") == []  # a header waits for its <|message|>
    # the thought streams as it comes, all but what may begin an end marker
    assert [e.text for e in stream.feed("<|message|>Thinking")] == ["Thinking"]
    assert [e.text for e in stream.feed(" more<|e")] == [" more"]
    assert stream.feed("nd|><|start|>assistant<|channel|>final<|message|>Hi") == ["Hi"]


@pytest.mark.parametrize("name", [c for c in PARSED_FORMATS])
def test_plain_text_untouched(name):
    text = "Just an answer: 2 < 3, {braces} and [brackets], <b>bold</b>.\n"
    for kw in ({}, {"reasoning": False}):
        assert parse_answer(text, fmt_of(name), TOOLS, **kw) == ParsedAnswer(text)
        rng = random.Random(name)
        for _ in range(20):
            assert streamed(text, fmt_of(name), random_cuts(text, rng), **kw) == ParsedAnswer(text)


MALFORMED = [
    ("hermes", '<tool_call>\n{"name": "get_weather", "arguments": {"city": }\n</tool_call> after'),
    ("hermes", 'cut off <tool_call>\n{"name": "get_weather", "argu'),
    ("qwen3_coder", "<tool_call>\n<function=get weather>\n<parameter=city>\nParis\n</parameter>\n</function>\n</tool_call>"),
    ("qwen3_coder", "<tool_call>\n<function=get_weather>\n<parameter=city>\nParis\n</function>\n</tool_call>"),
    ("glm45", "<tool_call>\n<arg_key>city</arg_key>\n<arg_value>Paris</arg_value>\n</tool_call>"),
    ("deepseek", "<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>get_weather\n```json\n{\"city\": "
                 "```<｜tool▁call▁end｜><｜tool▁calls▁end｜>"),
    ("kimi_k2", "<|tool_calls_section_begin|><|tool_call_begin|>functions.get_weather:0<|tool_call_argument_begin|>"
                "[1, 2]<|tool_call_end|><|tool_calls_section_end|>"),
    ("mistral", "[TOOL_CALLS] is a marker I mention, then go on."),
    ("mistral", '[TOOL_CALLS][{"name": "get_weather"}, 3]'),
    ("llama3_json", '{"name": "get_weather", "parameters": {"city": "Paris"}, "extra": 1}'),
    ("llama3_json", '{"answer": 42}'),
]


@pytest.mark.parametrize("name,text", MALFORMED, ids=[f"{m[0]}-{i}" for i, m in enumerate(MALFORMED)])
def test_malformed_calls_stay_text(name, text):
    assert parse_answer(text, fmt_of(name), TOOLS) == ParsedAnswer(text)
    rng = random.Random(text)
    for _ in range(30):
        assert streamed(text, fmt_of(name), random_cuts(text, rng)) == ParsedAnswer(text)


def test_calls_are_parsed_only_with_tools():
    text = '<tool_call>\n{"name": "get_weather", "arguments": {}}\n</tool_call>'
    assert parse_answer(text, fmt_of("hermes"), None) == ParsedAnswer(text)
    harmony = "<|channel|>commentary to=functions.get_weather<|message|>{}<|call|>"
    assert parse_answer(harmony, fmt_of("gpt_oss"), None) == ParsedAnswer("{}")


@pytest.mark.parametrize("text,opened,content,reasoning", [
    ("<think>\nstep 1\nstep 2\n</think>\n\nThe answer.", False, "The answer.", "step 1\nstep 2"),
    ("  <think>x</think>y", False, "y", "x"),
    ("step 1</think>\n\nThe answer.", True, "The answer.", "step 1"),
    ("\nstill thinking when cut off", True, "", "still thinking when cut off"),
    ("<think>never closed", False, "", "never closed"),
    ("<think></think>\n\nDirect.", False, "Direct.", None),
    ("Answer first <think>not a thought</think>", False, "Answer first <think>not a thought</think>", None),
    ("<thinking> is not the tag", False, "<thinking> is not the tag", None),
])
def test_think_tags(text, opened, content, reasoning):
    for name in ("content", "hermes", "deepseek", "qwen3_coder", "glm45", "kimi_k2", "llama3_json"):
        fmt = fmt_of(name)
        assert parse_answer(text, fmt, TOOLS, thinking_open=opened) == ParsedAnswer(content, reasoning)
        rng = random.Random(text)
        for _ in range(30):
            assert streamed(text, fmt, random_cuts(text, rng), thinking_open=opened) == ParsedAnswer(content, reasoning)
    assert parse_answer(text, fmt_of("hermes"), TOOLS, reasoning=False) == ParsedAnswer(text)


def test_harmony_reasoning():
    text = ("<|channel|>analysis<|message|>User says hi.<|end|><|start|>assistant<|channel|>commentary<|message|>"
            "Preamble. <|end|><|start|>assistant<|channel|>final<|message|>Hi there!")
    assert parse_answer(text, fmt_of("gpt_oss")) == ParsedAnswer("Preamble. Hi there!", "User says hi.")
    assert parse_answer(text, fmt_of("gpt_oss"), reasoning=False) == ParsedAnswer("User says hi.Preamble. Hi there!")
    # not harmony at all: every character is text
    assert parse_answer("Plain <|channel|> words", fmt_of("gpt_oss")) == ParsedAnswer("Plain <|channel|> words")
    # a header of no known channel stays text
    odd = "<|channel|>weird<|message|>body<|end|>"
    assert parse_answer(odd, fmt_of("gpt_oss")) == ParsedAnswer("<|channel|>weird<|message|>body")
    rng = random.Random(0)
    for _ in range(50):
        assert streamed(text, fmt_of("gpt_oss"), random_cuts(text, rng)) == \
            ParsedAnswer("Preamble. Hi there!", "User says hi.")


# -- detection ------------------------------------------------------------------------------------

def _template(*markers: str) -> str:
    """A stand-in template source holding ``markers`` (detection reads markers, not Jinja)."""
    return "{%- for message in messages -%}{{ message.content }}{%- endfor -%}" + "".join(
        "{{- '" + m.replace("'", "\\'") + "' -}}" for m in markers) + "{%- if tools -%}{{ tools | tojson }}{%- endif -%}"


@pytest.mark.parametrize("markers,name", [
    (("<tool_call>", "</tool_call>", "<think>"), "hermes"),
    (("<tool_call>", "<function=", "<parameter=", "</parameter>"), "qwen3_coder"),
    (("<tool_call>", "<arg_key>", "<arg_value>"), "glm45"),
    (("<|start_header_id|>ipython<|end_header_id|>", "<|python_tag|>"), "llama3_json"),
    (("<|start_header_id|>ipython<|end_header_id|>",), "llama3_json"),
    (("[AVAILABLE_TOOLS]", "[TOOL_CALLS]"), "mistral"),
    (("<｜Assistant｜>", "<｜tool▁calls▁begin｜>", "<｜tool▁call▁begin｜>"), "deepseek"),
    (("<|start|>", "<|channel|>", "<|message|>"), "gpt_oss"),
    (("<|im_middle|>", "<|tool_calls_section_begin|>", "<|tool_call_begin|>"), "kimi_k2"),
    ((">>>all",), "functionary_v3_2"),
    (("<|tool_call|>",), "granite"),
    (("<|im_start|>",), "content"),
])
def test_detect_format(markers, name):
    fmt = detect_format(_template(*markers))
    assert fmt.name == name
    assert fmt.parsed == (name in PARSED_FORMATS)


def test_detect_the_synthetic_templates_and_think_openings():
    assert detect_format(CHATML_TEMPLATE).name == "hermes" and detect_format(LLAMA3_TEMPLATE) == CONTENT
    assert detect_format(None) == CONTENT
    assert fmt_of("deepseek").thinking_open("<｜Assistant｜><think>\n")
    assert not fmt_of("hermes").thinking_open("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    assert not fmt_of("gpt_oss").thinking_open("<|start|>assistant")
    assert set(_SYNTAXES) | {"gpt_oss"} == set(PARSED_FORMATS)  # every format named parsed has a parser


# -- on the wire (cluster.api.openai_responses) ------------------------------------------------------


def _chat(**fields):
    return parse_chat({"model": "m", "messages": [{"role": "user", "content": "hi"}], **fields}, Limits(), "m")


def _done() -> Finished:
    return Finished("n", (ChoiceEnd(0, "stop", 1),), Usage(1, 1))


KIMI = ("<think>Weather? Use the tool.</think>Checking.<|tool_calls_section_begin|><|tool_call_begin|>"
        "functions.get_weather:0<|tool_call_argument_begin|>{\"city\": \"Paris\"}<|tool_call_end|>"
        "<|tool_calls_section_end|>")


def test_a_whole_answer_carries_reasoning_content_and_the_formats_calls():
    body = response(_chat(tools=TOOLS), [Choice(0, KIMI, "stop")], Usage(1, 1), "n", "kimi_k2")["choices"][0]
    assert body["finish_reason"] == "tool_calls"
    message = body["message"]
    assert message["content"] == "Checking." and message["reasoning_content"] == "Weather? Use the tool."
    assert message["tool_calls"] == [{"id": "functions.get_weather:0", "type": "function",
                                      "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]
    plain = response(_chat(), [Choice(0, "<think>a</think>b", "stop")], Usage(1, 1), "n", "hermes")["choices"][0]
    assert plain["message"] == {"role": "assistant", "content": "b", "reasoning_content": "a"}
    kept = response(_chat(reasoning_format="none"), [Choice(0, "<think>a</think>b", "stop")], Usage(1, 1), "n", "hermes")
    assert kept["choices"][0]["message"] == {"role": "assistant", "content": "<think>a</think>b"}
    opened = response(_chat(), [Choice(0, "a</think>b", "stop")], Usage(1, 1), "n", "deepseek", True)
    assert opened["choices"][0]["message"] == {"role": "assistant", "content": "b", "reasoning_content": "a"}
    # the plain rendering (no format): the text as it came
    assert response(_chat(), [Choice(0, "<think>a</think>b", "stop")], Usage(1, 1), "n")["choices"][0]["message"] == \
        {"role": "assistant", "content": "<think>a</think>b"}


def test_a_streamed_answer_sends_reasoning_deltas_then_content_then_calls():
    stream = StreamChunks(_chat(tools=TOOLS, stream=True), "kimi_k2")
    out = [c for i in range(0, len(KIMI), 3) for c in stream.piece(0, KIMI[i:i + 3])] + stream.end(_done())
    deltas = [c["choices"][0]["delta"] for c in out]
    assert deltas[0]["role"] == "assistant" and "content" not in deltas[0]
    assert "".join(d.get("reasoning_content", "") for d in deltas) == "Weather? Use the tool."
    assert "".join(d.get("content") or "" for d in deltas) == "Checking."
    calls = [t for d in deltas for t in d.get("tool_calls", [])]
    assert calls[0]["id"] == "functions.get_weather:0" and calls[0]["function"] == {"name": "get_weather", "arguments": ""}
    assert calls[1] == {"index": 0, "function": {"arguments": '{"city": "Paris"}'}}
    assert out[-1]["choices"][0]["finish_reason"] == "tool_calls"
    kinds = [next(k for k in ("reasoning_content", "content", "tool_calls") if k in d) for d in deltas[:-1]]
    assert kinds == sorted(kinds, key=["reasoning_content", "content", "tool_calls"].index)  # in that order


def test_reasoning_format_is_checked():
    with pytest.raises(APIError) as info:
        _chat(reasoning_format="deepseek-legacy")
    assert (info.value.status, info.value.param) == (400, "reasoning_format")
    assert _chat(reasoning_format="none").reasoning is False and _chat().reasoning is True
