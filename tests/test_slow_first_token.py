"""A slow first token is not an error (issue 22): a long prompt's prefill on a node whose cache
holds a seventh of the experts (one thread) takes seconds before any text, longer than the read
timeout of the HTTP clients below, and the request is still answered: through the gateway (its
SSE comments keep a streamed response alive until the text comes) and through the Python client
(no time-out on a request that is making progress).

Every time-out on a request's path, and why none of them cuts a slow first token:
cluster/distributed/dispatch.py ROUTER_WAIT_S (asks to the router, not the node's stream),
cluster/distributed/router.py NODE_TIMEOUT_S (sweeps only nodes with no request in flight; a
busy node's heartbeat is a light report that never waits for the step loop),
cluster/api/gateway.py STATUS_TIMEOUT_S (the router's status), Limits.body_timeout_s (the request
body), start_http (its /health probe); Serve's HTTP proxy has no end-to-end request time-out
(``HTTPOptions.request_timeout_s`` None).
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

import openai  # noqa: E402
import requests  # noqa: E402
from local_ray import loopback_cluster  # noqa: E402

from cluster.api.gateway import KEEPALIVE_COMMENT, GatewayConfig, start_http  # noqa: E402
from cluster.api.openai_api import Limits  # noqa: E402
from cluster.bench import free_port  # noqa: E402
from cluster.distributed import deploy  # noqa: E402
from cluster.distributed.client import Client  # noqa: E402
from cluster.engine.cache import discover_layout  # noqa: E402
from cluster.engine.sampling import SamplingParams  # noqa: E402

NAMESPACE = "slow-first-token"
READ_TIMEOUT_S = 1.0  # the HTTP clients' read timeout: shorter than the prefill below
KEEPALIVE_S = 0.25


def _prompt(first_word: str) -> str:
    """About 1,700 tokens of the demo model; each test's starts with its own word, so no node holds
    a prefix of it (a reused prefix is not prefilled again)."""
    return first_word + " " + " ".join(["mixture of experts routing cache"] * 60)


@pytest.fixture(scope="module")
def slow_gateway(demo_model: Path):
    """One node serving the demo model with a seventh of its experts' bytes and one thread."""
    budget = int(discover_layout(str(demo_model)).unit_bytes.sum() / 7)
    with loopback_cluster(1, NAMESPACE):
        try:
            deploy.deploy(str(demo_model), 1, cache_bytes=budget, namespace=NAMESPACE, n_threads=1, n_ctx=2048)
            config = GatewayConfig(namespace=NAMESPACE, api_key=None, keepalive_s=KEEPALIVE_S,
                                   limits=Limits(max_prompt_tokens=2000))
            yield start_http(config, "127.0.0.1", free_port())
        finally:
            deploy.shutdown(NAMESPACE)


def _model(url: str) -> str:
    return requests.get(f"{url}/v1/models", timeout=30).json()["data"][0]["id"]


def test_a_streamed_request_whose_first_token_outlasts_the_clients_read_timeout_is_answered(slow_gateway: str) -> None:
    body = {"model": _model(slow_gateway), "prompt": _prompt("http"), "max_tokens": 4, "stream": True, "temperature": 0}
    sent = time.monotonic()
    first_data = None
    lines: list[str] = []
    with requests.post(f"{slow_gateway}/v1/completions", json=body, stream=True,
                       timeout=(10, READ_TIMEOUT_S)) as response:
        assert response.status_code == 200
        for line in response.iter_lines(decode_unicode=True):
            if line.startswith("data: ") and first_data is None:
                first_data = time.monotonic() - sent
            lines.append(line)
    assert first_data is not None and first_data > READ_TIMEOUT_S, f"the first token came after {first_data} s"
    assert lines.count(KEEPALIVE_COMMENT.strip()) >= 1, lines[:5]
    assert lines[-2:] == ["data: [DONE]", ""] or lines[-1] == "data: [DONE]", lines[-3:]
    assert any('"text"' in line for line in lines if line.startswith("data: {"))


def test_the_openai_client_with_a_short_timeout_streams_a_slow_first_token(slow_gateway: str) -> None:
    client = openai.OpenAI(base_url=f"{slow_gateway}/v1", api_key="none", max_retries=0, timeout=READ_TIMEOUT_S)
    sent = time.monotonic()
    stream = client.completions.create(model=_model(slow_gateway), prompt=_prompt("openai"), max_tokens=4,
                                       stream=True, temperature=0)
    chunks = list(stream)
    assert time.monotonic() - sent > READ_TIMEOUT_S
    assert chunks and chunks[-1].choices[0].finish_reason == "length"


def test_the_python_client_answers_a_slow_first_token(slow_gateway: str) -> None:
    client = Client(namespace=NAMESPACE)
    sent = time.monotonic()
    done = client.generate(_prompt("python"), SamplingParams(max_tokens=4, temperature=0))
    assert done.usage.completion_tokens == 4 and done.usage.prompt_tokens > 1000 and done.usage.reused_prompt_tokens <= 1  # BOS
    assert time.monotonic() - sent > READ_TIMEOUT_S
