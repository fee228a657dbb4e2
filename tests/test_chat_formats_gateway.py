"""A chat template's format through the real gateway: the synthetic ChatML model served with an
operator's template in the Qwen3-Coder XML tool format whose generation prompt opens a thought
(``<think>``), so every answer starts as reasoning: ``reasoning_content`` apart from ``content``,
whole and streamed, ``reasoning_format: none`` keeping it in the text, and a forced ``tool_choice``
refused naming the format. One deployment (one node) serves the module.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

import openai  # noqa: E402
from local_ray import loopback_cluster  # noqa: E402

from cluster.api.gateway import GatewayConfig, start_http  # noqa: E402
from cluster.api.openai_api import Limits  # noqa: E402
from cluster.bench import free_port  # noqa: E402
from cluster.distributed import deploy  # noqa: E402
from cluster.engine.chat_format import detect_format  # noqa: E402
from cluster.models import synth  # noqa: E402

API_KEY = "formats-key"
NAMESPACE = "chat-formats-test"

# written for this test: ChatML turns, tools listed, calls shown in the Qwen3-Coder XML format
THINKING_XML_TEMPLATE = (
    "{%- if tools -%}{{- '<|im_start|>system\\nTools:\\n' -}}"
    "{%- for tool in tools -%}{{- tool | tojson -}}{{- '\\n' -}}{%- endfor -%}"
    "{{- 'Call one as <tool_call>\\n<function=NAME>\\n<parameter=KEY>\\nVALUE\\n</parameter>\\n</function>\\n</tool_call>"
    "<|im_end|>\\n' -}}{%- endif -%}"
    "{%- for message in messages -%}"
    "{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n<think>\\n' -}}{%- endif -%}"
)
TOOLS = [{"type": "function", "function": {"name": "lookup", "parameters": {
    "type": "object", "properties": {"word": {"type": "string"}}, "required": ["word"]}}}]


@pytest.fixture(scope="module")
def gateway(chatml_model: Path) -> str:
    with loopback_cluster(1, NAMESPACE):
        try:
            deploy.deploy(str(chatml_model), 1, cache_bytes=None, namespace=NAMESPACE, n_threads=2, n_ctx=512,
                          chat_template=THINKING_XML_TEMPLATE)
            yield start_http(GatewayConfig(namespace=NAMESPACE, api_key=API_KEY, limits=Limits(max_prompt_tokens=400,
                                                                                                max_tokens=64)),
                             "127.0.0.1", free_port())
        finally:
            deploy.shutdown(NAMESPACE)


def _client(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key=API_KEY, max_retries=0, timeout=120)


def test_the_template_is_detected_as_qwen3_coder_opening_a_thought():
    fmt = detect_format(THINKING_XML_TEMPLATE)
    assert fmt.name == "qwen3_coder" and fmt.parsed and fmt.thinking_open("<|im_start|>assistant\n<think>\n")


def test_an_answer_inside_an_opened_thought_is_reasoning_content_whole_and_streamed(gateway, chatml_model):
    client, model = _client(gateway), chatml_model.stem
    words = synth.read_topics(chatml_model)[0][:5]
    ask = dict(model=model, messages=[{"role": "user", "content": " ".join(words)}], max_tokens=16, temperature=0,
               seed=7)
    raw = client.chat.completions.create(**ask, extra_body={"reasoning_format": "none"}).choices[0].message
    assert raw.content and not getattr(raw, "reasoning_content", None)
    expected = raw.content.strip()
    assert "</think>" not in raw.content  # the synthetic model never closes its thought
    whole = client.chat.completions.with_raw_response.create(**ask)
    assert whole.headers["X-Chat-Template"] == "override"
    message = whole.parse().choices[0].message
    assert message.reasoning_content == expected and message.content == ""
    chunks = list(client.chat.completions.create(**ask, stream=True))
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    assert "".join(getattr(d, "reasoning_content", None) or "" for d in deltas) == expected
    assert "".join(d.content or "" for d in deltas) == ""


def test_tools_are_taken_and_a_forced_choice_is_refused_naming_the_format(gateway, chatml_model):
    client, model = _client(gateway), chatml_model.stem
    messages = [{"role": "user", "content": "look up kalo"}]
    auto = client.chat.completions.create(model=model, messages=messages, tools=TOOLS, max_tokens=4, temperature=0)
    assert auto.choices[0].finish_reason in ("stop", "length", "tool_calls")
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=model, messages=messages, tools=TOOLS, tool_choice="required", max_tokens=4)
    error = info.value.body
    assert error["param"] == "tool_choice" and "qwen3_coder" in error["message"]
