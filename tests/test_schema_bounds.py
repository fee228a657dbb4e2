"""JSON Schema bounds as grammar (cluster.engine.schema_bounds): the rules checked exhaustively against
the bounds' own arithmetic, the refusals by keyword, and answers of a real model under bounded schemas
validated with jsonschema."""

from __future__ import annotations

import itertools
import json
import re
from decimal import Decimal
from pathlib import Path
from typing import Iterator

import jsonschema
import pytest

from cluster.engine.grammar import json_schema_grammar
from cluster.engine.moe_engine import MoEEngine
from cluster.engine.sampling import SamplingParams
from cluster.engine.schema_bounds import MAX_REPETITION, integer_range, number_rule
from cluster.errors import InvalidParameterError


def _regex(gbnf: str) -> re.Pattern[str]:
    """A Python regex for a rule body made of literals, simple classes, groups, | ? and {m,n} (no rule names)."""
    out, i = [], 0
    while i < len(gbnf):
        c = gbnf[i]
        if c == '"':
            j = gbnf.index('"', i + 1)
            out.append(re.escape(gbnf[i + 1:j]))
            i = j + 1
        elif c == "[":
            j = gbnf.index("]", i + 1)
            out.append(gbnf[i:j + 1])
            i = j + 1
        elif c == "(":
            out.append("(?:")
            i += 1
        elif c in ")|?":
            out.append(c)
            i += 1
        elif c == "{":
            j = gbnf.index("}", i)
            out.append(gbnf[i:j + 1])
            i = j + 1
        elif c.isspace():
            i += 1
        else:
            raise AssertionError(f"unexpected {c!r} at {i} in {gbnf}")
    return re.compile("".join(out))


BOUNDS = [None, -1000, -101, -100, -99, -10, -9, -1, 0, 1, 7, 9, 10, 11, 99, 100, 101, 199, 990, 1000]


@pytest.mark.parametrize("lo, hi", [(lo, hi) for lo, hi in itertools.product(BOUNDS, BOUNDS)
                                    if lo is None or hi is None or lo <= hi])
def test_integer_range_matches_exactly_the_integers_in_range_as_json_writes_them(lo, hi):
    pattern = _regex(integer_range(lo, hi))
    for n in range(-1300, 1301):
        expected = (lo is None or n >= lo) and (hi is None or n <= hi)
        assert bool(pattern.fullmatch(str(n))) == expected, (lo, hi, n)
    for written in ("-0", "00", "01", "-01", "+1", "1.0", ""):
        assert not pattern.fullmatch(written), (lo, hi, written)


def test_integer_range_holds_at_the_edges_of_large_bounds():
    lo, hi = -(10**18), 10**18 - 7
    pattern = _regex(integer_range(lo, hi))
    for n in (lo, lo + 1, -1, 0, hi - 1, hi, 123456789012345678, -999999999999999999):
        assert pattern.fullmatch(str(n)), n
    for n in (lo - 1, hi + 1, 10**18, -(10**18) - 10):
        assert not pattern.fullmatch(str(n)), n
    unbounded = _regex(integer_range(5, None))
    assert unbounded.fullmatch("5") and unbounded.fullmatch("9" * 16) and not unbounded.fullmatch("4")


NUMBERS = sorted({f"{sign}{whole}{frac}" for sign in ("", "-") for whole in range(0, 13)
                  for frac in ("", ".0", ".00", ".5", ".05", ".50", ".001", ".9", ".999")})


@pytest.mark.parametrize("schema", [
    {"minimum": 5, "maximum": 9}, {"exclusiveMinimum": 5, "exclusiveMaximum": 9}, {"minimum": 0},
    {"exclusiveMinimum": 0}, {"maximum": 0}, {"exclusiveMaximum": 0}, {"minimum": -3, "maximum": 2},
    {"exclusiveMinimum": -3, "exclusiveMaximum": 2}, {"minimum": -10, "exclusiveMaximum": -2},
    {"exclusiveMinimum": -10, "maximum": -2}, {"minimum": 4, "maximum": 4}, {"minimum": -1.0, "maximum": 1.0},
    {"minimum": 2, "exclusiveMinimum": 3}, {"maximum": 9, "exclusiveMaximum": 11},
    {"minimum": 1, "exclusiveMinimum": True}, {"exclusiveMinimum": 0, "exclusiveMaximum": 1}])
