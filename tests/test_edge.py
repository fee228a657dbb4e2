"""Requests are rendered and tokenized where they enter (cluster.distributed.edge): the router gets
token ids and only decides; a prompt that cannot fit is refused at the edge (before tokenizing,
when its bytes alone say so) and the router never hears of it."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import pytest

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

from cluster.distributed.edge import Edge, PromptRequest  # noqa: E402
from cluster.distributed.protocol import ModelSource, Route, RouteAsk  # noqa: E402
from cluster.engine.chat import CHATML_TEMPLATE, ChatMessage, ChatPrompt, ChatRenderer  # noqa: E402
from cluster.engine.sampling import SamplingParams  # noqa: E402
from cluster.engine.tokenizer import Tokenizer  # noqa: E402
from cluster.errors import InvalidParameterError, ModelFileError, PromptTooLongError  # noqa: E402
from cluster.models import synth  # noqa: E402

CHAT = ChatPrompt((ChatMessage("system", "be brief"), ChatMessage("user", "hi there")))


def _request(prompt: str | ChatPrompt, max_prompt_tokens: int | None = None, **params: object) -> PromptRequest:
    return PromptRequest("r1", prompt, SamplingParams(**params), "s1", max_prompt_tokens)


def test_the_router_is_asked_with_token_ids_and_answers_a_decision_only():
    assert {f.name for f in dataclasses.fields(RouteAsk)} == {"request_id", "tokens", "params", "session_id", "ended"}
    assert {f.name for f in dataclasses.fields(Route)} == {"node_id", "namespace", "routing"}


def test_the_router_routes_token_ids_without_loading_a_vocabulary():
    """The router actor's class, run as Ray runs it (minus Ray), chooses a node for token ids with
    a model path nobody can read, and llama.cpp is never loaded into its process."""
    code = """
import asyncio, sys, time
from cluster.distributed.router import RouterActor
from cluster.distributed.protocol import NodeReport, RouteAsk
from cluster.engine.sampling import SamplingParams
actor = RouterActor("/nowhere/model.gguf", "warmth", "ns", None, n_ctx=64)
actor.core.on_report(NodeReport("sniper-node-0", 0, 4, True, None, None, (), None, time.time()))
route = asyncio.run(actor.route(RouteAsk("r1", (1, 2, 3), SamplingParams())))
source = asyncio.run(actor.model_source())
maps = open('/proc/self/maps').read()
loaded = sorted({m for m in ('llama_cpp', 'cluster._native', 'jinja2') if m in sys.modules}
                | ({'libggml'} if 'libggml' in maps else set()))
print(route.node_id, source.n_ctx, loaded)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "sniper-node-0 64 []", out


def test_the_router_refuses_an_ask_without_token_ids():
    from cluster.distributed.router import RouterActor
    import asyncio

    actor = RouterActor("/nowhere/model.gguf", n_ctx=64)
    with pytest.raises(InvalidParameterError, match="token ids") as info:
        asyncio.run(actor.route(RouteAsk("r1", (), SamplingParams())))
    assert info.value.param == "tokens"


def test_a_chat_tokenized_at_the_edge_is_what_the_router_used_to_send(chatml_model: Path):
    """The edge renders and tokenizes by the rule the router had: the template's text, special
    tokens parsed, the template's end of turn added to the stops; plain text with BOS, unparsed."""
    edge = Edge.load(ModelSource(str(chatml_model), None, 2048))
    tokenizer = Tokenizer.load(str(chatml_model))
    renderer = ChatRenderer(tokenizer)
    prepared = edge.prepare(_request(CHAT, max_tokens=4))
    assert prepared.ask.tokens == tuple(tokenizer.tokenize(renderer.render(CHAT).text, special=True))
    assert prepared.chat_template == "model"
    im_end = tokenizer.tokenize("<|im_end|>", special=True, add_special=False)[0]
    assert im_end in prepared.ask.params.stop_token_ids
    assert (prepared.ask.request_id, prepared.ask.session_id, prepared.ask.params.max_tokens) == ("r1", "s1", 4)
    text = edge.prepare(_request("<|im_start|> hi"))
    assert text.ask.tokens == tuple(tokenizer.tokenize("<|im_start|> hi", special=False)) and text.chat_template is None
    assert text.ask.tokens[0] == tokenizer.bos_id
    override = Edge.load(ModelSource(str(chatml_model), "{{ messages[-1].content }}", 2048))
    assert override.prepare(_request(CHAT)).chat_template == "override"
    assert override.render(CHAT)["text"] == "hi there"


