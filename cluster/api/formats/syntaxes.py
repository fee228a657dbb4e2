"""The tool-call formats of the model families, each read as ``cluster.api.formats.blocks`` runs it.

Markers and grammar as llama.cpp's ``common/chat.cpp`` parses them:

* ``hermes`` (Hermes 2/3, Qwen 2.5/3, QwQ): ``<tool_call>{"name", "arguments"}</tool_call>``;
* ``qwen3_coder`` (Qwen3-Coder, Qwen3.5, Nemotron 3): ``<tool_call><function=NAME>
  <parameter=KEY>VALUE</parameter>...</function></tool_call>`` (the ``<tool_call>`` may be left out);
* ``glm45`` (GLM-4.5 to 4.7): ``<tool_call>NAME<arg_key>KEY</arg_key><arg_value>VALUE</arg_value>...</tool_call>``;
* ``deepseek``: ``<｜tool▁calls▁begin｜>`` then per call ``<｜tool▁call▁begin｜>function<｜tool▁sep｜>NAME``
  and a fenced JSON block (R1, V3) or ``NAME<｜tool▁sep｜>{json}`` (V3.1), each ending
  ``<｜tool▁call▁end｜>``, then ``<｜tool▁calls▁end｜>``;
* ``kimi_k2``: ``<|tool_calls_section_begin|>`` then per call ``<|tool_call_begin|>functions.NAME:N
  <|tool_call_argument_begin|>{json}<|tool_call_end|>``, then ``<|tool_calls_section_end|>``; the
  call's id is ``functions.NAME:N``;
* ``mistral``: ``[TOOL_CALLS][{"name", "arguments", "id"?}, ...]`` (Nemo, Small 3) or
  ``[TOOL_CALLS]NAME[CALL_ID]ID[ARGS]{json}`` (Magistral, Devstral; ``[CALL_ID]`` optional);
* ``llama3_json`` (Llama 3.1 to 3.3): an answer that is ``{"name", "parameters"}`` (several
  separated by ``;``), or ``<|python_tag|>`` then such an object or ``NAME.call(KEY=JSON, ...)``.

XML-ish values (Qwen3-Coder, GLM) are text where the tool's schema says string, else JSON when
they parse as JSON. A call without a valid function name or JSON-object arguments leaves its
block as text. The DeepSeek and Kimi sections, and Mistral's calls, may end with the answer.
"""

from __future__ import annotations

import json
import re
from typing import Any, Callable, Sequence

from cluster.api.formats.blocks import Scan, Syntax
from cluster.api.formats.events import ParsedCall, arguments_text, is_function_name, json_end
from cluster.api.tool_calls import parse_call
from cluster.engine.chat_format import DEEPSEEK_CALLS_BEGIN

ToolTypes = dict[str, dict[str, Any]]
"""Per function name, its parameters' JSON schemas (``properties``), to type XML-ish values."""

_WS = " \t\r\n"


def tool_types(tools: Sequence[dict[str, Any]]) -> ToolTypes:
    """The parameter schemas of OpenAI function tools (``{"type": "function", "function": {...}}``)."""
    types: ToolTypes = {}
    for tool in tools:
        function = tool.get("function") if isinstance(tool, dict) else None
        if isinstance(function, dict) and isinstance(function.get("name"), str):
            properties = (function.get("parameters") or {}).get("properties")
            types[function["name"]] = properties if isinstance(properties, dict) else {}
    return types


def _call(name: Any, arguments: Any, call_id: Any = None) -> ParsedCall | None:
    text = arguments_text(arguments)
    if not is_function_name(name) or text is None:
        return None
    if isinstance(call_id, str) and call_id:
        return ParsedCall(name=name, arguments=text, id=call_id)
    return ParsedCall(name=name, arguments=text)


def _typed(value: str, schema: Any) -> Any:
    kind = schema.get("type") if isinstance(schema, dict) else None
    if kind == "string" or (isinstance(kind, list) and "string" in kind):
        return value
    try:
        return json.loads(value)
    except json.JSONDecodeError:
        return value


