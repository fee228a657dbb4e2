"""Which output format a chat template teaches its model: tool calls and reasoning markers.

A model writes tool calls (and, for reasoning models, its thought) in the format its chat
template shows it; the template's source text names that format by the markers it contains,
which is how llama.cpp's ``common/chat.cpp`` picks a parser. ``detect_format`` does the same
here, marker by marker, most specific first:

==============  =====================================================  ==========================
name            markers in the template                                what the model writes
==============  =====================================================  ==========================
gpt_oss         ``<|channel|>``                                        harmony channels
kimi_k2         ``<|tool_calls_section_begin|>``                       ``functions.f:0`` calls
deepseek        ``<｜tool▁calls▁begin｜>`` (R1, V3, V3.1)               ``<｜tool▁sep｜>`` calls
glm45           ``<tool_call>`` and ``<arg_key>``                       ``<arg_key>/<arg_value>``
qwen3_coder     ``<function=`` and ``<parameter=``                      XML function calls
hermes          ``<tool_call>``                                        ``<tool_call>{json}``
mistral         ``[TOOL_CALLS]``                                       ``[TOOL_CALLS]`` JSON
llama3_json     ``<|python_tag|>`` or an ``ipython`` header            a JSON object answer
==============  =====================================================  ==========================

Formats recognised but not parsed back (``PARSED_FORMATS`` lacks them) are still named, so a
request with ``tools`` is refused naming the format; a template with none of these markers is
``content`` (text only). Reasoning: every format but gpt-oss (its ``analysis`` channel) and
Mistral (``[THINK]``) marks a thought with ``<think>...</think>``; ``thinking_open`` tells whether
a rendered prompt already opened it, so the answer starts inside the thought.

Markers are often control tokens of the model's vocabulary (gpt-oss's ``<|channel|>``, DeepSeek's,
Kimi's, Mistral's ``[TOOL_CALLS]`` and ``[THINK]``), which the engine writes as nothing: a chat
answer in a format writes those of ``ChatFormat.preserved`` as their text (the rule of
llama-server's ``preserved_tokens``; ``cluster.engine.chat.ChatRenderer`` turns them into the token
ids of ``SamplingParams.preserved_token_ids``). ``ChatFormat.stops`` names the tokens that end an
answer where the template's end of turn does not: gpt-oss ends at ``<|return|>`` or ``<|call|>``,
never at the ``<|end|>`` of its analysis message.

The parsers live in ``cluster.api.formats``; this module only names formats (the engine renders
the prompt and must refuse tools it cannot parse back).
"""

from __future__ import annotations

from dataclasses import dataclass

PARSED_FORMATS = ("hermes", "qwen3_coder", "llama3_json", "mistral", "deepseek", "glm45", "gpt_oss", "kimi_k2")
"""Tool-call formats parsed back into ``tool_calls`` (``cluster.api.formats``)."""

PARSED_TITLES = ("Hermes/Qwen <tool_call>{json}", "Qwen3-Coder <function=...>", "Llama 3.x JSON", "Mistral [TOOL_CALLS]",
                 "DeepSeek", "GLM-4.5 <arg_key>", "gpt-oss harmony", "Kimi K2")
"""The formats of ``PARSED_FORMATS`` in words, for error messages."""

DEEPSEEK_CALLS_BEGIN = ("<｜tool▁calls▁begin｜>", "<｜tool_calls_begin｜>", "<｜tool calls begin｜>",
                        "<｜tool\\_calls\\_begin｜>", "<｜tool▁calls｜>")
"""How DeepSeek models open their calls (the distilled models write variants; llama.cpp accepts these)."""

# (name, markers that must all be in the template), most specific first
_RULES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("gpt_oss", ("<|channel|>",)),
    ("kimi_k2", ("<|tool_calls_section_begin|>",)),
    ("deepseek_v3_2", ("｜DSML｜",)),
    ("deepseek_v3_2", ("dsml_token",)),
    ("deepseek", ("<｜tool▁calls▁begin｜>",)),
    ("minimax_m2", ("<minimax:tool_call>",)),
    ("seed_oss", ("<seed:tool_call>",)),
    ("glm45", ("<tool_call>", "<arg_key>")),
    ("qwen3_coder", ("<function=", "<parameter=")),
    ("hermes", ("<tool_call>",)),
    ("mistral", ("[TOOL_CALLS]",)),
    ("llama3_json", ("<|start_header_id|>ipython<|end_header_id|>",)),
    ("llama3_json", ("<|python_tag|>",)),
    ("functionary_v3_2", (">>>all",)),
    ("functionary_v3_1", ("<|start_header_id|>", "<function=")),
    ("command_r7b", ("<|START_ACTION|>",)),
    ("granite", ("<|tool_call|>",)),
    ("firefunction_v2", (" functools[",)),
    ("lfm2", ("<|tool_list_start|>",)),
    ("apertus", ("<|tools_prefix|>",)),
    ("nemotron_v2", ("<SPECIAL_10>",)),
)

