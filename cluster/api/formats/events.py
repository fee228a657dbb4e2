"""What a format's parser yields, in order, and the text helpers every parser shares.

A parser turns a model's answer into events: ``str`` (answer text, OpenAI's ``content``),
``Reasoning`` (the model's thought, ``reasoning_content``) and ``ParsedCall`` (a tool call). The
helpers tell how much of a streamed text may still be the start of a marker (and so must be held
back) and where a JSON value written in the text ends.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Sequence, Union

from cluster.api.tool_calls import ParsedCall, is_function_name

__all__ = ["Event", "ParsedCall", "Reasoning", "arguments_text", "held_suffix", "is_function_name", "json_end"]


@dataclass(frozen=True)
class Reasoning:
    """A piece of the model's thought."""

    text: str


Event = Union[str, Reasoning, ParsedCall]


def held_suffix(text: str, markers: Sequence[str]) -> int:
    """Length of the longest end of ``text`` that is a proper beginning of one of ``markers``
    (text that may still become a marker when more arrives)."""
    longest = 0
    for marker in markers:
        for n in range(min(len(marker) - 1, len(text)), longest, -1):
            if marker.startswith(text[-n:]):
                longest = n
                break
    return longest


def json_end(text: str, start: int) -> int | None:
    """Where the JSON object or array opening at ``text[start]`` ends (the index after its last
    bracket), or None when it has not ended yet. Brackets inside strings do not count; whether
    the text between is valid JSON is left to ``json.loads``."""
    depth, in_string, escaped = 0, False, False
    for i in range(start, len(text)):
        c = text[i]
        if in_string:
            if escaped:
                escaped = False
            elif c == "\\":
                escaped = True
            elif c == '"':
                in_string = False
        elif c == '"':
            in_string = True
        elif c in "{[":
            depth += 1
        elif c in "}]":
            depth -= 1
            if depth == 0:
                return i + 1
    return None


def arguments_text(value: Any) -> str | None:
    """A call's arguments as OpenAI sends them (a JSON object in text): from an object, or from
    text holding one; None when ``value`` is neither."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            return None
    if not isinstance(value, dict):
        return None
    return json.dumps(value, ensure_ascii=False)
