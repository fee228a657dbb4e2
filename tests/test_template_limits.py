"""Chat templates cannot stall the service (cluster.engine.template_render): a template that loops,
writes megabytes or allocates gigabytes is stopped within the limit with a TemplateLimitError, the
pool goes on rendering for everyone else meanwhile, a deployment refuses such a template at start-up,
and a conversation that trips it at request time is a 400 while other clients are answered."""

from __future__ import annotations

import os
import statistics
import threading
import time
from pathlib import Path

import pytest

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

import openai  # noqa: E402
from local_ray import loopback_cluster  # noqa: E402

from cluster.api.gateway import GatewayConfig, start_http  # noqa: E402
from cluster.bench import free_port  # noqa: E402
from cluster.distributed import deploy  # noqa: E402
from cluster.engine.chat import CHATML_TEMPLATE, ChatMessage, ChatPrompt, ChatRenderer, ChatTemplate  # noqa: E402
from cluster.engine.template_render import RENDER_MAX_CHARS, RENDER_TIME_LIMIT_S, render_pool  # noqa: E402
from cluster.errors import ChatTemplateError, TemplateLimitError  # noqa: E402

LOOPS = "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}"
WRITES = "{% for i in range(100000) %}{% for j in range(1000) %}0123456789{% endfor %}{% endfor %}"
SLOW_ON_TRIGGER = ("{% if messages[-1].content == 'stall the service' %}" + LOOPS + "{% endif %}" + CHATML_TEMPLATE)


def _chat(text: str) -> ChatPrompt:
    return ChatPrompt((ChatMessage("user", text),))


@pytest.mark.parametrize("source, words", [
    (LOOPS, f"longer than {RENDER_TIME_LIMIT_S:g} s"),
    (WRITES, f"longer than {RENDER_MAX_CHARS} characters"),
    ("{{ 'x' * 10000000000 }}", "repeats a value"),
    ("{{ (messages[0].content ~ 'x') | center(4000000000) }}", "memory"),
])
def test_a_hostile_template_is_stopped_within_the_limit_and_the_pool_goes_on(source, words):
    template = ChatTemplate.create(source, "override")
    began = time.monotonic()
    with pytest.raises(TemplateLimitError, match=words) as info:
        template.render(_chat("hi"))
    assert time.monotonic() - began < RENDER_TIME_LIMIT_S + 1.5
    assert info.value.param == "messages" and str(info.value).startswith("the override chat template was stopped")
    assert ChatTemplate.create(CHATML_TEMPLATE, "model").render(_chat("hi")).text.startswith("<|im_start|>user\nhi")


def test_a_constant_that_would_take_gigabytes_is_neither_built_by_compiling_nor_by_rendering():
    began = time.monotonic()
    template = ChatTemplate.create("{{ 'x' | center(4000000000) }}", "override")  # Jinja folds constants
    with pytest.raises(TemplateLimitError, match="needs more memory"):
        template.render(_chat("hi"))
    assert time.monotonic() - began < RENDER_TIME_LIMIT_S + 1.5
    with pytest.raises(ChatTemplateError, match="does not compile: line 1"):
        ChatTemplate.create("{% for m in messages %}", "override")


def test_other_renders_go_on_while_a_slow_one_runs():
    slow = ChatTemplate.create(LOOPS, "override")
    fine = ChatTemplate.create(CHATML_TEMPLATE, "model")
    fine.render(_chat("warm"))
    failures: list[Exception] = []

    def stall() -> None:
        try:
            slow.render(_chat("hi"))
        except TemplateLimitError as exc:
            failures.append(exc)

    thread = threading.Thread(target=stall)
    thread.start()
    time.sleep(0.2)
    latencies = []
    while thread.is_alive():
        began = time.monotonic()
        fine.render(_chat("meanwhile"))
        latencies.append(time.monotonic() - began)
    thread.join()
    assert len(failures) == 1 and len(latencies) >= 5
    assert statistics.median(latencies) < 0.1, latencies


class _Vocabulary:
    """What ChatRenderer reads of a tokenizer, for a template under test."""

    def __init__(self, template: str) -> None:
        self.template, self.bos_text, self.eos_text = template, "", ""

    def chat_template(self) -> str:
        return self.template

    def tokenize(self, text: str, special: bool = False, add_special: bool = True) -> list[int]:
        return [1]

    def is_control(self, token: int) -> bool:
        return False


def test_a_template_that_exceeds_the_limit_on_the_probe_is_refused_before_anything_starts():
    with pytest.raises(TemplateLimitError, match="was stopped"):
        ChatRenderer(_Vocabulary(CHATML_TEMPLATE), override=WRITES)
    own = ChatRenderer(_Vocabulary(LOOPS))  # the model's own: completions still work, chat is refused with why
    with pytest.raises(ChatTemplateError, match="was stopped.*--chat-template FILE can replace it"):
        own.render(_chat("hi"))
    assert ChatRenderer(_Vocabulary(SLOW_ON_TRIGGER)).render(_chat("hi")).text.startswith("<|im_start|>user")
    assert render_pool().render("{{ 1 + 1 }}", {}) == "2"


def test_a_deployment_answers_a_stalling_conversation_with_a_400_within_the_limit_and_others_go_on(chatml_model: Path):
    namespace = "template-limits"
    with loopback_cluster(1, namespace):
        try:
            deploy.deploy(str(chatml_model), 1, cache_bytes=None, namespace=namespace, n_threads=2, n_ctx=512,
                          chat_template=SLOW_ON_TRIGGER)
            url = start_http(GatewayConfig(namespace=namespace, api_key="k"), "127.0.0.1", free_port())
            client = openai.OpenAI(base_url=f"{url}/v1", api_key="k", max_retries=0, timeout=60)
            model = chatml_model.stem

            def ask(text: str) -> float:
                began = time.monotonic()
                client.chat.completions.create(model=model, messages=[{"role": "user", "content": text}],
                                               max_tokens=2, temperature=0)
                return time.monotonic() - began

            baseline = statistics.median([ask("hello there") for _ in range(5)])
            errors: list[tuple[float, Exception]] = []

            def stall() -> None:
                began = time.monotonic()
                try:
                    ask("stall the service")
                except openai.BadRequestError as exc:
                    errors.append((time.monotonic() - began, exc))

            stallers = [threading.Thread(target=stall) for _ in range(2)]
            for thread in stallers:
                thread.start()
            time.sleep(0.3)
            during = []
            while any(thread.is_alive() for thread in stallers):
                during.append(ask("hello there"))
            for thread in stallers:
                thread.join()
            assert len(errors) == 2, errors
            for took, exc in errors:
                assert took < RENDER_TIME_LIMIT_S + 3, took
                assert exc.status_code == 400 and "longer than" in exc.body["message"], exc.body
            assert during and statistics.median(during) < baseline + 0.5, (baseline, during)
        finally:
            deploy.shutdown(namespace)
