"""Structured output (cluster.engine.grammar): JSON-schema and tool-call grammars, enforced by
llama.cpp's grammar sampler on a random synthetic model."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator

import jsonschema
import pytest

from cluster.api.formats.answer import parse_answer
from cluster.engine.chat_format import format_named
from cluster.engine.grammar import JSON_CHAR_RULE, json_object_grammar, json_schema_grammar, tool_call_grammar
from cluster.engine.moe_engine import MoEEngine
from cluster.engine.sampling import SamplingParamError, SamplingParams
from cluster.errors import InvalidParameterError

SCHEMA = {
    "type": "object",
    "properties": {
        "word": {"type": "string", "maxLength": 12},
        "count": {"type": "integer"},
        "ok": {"type": "boolean"},
        "tags": {"type": "array", "items": {"enum": ["red", "green"]}, "maxItems": 3},
    },
    "required": ["word", "count", "ok", "tags"],
    "additionalProperties": False,
}


@pytest.fixture(scope="module")
def engine(tiny_model: Path) -> Iterator[MoEEngine]:
    with MoEEngine(tiny_model, None, n_ctx=512, n_threads=2) as engine:
        yield engine


def test_the_grammar_keeps_json_strings_valid_and_whitespace_short():
    grammar = json_schema_grammar(SCHEMA)
    rules = dict(line.split(" ::= ", 1) for line in grammar.splitlines())
    assert rules["char"] == JSON_CHAR_RULE and rules["space"] == '" "?' and "root" in rules
    with pytest.raises(InvalidParameterError, match="response_format") as info:
        json_schema_grammar(["not", "a", "schema"])
    assert info.value.param == "response_format"


@pytest.mark.parametrize("temperature, seed", [(0.0, 0), (1.0, 1), (1.0, 2), (1.0, 3)])
def test_answers_under_a_json_schema_grammar_validate_even_on_a_random_model(engine, tiny_topics, temperature, seed):
    prompt = " ".join(tiny_topics[1][:6])
    gen = engine.generate(prompt, SamplingParams(max_tokens=160, temperature=temperature, seed=seed,
                                                 grammar=json_schema_grammar(SCHEMA)))
    assert gen.finish_reason == "stop", gen.text
    jsonschema.validate(json.loads(gen.text), SCHEMA)


def test_json_object_grammar_gives_an_object_or_a_cut_answer(engine, tiny_topics):
    finished = []
    for seed in range(4):
        gen = engine.generate(" ".join(tiny_topics[2][:5]), SamplingParams(max_tokens=96, temperature=1.0, seed=seed,
                                                                          grammar=json_object_grammar()))
        assert gen.text.startswith("{")
        if gen.finish_reason == "stop":
            finished.append(json.loads(gen.text))
        else:
            assert gen.finish_reason == "length" and gen.n_generated == 96
    assert finished and all(isinstance(obj, dict) for obj in finished)


def test_a_tool_call_grammar_makes_the_model_call_the_named_function(engine, tiny_topics):
    tools = [{"type": "function", "function": {"name": "lookup", "parameters": {
        "type": "object", "properties": {"word": {"type": "string", "maxLength": 10}}, "required": ["word"]}}},
        {"type": "function", "function": {"name": "count", "parameters": {
            "type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]}}}]
    for chosen in (tools[:1], tools[1:], tools):
        gen = engine.generate(" ".join(tiny_topics[0][:5]), SamplingParams(max_tokens=120, temperature=1.0, seed=5,
                                                                          grammar=tool_call_grammar(chosen)))
        parsed = parse_answer(gen.text, format_named("hermes"), chosen)
        text, calls = parsed.content, parsed.calls
        assert gen.finish_reason == "stop" and text == "" and len(calls) == 1, gen.text
        schema = next(t["function"]["parameters"] for t in chosen if t["function"]["name"] == calls[0].name)
        jsonschema.validate(json.loads(calls[0].arguments), schema)


def test_a_grammar_llama_cpp_cannot_parse_is_refused_before_anything_runs(engine):
    with pytest.raises(SamplingParamError, match="grammar"):
        engine.generate(" x", SamplingParams(max_tokens=2, grammar='root ::= "a" undefined-rule'))
    assert engine.generate(" x", max_tokens=2).n_generated == 2
