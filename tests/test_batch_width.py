"""BatchWidth: the running sequences an engine allows under memory pressure (pure logic)."""

from __future__ import annotations

from cluster.engine.batch_width import BatchWidth


def run(width: BatchWidth, cost_of, windows: int) -> list[int]:
    seen = []
    for _ in range(windows):
        tokens = width.window_steps * width.width  # one window
        width.note(tokens, cost_of(width.width) * tokens)
        seen.append(width.width)
    return seen


def test_without_memory_pressure_every_slot_is_used_from_the_start():
    width = BatchWidth(max_width=8, pressured=False)
    assert run(width, lambda w: 1e9 * w, 5) == [8] * 5


def test_it_widens_while_bytes_per_token_hold_and_stops_where_they_grow():
    width = BatchWidth(max_width=16, pressured=True)
    costs = {1: 20e6, 2: 20e6, 4: 50e6, 8: 80e6, 16: 70e6}  # docs/batching-bench: the union outgrows the budget at 4
    seen = run(width, costs.__getitem__, 12)
    assert seen[:2] == [2, 4] and 4 in seen
    assert max(seen[4:]) <= 4 and seen[-1] in (2, 4)
    assert sum(1 for w in seen[3:] if w == 2) >= len(seen[3:]) // 2, seen


def test_shared_experts_let_it_grow_to_every_slot():
    width = BatchWidth(max_width=8, pressured=True)
    assert run(width, lambda w: 10e6 / w, 6)[-1] == 8  # a batch sharing its experts reads less per token


def test_a_forgotten_cost_is_tried_again():
    width = BatchWidth(max_width=4, pressured=True, memory_windows=3)
    costs = {1: 10e6, 2: 40e6, 4: 40e6}
    seen = run(width, costs.__getitem__, 20)
    assert seen.count(2) >= 2, "after memory_windows the wider batch is tried again"
    assert seen.count(1) > seen.count(2)


def test_a_window_spans_as_many_steps_at_every_width():
    width = BatchWidth(max_width=8, pressured=True, window_steps=10)
    width.note(10, 1e6)
    assert width.width == 2, "after 10 tokens at width 1 it tries 2"
    width.note(10, 1e6)
    assert width.width == 2, "10 tokens at width 2 are half a window"
    width.note(10, 1e6)
    assert width.width == 4
