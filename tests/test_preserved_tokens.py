"""A chat format's markers written as their text though they are control tokens (llama-server's
``preserved_tokens``), and gpt-oss's stop rule, with real llama.cpp.

Two synthetic chat models (``cluster.engine.chat.SYNTH_TEMPLATES``): ``kimi_k2``, whose call
section markers and ``<think>``/``</think>`` are control tokens (llama.cpp writes them as nothing
unless asked), and ``harmony`` (gpt-oss's markers; this llama.cpp makes ``<|channel|>``,
``<|message|>``, ``<|start|>``, ``<|constrain|>`` and ``<|end|>`` user-defined tokens at load, and
``<|return|>``/``<|call|>`` end generation). Answers are forced token by token with a grammar
(``<[ID]>`` names a token) at temperature 0.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator

import pytest

from cluster.api.formats import parse_answer
from cluster.api.formats.harmony import ENDS, MESSAGE, START
from cluster.api.formats.syntaxes import syntax_for
from cluster.engine.chat import SYNTH_TEMPLATES, ChatMessage, ChatPrompt, ChatRenderer
from cluster.engine.chat_format import PARSED_FORMATS, detect_format, format_named
from cluster.engine.moe_engine import MoEEngine
from cluster.engine.sampling import SamplingParams

TOOLS = [{"type": "function", "function": {"name": "lookup", "parameters": {
    "type": "object", "properties": {"word": {"type": "string"}}, "required": ["word"]}}}]


@pytest.fixture(scope="module")
def kimi_engine(kimi_model: Path) -> Iterator[MoEEngine]:
    with MoEEngine(kimi_model, None, n_ctx=512, n_threads=2) as engine:
        yield engine


@pytest.fixture(scope="module")
def harmony_engine(harmony_model: Path) -> Iterator[MoEEngine]:
    with MoEEngine(harmony_model, None, n_ctx=512, n_threads=2) as engine:
        yield engine


def token_grammar(tokenizer, *parts: str) -> str:
    """A grammar of exactly ``parts``: a control token's text becomes ``<[ID]>``, other text a literal."""
    specials = {c for name in SYNTH_TEMPLATES for c in SYNTH_TEMPLATES[name][1]}
    items = []
    for part in parts:
        if part in specials:
            items.append(f"<[{tokenizer.tokenize(part, special=True, add_special=False)[0]}]>")
        else:
            items.append(json.dumps(part))
    return "root ::= " + " ".join(items) + "\n"


def user_turn(text: str = "look up kalo") -> ChatPrompt:
    return ChatPrompt((ChatMessage("user", text),), tools=tuple(json.dumps(t) for t in TOOLS))


# -- the rule ------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", PARSED_FORMATS)
def test_every_marker_a_parser_starts_a_block_with_is_preserved(name):
    fmt = format_named(name)
    if fmt.harmony:
        needed = {MESSAGE, START, "<|channel|>", "<|constrain|>", "<|end|>"}
        assert needed <= set(fmt.preserved) and not set(fmt.preserved) & (set(ENDS) - {START, "<|end|>"})
        assert fmt.stops == ("<|return|>", "<|call|>")
        return
    assert set(syntax_for(name).opens) <= set(fmt.preserved)
    assert set(fmt.think_tags) <= set(fmt.preserved) and fmt.stops is None


class _Vocabulary:
    """A vocabulary whose special texts are one control token each (``<|end|>`` included, as
    llama.cpp versions without its harmony workaround load it)."""

    bos_text, eos_text = "", ""

    def __init__(self, template: str, specials: tuple[str, ...]) -> None:
        self._template, self._ids = template, {text: 1000 + i for i, text in enumerate(specials)}

    def chat_template(self) -> str:
        return self._template

    def tokenize(self, text: str, special: bool = False, add_special: bool = True) -> list[int]:
        return [self._ids[text]] if special and text in self._ids else [ord(c) for c in text]

    def is_control(self, token: int) -> bool:
        return token >= 1000


def test_a_harmony_answer_stops_at_return_or_call_not_at_the_end_its_template_writes_after_an_answer():
    template, specials = SYNTH_TEMPLATES["harmony"][:2]
    vocabulary = _Vocabulary(template, specials)
    renderer = ChatRenderer(vocabulary)
    assert renderer.template.end_of_turn() == "<|end|>"  # what the probe finds after an answer
    ids = vocabulary._ids
    assert renderer.end_of_turn_ids == (ids["<|return|>"], ids["<|call|>"])
    assert set(renderer.preserved_ids) == {ids[m] for m in ("<|start|>", "<|channel|>", "<|constrain|>", "<|message|>",
                                                             "<|end|>")}
    params = renderer.chat_params(SamplingParams(stop_token_ids=(5,), preserved_token_ids=(7,)))
    assert params.stop_token_ids == (5, ids["<|return|>"], ids["<|call|>"])
    assert params.preserved_token_ids == tuple(sorted({7, *renderer.preserved_ids}))


