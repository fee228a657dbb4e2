"""A burst of concurrent requests with a failure injected in the middle (the node tests share it)."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Callable

from cluster.distributed.client import Client

N_REQUESTS = 9
MAX_TOKENS = 200


def burst_with_a_failure(client: Client, prompt: str, fail: Callable[[], None]) -> list[str]:
    """Sends N_REQUESTS greedy requests at once, whole answers (``generate``) and streams in turn,
    and calls ``fail`` (on a thread of its own) as soon as a stream has its first piece: the burst
    is under way then, however fast or loaded the machine. Every whole answer must come back
    complete and identical to the answer of a quiet moment, streams too (a node dying under either
    is continued on another node, the seam invisible). Returns each request's outcome: "ok"."""
    expected = client.generate(prompt, max_tokens=MAX_TOKENS)
    assert expected.usage.completion_tokens == MAX_TOKENS
    failing = threading.Thread(target=fail, name="failure")
    started = threading.Lock()

    def call(i: int) -> str:
        if i % 2 == 0:
            done = client.generate(prompt, max_tokens=MAX_TOKENS, seed=i)
            assert done.usage.completion_tokens == MAX_TOKENS and done.text == expected.text
            return "ok"
        pieces = []
        for piece in client.stream(prompt, max_tokens=MAX_TOKENS, seed=i):
            pieces.append(piece)
            if started.acquire(blocking=False):  # the first piece of any stream: now the failure
                failing.start()
        assert "".join(pieces) == expected.text
        return "ok"

    with ThreadPoolExecutor(N_REQUESTS) as pool:
        outcomes = list(pool.map(call, range(N_REQUESTS), timeout=240))
    assert started.locked(), "no stream had a first piece: the failure never came"
    failing.join()
    assert set(outcomes) == {"ok"}
    return outcomes
