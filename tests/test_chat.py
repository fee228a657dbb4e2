"""Chat templates (cluster.engine.chat): rendering in the sandbox, its errors, and the prompt tokens
llama.cpp evaluates for a rendering, token by token, on synthetic chat models."""

from __future__ import annotations

import datetime
from pathlib import Path
from typing import Iterator

import pytest

from cluster.models import synth
from cluster.engine.chat import (
    CHATML_TEMPLATE,
    LLAMA3_TEMPLATE,
    ChatMessage,
    ChatPrompt,
    ChatRenderer,
    ChatTemplate,
    ToolCall,
    chat_messages,
)
from cluster.distributed.client import Client
from cluster.engine.moe_engine import MoEEngine
from cluster.errors import ChatTemplateError, InvalidParameterError
from cluster.api.openai_api import error_from_exception
from cluster.engine.sampling import SamplingParams
from cluster.engine.tokenizer import Tokenizer

CHATML = ChatTemplate.create(CHATML_TEMPLATE, "model")
LLAMA3 = ChatTemplate.create(LLAMA3_TEMPLATE, "model", bos_token="<|begin_of_text|>")
TOOL = {"type": "function", "function": {"name": "lookup", "description": "find a word",
                                         "parameters": {"type": "object", "properties": {"word": {"type": "string"}}}}}


def chat(*messages: ChatMessage, tools: tuple[dict, ...] = ()) -> ChatPrompt:
    import json

    return ChatPrompt(tuple(messages), tools=tuple(json.dumps(t) for t in tools))


# -- rendering ---------------------------------------------------------------------------------


def test_chatml_renders_each_turn_between_its_control_tokens():
    rendered = CHATML.render(chat(ChatMessage("system", "be brief"), ChatMessage("user", "hi"),
                                  ChatMessage("assistant", "hello"), ChatMessage("user", "again")))
    assert rendered.text == ("<|im_start|>system\nbe brief<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n"
                             "<|im_start|>assistant\nhello<|im_end|>\n<|im_start|>user\nagain<|im_end|>\n"
                             "<|im_start|>assistant\n")
    assert (rendered.origin, rendered.special, rendered.end_of_turn) == ("model", True, "<|im_end|>")


def test_llama3_writes_its_bos_and_headers_and_trims_content():
    rendered = LLAMA3.render(chat(ChatMessage("user", "  hi \n")))
    assert rendered.text == ("<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nhi<|eot_id|>"
                             "<|start_header_id|>assistant<|end_header_id|>\n\n")
    assert rendered.end_of_turn == "<|eot_id|>"


def test_tools_tool_calls_and_tool_results_render_in_the_hermes_format():
    call = ToolCall(id="call_1", name="lookup", arguments='{"word": "kalo"}')
    rendered = CHATML.render(chat(ChatMessage("user", "look it up"), ChatMessage("assistant", None, tool_calls=(call,)),
                                  ChatMessage("tool", "found", tool_call_id="call_1"), tools=(TOOL,)))
    assert rendered.text.startswith("<|im_start|>system\nFunctions you may call")
    assert '{"type": "function", "function": {"name": "lookup"' in rendered.text  # tojson: JSON, not HTML-escaped
    assert ('<|im_start|>assistant\n<tool_call>\n{"name": "lookup", "arguments": {"word": "kalo"}}\n</tool_call>'
            '<|im_end|>\n<|im_start|>user\n<tool_response>\nfound\n</tool_response><|im_end|>\n') in rendered.text
    assert CHATML.supports_tools and not LLAMA3.supports_tools


def test_tools_are_refused_by_a_template_that_cannot_take_them_and_without_a_template():
    for template in (LLAMA3, ChatTemplate.create(None, "none")):
        with pytest.raises(ChatTemplateError, match="'tools' cannot be used") as info:
            template.render(chat(ChatMessage("user", "x"), tools=(TOOL,)))
        assert info.value.param == "tools"


