"""JSON Schema's bounds as grammar: numeric ranges, lengths, and a refusal of what cannot be enforced.

llama-cpp-python's port of llama.cpp's schema converter (``SchemaConverter``) ignores ``minimum``,
``maximum`` and the exclusive bounds, expands ``maxLength``/``maxItems`` into nested optional
groups (a bound of 10**18 never finishes), and silently drops keywords it does not know.
``BoundedSchemaConverter`` is that converter with four rules of its own:

* integers: ``minimum``, ``maximum``, ``exclusiveMinimum``, ``exclusiveMaximum`` (numbers, or
  draft 4's booleans) become a grammar of exactly the integers in the range, written as JSON
  writes them (no leading zeros, no ``-0``), by digit-by-digit ranges (``integer_range``);
* numbers: whole-number bounds the same way on the integer part, with the fraction allowed only
  where every value it gives is in range (no exponent form under bounds); a fractional bound on
  a ``number`` is refused;
* ``minLength``/``maxLength`` and ``minItems``/``maxItems`` become GBNF's own ``{m,n}``
  repetition, up to llama.cpp's limit on repetitions (``MAX_REPETITION``); a larger bound is
  refused by name, as llama.cpp's grammar parser would refuse it;
* a keyword that changes which documents are valid but cannot be expressed as grammar
  (``multipleOf``, ``uniqueItems``, ``not``, ``if``...) is refused by name (``UNENFORCEABLE``),
  so a schema is either enforced or a 400, never half-enforced.

A ``type`` list (``["integer", "null"]``) keeps its bounds on each branch.
"""

from __future__ import annotations

import math
from typing import Any

from llama_cpp.llama_grammar import PRIMITIVE_RULES, RESERVED_NAMES, STRING_FORMAT_RULES, SchemaConverter

from cluster.errors import InvalidParameterError

MAX_REPETITION = 2000
"""llama.cpp's grammar parser refuses a repetition above this many (``MAX_REPETITION_THRESHOLD``)."""
MAX_UNBOUNDED_DIGITS = 16
"""Digits of an integer part without an upper bound (the converter's own integer rule allows 16)."""
UNENFORCEABLE = ("multipleOf", "uniqueItems", "not", "if", "then", "else", "contains", "minContains",
                 "maxContains", "minProperties", "maxProperties", "patternProperties", "propertyNames",
                 "dependentRequired", "dependentSchemas", "dependencies", "unevaluatedProperties",
                 "unevaluatedItems")
"""Keywords that restrict valid documents in ways a context-free grammar here does not express."""
KNOWN_FORMATS = {name.removesuffix("-string") for name in STRING_FORMAT_RULES} | {"uuid", "uuid1", "uuid2", "uuid3",
                                                                                   "uuid4", "uuid5"}
_BOUND_KEYWORDS = ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum")


class UnenforceableSchemaError(InvalidParameterError):
    """A schema keyword (named in the message) that this grammar cannot enforce."""


