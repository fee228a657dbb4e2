"""Chat rendering: a conversation turned into the prompt text the model was trained on.

Published chat models carry their own template (GGUF ``tokenizer.chat_template``, Jinja) that
wraps each turn in control tokens such as ``<|im_start|>`` / ``<|im_end|>``. ``ChatTemplate``
renders a ``ChatPrompt`` with it in a sandboxed Jinja environment
(``jinja2.sandbox.ImmutableSandboxedEnvironment``) with the variables and helpers templates
use: ``messages``, ``add_generation_prompt``, ``bos_token``, ``eos_token``, ``tools`` (when
given), ``raise_exception(message)``, ``strftime_now(format)`` and a JSON ``tojson`` filter.
Compiling and rendering happen in worker processes with a time, size and memory limit
(``cluster.engine.template_render``): a template that exceeds one is a ``TemplateLimitError``,
and the deployment refuses such a template at start-up, on a probe conversation.
The text it produces is tokenized with special tokens parsed (``cluster.engine.tokenizer``).

A model without a template keeps the plain rendering (``role: content`` lines, then
``assistant:``), and says so: ``ChatTemplate.origin`` is ``model``, ``override`` (a template
given by the operator, ``serve --chat-template FILE``) or ``none``.

``ChatRenderer`` picks the template a deployment uses (an override, else the model's) and
finds the token that ends an assistant turn in it, on which generation stops (the format's own
stops where it names them: gpt-oss's ``<|return|>`` and ``<|call|>``, not the ``<|end|>`` of each
message), and the tokens of its format's markers, which a chat answer writes as their text even
when they are control tokens (``cluster.engine.chat_format.ChatFormat.preserved``).

A template's own failure (it raises, it uses something the sandbox forbids, a variable it
needs is missing) is a ``ChatTemplateError`` naming the problem: the caller's conversation is
what the template refused, so the HTTP layer answers 400.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from typing import Any, Callable, Literal, Protocol, Sequence

import jinja2
import jinja2.meta

from cluster.engine.chat_format import ChatFormat, detect_format, tools_refusal
from cluster.engine.sampling import SamplingParams
from cluster.engine.template_render import RenderFailure, render_pool, sandbox
from cluster.errors import ChatTemplateError, InvalidParameterError, TemplateLimitError

ROLES = ("system", "user", "assistant", "tool")
CHAT_ROLES = (*ROLES, "developer")  # the roles a message dict may name; "developer" is OpenAI's newer name for system
_MESSAGE_FIELDS = frozenset({"role", "content", "name", "tool_calls", "tool_call_id", "refusal"})
TemplateOrigin = Literal["model", "override", "none"]
_SENTINEL = "\u2063SNIPER-END-OF-TURN-PROBE\u2063"  # an answer no template rewrites


class VocabularyLike(Protocol):
    """What rendering needs of a tokenizer (``cluster.engine.tokenizer.Tokenizer`` has it)."""

    bos_text: str
    eos_text: str

    def chat_template(self) -> str | None: ...

    def tokenize(self, text: str, special: bool = False, add_special: bool = True) -> list[int]: ...

    def is_control(self, token: int) -> bool: ...


@dataclass(frozen=True)
class ToolCall:
    """A function call an assistant turn made.

    Attributes:
        id: the call's id (``call_...``), which the tool's answer refers to.
        name: the function's name.
        arguments: the arguments as a JSON object in text (OpenAI's wire form).
    """

    id: str
    name: str
    arguments: str


@dataclass(frozen=True)
class ChatMessage:
    """One turn of a conversation.

    Attributes:
        role: ``system``, ``user``, ``assistant`` or ``tool``.
        content: the text (None: an assistant turn made only of tool calls).
        tool_calls: the calls an assistant turn made.
        tool_call_id: for a ``tool`` turn: which call it answers.
        name: an optional participant or function name.
    """

    role: str
    content: str | None
    tool_calls: tuple[ToolCall, ...] = ()
    tool_call_id: str | None = None
    name: str | None = None

    def for_template(self) -> dict[str, Any]:
        """The message as templates read it (HF / OpenAI dict shape, absent fields left out;
        tool-call arguments as objects, which templates serialise with ``tojson``)."""
        out: dict[str, Any] = {"role": self.role, "content": self.content if self.content is not None else ""}
        if self.tool_calls:
            out["tool_calls"] = [{"id": c.id, "type": "function",
                                  "function": {"name": c.name, "arguments": json.loads(c.arguments)}}
                                 for c in self.tool_calls]
        if self.tool_call_id is not None:
            out["tool_call_id"] = self.tool_call_id
        if self.name is not None:
            out["name"] = self.name
        return out


def chat_messages(raw: Any) -> tuple[ChatMessage, ...]:
    """A conversation from what a caller gives: a non-empty list of ``ChatMessage`` objects or
    OpenAI-style message dicts (``{"role", "content", "name"?, "tool_calls"?, "tool_call_id"?}``;
    ``content`` a string or a list of text parts, ``tool_calls`` in OpenAI's wire shape). The
    HTTP layer and the Python client both read messages with it.

    Raises:
        InvalidParameterError: the list or one message is not of that form; the message and
            ``param`` name the place (``messages[1].content``).
    """
    if not isinstance(raw, (list, tuple)) or not raw:
        raise InvalidParameterError(f"messages must be a non-empty list of ChatMessage objects or {{role, content}} "
                                    f"dicts, got {_describe(raw)}", param="messages")
    return tuple(m if isinstance(m, ChatMessage) else _message(m, f"messages[{i}]") for i, m in enumerate(raw))


def _describe(value: Any) -> str:
    return repr(value) if isinstance(value, (list, tuple)) else type(value).__name__


def _message(message: Any, where: str) -> ChatMessage:
    if not isinstance(message, dict):
        raise InvalidParameterError(f"{where} must be a ChatMessage or a {{role, content}} dict, "
                                    f"got {type(message).__name__}", param=where)
    if message.get("role") not in CHAT_ROLES:
        raise InvalidParameterError(f"{where}.role must be one of {', '.join(CHAT_ROLES)}", param=f"{where}.role")
    role = "system" if message["role"] == "developer" else message["role"]
    unknown = sorted(set(message) - _MESSAGE_FIELDS, key=str)
    if unknown:
        raise InvalidParameterError(f"{where}: unrecognized field '{unknown[0]}'", param=f"{where}.{unknown[0]}")
    content = _content(message.get("content"), where, optional=role == "assistant" and bool(message.get("tool_calls")))
    calls = _message_tool_calls(message.get("tool_calls"), where) if role == "assistant" else ()
    if role != "assistant" and message.get("tool_calls") is not None:
        raise InvalidParameterError(f"{where}.tool_calls: only assistant messages make tool calls",
                                    param=f"{where}.tool_calls")
    call_id = message.get("tool_call_id")
    if role == "tool":
        if not isinstance(call_id, str) or not call_id:
            raise InvalidParameterError(f"{where}.tool_call_id: a tool message must say which call it answers",
                                        param=f"{where}.tool_call_id")
    elif call_id is not None:
        raise InvalidParameterError(f"{where}.tool_call_id: only tool messages answer calls", param=f"{where}.tool_call_id")
    name = message.get("name")
    if name is not None and (not isinstance(name, str) or not name):
        raise InvalidParameterError(f"{where}.name must be a non-empty string", param=f"{where}.name")
    return ChatMessage(role=role, content=content, tool_calls=calls, tool_call_id=call_id, name=name)


def _content(content: Any, where: str, optional: bool) -> str | None:
    if content is None and optional:
        return None
    if isinstance(content, list):  # [{"type": "text", "text": ...}, ...]
        if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str) for p in content):
            raise InvalidParameterError(f"{where}.content: only text parts are supported", param=f"{where}.content")
        return "".join(part["text"] for part in content)
    if not isinstance(content, str):
        raise InvalidParameterError(f"{where}.content must be a string or a list of text parts",
                                    param=f"{where}.content")
    return content


def _message_tool_calls(raw: Any, where: str) -> tuple[ToolCall, ...]:
    if raw is None:
        return ()
    if not isinstance(raw, (list, tuple)):
        raise InvalidParameterError(f"{where}.tool_calls must be a list", param=f"{where}.tool_calls")
    calls = []
    for j, call in enumerate(raw):
        if isinstance(call, ToolCall):
            calls.append(call)
            continue
        at = f"{where}.tool_calls[{j}]"
        function = call.get("function") if isinstance(call, dict) else None
        if not isinstance(function, dict) or call.get("type", "function") != "function" \
                or not isinstance(function.get("name"), str) or not function["name"]:
            raise InvalidParameterError(f"{at} must be {{id, type: 'function', function: {{name, arguments}}}}", param=at)
        arguments = function.get("arguments", "{}")
        try:
            parsed = json.loads(arguments) if isinstance(arguments, str) else None
        except json.JSONDecodeError:
            parsed = None
        if not isinstance(parsed, dict):
            raise InvalidParameterError(f"{at}.function.arguments must be a JSON object in a string",
                                        param=f"{at}.function.arguments")
        call_id = call.get("id") or f"call_{j}"
        if not isinstance(call_id, str):
            raise InvalidParameterError(f"{at}.id must be a string", param=f"{at}.id")
        calls.append(ToolCall(id=call_id, name=function["name"], arguments=arguments))
    return tuple(calls)


@dataclass(frozen=True)
class ChatPrompt:
    """A conversation to render, and the tools the model may call.

    Attributes:
        messages: the turns so far.
        tools: function tools in OpenAI's JSON shape (``{"type": "function", "function":
            {"name", "description", "parameters"}}``), serialised as JSON text so the prompt
            stays immutable; empty: no tools.
        add_generation_prompt: end with the opening of an assistant turn.
        forced_tool_choice: ``tool_choice`` ``required`` or named: a grammar makes the answer one
            call in the Hermes ``<tool_call>`` format (``cluster.engine.grammar.tool_call_grammar``),
            so the template must be of that format, and the answer starts with the call.
    """

    messages: tuple[ChatMessage, ...]
    tools: tuple[str, ...] = ()
    add_generation_prompt: bool = True
    forced_tool_choice: bool = False

    def tools_for_template(self) -> list[dict[str, Any]] | None:
        return [json.loads(t) for t in self.tools] or None


@dataclass(frozen=True)
class RenderedChat:
    """A conversation rendered: the prompt text and how it was made.

    Attributes:
        text: the prompt.
        origin: which template made it (``model``, ``override`` or ``none``: plain rendering).
        special: the text holds special-token texts to be parsed as tokens.
        end_of_turn: the template's end-of-turn text (``<|im_end|>``), if it has one.
        chat_format: the template's output format (``cluster.engine.chat_format``), None for the
            plain rendering; the answer is taken apart by it.
        thinking_open: the prompt ends inside an opened thought (``<think>``): the answer starts
            with reasoning.
    """

    text: str
    origin: TemplateOrigin
    special: bool
    end_of_turn: str | None = None
    chat_format: str | None = None
    thinking_open: bool = False


@dataclass(frozen=True)
class ChatTemplate:
    """A compiled chat template (or the plain rendering when ``source`` is None).

    Build with ``ChatTemplate.create``; a template that does not compile is refused there.
    """

    source: str | None
    origin: TemplateOrigin
    bos_token: str = ""
    eos_token: str = ""

    @classmethod
    def create(cls, source: str | None, origin: TemplateOrigin, bos_token: str = "", eos_token: str = "") -> ChatTemplate:
        """Compiles ``source``; None (or origin ``none``) is the plain rendering.

        Raises:
            ChatTemplateError: the template does not compile (its line and the parser's message);
                ``TemplateLimitError`` if compiling it exceeds a limit.
        """
        if source is None or origin == "none":
            return cls(None, "none", bos_token, eos_token)
        try:
            render_pool().compile(source)
        except RenderFailure as failure:
            raise _template_error(failure, f"the {origin} chat template does not compile") from None
        return cls(source, origin, bos_token, eos_token)

    @property
    def format(self) -> ChatFormat:
        """The output format the template teaches (``cluster.engine.chat_format.detect_format``)."""
        return detect_format(self.source)

    @property
    def supports_tools(self) -> bool:
        """The template reads ``tools`` and shows a tool-call format this service parses back
        (``cluster.engine.chat_format.PARSED_FORMATS``)."""
        if self.source is None or not self.format.parsed:
            return False
        return "tools" in jinja2.meta.find_undeclared_variables(sandbox().parse(self.source))

    def render(self, prompt: ChatPrompt) -> RenderedChat:
        """The prompt text of a conversation.

        Raises:
            ChatTemplateError: tools asked of a template that cannot take them, or the template
                failed on this conversation (the message says how).
        """
        if prompt.tools and not self.supports_tools:
            what = "the model has no chat template" if self.source is None else tools_refusal(self.format)
            raise ChatTemplateError(f"'tools' cannot be used with this model: {what}", param="tools")
        if prompt.forced_tool_choice and prompt.tools and self.format.name != "hermes":
            raise ChatTemplateError(f"a forced 'tool_choice' (required or named) is enforced in the Hermes <tool_call> format, "
                                    f"and this model's chat template uses the '{self.format.name}' format: use 'auto'",
                                    param="tool_choice")
        if self.source is None:
            return RenderedChat(plain_prompt(prompt.messages), "none", special=False)
        text = self._render(prompt.messages, prompt.tools_for_template(), prompt.add_generation_prompt)
        fmt = self.format
        return RenderedChat(text, self.origin, special=True, end_of_turn=self.end_of_turn(), chat_format=fmt.name,
                            thinking_open=fmt.thinking_open(text) and not prompt.forced_tool_choice)

    def _render(self, messages: Sequence[ChatMessage], tools: list[dict[str, Any]] | None,
                add_generation_prompt: bool) -> str:
        variables: dict[str, Any] = {"messages": [m.for_template() for m in messages],
                                     "add_generation_prompt": add_generation_prompt,
                                     "bos_token": self.bos_token, "eos_token": self.eos_token}
        if tools:
            variables["tools"] = tools
        try:
            return render_pool().render(self.source, variables)
        except RenderFailure as failure:
            what = {"raised": "refused the conversation", "limit": "was stopped"}.get(failure.kind,
                                                                                     "failed on the conversation")
            raise _template_error(failure, f"the {self.origin} chat template {what}") from None

    def end_of_turn(self) -> str | None:
        """The text the template writes right after an assistant's answer, up to the first
        whitespace (``<|im_end|>``, ``<|eot_id|>``); None if it writes nothing there or cannot
        render a one-turn exchange. The router stops generation on it when it is a control token.

        Raises:
            TemplateLimitError: rendering the exchange exceeds a limit (the probe of the module docstring).
        """
        if self.source is None:
            return None
        probe = (ChatMessage("user", "hi"), ChatMessage("assistant", _SENTINEL))
        try:
            text = self._render(probe, None, add_generation_prompt=False)
        except TemplateLimitError:
            raise
        except ChatTemplateError:
            return None
        at = text.find(_SENTINEL)
        if at < 0:
            return None
        after = text[at + len(_SENTINEL):].split(maxsplit=1)
        return after[0] if after else None


class ChatRenderer:
    """The deployment's chat template (an override, else the model's own, else the plain
    rendering) with the token ids that end an assistant turn in it."""

    def __init__(self, tokenizer: VocabularyLike, override: str | None = None) -> None:
        """Raises ChatTemplateError if ``override`` does not compile. A model's own template
        that does not compile does not stop the deployment (completions still work): chat
        requests are then refused with that error, which suggests an override."""
        source = override if override is not None else tokenizer.chat_template()
        origin: TemplateOrigin = "override" if override is not None else "model" if source is not None else "none"
        self.origin = origin
        self.broken: ChatTemplateError | None = None
        try:
            self.template = ChatTemplate.create(source, origin, tokenizer.bos_text, tokenizer.eos_text)
        except ChatTemplateError as exc:
            if override is not None:
                raise
            self.broken = ChatTemplateError(f"{exc}; serve --chat-template FILE can replace it", param="messages")
            self.template = ChatTemplate.create(None, "none")
        try:
            end = self.template.end_of_turn()
        except TemplateLimitError as exc:
            if override is not None:
                raise
            self.broken = ChatTemplateError(f"{exc}; serve --chat-template FILE can replace it", param="messages")
            self.template, end = ChatTemplate.create(None, "none"), None
        self.supports_tools = self.broken is None and self.template.supports_tools
        fmt = self.template.format if self.template.source is not None else None
        preserved = fmt.preserved if fmt is not None else ()
        # the format's markers that are one token of this vocabulary: written as their text
        self.preserved_ids: tuple[int, ...] = tuple(sorted({t for t in map(_single(tokenizer), preserved) if t is not None}))
        stops = tuple(t for t in map(_single(tokenizer), (fmt.stops or ()) if fmt is not None else ()) if t is not None)
        if not stops and end and end not in preserved:  # the template's end of turn, if one control token
            token = _single(tokenizer)(end)
            stops = (token,) if token is not None and tokenizer.is_control(token) else ()
        self.end_of_turn_ids: tuple[int, ...] = stops

    def render(self, chat: ChatPrompt) -> RenderedChat:
        if not isinstance(chat, ChatPrompt):
            raise InvalidParameterError(f"chat must be a ChatPrompt, got {type(chat).__name__}", param="messages")
        if self.broken is not None:
            raise self.broken
        return self.template.render(chat)

    def chat_params(self, params: SamplingParams) -> SamplingParams:
        """``params`` of a chat request: they also stop on the tokens that end the template's turn
        (``end_of_turn_ids``) and write its format's markers as their text (``preserved_ids``)."""
        extra = tuple(t for t in self.end_of_turn_ids if t not in params.stop_token_ids)
        if extra:
            params = replace(params, stop_token_ids=params.stop_token_ids + extra)
        kept = tuple(sorted(set(params.preserved_token_ids) | set(self.preserved_ids)))
        return replace(params, preserved_token_ids=kept) if kept != params.preserved_token_ids else params