def test_a_model_whose_template_cannot_take_tools_refuses_them_with_a_400_naming_tools(llama3_model: Path):
    renderer = ChatRenderer(Tokenizer.load(str(llama3_model)))  # as the caller's edge renders
    assert renderer.origin == "model" and not renderer.supports_tools
    with pytest.raises(ChatTemplateError) as info:
        renderer.render(chat(ChatMessage("user", "x"), tools=(TOOL,)))
    error = error_from_exception(info.value)
    assert (error.status, error.param) == (400, "tools") and "<tool_call>" in error.message


def test_a_template_that_raises_is_a_chat_template_error_naming_the_problem():
    with pytest.raises(ChatTemplateError, match="no tool turns") as info:
        LLAMA3.render(chat(ChatMessage("user", "x"), ChatMessage("tool", "y", tool_call_id="c")))
    assert info.value.param == "messages"
    with pytest.raises(ChatTemplateError, match="must follow an assistant turn that called a tool"):
        CHATML.render(chat(ChatMessage("user", "x"), ChatMessage("tool", "y", tool_call_id="c")))


@pytest.mark.parametrize("source, needle", [
    ("{{ ''.__class__.__mro__[1].__subclasses__() }}", "SecurityError"),  # the sandbox refuses
    ("{% set x = messages.append(1) %}{{ x }}", "SecurityError"),  # immutable: no changing the messages
    ("{{ messages[3].content }}", "UndefinedError"),
    ("{{ 1 // 0 }}", "ZeroDivisionError"),
])
def test_template_failures_and_sandbox_violations_are_chat_template_errors(source, needle):
    with pytest.raises(ChatTemplateError, match=needle):
        ChatTemplate.create(source, "override").render(chat(ChatMessage("user", "x")))


def test_a_template_that_does_not_compile_is_refused_when_created():
    with pytest.raises(ChatTemplateError, match="does not compile: line 1"):
        ChatTemplate.create("{% for m in messages %}{{ m.content }}", "override")
    with pytest.raises(ChatTemplateError, match="No filter named 'nosuchfilter'"):
        ChatTemplate.create("{{ messages[0].content | nosuchfilter }}", "override")


def test_helpers_templates_use_strftime_now_raise_exception_and_a_json_tojson():
    template = ChatTemplate.create("{{ strftime_now('%Y') }} {{ {'a': '<b>'} | tojson }} {{ bos_token }}|{{ eos_token }}",
                                   "override", bos_token="<s>", eos_token="</s>")
    text = template.render(chat(ChatMessage("user", "x"))).text
    assert text == f"{datetime.datetime.now().year} {{\"a\": \"<b>\"}} <s>|</s>"


def test_without_a_template_the_plain_rendering_is_kept_and_says_so():
    rendered = ChatTemplate.create(None, "none").render(chat(ChatMessage("system", "be brief"), ChatMessage("user", "hi")))
    assert rendered.text == "system: be brief\nuser: hi\nassistant:"
    assert (rendered.origin, rendered.special, rendered.end_of_turn) == ("none", False, None)


# -- messages as callers give them --------------------------------------------------------------


def test_message_dicts_become_chat_messages_and_chat_messages_pass_through():
    call = {"id": "call_1", "type": "function", "function": {"name": "f", "arguments": '{"a": 1}'}}
    given = [{"role": "developer", "content": "be brief"}, ChatMessage("user", "hi"),
             {"role": "assistant", "content": None, "tool_calls": [call]},
             {"role": "tool", "content": "2", "tool_call_id": "call_1", "name": "f"}]
    assert chat_messages(given) == (ChatMessage("system", "be brief"), ChatMessage("user", "hi"),
                                    ChatMessage("assistant", None, tool_calls=(ToolCall("call_1", "f", '{"a": 1}'),)),
                                    ChatMessage("tool", "2", tool_call_id="call_1", name="f"))


class _UntouchableRouter:
    """A router handle that fails the test if anything is asked of it."""

    def __getattr__(self, name: str) -> None:
        raise AssertionError(f"the router was called ({name}) for a request the client should have refused")