class BoundedSchemaConverter(SchemaConverter):
    """``SchemaConverter`` that enforces numeric bounds and lengths and refuses what it cannot enforce."""

    def resolve_refs(self, schema: dict, url: str) -> dict:
        """Rewrites every local ``$ref`` (``#/...``, JSON-pointer escapes included) to ``url#/...`` and records its
        target, inside referenced schemas too (the converter's own walk stops at the first ``$ref`` of a node, so a
        recursive definition's inner reference was left unresolved); any other reference is refused."""
        def walk(node: Any) -> None:
            if isinstance(node, list):
                for item in node:
                    walk(item)
            elif isinstance(node, dict):
                ref = node.get("$ref")
                if ref is not None:
                    if not isinstance(ref, str) or not ref.startswith("#"):
                        raise UnenforceableSchemaError(f"the JSON schema's '$ref' {ref!r} cannot be followed: only "
                                                       "references inside the schema ('#/...') are", param="$ref")
                    target: Any = schema
                    for part in ref[1:].split("/")[1:]:
                        part = part.replace("~1", "/").replace("~0", "~")
                        if isinstance(target, list) and part.isdigit() and int(part) < len(target):
                            target = target[int(part)]
                        elif isinstance(target, dict) and part in target:
                            target = target[part]
                        else:
                            raise InvalidParameterError(f"the JSON schema's '$ref' {ref!r} points at nothing",
                                                        param="$ref")
                    node["$ref"] = f"{url}{ref}"
                    self._refs[node["$ref"]] = target
                for value in node.values():
                    walk(value)

        walk(schema)
        return schema

    def visit(self, schema: Any, name: str) -> str:
        if not isinstance(schema, dict):
            return super().visit(schema, name)
        _refuse_unenforceable(schema)
        rule_name = name + "-" if name in RESERVED_NAMES else name or "root"
        schema_type = schema.get("type")
        if isinstance(schema_type, list) and any(k in schema for k in (*_BOUND_KEYWORDS, "minLength", "maxLength",
                                                                        "minItems", "maxItems")):
            branches = [self.visit({**schema, "type": t}, f"{name}{'-' if name else ''}{t}") for t in schema_type]
            return self._add_rule(rule_name, " | ".join(branches))
        if "$ref" in schema or "const" in schema or "enum" in schema or "anyOf" in schema or "oneOf" in schema:
            return super().visit(schema, name)
        if schema_type in ("integer", "number") and any(k in schema for k in _BOUND_KEYWORDS):
            body = integer_rule(schema) if schema_type == "integer" else number_rule(schema)
            return self._add_rule(rule_name, f"({body}) space")
        if schema_type == "string" and ("minLength" in schema or "maxLength" in schema):
            if "pattern" in schema or "format" in schema:
                raise UnenforceableSchemaError(
                    "the JSON schema's 'minLength'/'maxLength' cannot be enforced together with 'pattern' or 'format'; "
                    "put the length in the pattern", param="maxLength" if "maxLength" in schema else "minLength")
            low, high = _length_bounds(schema, "minLength", "maxLength")
            char = self._add_primitive("char", PRIMITIVE_RULES["char"])
            return self._add_rule(rule_name, rf'"\"" {_repeat(char, low, high)} "\"" space')
        is_array = schema_type == "array" or (schema_type is None and "items" in schema)
        if is_array and ("minItems" in schema or "maxItems" in schema):
            if "prefixItems" in schema or isinstance(schema.get("items"), list):
                raise UnenforceableSchemaError("the JSON schema's 'minItems'/'maxItems' cannot be enforced on a tuple "
                                               "('prefixItems'); its length is the tuple's", param="maxItems")
            low, high = _length_bounds(schema, "minItems", "maxItems")
            item = (self.visit(schema["items"], f"{name}{'-' if name else ''}item") if "items" in schema
                    else self._add_primitive("value", PRIMITIVE_RULES["value"]))
            return self._add_rule(rule_name, f'"[" space {_separated(item, low, high)} "]" space')
        return super().visit(schema, name)


def integer_rule(schema: dict[str, Any]) -> str:
    """GBNF (without trailing space) of the integers within ``schema``'s bounds."""
    low, low_exclusive, high, high_exclusive = _bounds(schema)
    lo = None if low is None else (math.floor(low) + 1 if low_exclusive else math.ceil(low))
    hi = None if high is None else (math.ceil(high) - 1 if high_exclusive else math.floor(high))
    if lo is not None and hi is not None and lo > hi:
        raise InvalidParameterError(f"the JSON schema's integer bounds admit no integer ({_describe(schema)})")
    return integer_range(lo, hi)