def test_number_bounds_match_exactly_the_decimals_in_range(schema):
    pattern = _regex(number_rule({"type": "number", **schema}))
    accepted = []
    for written in NUMBERS:
        value = {"type": "number", **schema}
        try:
            jsonschema.validate(float(Decimal(written)), {k: v for k, v in value.items()
                                                          if not isinstance(v, bool)} | _draft4(schema))
            expected = True
        except jsonschema.ValidationError:
            expected = False
        if written.startswith("-") and Decimal(written) == 0:
            expected = False  # a negative zero is never written (0 is)
        assert bool(pattern.fullmatch(written)) == expected, (schema, written)
        accepted += [written] if expected else []
    assert accepted  # every schema here admits numbers


def _draft4(schema: dict) -> dict:
    """Draft 4's boolean exclusiveMinimum, in the 2020-12 form jsonschema validates by default."""
    if schema.get("exclusiveMinimum") is True:
        return {"exclusiveMinimum": schema["minimum"], "minimum": schema["minimum"]}
    return {}


@pytest.mark.parametrize("schema, keyword", [
    ({"type": "string", "maxLength": 10**18}, "maxLength"),
    ({"type": "array", "items": {"type": "integer"}, "minItems": MAX_REPETITION + 1}, "minItems"),
    ({"type": "integer", "multipleOf": 3}, "multipleOf"),
    ({"type": "array", "items": {"type": "integer"}, "uniqueItems": True}, "uniqueItems"),
    ({"type": "object", "properties": {"a": {"not": {"type": "null"}}}}, "not"),
    ({"type": "string", "format": "email"}, "format"),
    ({"type": "number", "minimum": 0.5}, "minimum"),
    ({"type": "string", "pattern": "^[a-z]+$", "maxLength": 4}, "maxLength"),
    ({"type": "object", "properties": {"n": {"type": "integer", "minimum": 9, "maximum": 5}}}, "admit no integer"),
    ({"type": "integer", "minimum": float("nan")}, "finite"),
    ({"type": "string", "minLength": 5, "maxLength": 2}, "minLength"),
])
def test_what_cannot_be_enforced_is_refused_by_name(schema, keyword):
    with pytest.raises(InvalidParameterError, match=re.escape(keyword)) as info:
        json_schema_grammar(schema)
    assert info.value.param == "response_format" and str(info.value).startswith("'response_format': ")


HELD_OUT = [
    {"type": "object", "properties": {"n": {"type": "integer", "minimum": 5, "maximum": 9}}, "required": ["n"]},
    {"type": "object", "properties": {
        "score": {"type": "number", "exclusiveMinimum": 0, "exclusiveMaximum": 1},
        "year": {"type": "integer", "minimum": 1990, "maximum": 2030},
        "delta": {"type": ["integer", "null"], "minimum": -12, "maximum": -3},
        "tags": {"type": "array", "items": {"type": "string", "minLength": 2, "maxLength": 5}, "minItems": 1,
                 "maxItems": 3},
    }, "required": ["score", "year", "delta", "tags"], "additionalProperties": False},
    {"$defs": {"node": {"type": "object", "properties": {
        "v": {"type": "integer", "exclusiveMinimum": 100, "maximum": 120},
        "next": {"anyOf": [{"$ref": "#/$defs/node"}, {"type": "null"}]}}, "required": ["v", "next"],
        "additionalProperties": False}}, "$ref": "#/$defs/node"},
]


@pytest.fixture(scope="module")
def engine(tiny_model: Path) -> Iterator[MoEEngine]:
    with MoEEngine(tiny_model, None, n_ctx=512, n_threads=2) as engine:
        yield engine


@pytest.mark.parametrize("index", range(len(HELD_OUT)))
def test_a_real_models_answers_under_bounded_schemas_validate(engine, tiny_topics, index):
    schema = HELD_OUT[index]
    grammar = json_schema_grammar(schema)
    finished = 0
    for seed in range(4):
        gen = engine.generate(" ".join(tiny_topics[seed % len(tiny_topics)][:6]),
                              SamplingParams(max_tokens=200, temperature=1.2, seed=seed, grammar=grammar))
        if gen.finish_reason == "length":  # a recursive schema may nest past max_tokens; the rest must validate
            assert index == 2, gen.text
            continue
        jsonschema.validate(json.loads(gen.text), schema)
        finished += 1
    assert finished >= 2
