"""The OpenAI-compatible HTTP gateway on a real 2-node Ray cluster (loopback), with Ray Serve.

Driven with the official ``openai`` client (streaming included) and with raw HTTP for the
error cases; the metrics endpoint is scraped while requests run.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

import openai  # noqa: E402
import ray  # noqa: E402
import requests  # noqa: E402
from local_ray import loopback_cluster  # noqa: E402
from polling import wait_until  # noqa: E402
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

from cluster.distributed import deploy  # noqa: E402
from cluster.models import synth  # noqa: E402
from cluster.bench import free_port  # noqa: E402
from cluster.distributed.deploy import stop_http  # noqa: E402
from cluster.errors import InvalidParameterError, SniperError  # noqa: E402
from cluster.api.gateway import GatewayConfig, build_app, start_http  # noqa: E402
from cluster.api.openai_api import Limits  # noqa: E402
from cluster.distributed.protocol import ROUTER_NAME, node_name  # noqa: E402
from cluster.distributed.status import RouterStatus  # noqa: E402

N_NODES = 2
API_KEY = "test-key-123"
NAMESPACE = "gateway-test"
MAX_PROMPT_TOKENS = 64
BODY_TIMEOUT_S = 3.0


@pytest.fixture(scope="module")
def gateway(tiny_model, tiny_layout):
    """A deployment (max_queue 1 per node, so overload is easy to reach) behind the HTTP gateway."""
    with loopback_cluster(N_NODES, NAMESPACE):
        try:
            deploy.deploy(str(tiny_model), N_NODES, cache_bytes=int(0.4 * tiny_layout.unit_bytes.sum()),
                          namespace=NAMESPACE, n_threads=1, n_ctx=512, max_queue=1)
            limits = Limits(max_body_bytes=64 << 10, max_prompt_tokens=MAX_PROMPT_TOKENS, max_tokens=256,
                            body_timeout_s=BODY_TIMEOUT_S)
            url = start_http(GatewayConfig(namespace=NAMESPACE, api_key=API_KEY, limits=limits), "127.0.0.1",
                             free_port())
            yield url
        finally:
            deploy.shutdown(NAMESPACE)


@pytest.fixture(scope="module")
def model_name(tiny_model) -> str:
    return os.path.basename(str(tiny_model)).removesuffix(".gguf")


def _openai(url: str, key: str = API_KEY) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0, timeout=120)


def _status() -> RouterStatus:
    return ray.get(ray.get_actor("sniper-router", namespace=NAMESPACE).status.remote())


def _metrics(url: str) -> dict[str, dict[tuple, float]]:
    out: dict[str, dict[tuple, float]] = {}
    text = requests.get(f"{url}/metrics", timeout=30).text
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out.setdefault(sample.name, {})[tuple(sorted(sample.labels.items()))] = sample.value
    return out


def test_health_and_models(gateway, model_name):
    health = requests.get(f"{gateway}/health", timeout=30)
    assert health.status_code == 200 and sorted(health.json()["nodes"]) == [node_name(i) for i in range(N_NODES)]
    assert [m.id for m in _openai(gateway).models.list()] == [model_name]


def test_completions_with_the_openai_client_streaming_and_not(gateway, model_name, tiny_topics):
    client = _openai(gateway)
    prompt = synth.topic_prompt(tiny_topics, 0, 10, seed=4)
    done = client.completions.create(model=model_name, prompt=prompt, max_tokens=8, temperature=0, seed=1)
    assert done.object == "text_completion" and done.choices[0].finish_reason == "length"
    assert done.usage.completion_tokens == 8 and done.usage.total_tokens == done.usage.prompt_tokens + 8
    assert done.system_fingerprint.startswith("sniper-node-") and done.choices[0].text
    pieces, finish = [], None
    for part in client.completions.create(model=model_name, prompt=prompt, max_tokens=8, temperature=0, seed=1,
                                          stream=True):
        pieces.append(part.choices[0].text)
        finish = part.choices[0].finish_reason or finish
    assert "".join(pieces) == done.choices[0].text and finish == "length"


def test_chat_completions_with_the_openai_client_streaming_and_not(gateway, model_name, tiny_topics):
    client = _openai(gateway)
    messages = [{"role": "system", "content": "answer briefly"},
                {"role": "user", "content": synth.topic_prompt(tiny_topics, 1, 10, seed=5)}]
    raw = client.chat.completions.with_raw_response.create(model=model_name, messages=messages, max_tokens=6,
                                                           temperature=0, seed=2)
    assert raw.headers["x-chat-template"] == "none"  # this model has no template: plain role lines, and it says so
    done = raw.parse()
    assert done.object == "chat.completion" and done.choices[0].message.role == "assistant"
    assert done.choices[0].message.content and done.usage.completion_tokens == 6
    stream = client.chat.completions.create(model=model_name, messages=messages, max_tokens=6, temperature=0, seed=2,
                                            stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == done.choices[0].message.content
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 6
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"


def test_api_key_is_required_and_a_refused_request_reaches_no_node(gateway, model_name):
    before = _status()
    with pytest.raises(openai.AuthenticationError):
        _openai(gateway, key="wrong").completions.create(model=model_name, prompt="hello", max_tokens=4)
    for headers in ({}, {"Authorization": "Basic " + API_KEY}, {"Authorization": "Bearer " + API_KEY + "x"}):
        r = requests.post(f"{gateway}/v1/completions", json={"model": model_name, "prompt": "hi"}, headers=headers, timeout=30)
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        assert r.headers["www-authenticate"] == "Bearer"
    assert requests.get(f"{gateway}/v1/models", timeout=30).status_code == 401
    after = _status()
    assert after.decisions == before.decisions
    assert [n.served for n in after.nodes] == [n.served for n in before.nodes]


def _post(url: str, body, **kwargs) -> requests.Response:
    headers = {"Authorization": f"Bearer {API_KEY}", **kwargs.pop("headers", {})}
    if not isinstance(body, dict):  # raw bytes, or an iterator (sent chunked, without Content-Length)
        return requests.post(f"{url}/v1/completions", data=body, headers=headers, timeout=60, **kwargs)
    return requests.post(f"{url}/v1/completions", json=body, headers=headers, timeout=60, **kwargs)


def test_errors_are_openai_error_bodies(gateway, model_name):
    cases = [
        (b"{not json", 400, None),
        ({"model": model_name, "prompt": "hi", "max_tokens": 257}, 400, "max_tokens"),
        ({"model": model_name, "prompt": "hi", "temperature": -0.5}, 400, "temperature"),
        ({"model": model_name}, 400, "prompt"),
        ({"model": "gpt-4", "prompt": "hi"}, 404, "model"),
        ({"model": model_name, "prompt": "hi", "n": 17}, 400, "n"),
    ]
    for body, status, param in cases:
        r = _post(gateway, body)
        assert r.status_code == status, (body, r.text)
        error = r.json()["error"]
        assert error["message"] and error["param"] == param and "Traceback" not in r.text


def test_unknown_paths_and_the_api_description_are_behind_the_key_as_openai_errors(gateway):
    for path in ("/v1/embeddings", "/v1/does/not/exist", "/openapi.json"):
        r = requests.get(f"{gateway}{path}", timeout=30)
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key", (path, r.text)
    auth = {"Authorization": f"Bearer {API_KEY}"}
    r = requests.get(f"{gateway}/v1/embeddings", headers=auth, timeout=30)
    assert r.status_code == 404 and r.json()["error"]["message"].startswith("GET /v1/embeddings")
    r = requests.get(f"{gateway}/v1/completions", headers=auth, timeout=30)  # a known path, the wrong method
    assert r.status_code == 405 and "error" in r.json() and "detail" not in r.json()
    for path in ("/docs", "/redoc", "/nothing"):
        r = requests.get(f"{gateway}{path}", timeout=30)
        assert r.status_code == 404 and "error" in r.json(), (path, r.text)
    r = requests.get(f"{gateway}/openapi.json", headers=auth, timeout=30)
    assert r.status_code == 200 and "/v1/chat/completions" in r.json()["paths"]


def test_json_nested_too_deeply_is_a_400(gateway):
    r = _post(gateway, b"[" * 30_000 + b"]" * 30_000)  # 60 kB, under the body limit of the fixture
    assert r.status_code == 400 and "nested too deeply" in r.json()["error"]["message"]


def _raw_request(url: str, head_only_body: bytes, declared: int, headers: dict[str, str] | None = None) -> socket.socket:
    host, port = url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)), timeout=60)
    extra = "".join(f"{name}: {value}\r\n" for name, value in (headers or {}).items())
    sock.sendall(f"POST /v1/completions HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {API_KEY}\r\n{extra}"
                 f"Content-Type: application/json\r\nContent-Length: {declared}\r\n\r\n".encode() + head_only_body)
    return sock


def _in_progress(url: str) -> float:
    return _metrics(url).get("sniper_http_requests_in_progress", {}).get((), 0)


def _new_counts(url: str, before: dict[tuple, float]) -> dict[str, float]:
    """/v1/completions requests counted since ``before`` (a scrape's sniper_http_requests_total), by status."""
    after = _metrics(url).get("sniper_http_requests_total", {})
    return {dict(k)["status"]: v - before.get(k, 0) for k, v in after.items()
            if dict(k)["endpoint"] == "/v1/completions" and v != before.get(k, 0)}


def test_a_body_shorter_than_its_content_length_times_out_with_408(gateway):
    started = time.monotonic()
    sock = _raw_request(gateway, b'{"model": "x"', declared=200)
    try:
        answer = sock.recv(65536).decode()
    finally:
        sock.close()
    assert answer.startswith("HTTP/1.1 408"), answer[:200]
    assert BODY_TIMEOUT_S <= time.monotonic() - started < BODY_TIMEOUT_S + 20


def test_a_client_gone_mid_upload_is_counted_as_499_not_500(gateway):
    """The replica counts the request once, as 499 (Serve's proxy cancels the body's receive when the
    client goes: that was counted as 500 before), and nothing is left in progress.

    The client goes once the replica reads its body (the proxy may hand it on late: the test waits
    for that, however long). A try whose client went only after the body timeout is counted 408,
    once, and is tried again."""
    tries: list[dict[str, float]] = []
    deadline = time.monotonic() + 300
    while "499" not in (tries[-1] if tries else {}):
        assert time.monotonic() < deadline, f"every try's client went after the body timeout: {tries}"
        metrics = _metrics(gateway)
        before = metrics.get("sniper_http_requests_total", {})
        in_progress = metrics.get("sniper_http_requests_in_progress", {}).get((), 0)
        sock = _raw_request(gateway, b'{"model": "x", "prompt": "a', declared=500)
        try:
            wait_until(lambda: _in_progress(gateway) > in_progress, 120, "the replica reading the partial request")
        finally:
            sock.close()
        counted = wait_until(lambda: _new_counts(gateway, before), BODY_TIMEOUT_S + 30, "the request counted")
        assert counted in ({"499": 1}, {"408": 1}), counted
        wait_until(lambda: _in_progress(gateway) == in_progress, 30, "nothing left in progress")
        tries.append(counted)


def test_a_streaming_client_gone_before_its_first_byte_leaves_nothing_in_progress(gateway, model_name, tiny_topics):
    """The body's generator of a streamed response never starts when the client is gone before the
    first byte; the response's background task ends the request then (counted 499, gauge back).

    Serve's proxy drops a request whose client went before it handed the request on (the replica
    never sees it), so these ask it not to (``x-request-disconnect-disabled``): every one reaches
    the replica and the router, and the replica finds its client gone by itself."""
    metrics = _metrics(gateway)
    before = metrics.get("sniper_http_requests_total", {})
    in_progress = metrics.get("sniper_http_requests_in_progress", {}).get((), 0)
    routes = _status().n_routes
    body = json.dumps({"model": model_name, "prompt": synth.topic_prompt(tiny_topics, 1, 8, seed=41),
                       "max_tokens": 256, "stream": True}).encode()
    for _ in range(3):
        sock = _raw_request(gateway, body, declared=len(body), headers={"x-request-disconnect-disabled": "?1"})
        sock.close()  # before any byte of the answer
    counted = wait_until(lambda: (c := _new_counts(gateway, before)) and sum(c.values()) == 3 and c, 60,
                         "each of the three requests counted once")
    assert counted.get("499", 0) >= 1 and set(counted) <= {"499", "429"}, counted  # 429: both nodes already busy
    assert _status().n_routes - routes >= 3, "every request reached the router"
    wait_until(lambda: _in_progress(gateway) == in_progress, 30, "nothing left in progress")
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and any(n.load for n in _status().nodes):
        time.sleep(0.1)
    assert not any(n.load for n in _status().nodes)


def _descendants(pid: int) -> set[int]:
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    out, todo = set(), [pid]
    while todo:
        p = todo.pop()
        out.add(p)
        todo.extend(children.get(p, []))
    return out


def _listening(pids: set[int]) -> list[tuple[int, str]]:
    """(pid, local address) of every listening TCP socket the processes hold."""
    inodes: dict[str, int] = {}
    for pid in pids:
        try:
            for fd in Path(f"/proc/{pid}/fd").iterdir():
                target = os.readlink(fd)
                if target.startswith("socket:["):
                    inodes[target[8:-1]] = pid
        except OSError:
            continue
    out = []
    for table, v6 in (("/proc/net/tcp", False), ("/proc/net/tcp6", True)):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] != "0A" or fields[9] not in inodes:  # 0A: LISTEN
                continue
            addr_hex = fields[1].split(":")[0]
            raw = bytes.fromhex(addr_hex)
            if v6:
                words = [raw[i:i + 4][::-1] for i in range(0, 16, 4)]
                addr = socket.inet_ntop(socket.AF_INET6, b"".join(words))
            else:
                addr = socket.inet_ntop(socket.AF_INET, raw[::-1])
            out.append((inodes[fields[9]], addr))
    return out


