"""A burst of concurrent requests with a failure injected in the middle (the node tests share it)."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Callable

from cluster.distributed.client import Client

N_REQUESTS = 9
MAX_TOKENS = 200


def burst_with_a_failure(client: Client, prompt: str, fail: Callable[[], None],
                         after_s: float = 0.5) -> list[str]:
    """Sends N_REQUESTS greedy requests at once, whole answers (``generate``) and streams in turn,
    and calls ``fail`` ``after_s`` seconds in. Every whole answer must come back complete and
    identical to the answer of a quiet moment, streams too (a node dying under either is
    continued on another node, the seam invisible). Returns each request's outcome: "ok"."""
    expected = client.generate(prompt, max_tokens=MAX_TOKENS)
    assert expected.usage.completion_tokens == MAX_TOKENS

    def call(i: int) -> str:
        if i % 2 == 0:
            done = client.generate(prompt, max_tokens=MAX_TOKENS, seed=i)
            assert done.usage.completion_tokens == MAX_TOKENS and done.text == expected.text
            return "ok"
        assert "".join(client.stream(prompt, max_tokens=MAX_TOKENS, seed=i)) == expected.text
        return "ok"

    timer = threading.Timer(after_s, fail)
    timer.start()
    with ThreadPoolExecutor(N_REQUESTS) as pool:
        outcomes = list(pool.map(call, range(N_REQUESTS), timeout=240))
    timer.join()
    assert set(outcomes) == {"ok"}
    return outcomes