THINK_TAGS = ("<think>", "</think>")
MISTRAL_THINK_TAGS = ("[THINK]", "[/THINK]")

_CALL_MARKERS: dict[str, tuple[str, ...]] = {
    "gpt_oss": ("<|start|>", "<|channel|>", "<|constrain|>", "<|message|>", "<|end|>"),
    "kimi_k2": ("<|tool_calls_section_begin|>", "<|tool_calls_section_end|>", "<|tool_call_begin|>",
                "<|tool_call_argument_begin|>", "<|tool_call_end|>"),
    "deepseek": (*DEEPSEEK_CALLS_BEGIN, "<｜tool▁calls▁end｜>", "<｜tool▁call▁begin｜>", "<｜tool▁sep｜>",
                 "<｜tool▁call▁end｜>"),
    "glm45": ("<tool_call>", "</tool_call>", "<arg_key>", "</arg_key>", "<arg_value>", "</arg_value>"),
    "qwen3_coder": ("<tool_call>", "</tool_call>", "<function=", "</function>", "<parameter=", "</parameter>"),
    "hermes": ("<tool_call>", "</tool_call>"),
    "mistral": ("[TOOL_CALLS]", "[CALL_ID]", "[ARGS]"),
    "llama3_json": ("<|python_tag|>",),
}
"""Per parsed format, the markers its parser reads in an answer besides the thought's tags (as
llama.cpp's chat handlers list them in ``preserved_tokens``): where the model's vocabulary has one
as a control token, a chat answer in that format writes it as its text (``ChatFormat.preserved``)."""

_STOP_MARKERS: dict[str, tuple[str, ...]] = {
    "gpt_oss": ("<|return|>", "<|call|>"),
}
"""Per format, the tokens that end the model's turn when its template's own end of turn is not
it: a harmony answer is several messages, each ended by ``<|end|>``; the turn ends with
``<|return|>`` (the final answer) or ``<|call|>`` (a tool call)."""


@dataclass(frozen=True)
class ChatFormat:
    """A template's output format.

    Attributes:
        name: one of the names of the module docstring, or ``content`` (no tool-call markers).
        think_tags: the (open, close) markers of a thought; None for gpt-oss (harmony channels).
    """

    name: str
    think_tags: tuple[str, str] | None = THINK_TAGS

    @property
    def parsed(self) -> bool:
        """Tool calls in this format are parsed back."""
        return self.name in PARSED_FORMATS

    @property
    def harmony(self) -> bool:
        return self.name == "gpt_oss"

    @property
    def preserved(self) -> tuple[str, ...]:
        """The markers the answer's parser reads (its thought's tags, its calls' markers): the
        engine writes a token whose text is one of them as that text, even a control token, which
        it otherwise writes as nothing (llama-server's ``preserved_tokens``)."""
        return (*(self.think_tags or ()), *_CALL_MARKERS.get(self.name, ()))

    @property
    def stops(self) -> tuple[str, ...] | None:
        """The tokens that end an answer in this format, when they are not the template's end of
        turn (None: the template's end of turn does, ``ChatTemplate.end_of_turn``)."""
        return _STOP_MARKERS.get(self.name)

    def thinking_open(self, prompt: str) -> bool:
        """The rendered ``prompt`` ends inside an opened thought (``...<think>\\n``): the answer
        starts with reasoning, which llama.cpp calls ``thinking_forced_open``."""
        return self.think_tags is not None and prompt.rstrip().endswith(self.think_tags[0])


CONTENT = ChatFormat("content")


def tools_refusal(fmt: ChatFormat) -> str:
    """Why a template of format ``fmt`` cannot take tools, in words (for a 400)."""
    parsed = "this server parses " + ", ".join(PARSED_TITLES)
    if fmt.name == "content":
        return f"the chat template shows the model no tool-call format ({parsed})"
    if not fmt.parsed:
        return f"the chat template's tool-call format is '{fmt.name}', which this server does not parse ({parsed})"
    return f"the chat template does not read 'tools' (its tool-call format is '{fmt.name}')"


def detect_format(source: str | None) -> ChatFormat:
    """The output format the chat template ``source`` teaches (``CONTENT`` for None or no markers)."""
    if not source:
        return CONTENT
    for name, markers in _RULES:
        if all(m in source for m in markers):
            return format_named(name)
    return CONTENT


def format_named(name: str) -> ChatFormat:
    """The format called ``name`` (as ``ChatFormat.name``; what travels with a request)."""
    if name == "gpt_oss":
        return ChatFormat(name, None)
    if name == "mistral":
        return ChatFormat(name, MISTRAL_THINK_TAGS)
    return ChatFormat(name)
