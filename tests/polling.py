"""Waiting in tests for what happens elsewhere (a report, a count, a process): poll to a deadline.

A fixed ``time.sleep`` before an assertion fails on a loaded machine and wastes time on an idle
one; ``wait_until`` returns as soon as the condition holds and fails, naming what it waited for,
only when the deadline passes.
"""

from __future__ import annotations

import time
from typing import Callable, TypeVar

T = TypeVar("T")


def wait_until(condition: Callable[[], T], timeout_s: float, what: str, interval_s: float = 0.05) -> T:
    """Calls ``condition`` until it returns something truthy, and returns that value.

    Args:
        condition: asked again every ``interval_s`` seconds; its exceptions propagate.
        timeout_s: how long to keep asking (> 0).
        what: the awaited state, for the failure's message.
        interval_s: the pause between two calls.

    Raises:
        AssertionError: ``condition`` was still falsy ``timeout_s`` seconds after the first call
            (the message names ``what`` and the last value).
    """
    if not timeout_s > 0:
        raise ValueError(f"timeout_s must be > 0, got {timeout_s!r}")
    deadline = time.monotonic() + timeout_s
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"{what}: not within {timeout_s:g} s (last: {value!r})")
        time.sleep(interval_s)