def number_rule(schema: dict[str, Any]) -> str:
    """GBNF (without trailing space) of decimal numbers within ``schema``'s whole-number bounds."""
    low, low_exclusive, high, high_exclusive = _bounds(schema)
    for keyword, value in (("minimum/exclusiveMinimum", low), ("maximum/exclusiveMaximum", high)):
        if value is not None and value != math.floor(value):
            raise UnenforceableSchemaError(
                f"the JSON schema's '{keyword}' {value} on a number cannot be enforced: only whole-number bounds on "
                "numbers are (use an integer schema, or a whole-number bound)", param=keyword.split("/")[0])
    lo = None if low is None else int(low)
    hi = None if high is None else int(high)
    if lo is not None and hi is not None and (lo > hi or (lo == hi and (low_exclusive or high_exclusive))):
        raise InvalidParameterError(f"the JSON schema's number bounds admit no number ({_describe(schema)})")
    alternatives = []
    if hi is None or hi > 0 or (hi == 0 and not high_exclusive):  # x >= 0
        alternatives += _magnitudes(max(lo, 0) if lo is not None else 0, low_exclusive and (lo or 0) >= 0,
                                    hi, high_exclusive)
    if lo is None or lo < 0:  # x < 0, written "-" m with m = -x
        negative = _magnitudes(-hi if hi is not None and hi < 0 else 0, (high_exclusive if hi is not None and hi < 0
                                                                         else True), None if lo is None else -lo,
                               low_exclusive)
        if negative:
            alternatives.append(f'"-" ({" | ".join(negative)})')
    return " | ".join(alternatives)


def integer_range(lo: int | None, hi: int | None) -> str:
    """GBNF of the integers ``lo <= n <= hi`` as JSON writes them (``None``: that side unbounded)."""
    if lo is not None and hi is not None and lo > hi:
        raise ValueError(f"empty range {lo}..{hi}")
    alternatives = []
    if hi is None or hi >= 0:
        alternatives += _nonnegative(max(lo, 0) if lo is not None else 0, hi)
    if lo is None or lo < 0:
        magnitudes = _nonnegative(max(1, -hi) if hi is not None and hi < 0 else 1, None if lo is None else -lo)
        alternatives.append(f'"-" ({" | ".join(magnitudes)})')
    return " | ".join(alternatives)


def _nonnegative(lo: int, hi: int | None) -> list[str]:
    """Alternatives matching the integers ``lo..hi`` (``lo >= 0``) in decimal without leading zeros."""
    alternatives = []
    last_length = len(str(hi)) if hi is not None else max(len(str(lo)), MAX_UNBOUNDED_DIGITS)
    for length in range(len(str(lo)), last_length + 1):
        first = max(lo, 10 ** (length - 1) if length > 1 else 0)
        last = min(hi, 10**length - 1) if hi is not None else 10**length - 1
        if first <= last:
            alternatives += _same_length(str(first), str(last))
    return alternatives


def _same_length(lo: str, hi: str) -> list[str]:
    """Alternatives matching the digit strings ``lo..hi`` of one length (``lo <= hi``)."""
    if lo == hi:
        return [f'"{lo}"']
    if len(lo) == 1:
        return [f"[{lo}-{hi}]"]
    rest = len(lo) - 1
    if lo[0] == hi[0]:
        return [f'"{lo[0]}" ({" | ".join(_same_length(lo[1:], hi[1:]))})']
    alternatives = []
    low_full, high_full = lo[1:] == "0" * rest, hi[1:] == "9" * rest
    if not low_full:
        alternatives.append(f'"{lo[0]}" ({" | ".join(_same_length(lo[1:], "9" * rest))})')
    first, last = (int(lo[0]) if low_full else int(lo[0]) + 1), (int(hi[0]) if high_full else int(hi[0]) - 1)
    if first <= last:
        alternatives.append(f"[{first}-{last}] [0-9]{{{rest}}}")
    if not high_full:
        alternatives.append(f'"{hi[0]}" ({" | ".join(_same_length("0" * rest, hi[1:]))})')
    return alternatives


_ANY_FRACTION = '("." [0-9]{1,15})?'
_ZERO_FRACTION = '("." "0"{1,15})?'
_NONZERO_FRACTION = '"." "0"{0,14} [1-9] [0-9]{0,14}'  # the first digit that is not zero, then any