@pytest.mark.parametrize("messages, param", [
    ([{"role": "user", "content": "hi"}, 3], "messages[1]"),
    ([{"role": "user", "content": "hi"}, ("user", "x")], "messages[1]"),
    ([{"content": "hi"}], "messages[0].role"),
    ([{"role": "user", "content": 7}], "messages[0].content"),
    ("hi", "messages"),
    ([], "messages"),
])
def test_the_client_refuses_malformed_messages_itself_naming_the_message(messages, param):
    client = Client(_UntouchableRouter(), namespace="none")
    for call in (client.chat, client.render):
        with pytest.raises(InvalidParameterError) as info:
            call(messages)
        assert info.value.param == param and param in str(info.value) and "\n" not in str(info.value)


# -- the GGUF side: templates and control tokens written by cluster.models.synth --------------------------


def test_synth_writes_the_template_and_single_control_tokens(chatml_model: Path, llama3_model: Path, tiny_model: Path):
    chatml, llama3 = Tokenizer.load(str(chatml_model)), Tokenizer.load(str(llama3_model))
    assert chatml.chat_template() == CHATML_TEMPLATE and llama3.chat_template() == LLAMA3_TEMPLATE
    assert Tokenizer.load(str(tiny_model)).chat_template() is None
    for tokenizer, controls in ((chatml, ("<|im_start|>", "<|im_end|>")),
                                (llama3, ("<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"))):
        for text in controls:
            ids = tokenizer.tokenize(text, special=True, add_special=False)
            assert len(ids) == 1 and tokenizer.is_control(ids[0]) and tokenizer.text(ids[0]) == text
            assert len(tokenizer.tokenize(text, special=False, add_special=False)) > 1  # as plain text: bytes
    im_end = chatml.tokenize("<|im_end|>", special=True, add_special=False)[0]
    eot = llama3.tokenize("<|eot_id|>", special=True, add_special=False)[0]
    assert chatml.is_eog(im_end) and llama3.is_eog(eot)  # tokenizer.ggml.eot_token_id: llama.cpp stops on them
    assert llama3.bos_text == "<|begin_of_text|>" and chatml.bos_text == synth.BOS_TEXT


@pytest.fixture(scope="module")
def chatml_engine(chatml_model: Path) -> Iterator[MoEEngine]:
    with MoEEngine(chatml_model, None, n_ctx=256, n_threads=2) as engine:
        yield engine


def test_the_prompt_tokens_llama_cpp_evaluates_are_the_chatml_rendering_token_by_token(
        chatml_engine: MoEEngine, chatml_model: Path) -> None:
    tokenizer = chatml_engine.tokenizer
    words = " ".join(synth.read_topics(chatml_model)[0][:4])
    rendered = ChatRenderer(tokenizer).render(chat(ChatMessage("system", "be brief"), ChatMessage("user", words)))
    gen = chatml_engine.generate(rendered.text, max_tokens=2, special=rendered.special)

    def plain(text: str) -> list[int]:
        return tokenizer.tokenize(text, special=False, add_special=False)

    start, end = (tokenizer.tokenize(t, special=True, add_special=False)[0] for t in ("<|im_start|>", "<|im_end|>"))
    expected = ([tokenizer.bos_id, start] + plain("system\nbe brief") + [end] + plain("\n") + [start]
                + plain("user\n" + words) + [end] + plain("\n") + [start] + plain("assistant\n"))
    assert list(chatml_engine.context_tokens[:gen.n_prompt_tokens]) == expected
    assert gen.n_prompt_tokens == len(expected) == len(tokenizer.tokenize(rendered.text, special=True))
    assert len(plain(rendered.text)) > len(expected)  # without parsing special tokens the prompt would differ


def test_a_rendering_that_writes_bos_gets_no_second_bos(llama3_model: Path) -> None:
    tokenizer = Tokenizer.load(str(llama3_model))
    rendered = ChatRenderer(tokenizer).render(chat(ChatMessage("user", "hi")))
    assert rendered.text.startswith("<|begin_of_text|>") and tokenizer.add_bos
    tokens = tokenizer.tokenize(rendered.text, special=True)
    assert tokens[0] == tokenizer.bos_id and tokens.count(tokenizer.bos_id) == 1
    assert tokenizer.tokenize("hi", special=True)[0] == tokenizer.bos_id  # text without it still gets one