def test_an_edge_is_loaded_once_per_process_and_deployment(chatml_model: Path, tiny_model: Path):
    source = ModelSource(str(chatml_model), None, 2048)
    assert Edge.load(source) is Edge.load(ModelSource(str(chatml_model), None, 2048))
    assert Edge.load(ModelSource(str(tiny_model), None, 2048)) is not Edge.load(source)


class _CountingTokenizer:
    """The real vocabulary, counting the texts it is asked to tokenize."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self._tokenizer = tokenizer
        self.tokenized: list[int] = []

    def __getattr__(self, name: str) -> object:
        return getattr(self._tokenizer, name)

    def tokenize(self, text: str, special: bool = False, add_special: bool = True) -> list[int]:
        self.tokenized.append(len(text))
        return self._tokenizer.tokenize(text, special, add_special)


def test_a_prompt_too_large_by_its_bytes_is_refused_before_it_is_tokenized(tiny_model: Path):
    counting = _CountingTokenizer(Tokenizer.load(str(tiny_model)))
    edge = Edge(ModelSource(str(tiny_model), None, 1024), counting, ChatRenderer(counting))
    huge = "kalo meni " * 1_000_000  # 10 MB
    with pytest.raises(PromptTooLongError, match="10000000 bytes") as info:
        edge.prepare(_request(huge))
    assert f"{1023 * edge.longest_token_bytes} bytes" in str(info.value) and "before tokenizing" in str(info.value)
    with pytest.raises(PromptTooLongError, match="this endpoint accepts at most 8 tokens"):
        edge.prepare(_request("x" * (8 * edge.longest_token_bytes + 1), max_prompt_tokens=8))
    assert counting.tokenized == []  # neither was tokenized
    with pytest.raises(PromptTooLongError):
        edge.prepare(_request(ChatPrompt((ChatMessage("user", huge),))))
    assert counting.tokenized == []


def test_a_prompt_of_more_tokens_than_fit_is_refused_after_tokenizing_naming_the_limit(tiny_model: Path, tiny_topics):
    edge = Edge.load(ModelSource(str(tiny_model), None, 64))
    long = "x" * 100  # a token per byte: under the byte bound, over the context
    n = len(edge.tokenizer.tokenize(long))
    assert 64 <= n and len(long.encode()) <= 63 * edge.longest_token_bytes
    with pytest.raises(PromptTooLongError, match=f"the prompt is {n} tokens: a node's context holds 64 tokens"):
        edge.prepare(_request(long))
    short = synth.topic_prompt(tiny_topics, 0, 12, seed=1)[:50]
    n = len(edge.tokenizer.tokenize(short))
    assert n > 8 and len(short.encode()) <= 8 * edge.longest_token_bytes
    with pytest.raises(PromptTooLongError, match=f"the prompt is {n} tokens: this endpoint accepts at most 8 tokens"):
        edge.prepare(_request(short, max_prompt_tokens=8))
    fits = edge.prepare(_request(synth.topic_prompt(tiny_topics, 0, 12, seed=1), max_prompt_tokens=64))
    assert 8 < len(fits.ask.tokens) < 64


def test_no_token_covers_more_bytes_than_the_size_bound_assumes(tiny_model: Path, chatml_model: Path, tiny_topics):
    """The byte bound refuses only prompts that cannot fit: every text has at least
    bytes / longest_token_bytes tokens (plain, special tokens parsed, odd bytes and scripts)."""
    texts = [synth.topic_prompt(tiny_topics, t, 40, seed=t) for t in range(3)] + [
        "<|im_start|>user\nhi<|im_end|>" * 20, "ünïcødé – 漢字 ☃ 🙂" * 30, "".join(chr(c) for c in range(32, 600)),
        " " * 500, "\n\t" * 300]
    for model in (tiny_model, chatml_model):
        edge = Edge.load(ModelSource(str(model), None, 2048))
        for text in texts:
            for special in (False, True):
                tokens = edge.tokenizer.tokenize(text, special=special, add_special=False)
                assert len(text.encode()) <= len(tokens) * edge.longest_token_bytes, (model.name, text[:20], special)


def test_requests_tokenized_together_on_the_edges_threads_get_the_tokens_they_get_alone(chatml_model: Path,
                                                                                       tiny_topics):
    """The edge's threads share one llama.cpp vocabulary (as a gateway replica's requests do)."""
    import asyncio

    edge = Edge.load(ModelSource(str(chatml_model), None, 2048))
    requests = [_request(ChatPrompt((ChatMessage("user", synth.topic_prompt(tiny_topics, i % 4, 150, seed=i)),))
                         if i % 2 else synth.topic_prompt(tiny_topics, i % 4, 150, seed=i)) for i in range(32)]
    alone = [edge.prepare(r).ask.tokens for r in requests]

    async def together() -> list[tuple[int, ...]]:
        return [p.ask.tokens for p in await asyncio.gather(*(edge.run(edge.prepare, r) for r in requests))]

    assert asyncio.run(together()) == alone


def test_a_process_that_cannot_read_the_model_is_told_the_way_out(tiny_model: Path, tmp_path: Path):
    missing = str(tmp_path / "elsewhere" / "model.gguf")
    with pytest.raises(ModelFileError, match="model_path=") as info:
        Edge.load(ModelSource(missing, None, 2048))
    assert missing in str(info.value) and "\n" not in str(info.value)
    copy = Edge.load(ModelSource(missing, None, 2048), model_path=str(tiny_model))  # a local copy of the same file
    assert copy.tokenizer.n_vocab == Tokenizer.load(str(tiny_model)).n_vocab


def test_a_request_of_the_wrong_form_is_refused_when_it_is_made():
    for bad, param in ((dict(prompt=""), "prompt"), (dict(prompt=ChatPrompt(())), "messages"),
                       (dict(session_id=""), "session_id"), (dict(max_prompt_tokens=0), "max_prompt_tokens"),
                       (dict(params="greedy"), "params")):
        fields = {"request_id": "r", "prompt": "hi", "params": SamplingParams(), **bad}
        with pytest.raises(InvalidParameterError) as info:
            PromptRequest(**fields)
        assert info.value.param == param


# -- a real deployment ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def deployment(tiny_model, tiny_layout):
    import ray  # noqa: F401
    from local_ray import loopback_cluster

    from cluster.distributed import deploy
    from cluster.distributed.client import Client

    with loopback_cluster(1, "t-edge"):
        try:
            deploy.deploy(str(tiny_model), 1, cache_bytes=int(0.5 * tiny_layout.unit_bytes.sum()), namespace="t-edge",
                          n_threads=1, n_ctx=512)
            yield Client(namespace="t-edge")
        finally:
            deploy.shutdown("t-edge")


def test_a_10_mb_prompt_is_refused_where_it_enters_and_the_router_never_hears_of_it(deployment, tiny_topics):
    client = deployment
    ordinary = synth.topic_prompt(tiny_topics, 0, 8, seed=3)
    assert client.generate(ordinary, max_tokens=2).usage  # the edge is loaded
    before = client.status().n_routes
    with pytest.raises(PromptTooLongError, match="bytes"):
        client.generate("kalo meni " * 1_000_000, max_tokens=2)
    with pytest.raises(PromptTooLongError, match="context holds 512 tokens"):
        client.generate("x" * 600, max_tokens=2)  # a token per byte: tokenized, then refused
    assert client.status().n_routes == before
    done = client.generate(ordinary, max_tokens=2)
    assert client.status().n_routes == before + 1
    assert done.finish_reason in ("stop", "length")
    assert client.detokenize(client.tokenize(ordinary, add_special=False)) == ordinary