def test_every_listener_of_the_deployment_is_on_loopback(gateway):
    """Read from the kernel: every listening socket of this process and everything it started (Ray's
    processes, the node actors, the router, Serve's proxy and the gateway's replica)."""
    listeners = _listening(_descendants(os.getpid()))
    assert len(listeners) > 5, listeners  # Ray's services, the proxy, the replicas: all seen
    exposed = [(pid, addr) for pid, addr in listeners
               if not (addr.startswith("127.") or addr in ("::1", "::ffff:127.0.0.1") or addr.startswith("::ffff:127."))]
    details = [(pid, addr, Path(f"/proc/{pid}/cmdline").read_bytes()[:80]) for pid, addr in exposed]
    assert not exposed, f"listening beyond loopback: {details}"


def test_body_and_prompt_limits(gateway, model_name):
    huge = json.dumps({"model": model_name, "prompt": "word " * 20000})
    r = _post(gateway, huge)
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"
    chunked = _post(gateway, iter([huge.encode()]))  # no Content-Length: the limit holds while reading
    assert chunked.status_code == 413
    long_prompt = " ".join(["alpha beta gamma"] * 40)
    r = _post(gateway, {"model": model_name, "prompt": long_prompt, "max_tokens": 4})
    assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"
    assert f"at most {MAX_PROMPT_TOKENS}" in r.json()["error"]["message"]


