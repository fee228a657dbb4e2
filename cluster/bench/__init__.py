"""Benchmarks: engine (overhead, bounded memory, cache policy), routing on a live cluster, simulation, and the
quality cost of cache-aware expert selection (``quality``)."""

import socket
import sys
from pathlib import Path
from typing import Any, Sequence

import numpy as np

DEFAULT_OUT = Path("docs")  # where `bench` writes its reports unless --out says otherwise


def out_flag(out_dir: Path | str | None) -> str | None:
    """The value of --out in a reproducing command (None for the default)."""
    return None if out_dir is None or Path(out_dir) == DEFAULT_OUT else str(out_dir)


def command_line(suite: str, flags: Sequence[tuple[str, Any]]) -> str:
    """The command that reproduces a run: ``python -m cluster bench SUITE`` and its flags, in order.

    A flag whose value is None or False is left out; True stands for a flag without a value.
    """
    words = [f"python -m cluster bench {suite}"]
    for flag, value in flags:
        if value is True:
            words.append(flag)
        elif value is not None and value is not False:
            words.append(f"{flag} {value}")
    return " ".join(words)


def free_port() -> int:
    """A TCP port nobody listens at on 127.0.0.1 now (for a server a benchmark starts)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def log_progress(progress: bool, message: str) -> None:
    """One line of progress on stderr (stdout carries the JSON)."""
    if progress:
        print(message, file=sys.stderr, flush=True)


def percentile(values: Sequence[float], q: float, *, observed: bool = False) -> float | None:
    """The ``q``-th percentile of ``values`` (None if there are none): interpolated between the
    two nearest, or with ``observed`` the nearest value measured (for latencies of few requests)."""
    if not len(values):
        return None
    return float(np.percentile(values, q, method="nearest" if observed else "linear"))