def _closed(text: str, open_: str, close: str, final: bool, lenient: bool) -> tuple[int, str] | None:
    """The block from ``open_`` to ``close``: (its end, the text between); None while unclosed
    (at the end of the answer, a ``lenient`` block ends there)."""
    end = text.find(close, len(open_))
    if end < 0:
        return (len(text), text[len(open_):]) if final and lenient else None
    return end + len(close), text[len(open_):end]


def _all(pattern: re.Pattern[str], body: str, make: Callable[[re.Match[str]], Any]) -> list[Any] | None:
    """``make`` of each match of ``pattern``, which must cover ``body`` whole, back to back; None if not."""
    out, at = [], 0
    while at < len(body):
        match = pattern.match(body, at)
        if match is None or match.end() == at:
            return None
        item = make(match)
        if item is None:
            return None
        out.append(item)
        at = match.end()
    return out


class _Base:
    opens: tuple[str, ...] = ()
    start_opens: tuple[str, ...] = ()
    separators = _WS

    def __init__(self, types: ToolTypes | None = None) -> None:
        self.types = types or {}


class Hermes(_Base):
    opens = ("<tool_call>",)

    def scan(self, text: str, final: bool) -> Scan | None:
        at = len(self.opens[0])
        while at < len(text) and text[at] in _WS:
            at += 1
        if at < len(text) and text[at] == "{":  # the block ends after its JSON ('</tool_call>' may be in a string)
            end = json_end(text, at)
            rest = text[end:].lstrip(_WS) if end is not None else ""
            if end is not None and rest.startswith("</tool_call>"):
                call = parse_call(text[at:end])
                return Scan(len(text) - len(rest) + len("</tool_call>"), [call] if call is not None else None)
            if not final and (end is None or "</tool_call>".startswith(rest)):
                return None
        block = _closed(text, "<tool_call>", "</tool_call>", final, lenient=False)
        if block is None:
            return None
        call = parse_call(block[1].strip())
        return Scan(block[0], [call] if call is not None else None)


_QWEN_FUNCTION = re.compile(r"\s*<function=([^>\n]+)>(.*?)</function>\s*", re.S)
_QWEN_PARAMETER = re.compile(r"\s*<parameter=([^>\n]+)>(.*?)</parameter>\s*", re.S)


class Qwen3Coder(_Base):
    opens = ("<tool_call>", "<function=")

    def scan(self, text: str, final: bool) -> Scan | None:
        if text.startswith("<function="):
            block = _closed(text, "", "</function>", final, lenient=False)
            body = text[:block[0]] if block else ""
        else:
            block = _closed(text, "<tool_call>", "</tool_call>", final, lenient=False)
            body = block[1] if block else ""
        if block is None:
            return None
        calls = _all(_QWEN_FUNCTION, body, self._function) if body.strip() else None
        return Scan(block[0], calls)

    def _function(self, match: re.Match[str]) -> ParsedCall | None:
        name = match.group(1).strip()
        schema = self.types.get(name, {})
        pairs = _all(_QWEN_PARAMETER, match.group(2), lambda p: (p.group(1).strip(), _raw_value(p.group(2))))
        if pairs is None:
            return None
        return _call(name, {k: _typed(v, schema.get(k)) for k, v in pairs})


def _raw_value(value: str) -> str:
    """A value between XML-ish tags without the newline the template puts on each side."""
    if value.startswith("\n"):
        value = value[1:]
    return value[:-1] if value.endswith("\n") else value


_GLM_ARGUMENT = re.compile(r"\s*<arg_key>(.*?)</arg_key>\s*<arg_value>(.*?)</arg_value>\s*", re.S)


class Glm45(_Base):
    opens = ("<tool_call>",)

    def scan(self, text: str, final: bool) -> Scan | None:
        block = _closed(text, "<tool_call>", "</tool_call>", final, lenient=False)
        if block is None:
            return None
        body = block[1]
        split = body.find("<arg_key>")
        name = (body if split < 0 else body[:split]).strip()
        schema = self.types.get(name, {})
        pairs = _all(_GLM_ARGUMENT, body[len(body) if split < 0 else split:], lambda p: (p.group(1).strip(), p.group(2)))
        call = _call(name, {k: _typed(v, schema.get(k)) for k, v in pairs}) if pairs is not None else None
        return Scan(block[0], [call] if call is not None else None)