def test_overload_is_429_and_nothing_hangs(gateway, model_name, tiny_topics):
    prompt = synth.topic_prompt(tiny_topics, 0, 8, seed=9)

    def one(i: int) -> int:
        return _post(gateway, {"model": model_name, "prompt": prompt, "max_tokens": 256, "seed": i}).status_code

    with ThreadPoolExecutor(8) as pool:
        codes = list(pool.map(one, range(8), timeout=180))
    assert set(codes) <= {200, 429} and codes.count(429) >= 1 and codes.count(200) >= N_NODES, codes
    r = _post(gateway, {"model": model_name, "prompt": prompt, "max_tokens": 2})
    assert r.status_code == 200  # capacity is back once the burst ends


def test_metrics_scraped_during_load(gateway, model_name, tiny_topics):
    before = _metrics(gateway)
    ok_key = (("endpoint", "/v1/completions"), ("status", "200"))
    ok_before = before.get("sniper_http_requests_total", {}).get(ok_key, 0)
    results: list[int] = []

    def load() -> None:
        for i in range(3):
            prompt = synth.topic_prompt(tiny_topics, i % 2, 8, seed=20 + i)
            results.append(_post(gateway, {"model": model_name, "prompt": prompt, "max_tokens": 128, "seed": i}).status_code)

    workers = [threading.Thread(target=load) for _ in range(N_NODES)]
    for w in workers:
        w.start()
    busy_seen = 0
    while any(w.is_alive() for w in workers):
        m = _metrics(gateway)
        busy_seen = max(busy_seen, sum(m.get("sniper_node_queue_depth", {}).values()),
                        m.get("sniper_http_requests_in_progress", {}).get((), 0))
        time.sleep(0.05)
    for w in workers:
        w.join()
    after = _metrics(gateway)
    assert busy_seen >= 1
    assert after["sniper_http_requests_total"][ok_key] - ok_before == results.count(200) >= 1
    assert after["sniper_generated_tokens_total"][()] >= before.get("sniper_generated_tokens_total", {}).get((), 0) + 128
    served = after["sniper_node_requests_total"]
    assert sorted(dict(k)["node"] for k in served) == [node_name(i) for i in range(N_NODES)]
    assert sum(after["sniper_node_expert_bytes_read_total"].values()) > 0
    assert all(0 <= v <= 1 for v in after["sniper_node_expert_hit_rate"].values())
    decisions = after["sniper_routing_decisions_total"]
    assert all(dict(k)["policy"] == "warmth" for k in decisions) and sum(decisions.values()) >= 6
    assert after["sniper_request_duration_seconds_count"][(("endpoint", "/v1/completions"),)] >= 6


