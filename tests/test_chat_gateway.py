"""A synthetic ChatML chat model behind the real HTTP gateway, driven with the official openai client:
the template's rendering is what the node evaluates, sampling options reach llama.cpp's samplers,
structured output validates, tool calls come back as tool_calls, errors are 400s naming the field.

One deployment (one node) serves every test of the module.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

import jsonschema  # noqa: E402
import openai  # noqa: E402
import requests  # noqa: E402
from local_ray import loopback_cluster  # noqa: E402

from cluster.distributed import deploy  # noqa: E402
from cluster.models import synth  # noqa: E402
from cluster.bench import free_port  # noqa: E402
from cluster.api.gateway import GatewayConfig, start_http  # noqa: E402
from cluster.api.openai_api import Limits  # noqa: E402
from cluster.engine.tokenizer import Tokenizer  # noqa: E402

API_KEY = "chat-key"
NAMESPACE = "chat-test"
SCHEMA = {"type": "object", "properties": {"word": {"type": "string", "maxLength": 12}, "count": {"type": "integer"},
                                           "ok": {"type": "boolean"}},
          "required": ["word", "count", "ok"], "additionalProperties": False}
TOOLS = [{"type": "function", "function": {"name": "lookup", "description": "look a word up", "parameters": {
    "type": "object", "properties": {"word": {"type": "string", "maxLength": 10}}, "required": ["word"]}}},
    {"type": "function", "function": {"name": "count", "parameters": {
        "type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]}}}]


@pytest.fixture(scope="module")
def gateway(chatml_model: Path) -> str:
    with loopback_cluster(1, NAMESPACE):
        try:
            deploy.deploy(str(chatml_model), 1, cache_bytes=None, namespace=NAMESPACE, n_threads=2, n_ctx=1024)
            limits = Limits(max_prompt_tokens=900, max_tokens=256)
            yield start_http(GatewayConfig(namespace=NAMESPACE, api_key=API_KEY, limits=limits), "127.0.0.1", free_port())
        finally:
            deploy.shutdown(NAMESPACE)


@pytest.fixture(scope="module")
def model(chatml_model: Path) -> str:
    return chatml_model.stem


@pytest.fixture(scope="module")
def tokenizer(chatml_model: Path) -> Tokenizer:
    return Tokenizer.load(str(chatml_model))


@pytest.fixture(scope="module")
def words(chatml_model: Path) -> list[list[str]]:
    return synth.read_topics(chatml_model)


def _client(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key=API_KEY, max_retries=0, timeout=120)


def _user(words: list[list[str]], topic: int = 0) -> list[dict]:
    return [{"role": "system", "content": "be brief"}, {"role": "user", "content": " ".join(words[topic][:5])}]


def test_usage_counts_the_chatml_rendering_and_the_answer_never_shows_the_end_of_turn(gateway, model, tokenizer, words):
    client = _client(gateway)
    user = " ".join(words[0][:5])
    raw = client.chat.completions.with_raw_response.create(model=model, messages=_user(words), max_tokens=12,
                                                           temperature=0)
    done = raw.parse()
    assert raw.headers["x-chat-template"] == "model"
    rendering = f"<|im_start|>system\nbe brief<|im_end|>\n<|im_start|>user\n{user}<|im_end|>\n<|im_start|>assistant\n"
    assert done.usage.prompt_tokens == len(tokenizer.tokenize(rendering, special=True))
    assert done.usage.prompt_tokens < len(tokenizer.tokenize(rendering, special=False))  # control tokens are single tokens
    assert done.choices[0].message.content and "<|im_end|>" not in done.choices[0].message.content
    im_end = tokenizer.tokenize("<|im_end|>", special=True, add_special=False)[0]
    ended = [client.chat.completions.create(model=model, messages=_user(words), max_tokens=24, temperature=1.0,
                                            seed=seed, logit_bias={str(im_end): 6}) for seed in range(4)]
    assert all("<|im_end|>" not in e.choices[0].message.content for e in ended)
    assert any(e.choices[0].finish_reason == "stop" and e.usage.completion_tokens < 24 for e in ended)
    assert all(e.choices[0].finish_reason == "length" for e in ended if e.usage.completion_tokens == 24)


def test_json_schema_answers_validate_streaming_and_not(gateway, model, words):
    client = _client(gateway)
    response_format = {"type": "json_schema", "json_schema": {"name": "answer", "schema": SCHEMA, "strict": True}}
    for seed in (1, 2):
        done = client.chat.completions.create(model=model, messages=_user(words, 1), max_tokens=200, temperature=1.0,
                                              seed=seed, response_format=response_format)
        assert done.choices[0].finish_reason == "stop"
        jsonschema.validate(json.loads(done.choices[0].message.content), SCHEMA)
        stream = client.chat.completions.create(model=model, messages=_user(words, 1), max_tokens=200, temperature=1.0,
                                                seed=seed, response_format=response_format, stream=True)
        text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
        assert text == done.choices[0].message.content
        jsonschema.validate(json.loads(text), SCHEMA)
    sampled = client.chat.completions.create(model=model, messages=_user(words, 2), max_tokens=64, temperature=1.0,
                                             seed=1, response_format={"type": "json_object"})
    assert sampled.choices[0].finish_reason == "stop"
    assert isinstance(json.loads(sampled.choices[0].message.content), dict)
    # greedy, this model writes a key that never ends: the answer is cut, and says so
    cut = client.chat.completions.create(model=model, messages=_user(words, 2), max_tokens=64, temperature=0,
                                         response_format={"type": "json_object"})
    assert cut.choices[0].finish_reason == "length" and cut.usage.completion_tokens == 64
    assert cut.choices[0].message.content.startswith("{")


def test_sampling_options_reach_the_samplers(gateway, model, tokenizer, words):
    client = _client(gateway)
    messages = _user(words, 3)

    def answer(**options) -> openai.types.chat.ChatCompletion:
        return client.chat.completions.create(model=model, messages=messages, max_tokens=12, **options)

    greedy = answer(temperature=0)
    texts = [answer(temperature=1.5, seed=seed).choices[0].message.content for seed in (1, 1, 2, 3)]
    assert texts[0] == texts[1] and len(set(texts[1:])) >= 2
    assert answer(temperature=1.5, seed=2, extra_body={"top_k": 1}).choices[0].message.content == \
        greedy.choices[0].message.content
    assert answer(temperature=1.5, seed=3, extra_body={"min_p": 1.0}).choices[0].message.content == \
        greedy.choices[0].message.content
    first_word = tokenizer.tokenize(greedy.choices[0].message.content, add_special=False)[0]
    banned = answer(temperature=0, logit_bias={str(first_word): -100})
    assert first_word not in tokenizer.tokenize(banned.choices[0].message.content, add_special=False)
    two = answer(temperature=1.5, seed=7, n=2)
    assert [c.index for c in two.choices] == [0, 1] and two.choices[0].message.content != two.choices[1].message.content
    assert two.usage.completion_tokens == 24
    penalised = answer(temperature=0, presence_penalty=2.0, frequency_penalty=1.0, extra_body={"repeat_penalty": 1.3})
    assert penalised.usage.completion_tokens == 12
    probs = answer(temperature=0, logprobs=True, top_logprobs=2)
    content = probs.choices[0].logprobs.content
    assert len(content) == 12 and "".join(e.token for e in content) == probs.choices[0].message.content
    assert all(e.top_logprobs[0].token == e.token and e.logprob <= 0 for e in content)
    stream = client.chat.completions.create(model=model, messages=messages, max_tokens=12, temperature=1.5, seed=7, n=2,
                                            logprobs=True, stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    by_choice: dict[int, str] = {}
    for c in chunks:
        for choice in c.choices:
            by_choice[choice.index] = by_choice.get(choice.index, "") + (choice.delta.content or "")
    assert by_choice == {0: two.choices[0].message.content, 1: two.choices[1].message.content}
    assert chunks[-1].usage.completion_tokens == 24
    legacy = client.completions.create(model=model, prompt=" ".join(words[3][:4]), max_tokens=5, temperature=0, logprobs=2)
    lp = legacy.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.text_offset) == 5 and len(lp.top_logprobs[0]) == 2


def test_a_tool_call_comes_back_as_tool_calls_streaming_and_not(gateway, model, words):
    client = _client(gateway)
    messages = [{"role": "user", "content": "look up " + words[0][0]}]
    done = client.chat.completions.create(model=model, messages=messages, tools=TOOLS, tool_choice="required",
                                          max_tokens=120, temperature=1.0, seed=3)
    choice = done.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    (call,) = choice.message.tool_calls
    schema = next(t["function"]["parameters"] for t in TOOLS if t["function"]["name"] == call.function.name)
    jsonschema.validate(json.loads(call.function.arguments), schema)
    named = client.chat.completions.create(model=model, messages=messages, tools=TOOLS, max_tokens=120, temperature=0,
                                           tool_choice={"type": "function", "function": {"name": "count"}}, stream=True)
    chunks = list(named)
    calls = [d for c in chunks if c.choices for d in (c.choices[0].delta.tool_calls or [])]
    assert calls[0].function.name == "count" and calls[0].id and calls[0].type == "function"
    arguments = "".join(d.function.arguments or "" for d in calls)
    assert isinstance(json.loads(arguments)["n"], int)
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "tool_calls"
    follow_up = messages + [{"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
                            {"role": "tool", "tool_call_id": call.id, "content": "found it"}]
    after = client.chat.completions.create(model=model, messages=follow_up, tools=TOOLS, max_tokens=4, temperature=0)
    assert after.choices[0].finish_reason in ("length", "stop")


@pytest.mark.parametrize("options, param", [
    ({"temperature": 3}, "temperature"), ({"n": 0}, "n"), ({"logprobs": True, "top_logprobs": 50}, "top_logprobs"),
    ({"extra_body": {"top_k": -3}}, "top_k"), ({"extra_body": {"min_p": 1.5}}, "min_p"),
    ({"presence_penalty": 3}, "presence_penalty"), ({"logit_bias": {"99999999": 5}}, "logit_bias"),
    ({"max_completion_tokens": 0}, "max_completion_tokens"), ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": "not a schema"}}},
     "response_format"),
])
def test_bad_values_are_400_naming_the_field(gateway, model, words, options, param):
    with pytest.raises(openai.BadRequestError) as info:
        _client(gateway).chat.completions.create(model=model, messages=_user(words), max_tokens=4, **options)
    assert info.value.status_code == 400 and info.value.body["param"] == param, info.value.body


@pytest.mark.parametrize("schema, keyword", [
    ({"type": "object", "properties": {"s": {"type": "string", "maxLength": 10**18}}}, "'maxLength'"),
    ({"type": "object", "properties": {"n": {"type": "integer", "multipleOf": 7}}}, "'multipleOf'"),
])
def test_a_schema_keyword_that_cannot_be_enforced_is_a_400_naming_it(gateway, model, words, schema, keyword):
    response_format = {"type": "json_schema", "json_schema": {"name": "x", "schema": schema, "strict": True}}
    for stream in (False, True):
        with pytest.raises(openai.BadRequestError) as info:
            _client(gateway).chat.completions.create(model=model, messages=_user(words), max_tokens=4, stream=stream,
                                                     response_format=response_format)
        assert info.value.status_code == 400 and info.value.body["param"] == "response_format", info.value.body
        assert keyword in info.value.body["message"], info.value.body


def test_a_template_error_is_a_400_naming_the_problem(gateway, model):
    with pytest.raises(openai.BadRequestError) as info:
        _client(gateway).chat.completions.create(model=model, max_tokens=4, messages=[
            {"role": "user", "content": "hi"}, {"role": "tool", "tool_call_id": "call_x", "content": "42"}])
    assert "must follow an assistant turn that called a tool" in info.value.body["message"]
    assert info.value.body["param"] == "messages"


def test_tokenize_and_detokenize_as_llama_server_has_them(gateway, tokenizer):
    headers = {"Authorization": f"Bearer {API_KEY}"}
    assert requests.post(f"{gateway}/tokenize", json={"content": "hi"}, timeout=30).status_code == 401
    r = requests.post(f"{gateway}/tokenize", json={"content": "<|im_start|>user\nhi", "with_pieces": True},
                      headers=headers, timeout=30)
    pieces = r.json()["tokens"]
    assert pieces[0] == {"id": tokenizer.tokenize("<|im_start|>", special=True, add_special=False)[0], "piece": "<|im_start|>"}
    assert "".join(p["piece"] for p in pieces) == "<|im_start|>user\nhi"
    plain = requests.post(f"{gateway}/tokenize", json={"content": "<|im_start|>", "parse_special": False, "add_special": True},
                          headers=headers, timeout=30).json()["tokens"]
    assert plain[0] == tokenizer.bos_id and len(plain) > 2
    ids = [p["id"] for p in pieces]
    back = requests.post(f"{gateway}/detokenize", json={"tokens": ids}, headers=headers, timeout=30)
    assert back.json() == {"content": "<|im_start|>user\nhi"}
    bad = requests.post(f"{gateway}/detokenize", json={"tokens": [10**9]}, headers=headers, timeout=30)
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "tokens"


def test_the_python_client_chats_renders_and_tokenizes(gateway, model, tokenizer, words):
    import ray

    from cluster.engine.chat import ChatMessage
    from cluster.distributed.client import Client
    from cluster.distributed.protocol import ROUTER_NAME
    from cluster.engine.sampling import SamplingParams

    client = Client(ray.get_actor(ROUTER_NAME, namespace=NAMESPACE))
    messages = [ChatMessage("user", " ".join(words[1][:3]))]
    rendered = client.render(messages)
    assert rendered["origin"] == "model" and rendered["text"].endswith("<|im_start|>assistant\n")
    assert rendered["tokens"] == tokenizer.tokenize(rendered["text"], special=True)
    done = client.chat(messages, SamplingParams(max_tokens=6, temperature=1.0, seed=4, n=2, logprobs=True))
    assert done.chat_template == "model" and [c.index for c in done.choices] == [0, 1]
    assert done.usage.prompt_tokens == len(rendered["tokens"]) and done.usage.completion_tokens == 12
    assert done.text == done.choices[0].text and len(done.choices[1].logprobs) == 6
    as_dicts = client.chat([{"role": "user", "content": messages[0].content}], max_tokens=6, temperature=1.0, seed=4)
    assert as_dicts.chat_template == "model" and as_dicts.usage.prompt_tokens == len(rendered["tokens"])
    full = client.generate(" ".join(words[1][:3]), max_tokens=12)
    stop = full.text.split(" ")[3]  # a word of the answer, given as one string: one stop string
    cut = client.generate(" ".join(words[1][:3]), max_tokens=12, stop=stop)
    assert cut.finish_reason == "stop" and cut.text == full.text[:full.text.index(stop)]
    assert client.detokenize(client.tokenize("<|im_end|>")) == "<|im_end|>"
