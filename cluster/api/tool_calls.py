"""A tool call as OpenAI's ``tool_calls`` carry it, and the rules every format's parser applies to one.

``ParsedCall`` is one call (id, function name, arguments as JSON text); ``parse_call`` reads the JSON
object of a call (``{"name": "f", "arguments": {...}}``, the arguments possibly already serialised)
and returns None where it is not one, so the block stays text; ``is_function_name`` is OpenAI's rule
for names. The formats themselves (Hermes ``<tool_call>`` blocks and the others, whole and streamed)
are parsed in ``cluster.api.formats``.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass, field
from typing import Any

FUNCTION_NAME = re.compile(r"[a-zA-Z0-9_-]{1,64}")
"""What a tool's function name may be (OpenAI's rule, ``^[a-zA-Z0-9_-]{1,64}$``): letters, digits,
underscores and dashes, 1 to 64 of them."""


def is_function_name(name: Any) -> bool:
    """``name`` is a string OpenAI accepts as a function name (``FUNCTION_NAME``)."""
    return isinstance(name, str) and FUNCTION_NAME.fullmatch(name) is not None


@dataclass(frozen=True)
class ParsedCall:
    """One call found in the output: its id, function name and arguments (JSON text)."""

    name: str
    arguments: str
    id: str = field(default_factory=lambda: "call_" + uuid.uuid4().hex[:24])


def parse_call(body: str) -> ParsedCall | None:
    """The call in the text between the tags, or None if it is not one."""
    try:
        data: Any = json.loads(body)
    except json.JSONDecodeError:
        return None
    if not isinstance(data, dict) or not isinstance(data.get("name"), str) or not data["name"]:
        return None
    arguments = data.get("arguments", data.get("parameters", {}))
    if isinstance(arguments, str):  # some models write the arguments already serialised
        try:
            arguments = json.loads(arguments)
        except json.JSONDecodeError:
            return None
    if not isinstance(arguments, dict):
        return None
    return ParsedCall(name=data["name"], arguments=json.dumps(arguments, ensure_ascii=False))
