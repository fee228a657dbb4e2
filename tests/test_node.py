"""NodeServer without Ray: the routing traces it keeps for a restarted router."""

from __future__ import annotations

from pathlib import Path

import pytest

from cluster import node as node_module
from cluster import synth
from cluster.node import NodeConfig, NodeReport, NodeServer


@pytest.fixture
def served_node(tiny_model: Path, tiny_topics: list[list[str]], monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(node_module, "RECENT_TRACE_TOKENS", 40)  # room for the traces of about two requests
    reports: list[NodeReport] = []
    server = NodeServer("sniper-node-0", NodeConfig(str(tiny_model), cache_bytes=1 << 20, n_ctx=256, n_threads=1,
                                                    heartbeat_s=60.0), report_sink=reports.append)
    try:
        for i in range(4):  # different topics: nothing of one prompt is reused by the next
            prompt = synth.topic_prompt(tiny_topics, i % len(tiny_topics), 16, seed=i)
            items = list(server.stream({"prompt": prompt, "max_tokens": 2, "request_id": f"r{i}"}))
            assert items[-1]["done"]
        yield server, reports
    finally:
        server.close()


def test_resend_traces_sends_the_recent_requests_summaries_again_within_the_bound(served_node) -> None:
    server, reports = served_node
    served = [r.summary for r in reports if r.request_id is not None and r.summary is not None]
    assert len(served) == 4
    reports.clear()
    n = server.resend_traces()
    resent = [r.summary for r in reports]
    assert n == len(resent) and 1 <= n < 4  # the oldest ones fell out of the 40-token bound
    assert sum(len(s.tokens) for s in resent) <= 40 or n == 1
    assert [s.tokens for s in resent] == [s.tokens for s in served[-n:]]  # the newest, oldest first
    assert all(r.request_id is None and r.warmth is None and r.prefixes is None for r in reports)