def _single(tokenizer: VocabularyLike) -> Callable[[str], int | None]:
    """``text`` -> its token id when it is one token of the vocabulary (special texts parsed), else None."""
    def token(text: str) -> int | None:
        ids = tokenizer.tokenize(text, special=True, add_special=False)
        return ids[0] if len(ids) == 1 else None
    return token


def plain_prompt(messages: Sequence[ChatMessage]) -> str:
    """The rendering for models without a template: ``role: content`` lines, then ``assistant:``.

    The same history always renders to the same prefix, so a conversation's next turn reuses
    the KV state its node kept (and the router sees the shared prefix).
    """
    return "".join(f"{m.role}: {m.content or ''}\n" for m in messages) + "assistant:"


def _template_error(failure: RenderFailure, what: str) -> ChatTemplateError:
    kind = TemplateLimitError if failure.kind == "limit" else ChatTemplateError
    return kind(f"{what}: {failure.message}", param="messages")


# -- templates written into synthetic chat models (cluster.models.synth) --------------------------------

CHATML_TEMPLATE = (
    "{%- if messages and messages[0].role == 'system' -%}\n"
    "    {%- set system = messages[0].content -%}\n"
    "    {%- set turns = messages[1:] -%}\n"
    "{%- else -%}\n"
    "    {%- set system = '' -%}\n"
    "    {%- set turns = messages -%}\n"
    "{%- endif -%}\n"
    "{%- if tools -%}\n"
    "    {{- '<|im_start|>system\\n' -}}\n"
    "    {%- if system -%}{{- system + '\\n\\n' -}}{%- endif -%}\n"
    "    {{- 'Functions you may call, one JSON signature per line:\\n<tools>\\n' -}}\n"
    "    {%- for tool in tools -%}{{- tool | tojson -}}{{- '\\n' -}}{%- endfor -%}\n"
    "    {{- '</tools>\\nTo call one, answer with <tool_call>\\n{\"name\": NAME, \"arguments\": OBJECT}\\n</tool_call>'"
    " + '<|im_end|>\\n' -}}\n"
    "{%- elif system -%}\n"
    "    {{- '<|im_start|>system\\n' + system + '<|im_end|>\\n' -}}\n"
    "{%- endif -%}\n"
    "{%- set state = namespace(called=false) -%}\n"
    "{%- for message in turns -%}\n"
    "    {%- if message.role == 'user' or message.role == 'system' -%}\n"
    "        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' -}}\n"
    "        {%- set state.called = false -%}\n"
    "    {%- elif message.role == 'assistant' -%}\n"
    "        {{- '<|im_start|>assistant\\n' + message.content -}}\n"
    "        {%- for call in message.tool_calls or [] -%}\n"
    "            {%- if message.content or not loop.first -%}{{- '\\n' -}}{%- endif -%}\n"
    "            {{- '<tool_call>\\n{\"name\": ' + call.function.name | tojson + ', \"arguments\": '"
    " + call.function.arguments | tojson + '}\\n</tool_call>' -}}\n"
    "        {%- endfor -%}\n"
    "        {{- '<|im_end|>\\n' -}}\n"
    "        {%- set state.called = (message.tool_calls or []) | length > 0 -%}\n"
    "    {%- elif message.role == 'tool' -%}\n"
    "        {%- if not state.called -%}\n"
    "            {{- raise_exception('a tool result must follow an assistant turn that called a tool') -}}\n"
    "        {%- endif -%}\n"
    "        {{- '<|im_start|>user\\n<tool_response>\\n' + message.content + '\\n</tool_response><|im_end|>\\n' -}}\n"
    "    {%- else -%}\n"
    "        {{- raise_exception('ChatML turns are system, user, assistant or tool, not ' + message.role) -}}\n"
    "    {%- endif -%}\n"
    "{%- endfor -%}\n"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}\n"
)
"""A ChatML template (Qwen / Hermes turn format) with Hermes-style tools, written for this project."""