def test_a_caller_that_goes_away_cancels_its_request_on_the_node(gateway, model_name, tiny_topics):
    def generated_once_idle() -> list[int]:  # [tokens the nodes generated for finished requests] once none has a request
        reports = [ray.get(ray.get_actor(node_name(i), namespace=NAMESPACE).report.remote(), timeout=30)
                   for i in range(N_NODES)]  # the nodes' own counts, not the router's (callers settle those too)
        return [] if any(r.load for r in reports) else [sum(r.stats.generated_tokens for r in reports)]

    (start,) = wait_until(generated_once_idle, 60, "every node done with earlier requests")
    body = {"model": model_name, "prompt": synth.topic_prompt(tiny_topics, 0, 8, seed=31), "max_tokens": 256,
            "stream": True}
    with requests.post(f"{gateway}/v1/completions", json=body, timeout=60, stream=True,
                       headers={"Authorization": f"Bearer {API_KEY}"}) as r:
        assert r.status_code == 200
        assert next(r.iter_lines()).startswith(b"data: ")  # the first piece arrived; the caller leaves
    (end,) = wait_until(generated_once_idle, 60, "the node done with the request")
    wait_until(lambda: not any(n.load for n in _status().nodes), 30, "the router's count settled")
    assert end - start < 256


def _readme_http_section() -> str:
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    start = readme.index("## HTTP (OpenAI-compatible)")
    return readme[start:readme.index("\n## ", start + 1)]


