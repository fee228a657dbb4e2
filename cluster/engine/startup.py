"""Start-up progress: the phases an engine (and the node around it) goes through before it serves,
each timed once and reported once.

A 17 GB model takes minutes to become ready (reading the file, llama.cpp's load, the cache's
budget); ``Startup`` times each phase and hands a ``StartupPhase`` to a callback when it ends (the
CLI prints it as one line, a node prints it to its log and returns every phase from ``ready()``),
and logs it on the ``cluster.startup`` logger. A phase that reads the model file at length can
show a progress bar (tqdm, on a terminal): the file's bytes in the page cache, measured with
``mincore`` every ``FILE_POLL_S`` seconds, whoever reads them (the cache's preload or llama.cpp).

Phase names (stable strings, in order; a phase that does not apply is not reported):
``memory_limit`` (a node under a cgroup limit), ``layout`` (where every expert is in the file),
``preload`` (the cache puts the file in the page cache before llama.cpp maps it), ``load``
(llama.cpp's model load), ``context`` (llama.cpp's context: KV memory), ``budget`` (an ``auto``
budget derived from the machine's memory), ``attach`` (the cache hooked into the context),
``engine`` (KV slots, samplers, the step loop) and ``ready``.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
from dataclasses import dataclass
from typing import Callable

log = logging.getLogger("cluster.startup")

FILE_POLL_S = 0.5  # seconds between two page-cache measurements of a file being read (a bar's refresh)


@dataclass(frozen=True)
class StartupPhase:
    """One finished phase of a start-up.

    Attributes:
        name: the phase's stable name (module docstring).
        detail: what it did, in words (bytes read, the budget's derivation), or "".
        elapsed_s: seconds the phase took.
        since_start_s: seconds from the start-up's beginning to the phase's end.
    """

    name: str
    detail: str
    elapsed_s: float
    since_start_s: float

    def line(self, label: str = "") -> str:
        """The phase as one line of a terminal or a log: ``[  12.3 s] node-0 load: detail (5.1 s)``."""
        who = f"{label} " if label else ""
        detail = f": {self.detail}" if self.detail else ""
        return f"[{self.since_start_s:7.1f} s] {who}{self.name}{detail} ({self.elapsed_s:.1f} s)"


PhaseCallback = Callable[[StartupPhase], None]


class Startup:
    """Times the phases of one start-up, run one after the other: ``begin`` ends the running phase
    and starts the next; each phase, when it ends, is logged, kept in ``phases`` and passed to
    ``on_phase``. (Begin/end rather than ``with`` blocks: the phases wrap the loader's lines as
    they are.)

    Args:
        on_phase: called with every phase as it ends (on the thread that ran it), or None.
        progress_bars: a phase that names a file it ``reads`` shows a tqdm bar of that file's bytes
            in the page cache on standard error while it runs.
    """

    def __init__(self, on_phase: PhaseCallback | None = None, *, progress_bars: bool = False) -> None:
        self._on_phase = on_phase
        self._bars = progress_bars
        self._t0 = time.perf_counter()
        self._phases: list[StartupPhase] = []
        self._running: tuple[str, float] | None = None  # the running phase's name and start
        self._detail = ""
        self._bar: _FileBar | None = None

    @property
    def phases(self) -> tuple[StartupPhase, ...]:
        return tuple(self._phases)

    def begin(self, name: str, *, reads: str | None = None) -> None:
        """Ends the running phase (reported) and starts ``name``; ``reads``: a file the phase reads
        at length (a bar, if bars are on)."""
        self.end()
        self._running, self._detail = (name, time.perf_counter()), ""
        if reads is not None and self._bars:
            self._bar = _FileBar(reads, name)

    def note(self, detail: str) -> None:
        """Says what the running phase did (reported with it when it ends)."""
        self._detail = detail

    def end(self) -> None:
        """Ends the running phase, if any, and reports it."""
        if self._running is None:
            return
        name, start = self._running
        self.abandon()
        self._report(name, self._detail, time.perf_counter() - start)

    def abandon(self) -> None:
        """Stops the running phase without reporting it (it failed: its error says what went wrong)."""
        self._running = None
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def ready(self, detail: str = "") -> StartupPhase:
        """Ends the running phase; then the last one, ``ready``: the whole start-up's seconds."""
        self.end()
        return self._report("ready", detail, time.perf_counter() - self._t0)

    def _report(self, name: str, detail: str, elapsed_s: float) -> StartupPhase:
        phase = StartupPhase(name, detail, elapsed_s, time.perf_counter() - self._t0)
        self._phases.append(phase)
        log.info("%s", phase.line())
        if self._on_phase is not None:
            self._on_phase(phase)
        return phase


def print_phases(label: str = "", stream: object = None) -> PhaseCallback:
    """A callback that prints each phase as one line (``StartupPhase.line``) on ``stream``
    (standard error by default), flushed at once (a node's log reaches Ray's log monitor)."""

    def show(phase: StartupPhase) -> None:
        print(phase.line(label), file=stream or sys.stderr, flush=True)
    return show


class _FileBar:
    """A tqdm bar of a file's bytes in the page cache, refreshed by a thread of its own every
    ``FILE_POLL_S`` seconds until ``close`` (its stop signal)."""

    def __init__(self, path: str, name: str) -> None:
        from tqdm import tqdm

        self._path = path
        self._total = os.path.getsize(path)
        self._stop = threading.Event()
        self._tqdm = tqdm(total=self._total, desc=f"{name} {os.path.basename(path)} (in memory)", unit="B",
                          unit_scale=True, unit_divisor=1024, leave=False, file=sys.stderr)
        self._thread = threading.Thread(target=self._poll, name=f"startup-{name}-bar", daemon=True)
        self._thread.start()

    def _poll(self) -> None:
        from cluster.engine.node_memory import cached_bytes

        while True:
            try:
                self._tqdm.n = min(self._total, cached_bytes(self._path))
                self._tqdm.refresh()
            except OSError:  # the file went: the phase will say so
                return
            if self._stop.wait(FILE_POLL_S):
                return

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        self._tqdm.close()
