"""NodeServer without Ray: the routing traces it keeps for a restarted router."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from polling import wait_until

from cluster.distributed import node as node_module
from cluster.models import synth
from cluster.distributed.node import COALESCE_S, NodeConfig, NodeServer
from cluster.distributed.protocol import Finished, NodeReport, NodeRequest, Piece
from cluster.engine.sampling import SamplingParams


@pytest.fixture
def served_node(tiny_model: Path, tiny_topics: list[list[str]], monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(node_module, "RECENT_TRACE_TOKENS", 40)  # room for the traces of about two requests
    reports: list[NodeReport] = []
    server = NodeServer("sniper-node-0", NodeConfig.create(str(tiny_model), cache_bytes=1 << 20, n_ctx=256, n_threads=1,
                                                    heartbeat_s=60.0), report_sink=reports.append)
    try:
        for i in range(4):  # different topics: nothing of one prompt is reused by the next
            prompt = synth.topic_prompt(tiny_topics, i % len(tiny_topics), 16, seed=i)
            request = NodeRequest(f"r{i}", tuple(server.engine.tokenize(prompt)), SamplingParams(max_tokens=2))
            items = list(server.stream(request))
            assert isinstance(items[-1], Finished)
        yield server, reports
    finally:
        server.close()


def test_resend_traces_sends_the_recent_requests_summaries_again_within_the_bound(served_node) -> None:
    server, reports = served_node
    served = [r.summary for r in reports if r.request_id is not None and r.summary is not None]
    assert len(served) == 4
    sizes = [len(s.tokens) for s in served]
    kept = max(k for k in range(1, 5) if k == 1 or sum(sizes[-k:]) <= 40)  # the newest that fit, at least one
    assert 2 <= kept < 4, sizes  # the fixture's prompts: the bound holds some of them, not all
    reports.clear()
    n = server.resend_traces()
    resent = [r.summary for r in reports]
    assert n == len(resent) == kept  # the oldest ones fell out of the 40-token bound
    assert sum(len(s.tokens) for s in resent) <= 40
    assert [s.tokens for s in resent] == [s.tokens for s in served[-n:]]  # the newest, oldest first
    assert all(r.request_id is None and r.warmth is None and r.prefixes is None for r in reports)


def test_a_slow_reader_gets_the_pieces_that_piled_up_together_and_never_holds_decoding_up(
        tiny_model: Path, tiny_topics: list[list[str]]) -> None:
    server = NodeServer("sniper-node-0", NodeConfig.create(str(tiny_model), cache_bytes=1 << 20, n_ctx=512, n_threads=1,
                                                    heartbeat_s=60.0))
    try:
        tokens = tuple(server.engine.tokenize(synth.topic_prompt(tiny_topics, 0, 8, seed=1)))
        fast = list(server.stream(NodeRequest("fast", tokens, SamplingParams(max_tokens=128))))
        stream = server.stream(NodeRequest("slow", tokens, SamplingParams(max_tokens=128)))
        slow = [next(stream)]  # the first piece; then this reader reads nothing more until decoding has ended
        wait_until(lambda: server.engine.n_running == 0, 60, "decoding the request while its reader waits")
        slow += list(stream)
    finally:
        server.close()
    text = lambda items: "".join(i.text for i in items if isinstance(i, Piece))  # noqa: E731
    assert text(slow) == text(fast) and text(fast)
    n_fast, n_slow = (sum(isinstance(i, Piece) for i in items) for items in (fast, slow))
    decode_fast = fast[-1].timing.decode_s
    # the first piece at once, then one message per window of pieces, not one per token
    assert 2 <= n_fast <= 2 + (decode_fast + fast[-1].timing.prefill_s) / COALESCE_S, (n_fast, decode_fast)
    # what piled up while the reader waited came as one piece (its last token's text may follow the engine's count)
    assert n_slow <= 3, n_slow


def test_a_report_that_fails_to_build_does_not_end_the_heartbeat(tiny_model: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    reports: list[NodeReport] = []
    server = NodeServer("sniper-node-0", NodeConfig.create(str(tiny_model), cache_bytes=1 << 20, n_ctx=256, n_threads=1,
                                                    heartbeat_s=0.05), report_sink=reports.append)
    calls = {"n": 0}
    real = server.engine.cache_report

    def failing_twice(reconcile: bool = True) -> tuple[dict, bytes]:
        calls["n"] += 1
        if calls["n"] <= 2:
            raise RuntimeError("the engine is closing")
        return real(reconcile)

    try:
        monkeypatch.setattr(server.engine, "cache_report", failing_twice)
        deadline = time.monotonic() + 20
        while not any(r.warmth is not None for r in reports) and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        server.close()
    assert calls["n"] > 2, "the heartbeat went on after reports failed to build"
    assert any(r.warmth is not None for r in reports)


def test_reports_built_while_conversations_come_and_go_never_fail(tiny_model: Path,
                                                                  tiny_topics: list[list[str]]) -> None:
    import threading

    server = NodeServer("sniper-node-0", NodeConfig.create(str(tiny_model), cache_bytes=1 << 20, n_ctx=256, n_threads=1,
                                                    n_slots=2, session_bytes=1 << 14, heartbeat_s=60.0))
    errors: list[BaseException] = []  # 16 KiB: about three saved conversations of this model
    stop = threading.Event()
    started: list[str] = []  # conversations sent so far, appended before each is sent
    n_reports = 0

    def build_reports() -> None:
        nonlocal n_reports
        while not stop.is_set():
            try:
                report = server.report()
                known = set(started)  # read after the report: every conversation it names was sent before it
                assert type(report.sessions) is tuple and len(set(report.sessions)) == len(report.sessions), report.sessions
                assert set(report.sessions) <= known, (report.sessions, sorted(known))
                n_reports += 1
            except BaseException as exc:  # noqa: BLE001  (the failure the test looks for)
                errors.append(exc)
                return

    builder = threading.Thread(target=build_reports)
    builder.start()
    try:
        wait_until(lambda: n_reports or errors, 60, "the builder's first report")  # it runs before they start
        for i in range(12):  # new conversations push old ones out of the slots and the saved states
            prompt = synth.topic_prompt(tiny_topics, i % len(tiny_topics), 8, seed=i)
            request = NodeRequest(f"r{i}", tuple(server.engine.tokenize(prompt)), SamplingParams(max_tokens=2),
                                  session_id=f"conversation-{i}")
            started.append(request.session_id)
            assert isinstance(list(server.stream(request))[-1], Finished)
        final = server.report().sessions
    finally:
        stop.set()
        builder.join()
        server.close()
    assert not errors, errors[0]
    newest = {f"conversation-{i}" for i in range(12 - len(final), 12)}
    assert set(final) == newest and len(final) < 12, final  # the newest are held, the oldest were pushed out


@pytest.mark.parametrize("fields, param", [
    ({"n_slots": 100000}, "n_slots"), ({"n_threads": 5000}, "n_threads"), ({"n_ctx": 0}, "n_ctx"),
    ({"session_bytes": -1}, None), ({"memory_share": 0.0}, None), ({"max_queue": 0}, "max_queue"),
    ({"memory_limit_bytes": 0}, "memory_limit_bytes"), ({"cache_bytes": "lots"}, None),
])
def test_a_node_config_is_checked_whole_with_its_engines_bounds_without_opening_the_model(fields, param):
    from cluster.errors import InvalidParameterError

    config = NodeConfig.create("/nonexistent/model.gguf", **fields)
    with pytest.raises(InvalidParameterError) as info:
        config.validate()
    assert info.value.param == param and next(iter(fields)) in str(info.value)