def _as_tested(text: str, url: str, model: str) -> str:
    return text.replace("http://127.0.0.1:8000", url).replace('"demo"', f'"{model}"')


def test_readme_curl_and_openai_examples_work(gateway, model_name):
    section = _readme_http_section()
    curls = [line for line in section.splitlines() if line.startswith("curl ")]
    assert len(curls) == 5
    env = {**os.environ, "SNIPER_API_KEY": API_KEY}
    outputs = [subprocess.run(["bash", "-c", _as_tested(c, gateway, model_name)], env=env, capture_output=True,
                              text=True, timeout=120, check=True).stdout for c in curls]
    completion, chat_stream, tokenized, health, metrics = outputs
    assert json.loads(completion)["usage"]["completion_tokens"] == 16
    events = [line[len("data: "):] for line in chat_stream.splitlines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]" and json.loads(events[0])["object"] == "chat.completion.chunk"
    assert "".join(t["piece"] for t in json.loads(tokenized)["tokens"]) == " kalo meni"
    assert json.loads(health)["status"] == "ok" and "sniper_node_expert_hit_rate" in metrics
    python_block = section.split("```python\n", 1)[1].split("```", 1)[0]
    printed = subprocess.run([sys.executable, "-c", _as_tested(python_block, gateway, model_name)], env=env,
                             capture_output=True, text=True, timeout=120)
    assert printed.returncode == 0 and "sniper-node-" in printed.stdout, printed.stderr[-2000:]