_DEEPSEEK_CALL = re.compile(r"\s*(?:<｜tool▁call▁begin｜>)?(.*?)<｜tool▁sep｜>(.*?)<｜tool▁call▁end｜>\s*", re.S)
_DEEPSEEK_FENCED = re.compile(r"([^\n]+)\n```(?:json)?\n?(.*?)\s*```\s*", re.S)


class DeepSeek(_Base):
    opens = DEEPSEEK_CALLS_BEGIN

    def scan(self, text: str, final: bool) -> Scan | None:
        open_ = next(m for m in self.opens if text.startswith(m))
        block = _closed(text, open_, "<｜tool▁calls▁end｜>", final, lenient=True)
        if block is None:
            return None
        calls = _all(_DEEPSEEK_CALL, block[1], self._call) if block[1].strip() else None
        return Scan(block[0], calls)

    @staticmethod
    def _call(match: re.Match[str]) -> ParsedCall | None:
        kind, rest = match.group(1).strip(), match.group(2)
        fenced = _DEEPSEEK_FENCED.fullmatch(rest) if kind == "function" else None
        if fenced is not None:  # R1 / V3: function<｜tool▁sep｜>NAME\n```json\n{...}\n```
            return _call(fenced.group(1).strip(), fenced.group(2))
        return _call(kind, rest.strip())  # V3.1: NAME<｜tool▁sep｜>{...}


_KIMI_CALL = re.compile(r"\s*<\|tool_call_begin\|>\s*(.*?)\s*<\|tool_call_argument_begin\|>(.*?)<\|tool_call_end\|>\s*", re.S)
_KIMI_ID = re.compile(r"(?:functions\.)?([A-Za-z0-9_-]+)(?::\d+)?")


class KimiK2(_Base):
    opens = ("<|tool_calls_section_begin|>",)

    def scan(self, text: str, final: bool) -> Scan | None:
        block = _closed(text, self.opens[0], "<|tool_calls_section_end|>", final, lenient=True)
        if block is None:
            return None
        calls = _all(_KIMI_CALL, block[1], self._call) if block[1].strip() else None
        return Scan(block[0], calls)

    @staticmethod
    def _call(match: re.Match[str]) -> ParsedCall | None:
        call_id = match.group(1)
        name = _KIMI_ID.fullmatch(call_id)
        if name is None:
            return None
        return _call(name.group(1), match.group(2).strip(), call_id if ":" in call_id else None)


_MISTRAL_HEAD = re.compile(r"([A-Za-z0-9_-]+)(?:\[CALL_ID\]([A-Za-z0-9_-]+))?")
_MISTRAL_MAYBE_HEAD = re.compile(r"[A-Za-z0-9_\-\[\]]*")


class Mistral(_Base):
    opens = ("[TOOL_CALLS]",)

    def scan(self, text: str, final: bool) -> Scan | None:
        at = len(self.opens[0])
        while at < len(text) and text[at] in _WS:
            at += 1
        if at == len(text):
            return None if not final else Scan(len(self.opens[0]), None)
        if text[at] == "[":  # [TOOL_CALLS][{"name": ..., "arguments": {...}, "id": ...}, ...]
            end = json_end(text, at)
            if end is None:
                return None if not final else Scan(len(self.opens[0]), None)
            return Scan(end, self._array(text[at:end]))
        args = text.find("[ARGS]", at)
        if args < 0:  # NAME[CALL_ID]ID[ARGS]{...}, still coming?
            if not final and _MISTRAL_MAYBE_HEAD.fullmatch(text, at):
                return None
            return Scan(len(self.opens[0]), None)
        head = _MISTRAL_HEAD.fullmatch(text, at, args)
        start = args + len("[ARGS]")
        while start < len(text) and text[start] in _WS:
            start += 1
        if head is None or (start < len(text) and text[start] != "{"):
            return Scan(len(self.opens[0]), None)
        end = json_end(text, start) if start < len(text) else None
        if end is None:
            return None if not final else Scan(len(self.opens[0]), None)
        call = _call(head.group(1), text[start:end], head.group(2))
        return Scan(end, [call]) if call is not None else Scan(len(self.opens[0]), None)

    @staticmethod
    def _array(text: str) -> list[ParsedCall] | None:
        try:
            items = json.loads(text)
        except json.JSONDecodeError:
            return None
        if not isinstance(items, list) or not items:
            return None
        calls = [_call(i.get("name"), i.get("arguments", {}), i.get("id")) if isinstance(i, dict) else None
                 for i in items]
        return calls if all(c is not None for c in calls) else None  # type: ignore[return-value]


