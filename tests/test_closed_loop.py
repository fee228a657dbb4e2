"""The closed loop that drives both sides of ``bench batch``."""

from __future__ import annotations

import threading
import time

import pytest

from cluster.bench.closed_loop import closed_loop


def test_every_client_warms_up_then_sends_back_to_back_until_the_window_ends():
    lock = threading.Lock()
    sent: list[tuple[str, float, float, float, str]] = []  # prompt, deadline, sent at, answered at, client

    def send(prompt: str, deadline: float) -> dict:
        started = time.perf_counter()
        time.sleep(0.001)
        with lock:
            sent.append((prompt, deadline, started, time.perf_counter(), threading.current_thread().name))
        return {"prompt": prompt}

    prompts = [f"p{i}" for i in range(5)]
    window_s = 0.3
    elapsed, measured = closed_loop(3, prompts, send, warmup_s=5.0, window_s=window_s)
    assert elapsed >= window_s
    warmups = sorted(p for p, *_ in sent[:3])
    assert warmups == ["p0", "p1", "p2"], "client c warms up with prompt c"
    assert len(measured) == len(sent) - 3 >= 3 * 5, "every request after the warm-ups is measured"
    assert {m["prompt"] for m in measured} == set(prompts), "clients rotate over every prompt"
    window_deadlines = {d for _, d, *_ in sent[3:]}
    assert len(window_deadlines) == 1, "every measured request is told the window's end"
    (end,) = window_deadlines
    start = end - window_s
    assert all(answered < start for _, _, _, answered, _ in sent[:3]), "the window opens once every warm-up is answered"
    assert all(started >= start for _, _, started, _, _ in sent[3:]), "the measured requests are sent in the window"
    for client in ("client-0", "client-1", "client-2"):  # each sends back to back, from the prompt after its warm-up
        mine = [(p, started, answered) for p, _, started, answered, name in sent[3:] if name == client]
        first = int(client[-1]) + 1
        assert mine and [p for p, _, _ in mine] == [prompts[(first + i) % 5] for i in range(len(mine))], client
        assert all(b[1] >= a[2] for a, b in zip(mine, mine[1:])), f"{client} sends one request at a time"
        assert all(answered < end for _, _, answered in mine[:-1]), f"{client} sent again after the window's end"


def test_a_failing_client_stops_the_others_and_its_error_is_raised():
    calls = {"n": 0}

    def send(prompt: str, deadline: float) -> dict:
        calls["n"] += 1
        if prompt == "bad":
            raise RuntimeError("the server went away")
        time.sleep(0.01)
        return {}

    window_s = 60.0
    t0 = time.perf_counter()
    with pytest.raises(RuntimeError, match="went away"):
        closed_loop(3, ["ok", "ok", "bad"], send, warmup_s=5.0, window_s=window_s)
    assert calls["n"] == 3, "the others stop at their warm-up: the window never opens"
    assert time.perf_counter() - t0 < window_s, "nobody waits for the failed client or the whole window"
