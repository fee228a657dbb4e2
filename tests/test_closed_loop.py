"""The closed loop that drives both sides of ``bench batch``."""

from __future__ import annotations

import threading
import time

import pytest

from cluster.bench.closed_loop import closed_loop


def test_every_client_warms_up_then_sends_back_to_back_until_the_window_ends():
    lock = threading.Lock()
    sent: list[tuple[str, float]] = []

    def send(prompt: str, deadline: float) -> dict:
        with lock:
            sent.append((prompt, deadline))
        time.sleep(0.02)
        return {"prompt": prompt}

    prompts = [f"p{i}" for i in range(5)]
    elapsed, measured = closed_loop(3, prompts, send, warmup_s=5.0, window_s=0.3)
    assert 0.3 <= elapsed < 2.0
    warmups = sorted(p for p, _ in sent[:3])
    assert warmups == ["p0", "p1", "p2"], "client c warms up with prompt c"
    assert len(measured) == len(sent) - 3 >= 3 * 5, "every request after the warm-ups is measured"
    assert {m["prompt"] for m in measured} == set(prompts), "clients rotate over every prompt"
    window_deadlines = {d for _, d in sent[3:]}
    assert len(window_deadlines) == 1, "every measured request is told the window's end"


def test_a_failing_client_stops_the_others_and_its_error_is_raised():
    calls = {"n": 0}

    def send(prompt: str, deadline: float) -> dict:
        calls["n"] += 1
        if prompt == "bad":
            raise RuntimeError("the server went away")
        time.sleep(0.01)
        return {}

    t0 = time.perf_counter()
    with pytest.raises(RuntimeError, match="went away"):
        closed_loop(3, ["ok", "ok", "bad"], send, warmup_s=5.0, window_s=60.0)
    assert time.perf_counter() - t0 < 10, "nobody waits for the failed client or the whole window"