_PYTHON_CALL = re.compile(r"\s*([A-Za-z_]\w*)\s*\.\s*call\(")
_PYTHON_MAYBE_CALL = re.compile(r"\s*[A-Za-z_]\w*\s*(?:\.\s*(?:c(?:a(?:l(?:l)?)?)?)?)?")
_PYTHON_ARG = re.compile(r"\s*(\w+)\s*=\s*")
_DECODER = json.JSONDecoder()


class Llama3Json(_Base):
    opens = ("<|python_tag|>",)
    start_opens = ("{",)
    separators = _WS + ";"

    def scan(self, text: str, final: bool) -> Scan | None:
        if text.startswith("{"):
            return self._object(text, 0, final, start_only=True)
        at = len(self.opens[0])
        rest = text[at:].lstrip()
        if not rest:
            return None if not final else Scan(at, None)
        if rest.startswith("{"):
            return self._object(text, len(text) - len(rest), final, start_only=False)
        call = _PYTHON_CALL.match(text, at)
        if call is None:
            if not final and _PYTHON_MAYBE_CALL.fullmatch(text, at):
                return None
            return Scan(at, None)
        return self._python_call(text, call, final)

    @staticmethod
    def _object(text: str, start: int, final: bool, start_only: bool) -> Scan | None:
        end = json_end(text, start)
        if end is None:
            return None if not final else Scan(len(text) if start_only else start, None)
        try:
            data = json.loads(text[start:end])
        except json.JSONDecodeError:
            data = None
        call = None
        if isinstance(data, dict) and data.get("type", "function") == "function" and \
                set(data) <= {"type", "name", "parameters", "arguments"}:
            call = _call(data.get("name"), data.get("parameters", data.get("arguments")))
        if call is None:
            return Scan(end if start_only else start, None)
        return Scan(end, [call])

    @staticmethod
    def _python_call(text: str, call: re.Match[str], final: bool) -> Scan | None:
        """``<|python_tag|>NAME.call(KEY=JSON, ...)`` (Llama 3.1's built-in tools)."""
        arguments: dict[str, Any] = {}
        at = call.end()
        not_call = Scan(len(Llama3Json.opens[0]), None)
        while True:
            while at < len(text) and text[at] in _WS:
                at += 1
            if at == len(text):
                return None if not final else not_call
            if text[at] == ")":
                parsed = _call(call.group(1), arguments)
                return Scan(at + 1, [parsed]) if parsed is not None else not_call
            if arguments:
                if text[at] != ",":
                    return not_call
                at += 1
            key = _PYTHON_ARG.match(text, at)
            if key is None:  # a key still being written, or not a call
                return None if not final and re.fullmatch(r"\s*\w*\s*", text[at:]) else not_call
            try:
                value, at = _DECODER.raw_decode(text, key.end())
            except json.JSONDecodeError:
                return None if not final else not_call
            arguments[key.group(1)] = value


def syntax_for(name: str, types: ToolTypes | None = None) -> Syntax | None:
    """The parser of the tool-call format ``name`` (``cluster.engine.chat_format``), None if not parsed."""
    kind = _SYNTAXES.get(name)
    return kind(types) if kind is not None else None


_SYNTAXES: dict[str, type[_Base]] = {"hermes": Hermes, "qwen3_coder": Qwen3Coder, "glm45": Glm45, "deepseek": DeepSeek,
                                     "kimi_k2": KimiK2, "mistral": Mistral, "llama3_json": Llama3Json}
