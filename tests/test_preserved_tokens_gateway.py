"""Control-token markers through the real gateway: the synthetic Kimi K2 chat model (its call
section markers and ``<think>`` are control tokens) answers, forced token by token by a grammar,
with a thought, text and a call; the chat answer comes back as ``reasoning_content``, ``content``
and ``tool_calls``, whole and streamed, while a plain completion with the same grammar writes the
control tokens as nothing. One deployment (one node) serves the module.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

import openai  # noqa: E402
from local_ray import loopback_cluster  # noqa: E402
from test_preserved_tokens import KIMI_ANSWER, TOOLS, token_grammar  # noqa: E402

from cluster.api.gateway import GatewayConfig, start_http  # noqa: E402
from cluster.api.openai_api import Limits  # noqa: E402
from cluster.bench import free_port  # noqa: E402
from cluster.distributed import deploy  # noqa: E402
from cluster.engine.tokenizer import Tokenizer  # noqa: E402

API_KEY = "preserved-key"
NAMESPACE = "preserved-tokens-test"


@pytest.fixture(scope="module")
def gateway(kimi_model: Path) -> str:
    with loopback_cluster(1, NAMESPACE):
        try:
            deploy.deploy(str(kimi_model), 1, cache_bytes=None, namespace=NAMESPACE, n_threads=2, n_ctx=512)
            yield start_http(GatewayConfig(namespace=NAMESPACE, api_key=API_KEY,
                                           limits=Limits(max_prompt_tokens=400, max_tokens=120)),
                             "127.0.0.1", free_port())
        finally:
            deploy.shutdown(NAMESPACE)


@pytest.fixture(scope="module")
def grammar(kimi_model: Path) -> str:
    return token_grammar(Tokenizer.load(str(kimi_model)), *KIMI_ANSWER)


def _client(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key=API_KEY, max_retries=0, timeout=120)


def test_a_chat_answer_with_control_token_markers_comes_apart_whole_and_streamed(gateway, kimi_model, grammar):
    client = _client(gateway)
    ask = dict(model=kimi_model.stem, messages=[{"role": "user", "content": "look up kalo"}], tools=TOOLS,
               max_tokens=120, temperature=0, extra_body={"grammar": grammar})
    choice = client.chat.completions.create(**ask).choices[0]
    message = choice.message
    assert choice.finish_reason == "tool_calls"
    assert message.reasoning_content == "pondering" and message.content == "Let me look."
    assert [(c.id, c.function.name, json.loads(c.function.arguments)) for c in message.tool_calls] == \
        [("functions.lookup:0", "lookup", {"word": "kalo"})]

    deltas = [c.choices[0].delta for c in client.chat.completions.create(**ask, stream=True) if c.choices]
    assert "".join(getattr(d, "reasoning_content", None) or "" for d in deltas) == "pondering"
    assert "".join(d.content or "" for d in deltas) == "Let me look."
    calls = [c for d in deltas for c in d.tool_calls or ()]
    assert calls[0].id == "functions.lookup:0" and calls[0].function.name == "lookup"
    assert json.loads("".join(c.function.arguments or "" for c in calls)) == {"word": "kalo"}

    raw = client.chat.completions.create(**{**ask, "extra_body": {"grammar": grammar, "reasoning_format": "none"}},
                                         tool_choice="none")
    text = raw.choices[0].message.content
    assert text.startswith("<think>pondering</think>Let me look.<|tool_calls_section_begin|>")
    assert "<|im_middle|>" not in text  # a control token that is not a marker stays hidden


def test_a_plain_completion_writes_control_tokens_as_nothing(gateway, kimi_model, grammar):
    done = _client(gateway).completions.create(model=kimi_model.stem, prompt="look up kalo", max_tokens=120,
                                               temperature=0, extra_body={"grammar": grammar})
    assert done.choices[0].text == "".join(p for p in KIMI_ANSWER if not p.startswith("<"))