def test_a_format_whose_markers_are_not_tokens_preserves_nothing(chatml_model):
    from cluster.engine.tokenizer import Tokenizer

    renderer = ChatRenderer(Tokenizer.load(str(chatml_model)))  # hermes: <tool_call> is text here
    assert renderer.template.format.name == "hermes" and renderer.preserved_ids == ()
    assert renderer.chat_params(SamplingParams()).preserved_token_ids == ()


# -- real llama.cpp: Kimi K2, markers that are control tokens -------------------------------------

KIMI_ANSWER = ("<think>", "pondering", "</think>", "Let me", "<|im_middle|>", " look.", "<|tool_calls_section_begin|>",
               "<|tool_call_begin|>", "functions.lookup:0", "<|tool_call_argument_begin|>", '{"word": "kalo"}',
               "<|tool_call_end|>", "<|tool_calls_section_end|>")


def test_kimi_markers_are_written_as_text_in_a_chat_answer_and_parsed(kimi_engine: MoEEngine):
    tokenizer = kimi_engine.tokenizer
    renderer = ChatRenderer(tokenizer)
    assert renderer.template.format.name == "kimi_k2" and len(renderer.preserved_ids) == 7
    rendered = renderer.render(user_turn())
    grammar = token_grammar(tokenizer, *KIMI_ANSWER)
    params = renderer.chat_params(SamplingParams(max_tokens=120, grammar=grammar, logprobs=True, top_logprobs=2))
    gen = kimi_engine.generate(rendered.text, params, special=True)
    expected = "".join(p for p in KIMI_ANSWER if p != "<|im_middle|>")  # a control token not a marker: hidden
    assert gen.finish_reason == "stop" and gen.text == expected
    assert "".join(e.text for e in gen.logprobs) == gen.text
    by_token = {e.token: e for e in gen.logprobs}
    for marker in ("<think>", "<|tool_call_begin|>"):
        entry = by_token[tokenizer.tokenize(marker, special=True, add_special=False)[0]]
        assert entry.piece == marker.encode() and entry.text == marker
    middle = tokenizer.tokenize("<|im_middle|>", special=True, add_special=False)[0]
    assert by_token[middle].piece == b"" and by_token[middle].text == ""
    streamed = "".join(kimi_engine.stream(rendered.text, params, special=True))
    assert streamed == gen.text
    answer = parse_answer(gen.text, detect_format(renderer.template.source), TOOLS)
    assert answer.reasoning == "pondering" and answer.content == "Let me look."
    assert [(c.name, json.loads(c.arguments), c.id) for c in answer.calls] == [("lookup", {"word": "kalo"},
                                                                                   "functions.lookup:0")]


def test_without_preserved_tokens_control_markers_stay_hidden(kimi_engine: MoEEngine):
    tokenizer = kimi_engine.tokenizer
    rendered = ChatRenderer(tokenizer).render(user_turn())
    params = SamplingParams(max_tokens=120, grammar=token_grammar(tokenizer, *KIMI_ANSWER))  # a plain request's params
    gen = kimi_engine.generate(rendered.text, params, special=True)
    assert gen.text == "".join(p for p in KIMI_ANSWER if not p.startswith("<"))


# -- real llama.cpp: harmony ---------------------------------------------------------------------

def test_a_harmony_answer_goes_past_end_and_comes_apart_into_reasoning_and_content(harmony_engine: MoEEngine):
    tokenizer = harmony_engine.tokenizer
    renderer = ChatRenderer(tokenizer)
    fmt = renderer.template.format
    ret, call, end = (tokenizer.tokenize(m, special=True, add_special=False)[0] for m in ("<|return|>", "<|call|>",
                                                                                           "<|end|>"))
    assert fmt.harmony and renderer.end_of_turn_ids == (ret, call) and end in renderer.preserved_ids
    parts = ("<|channel|>", "analysis", "<|message|>", "pondering", "<|end|>", "<|start|>", "assistant", "<|channel|>",
             "final", "<|message|>", "kalo it is")
    params = renderer.chat_params(SamplingParams(max_tokens=120, grammar=token_grammar(tokenizer, *parts)))
    gen = harmony_engine.generate(renderer.render(user_turn()).text, params, special=True)
    assert gen.finish_reason == "stop" and gen.text == "".join(parts)
    assert gen.tokens[-1] != end and not {ret, call} & set(gen.tokens)
    answer = parse_answer(gen.text, fmt, TOOLS)
    assert (answer.reasoning, answer.content, answer.calls) == ("pondering", "kalo it is", [])


def test_a_harmony_call_is_parsed(harmony_engine: MoEEngine):
    tokenizer = harmony_engine.tokenizer
    renderer = ChatRenderer(tokenizer)
    parts = ("<|channel|>", "commentary to=functions.lookup ", "<|constrain|>", "json", "<|message|>",
             '{"word": "kalo"}')
    params = renderer.chat_params(SamplingParams(max_tokens=120, grammar=token_grammar(tokenizer, *parts)))
    gen = harmony_engine.generate(renderer.render(user_turn()).text, params, special=True)
    assert gen.text == "".join(parts)
    answer = parse_answer(gen.text, renderer.template.format, TOOLS)
    assert [(c.name, json.loads(c.arguments)) for c in answer.calls] == [("lookup", {"word": "kalo"})]