def _magnitudes(lo: int, lo_exclusive: bool, hi: int | None, hi_exclusive: bool) -> list[str]:
    """Alternatives matching decimals m >= 0 (no sign, no exponent) with lo < m (lo <= m when inclusive) and
    m < hi (m <= hi when inclusive, no upper bound for ``None``)."""
    alternatives = []
    whole_lo = lo + 1 if lo_exclusive else lo
    whole_hi = None if hi is None else hi - 1
    if whole_hi is None or whole_lo <= whole_hi:  # integer parts whose every fraction is in range
        alternatives.append(f"({integer_range(whole_lo, whole_hi)}) {_ANY_FRACTION}")
    if lo_exclusive and (hi is None or lo < hi):  # lo itself, plus a fraction that is not zero
        alternatives.append(f'"{lo}" {_NONZERO_FRACTION}')
    if hi is not None and not hi_exclusive and hi >= whole_lo:  # hi itself, with zeros only after the point
        alternatives.append(f'"{hi}" {_ZERO_FRACTION}')
    return alternatives


def _bounds(schema: dict[str, Any]) -> tuple[float | None, bool, float | None, bool]:
    """(low, low exclusive, high, high exclusive), the tighter of each pair; draft 4's boolean form too."""
    def number(keyword: str) -> float | None:
        value = schema.get(keyword)
        if value is None or isinstance(value, bool):
            return None
        if not isinstance(value, (int, float)) or not math.isfinite(value):
            raise InvalidParameterError(f"the JSON schema's '{keyword}' must be a finite number, got {value!r}",
                                        param=keyword)
        return value

    low, high = number("minimum"), number("maximum")
    low_exclusive = schema.get("exclusiveMinimum") is True
    high_exclusive = schema.get("exclusiveMaximum") is True
    if (x := number("exclusiveMinimum")) is not None and (low is None or x >= low):
        low, low_exclusive = x, True
    if (x := number("exclusiveMaximum")) is not None and (high is None or x <= high):
        high, high_exclusive = x, True
    return low, low_exclusive, high, high_exclusive


def _length_bounds(schema: dict[str, Any], min_key: str, max_key: str) -> tuple[int, int | None]:
    low, high = schema.get(min_key, 0), schema.get(max_key)
    for key, value in ((min_key, low), (max_key, high)):
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise InvalidParameterError(f"the JSON schema's '{key}' must be a non-negative integer, got {value!r}",
                                        param=key)
        if value > MAX_REPETITION:
            raise UnenforceableSchemaError(
                f"the JSON schema's '{key}' {value} cannot be enforced: a grammar bounds lengths up to "
                f"{MAX_REPETITION} (llama.cpp's limit on repetitions); leave '{key}' out and bound the answer with "
                "max_tokens, or lower it", param=key)
    if high is not None and low > high:
        raise InvalidParameterError(f"the JSON schema's '{min_key}' {low} is above its '{max_key}' {high}",
                                    param=min_key)
    return low, high


def _repeat(item: str, low: int, high: int | None) -> str:
    if high is None:
        return f"{item}{{{low},}}"
    return f"{item}{{{low},{high}}}" if high else ""


def _separated(item: str, low: int, high: int | None) -> str:
    """``item`` repeated ``low..high`` times with ``"," space`` between."""
    if high == 0:
        return ""
    more = "" if high == 1 else f' ("," space {item}){{{max(low - 1, 0)},{"" if high is None else high - 1}}}'
    return f"{item}{more}" if low >= 1 else f"({item}{more})?"


def _refuse_unenforceable(schema: dict[str, Any]) -> None:
    for keyword in UNENFORCEABLE:
        if keyword in schema:
            raise UnenforceableSchemaError(
                f"the JSON schema's '{keyword}' cannot be enforced by the grammar that constrains generation; "
                f"leave it out (an answer would not be guaranteed to satisfy it)", param=keyword)
    fmt = schema.get("format")
    if fmt is not None and schema.get("type") in (None, "string") and fmt not in KNOWN_FORMATS:
        raise UnenforceableSchemaError(
            f"the JSON schema's 'format' {fmt!r} cannot be enforced; the formats that are: "
            f"{', '.join(sorted(KNOWN_FORMATS))}", param="format")


def _describe(schema: dict[str, Any]) -> str:
    return ", ".join(f"{k}={schema[k]!r}" for k in _BOUND_KEYWORDS if k in schema)