LLAMA3_TEMPLATE = (
    "{{- bos_token -}}\n"
    "{%- for message in messages -%}\n"
    "    {%- if message.role not in ['system', 'user', 'assistant'] -%}\n"
    "        {{- raise_exception('this template has no ' + message.role + ' turns (system, user, assistant)') -}}\n"
    "    {%- endif -%}\n"
    "    {{- '<|start_header_id|>' + message.role + '<|end_header_id|>\\n\\n' + message.content | trim + '<|eot_id|>' -}}\n"
    "{%- endfor -%}\n"
    "{%- if add_generation_prompt -%}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' -}}{%- endif -%}\n"
)
"""A Llama-3-style header template (no tools), written for this project."""

HARMONY_TEMPLATE = (
    "{%- if tools -%}\n"
    "    {{- '<|start|>developer<|message|># Tools\\n\\n## functions\\n\\n' -}}\n"
    "    {%- for tool in tools -%}{{- tool | tojson -}}{{- '\\n' -}}{%- endfor -%}\n"
    "    {{- '<|end|>' -}}\n"
    "{%- endif -%}\n"
    "{%- for message in messages -%}\n"
    "    {%- if message.role == 'assistant' -%}\n"
    "        {%- if message.content -%}\n"
    "            {{- '<|start|>assistant<|channel|>final<|message|>' + message.content + '<|end|>' -}}\n"
    "        {%- endif -%}\n"
    "        {%- for call in message.tool_calls or [] -%}\n"
    "            {{- '<|start|>assistant<|channel|>commentary to=functions.' + call.function.name"
    " + ' <|constrain|>json<|message|>' + call.function.arguments | tojson + '<|call|>' -}}\n"
    "        {%- endfor -%}\n"
    "    {%- elif message.role == 'tool' -%}\n"
    "        {{- '<|start|>functions.' + (message.name or 'tool') + ' to=assistant<|channel|>commentary<|message|>'"
    " + message.content + '<|end|>' -}}\n"
    "    {%- else -%}\n"
    "        {{- '<|start|>' + message.role + '<|message|>' + message.content + '<|end|>' -}}\n"
    "    {%- endif -%}\n"
    "{%- endfor -%}\n"
    "{%- if add_generation_prompt -%}{{- '<|start|>assistant' -}}{%- endif -%}\n"
)
"""A gpt-oss-style harmony template, written for this project: every message ``<|start|>ROLE
<|channel|>...<|message|>...<|end|>``, calls ``to=functions.NAME`` ended by ``<|call|>``, an answer
ended by ``<|return|>`` (the model's end of turn, never written in the history: an answer already
given ends with ``<|end|>``, as llama.cpp renders one for inference)."""

