"""A closed loop of clients: each sends a request, waits for its answer, sends the next.

Shared by ``bench batch``'s two sides (the engine in ``batch_worker``, llama-server in
``batch_bench``) so that both are driven the same way: every client first sends one warm-up
request (cut at the warm-up deadline); when all have, the measured window opens (``begin`` runs
first, for the caller's counters) and each client sends requests back to back until it ends. A
request is told the deadline it must give up at; what it returns is kept.
"""

from __future__ import annotations

import threading
import time
from typing import Any, Callable, Sequence

# one request: (prompt, deadline on time.perf_counter's clock) -> its measurements
Send = Callable[[str, float], dict[str, Any]]


def closed_loop(clients: int, prompts: Sequence[str], send: Send, *, warmup_s: float, window_s: float,
                begin: Callable[[], None] | None = None) -> tuple[float, list[dict[str, Any]]]:
    """Runs ``clients`` closed-loop clients over ``prompts`` (client c starts at prompt c) and
    returns the measured window's length in seconds and every request measured in it. A client
    whose request raises stops every client, and the first error is raised here."""
    if clients < 1 or not prompts:
        raise ValueError("a closed loop needs at least one client and one prompt")
    warmup_deadline = time.perf_counter() + warmup_s
    window = {"start": 0.0, "end": float("inf")}

    def open_window() -> None:
        if begin is not None:
            begin()
        window["start"] = time.perf_counter()
        window["end"] = window["start"] + window_s

    barrier = threading.Barrier(clients, action=open_window)
    results: list[list[dict[str, Any]]] = [[] for _ in range(clients)]
    errors: list[BaseException] = []

    def client(c: int) -> None:
        try:
            send(prompts[c % len(prompts)], warmup_deadline)
            barrier.wait()
            i = c + 1
            while time.perf_counter() < window["end"]:
                results[c].append(send(prompts[i % len(prompts)], window["end"]))
                i += 1
        except threading.BrokenBarrierError:
            pass  # another client failed: its error is the one raised
        except BaseException as exc:  # noqa: BLE001  (raised in the caller's thread)
            errors.append(exc)
            barrier.abort()
            window["end"] = 0.0

    threads = [threading.Thread(target=client, args=(c,), name=f"client-{c}") for c in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return time.perf_counter() - window["start"], [r for rs in results for r in rs]