def test_generation_stops_on_the_end_of_turn_token_and_never_shows_it(chatml_engine: MoEEngine) -> None:
    tokenizer = chatml_engine.tokenizer
    renderer = ChatRenderer(tokenizer)
    im_start, im_end = (tokenizer.tokenize(t, special=True, add_special=False)[0] for t in ("<|im_start|>", "<|im_end|>"))
    assert renderer.end_of_turn_ids == (im_end,)
    rendered = renderer.render(chat(ChatMessage("user", "hi")))
    forced = chatml_engine.generate(rendered.text, SamplingParams(max_tokens=8, logit_bias={im_end: 100}), special=True)
    assert (forced.text, forced.n_generated, forced.finish_reason) == ("", 0, "stop")
    # sampled with the end of turn made likely: it ends answers early, and is never in their text
    ends = [chatml_engine.generate(rendered.text, SamplingParams(max_tokens=24, temperature=1.0, seed=seed,
                                                                 logit_bias={im_end: 6.0}), special=True)
            for seed in range(6)]
    assert all("<|im_end|>" not in g.text and im_end not in g.tokens for g in ends)
    assert any(g.finish_reason == "stop" and 0 < g.n_generated < 24 for g in ends)
    assert all(g.finish_reason == "length" for g in ends if g.n_generated == 24)
    # a control token that is not an end of generation stops only when asked (the router asks for
    # the template's end-of-turn token this way), and is not shown either
    params = SamplingParams(max_tokens=3, logit_bias={im_start: 100})
    assert chatml_engine.generate(rendered.text, params, special=True).n_generated == 3
    stopped = chatml_engine.generate(rendered.text, params.updated(stop_token_ids=(im_start,)), special=True)
    assert (stopped.text, stopped.n_generated, stopped.finish_reason) == ("", 0, "stop")


def test_an_override_replaces_the_models_template_and_is_checked_before_anything_starts(
        tiny_model: Path, chatml_model: Path, tmp_path: Path) -> None:
    from cluster.distributed.deploy import check_model, read_chat_template
    from cluster.errors import InvalidParameterError
    from cluster.api.gateway import build_app

    override = ChatRenderer(Tokenizer.load(str(chatml_model)), "{{ messages[0].content }}")
    assert override.origin == "override" and override.end_of_turn_ids == ()
    assert override.render(chat(ChatMessage("user", "hi"))).text == "hi"
    plain = ChatRenderer(Tokenizer.load(str(tiny_model)), CHATML_TEMPLATE)  # ChatML text, but no such tokens here
    assert plain.origin == "override" and plain.end_of_turn_ids == ()  # <|im_end|> is not one control token
    assert ChatRenderer(Tokenizer.load(str(tiny_model))).origin == "none"

    data = chatml_model.read_bytes()  # the same model, its template broken in place (same length: a valid GGUF)
    assert data.count(b"{%- endfor -%}") == 3  # all in the template
    broken_model = tmp_path / "broken-template.gguf"
    broken_model.write_bytes(data.replace(b"{%- endfor -%}", b"{%- endfox -%}"))
    broken = ChatRenderer(Tokenizer.load(str(broken_model)))  # a model whose own template does not compile
    assert broken.origin == "model" and not broken.supports_tools
    with pytest.raises(ChatTemplateError, match="model chat template does not compile.*endfox.*--chat-template FILE"):
        broken.render(chat(ChatMessage("user", "hi")))
    path = tmp_path / "t.jinja"
    path.write_text("{{ messages[0].content }}")
    assert read_chat_template(str(path)) == "{{ messages[0].content }}" and read_chat_template(None) is None
    for bad in (tmp_path / "missing.jinja", tmp_path / "empty.jinja"):
        if bad.name == "empty.jinja":
            bad.write_text("  \n")
        with pytest.raises(InvalidParameterError, match=f"--chat-template: .*{bad.name}"):
            read_chat_template(str(bad))
    with pytest.raises(ChatTemplateError, match="override chat template does not compile"):
        check_model(str(chatml_model), None, "{% if %}")
    with pytest.raises(InvalidParameterError, match="give model too"):
        build_app({"chat_template": str(path)})