KIMI_K2_TEMPLATE = (
    "{%- if tools -%}{{- '<|im_system|>tool_declare<|im_middle|>' + tools | tojson + '<|im_end|>' -}}{%- endif -%}\n"
    "{%- for message in messages -%}\n"
    "    {%- if message.role == 'assistant' -%}\n"
    "        {{- '<|im_assistant|>assistant<|im_middle|>' + message.content -}}\n"
    "        {%- if message.tool_calls -%}\n"
    "            {{- '<|tool_calls_section_begin|>' -}}\n"
    "            {%- for call in message.tool_calls -%}\n"
    "                {{- '<|tool_call_begin|>' + call.id + '<|tool_call_argument_begin|>'"
    " + call.function.arguments | tojson + '<|tool_call_end|>' -}}\n"
    "            {%- endfor -%}\n"
    "            {{- '<|tool_calls_section_end|>' -}}\n"
    "        {%- endif -%}\n"
    "        {{- '<|im_end|>' -}}\n"
    "    {%- elif message.role == 'tool' -%}\n"
    "        {{- '<|im_system|>tool<|im_middle|>## Return of ' + message.tool_call_id + '\\n' + message.content"
    " + '<|im_end|>' -}}\n"
    "    {%- else -%}\n"
    "        {{- '<|im_' + message.role + '|>' + message.role + '<|im_middle|>' + message.content + '<|im_end|>' -}}\n"
    "    {%- endif -%}\n"
    "{%- endfor -%}\n"
    "{%- if add_generation_prompt -%}{{- '<|im_assistant|>assistant<|im_middle|>' -}}{%- endif -%}\n"
)
"""A Kimi-K2-style template, written for this project: turns between ``<|im_user|>`` /
``<|im_assistant|>`` / ``<|im_system|>``, ``<|im_middle|>`` and ``<|im_end|>``; calls in a
``<|tool_calls_section_begin|>`` section, each ``<|tool_call_begin|>functions.NAME:N
<|tool_call_argument_begin|>{json}<|tool_call_end|>``; a thought between ``<think>`` and
``</think>``. Every marker is a control token of the synthetic model."""

SYNTH_TEMPLATES: dict[str, tuple[str, tuple[str, ...], str, str | None]] = {
    # name: (template, its control tokens, end-of-turn token, BOS token it writes itself or None)
    "chatml": (CHATML_TEMPLATE, ("<|im_start|>", "<|im_end|>"), "<|im_end|>", None),
    "llama3": (LLAMA3_TEMPLATE, ("<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"),
               "<|eot_id|>", "<|begin_of_text|>"),
    "harmony": (HARMONY_TEMPLATE, ("<|start|>", "<|channel|>", "<|message|>", "<|constrain|>", "<|end|>",
                                   "<|return|>", "<|call|>"), "<|return|>", None),
    "kimi_k2": (KIMI_K2_TEMPLATE, ("<|im_system|>", "<|im_user|>", "<|im_assistant|>", "<|im_middle|>", "<|im_end|>",
                                   "<|tool_calls_section_begin|>", "<|tool_calls_section_end|>", "<|tool_call_begin|>",
                                   "<|tool_call_argument_begin|>", "<|tool_call_end|>", "<think>", "</think>"),
                "<|im_end|>", None),
}
"""Chat formats ``cluster.models.synth`` can write into a synthetic model (``--chat-template NAME``)."""
