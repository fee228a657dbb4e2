"""How many sequences an engine runs together when its expert cache cannot hold the model.

With every expert resident, a wider batch only costs compute, and every slot is used. Under a
budget below the model's experts, each sequence brings its own working set: once the running
sequences' union no longer fits, every step evicts what the next one needs, and a batch of eight
reads several times the expert bytes per generated token that one sequence reads (measured in
docs/batching-bench/batching.md, every slot decoding: 94 MiB per token for eight against 22 MiB for
one on `bench` at a 50 % limit), so a wider batch
is slower than a narrow one. ``BatchWidth`` then adapts the number of running sequences to what
the cache sustains, judged by the one cost that bounds a disk-bound node: expert bytes read per
generated token, over windows of ``window_steps`` tokens per running sequence (``window_steps``
times the width: a window spans about as many steps at every width, so a wide batch's cost
includes what changing from one kind of batch to the next costs, ``cluster.engine.batch_admission``):

* start at one sequence; after a window, try twice as many unless twice as many was seen to cost
  more than ``tolerance`` times the current width's bytes per token;
* halve when the current width costs more than ``tolerance`` times half of it;
* what a width cost is forgotten after ``memory_windows`` windows (the workload changes), so a
  wider batch is tried again.

Sequences beyond the width wait (their requests are admitted, their slots not yet used); nothing
running is stopped. Pure logic: the engine feeds it each step's generated tokens and bytes read.
"""

from __future__ import annotations

from dataclasses import dataclass, field

EPSILON_BYTES = 4096.0  # a window that read (almost) nothing still compares sensibly


@dataclass
class BatchWidth:
    """The number of sequences to run together (see the module docstring)."""

    max_width: int
    pressured: bool
    window_steps: int = 64
    tolerance: float = 1.25
    memory_windows: int = 16
    width: int = 0
    _tokens: int = 0
    _bytes: float = 0.0
    _windows: int = 0
    _cost: dict[int, tuple[float, int]] = field(default_factory=dict)  # width -> (bytes per token, window seen)

    def __post_init__(self) -> None:
        self.width = 1 if self.pressured else self.max_width

    def note(self, tokens: int, bytes_read: float) -> None:
        """One step: tokens generated and expert bytes read."""
        if not self.pressured or self.max_width == 1:
            return
        self._tokens += tokens
        self._bytes += bytes_read
        if self._tokens >= self.window_steps * self.width:
            self._decide(self._bytes / self._tokens + EPSILON_BYTES)
            self._tokens, self._bytes = 0, 0.0

    def cost(self, width: int) -> float | None:
        seen = self._cost.get(width)
        if seen is None or self._windows - seen[1] > self.memory_windows:
            return None
        return seen[0]

    def _decide(self, cost: float) -> None:
        self._windows += 1
        self._cost[self.width] = (cost, self._windows)
        w = self.width
        half = self.cost(w // 2) if w > 1 else None
        if half is not None and cost > self.tolerance * half:
            self.width = w // 2
            return
        wider = self.cost(min(2 * w, self.max_width)) if w < self.max_width else None
        if w < self.max_width and (wider is None or wider <= self.tolerance * cost):
            self.width = min(2 * w, self.max_width)