def test_asking_for_another_port_while_serve_runs_is_a_clear_error(gateway):
    config = GatewayConfig(namespace=NAMESPACE, api_key=API_KEY,
                           limits=Limits(max_body_bytes=64 << 10, max_prompt_tokens=MAX_PROMPT_TOKENS, max_tokens=256))
    with pytest.raises(SniperError, match="does not answer at http://127.0.0.1:.*shutdown"):
        start_http(config, "127.0.0.1", free_port(), timeout_s=3)
    assert requests.get(f"{gateway}/health", timeout=30).status_code == 200  # the running gateway is untouched


def test_build_app_deploys_and_serves_as_a_rayservice_would(gateway, tiny_model, model_name):
    """``cluster.api.gateway:build_app`` with the string arguments a Serve config passes."""
    from ray import serve

    with pytest.raises(InvalidParameterError, match="modell"):
        build_app({"modell": "x"})
    for bad in ("lots", 0, "-3"):
        with pytest.raises(InvalidParameterError, match="cache_mb must be a positive integer"):
            build_app({"model": str(tiny_model), "cache_mb": bad})
    args = {"model": str(tiny_model), "nodes": "2", "threads": "1", "namespace": "gateway-build", "api_key": "k2",
            "max_tokens_limit": "8"}  # no cache_mb: as `serve`, a budget that holds the whole model
    try:
        serve.run(build_app(args), name="sniper-build", route_prefix="/build")
        url = f"{gateway}/build"
        assert requests.get(f"{url}/health", timeout=30).json()["nodes"] == [node_name(0), node_name(1)]
        body = {"model": model_name, "prompt": "hello", "max_tokens": 8, "temperature": 0}  # greedy: never EOS first
        assert requests.post(f"{url}/v1/completions", json=body, timeout=60).status_code == 401
        r = requests.post(f"{url}/v1/completions", json=body, headers={"Authorization": "Bearer k2"}, timeout=60)
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 8
        r = requests.post(f"{url}/v1/completions", json={**body, "max_tokens": 9}, headers={"Authorization": "Bearer k2"},
                          timeout=60)
        assert r.status_code == 400
        status = ray.get(ray.get_actor(ROUTER_NAME, namespace="gateway-build").status.remote(), timeout=30)
        served = [n for n in status.nodes if n.served]
        assert served and {n.budget_bytes for n in served} == {deploy.whole_model_budget(str(tiny_model))}
    finally:
        serve.delete("sniper-build")
        deploy.shutdown("gateway-build")


