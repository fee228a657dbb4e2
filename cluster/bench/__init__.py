"""Benchmarks: engine overhead, bounded memory, cache policy (and, later, routing)."""

import sys


def log_progress(progress: bool, message: str) -> None:
    """One line of progress on stderr (stdout carries the JSON)."""
    if progress:
        print(message, file=sys.stderr, flush=True)
