"""A node under concurrent streams: pieces coalesce per window, the answer stays the same, and its
process does not run at Ray's worker niceness."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest

from cluster.distributed import node as node_module
from cluster.distributed.node import (
    COALESCE_MAX_S,
    COALESCE_S,
    NodeConfig,
    NodeServer,
    coalesce_window,
)
from cluster.distributed.protocol import Finished, NodeRequest, Piece
from cluster.engine.sampling import SamplingParams
from cluster.models import synth


def test_the_window_grows_with_the_requests_on_the_node_up_to_its_bound() -> None:
    assert coalesce_window(0) == coalesce_window(1) == COALESCE_S
    assert coalesce_window(4) == 4 * COALESCE_S
    assert coalesce_window(1000) == COALESCE_MAX_S
    windows = [coalesce_window(n) for n in range(1, 20)]
    assert windows == sorted(windows)


def test_concurrent_streams_gather_pieces_for_longer_and_keep_the_lone_streams_answers(
        tiny_model: Path, tiny_topics: list[list[str]], monkeypatch: pytest.MonkeyPatch) -> None:
    n = 4
    windows: list[float] = []  # what each stream's gathering waited for, after its first piece
    take = node_module._Outbox.take
    monkeypatch.setattr(node_module._Outbox, "take", lambda self, window: windows.append(window) or take(self, window))
    server = NodeServer("sniper-node-0", NodeConfig.create(str(tiny_model), cache_bytes=1 << 20, n_ctx=512, n_threads=1,
                                                           n_slots=n, max_queue=n, heartbeat_s=60.0))
    params = SamplingParams(max_tokens=96, logprobs=True)
    try:
        prompts = [tuple(server.engine.tokenize(synth.topic_prompt(tiny_topics, i % len(tiny_topics), 8, seed=i)))
                   for i in range(n)]
        alone = [list(server.stream(NodeRequest(f"alone-{i}", tokens, params))) for i, tokens in enumerate(prompts)]
        lone_windows = windows[:]
        windows.clear()
        together: list[list[object]] = [[] for _ in range(n)]
        barrier = threading.Barrier(n)

        def read(i: int) -> None:
            barrier.wait()
            together[i].extend(server.stream(NodeRequest(f"together-{i}", prompts[i], params)))

        threads = [threading.Thread(target=read, args=(i,)) for i in range(n)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
    finally:
        server.close()
    for lone, items in zip(alone, together):
        pieces = [i for i in items if isinstance(i, Piece)]
        end = items[-1]
        assert isinstance(end, Finished)
        # what the caller sees is the lone stream's answer: text, the tokens made final, their logprobs
        assert "".join(p.text for p in pieces) == "".join(p.text for p in lone if isinstance(p, Piece))
        tokens = [t for p in pieces for t in p.tokens]
        assert tokens == [t for p in lone if isinstance(p, Piece) for t in p.tokens]
        assert len(tokens) == end.usage.completion_tokens == lone[-1].usage.completion_tokens
        assert len([lp for p in pieces for lp in p.logprobs]) == end.usage.completion_tokens
        assert end.choices == lone[-1].choices
    # a lone stream gathers for COALESCE_S; with n streaming, each gathers n times as long (the
    # node's messages per second stay about 1 / COALESCE_S, not one per token per request)
    assert set(lone_windows) == {0.0, COALESCE_S}  # the first piece at once, then one window per message
    assert max(windows) == coalesce_window(n) == n * COALESCE_S
    assert set(windows) <= {0.0} | {coalesce_window(k) for k in range(1, n + 1)}


def test_a_node_process_takes_back_its_parents_niceness_on_every_thread() -> None:
    """What ``NodeActor`` does first: Ray starts workers 15 nicer than the raylet."""
    if os.geteuid() != 0:
        pytest.skip("lowering a niceness needs CAP_SYS_NICE")
    script = textwrap.dedent("""
        import os, threading
        from cluster.distributed.node import take_back_priority
        os.nice(10)  # as Ray's worker_niceness would have it
        threading.Thread(target=threading.Event().wait, daemon=True).start()  # a thread started before
        took = take_back_priority()
        later = []
        t = threading.Thread(target=lambda: later.append(os.getpriority(os.PRIO_PROCESS, 0)))  # and one after
        t.start(); t.join()
        nices = set()
        for tid in os.listdir("/proc/self/task"):
            try:
                nices.add(os.getpriority(os.PRIO_PROCESS, int(tid)))
            except ProcessLookupError:  # the joined thread can still be listed while it exits
                pass
        print(took, sorted(nices), later[0])
    """)
    mine = os.getpriority(os.PRIO_PROCESS, 0)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == [str(mine), f"[{mine}]", str(mine)], out.stdout