def test_a_node_dying_mid_answer_is_continued_elsewhere_not_an_error(gateway, model_name, tiny_topics):
    """The answer's node dies while it writes it: another node continues it and the caller gets
    the full answer, each token counted once."""
    body = {"model": model_name, "prompt": synth.topic_prompt(tiny_topics, 2, 8, seed=43), "max_tokens": 256,
            "temperature": 0}
    nodes = [ray.get_actor(node_name(i), namespace=NAMESPACE) for i in range(N_NODES)]

    def serving() -> list[str]:  # the nodes that have the request in hand (their own count, not the router's)
        return [node_name(i) for i, node in enumerate(nodes) if ray.get(node.report.remote(), timeout=30).load]

    with ThreadPoolExecutor(1) as pool:
        answer = pool.submit(_post, gateway, body)
        deadline = time.monotonic() + 30
        while not (busy := serving()):
            assert time.monotonic() < deadline and not answer.done(), f"the request never reached a node: {answer.result().text if answer.done() else ''}"
            time.sleep(0.01)
        ray.kill(nodes[int(busy[0].rsplit("-", 1)[1])], no_restart=False)  # a crash mid-answer: Ray starts it again
        r = answer.result(timeout=120)
    assert r.status_code == 200, r.text
    done = r.json()
    assert done["usage"]["completion_tokens"] == 256 and done["system_fingerprint"] != busy[0]
    deadline = time.monotonic() + 120  # the crashed node is back before the tests that follow
    while not all(n.alive for n in _status().nodes):
        assert time.monotonic() < deadline, "the crashed node did not come back"
        time.sleep(0.5)


def test_a_stream_whose_node_dies_is_continued_on_another_node_without_a_seam(gateway, model_name, tiny_topics):
    """The official client streams; the node writing the answer is killed after its first piece:
    the stream goes on from another node, the text equals an undisturbed run's, usage counts each
    token once, and nothing of Ray's (exception names, actor ids) reaches the client."""
    body = {"model": model_name, "prompt": synth.topic_prompt(tiny_topics, 3, 8, seed=44), "max_tokens": 256,
            "temperature": 0}
    expected = _post(gateway, body).json()["choices"][0]["text"]
    nodes = [ray.get_actor(node_name(i), namespace=NAMESPACE) for i in range(N_NODES)]
    stream = _openai(gateway).completions.create(**body, stream=True, stream_options={"include_usage": True})
    chunks = [next(stream)]
    busy = [node_name(i) for i, node in enumerate(nodes) if ray.get(node.report.remote(), timeout=30).load]
    assert busy, "the answer ended before a node could be killed"
    ray.kill(nodes[int(busy[0].rsplit("-", 1)[1])], no_restart=False)  # Ray starts it again
    chunks += list(stream)
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == expected
    assert chunks[-1].usage.completion_tokens == 256 and chunks[-1].usage.prompt_tokens == _post(
        gateway, {**body, "max_tokens": 1}).json()["usage"]["prompt_tokens"]
    finishing = [c.system_fingerprint for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishing and finishing[0] != busy[0]  # another node ended it
    raw = json.dumps([c.model_dump() for c in chunks])
    assert "Error" not in raw and "actor" not in raw.lower()
    deadline = time.monotonic() + 120  # the crashed node is back before the tests that follow
    while not all(n.alive for n in _status().nodes):
        assert time.monotonic() < deadline, "the crashed node did not come back"
        time.sleep(0.5)


def test_nodes_dying_end_a_started_stream_with_an_error_then_health_is_503(gateway, model_name, tiny_topics):
    body = {"model": model_name, "prompt": synth.topic_prompt(tiny_topics, 0, 8, seed=41), "max_tokens": 256,
            "stream": True}
    with requests.post(f"{gateway}/v1/completions", json=body, timeout=60, stream=True,
                       headers={"Authorization": f"Bearer {API_KEY}"}) as r:
        lines = r.iter_lines()
        assert next(lines).startswith(b"data: {")  # text is flowing: now every node dies
        for i in range(N_NODES):
            ray.kill(ray.get_actor(node_name(i), namespace=NAMESPACE), no_restart=True)
        events = [line[len(b"data: "):] for line in lines if line.startswith(b"data: ")]
    assert events and events[-1] != b"[DONE]"
    error = json.loads(events[-1])["error"]
    assert error["code"] == "node_failed" and "sniper-node-" in error["message"]
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and requests.get(f"{gateway}/health", timeout=30).status_code == 200:
        time.sleep(0.25)
    health = requests.get(f"{gateway}/health", timeout=30)
    assert health.status_code == 503 and health.json()["status"] == "unavailable"
    r = _post(gateway, {"model": model_name, "prompt": "hello", "max_tokens": 2})
    assert r.status_code == 503 and r.json()["error"]["type"] == "service_unavailable"
    assert stop_http(NAMESPACE)
