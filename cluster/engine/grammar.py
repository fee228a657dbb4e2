"""Grammars for structured output: JSON Schema (and tool calls) turned into llama.cpp GBNF.

The conversion is llama-cpp-python's port of llama.cpp's JSON-Schema converter
(``llama_cpp.llama_grammar.SchemaConverter``); the engine hands the GBNF to llama.cpp's grammar
sampler, so the output follows the schema token by token. Two rules of the converter's output
are replaced, both so that what is generated parses as JSON even on a model that knows nothing
(a random synthetic model):

* ``char``: the converter allows any character but ``"`` and ``\\`` inside strings, control
  characters included, which JSON forbids raw; here they must be escaped, as JSON requires.
* ``space``: at most one space between tokens (the converter's own choice too), so a model
  cannot run away in whitespace.

The converter is ``schema_bounds.BoundedSchemaConverter``: numeric bounds, string and array
lengths are enforced, and a keyword that cannot be is refused by name. An unbounded string is
unbounded in the grammar too, so ``max_tokens`` still decides (the answer is then cut, with
``finish_reason: length``).
"""

from __future__ import annotations

import copy
import json
from typing import Any, Sequence

from cluster.engine.schema_bounds import BoundedSchemaConverter
from cluster.errors import InvalidParameterError

JSON_CHAR_RULE = r'[^"\\\x7F\x00-\x1F] | "\\" (["\\/bfnrt] | "u" [0-9a-fA-F]{4})'
"""A character of a JSON string: anything printable but a quote or backslash, or an escape."""
SPACE_RULE = '" "?'
TOOL_CALL_OPEN = "<tool_call>\n"
TOOL_CALL_CLOSE = "\n</tool_call>"


def json_schema_grammar(schema: Any, param: str = "response_format") -> str:
    """GBNF whose sentences are the JSON documents valid under ``schema`` (a decoded JSON Schema).

    Raises:
        InvalidParameterError: ``schema`` is not an object, or uses something the converter
            cannot express (named by ``param``).
    """
    return _convert(schema, param, prop_order=())


def json_object_grammar() -> str:
    """GBNF of any JSON object (``response_format: {"type": "json_object"}``)."""
    return _convert({"type": "object"}, "response_format", prop_order=())


def tool_call_grammar(tools: Sequence[dict[str, Any]], param: str = "tool_choice") -> str:
    """GBNF of one Hermes-style call of one of ``tools`` (OpenAI function tools):
    ``<tool_call>\\n{"name": NAME, "arguments": {...}}\\n</tool_call>``, the arguments valid
    under the function's ``parameters`` schema. Used to enforce ``tool_choice`` "required" or
    a named function."""
    if not tools:
        raise InvalidParameterError(f"'{param}' needs at least one tool", param=param)
    alternatives = []
    for tool in tools:
        function = tool["function"]
        parameters = function.get("parameters") or {"type": "object"}
        alternatives.append({"type": "object",
                             "properties": {"name": {"const": function["name"]}, "arguments": parameters},
                             "required": ["name", "arguments"], "additionalProperties": False})
    schema = alternatives[0] if len(alternatives) == 1 else {"anyOf": alternatives}
    body = _convert(schema, param, prop_order=("name", "arguments"), root="tool-call-body")
    return f"root ::= {_literal(TOOL_CALL_OPEN)} tool-call-body {_literal(TOOL_CALL_CLOSE)}\n{body}"


def _convert(schema: Any, param: str, prop_order: Sequence[str], root: str = "root") -> str:
    if not isinstance(schema, dict):
        raise InvalidParameterError(f"'{param}': the JSON schema must be an object, got {json.dumps(schema)[:100]}",
                                    param=param)
    converter = BoundedSchemaConverter(prop_order={name: i for i, name in enumerate(prop_order)}, allow_fetch=False,
                                dotall=False, raw_pattern=False)
    try:
        resolved = converter.resolve_refs(copy.deepcopy(schema), "input")  # the caller's schema stays as it was
        converter.visit(resolved, "")
        grammar = converter.format_grammar()
    except InvalidParameterError as exc:
        raise InvalidParameterError(f"'{param}': {exc}", param=param) from None
    except (AssertionError, KeyError, TypeError, ValueError, RecursionError, AttributeError) as exc:
        raise InvalidParameterError(f"'{param}': the JSON schema cannot be turned into a grammar: "
                                    f"{type(exc).__name__}: {exc}", param=param) from None
    rules = []
    for line in grammar.splitlines():
        name, sep, body = line.partition(" ::= ")
        if sep and name == "char":
            body = JSON_CHAR_RULE
        elif sep and name == "space":
            body = SPACE_RULE
        elif sep and name == "root":
            name = root
        rules.append(f"{name} ::= {body}" if sep else line)
    return "\n".join(rules)


def _literal(text: str) -> str:
    return json.dumps(text)  # a GBNF string literal uses JSON's escapes for quotes, backslashes and newlines
