"""``bench scale`` on a small model: its round-robin proxy, its chat users, its measurements and its report.

The full-size run (an 18.6 GB model, about an hour) is never made here; the same code runs on the demo model with
short windows, two nodes, a real local Ray cluster, real cgroups where the machine allows them and real
llama-server processes where the binary is built.
"""

from __future__ import annotations

import http.server
import json
import threading
from pathlib import Path
from typing import Iterator

import pytest
import requests

from cluster.bench import scale
from cluster.bench.chat_users import RequestRecord
from cluster.bench.llama_server import find_llama_server
from cluster.bench.round_robin_proxy import RoundRobinProxy
from cluster.distributed import memory_limit as memlimit


class _Named(http.server.BaseHTTPRequestHandler):
    """Answers every POST with its server's name, in three streamed chunks, and the body it got back."""

    def do_POST(self) -> None:  # noqa: N802 (http.server's name)
        body = self.rfile.read(int(self.headers["Content-Length"]))
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        for piece in (self.server.name.encode(), b":", body):  # type: ignore[attr-defined]
            self.wfile.write(f"{len(piece):x}\r\n".encode() + piece + b"\r\n")
            self.wfile.flush()
        self.wfile.write(b"0\r\n\r\n")

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture()
def two_backends() -> Iterator[list[str]]:
    servers = []
    for name in ("A", "B"):
        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Named)
        server.name = name  # type: ignore[attr-defined]
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
    yield [f"http://127.0.0.1:{s.server_address[1]}" for s in servers]
    for s in servers:
        s.shutdown()


def test_the_proxy_sends_requests_to_each_backend_in_turn_and_streams_their_answers(two_backends: list[str]) -> None:
    with RoundRobinProxy(two_backends) as proxy:
        answers = [requests.post(f"{proxy.url}/v1/completions", data=f"request {i}", timeout=10).text for i in range(5)]
        assert proxy.forwarded == [3, 2]
    assert answers == [f"{'AB'[i % 2]}:request {i}" for i in range(5)]
    with pytest.raises(ValueError, match="at least one backend"):
        RoundRobinProxy([])


def test_tokens_of_a_piece_that_carried_several_are_spread_over_the_pieces() -> None:
    r = RequestRecord(0, 0, 0, 10, sent=0.0, first=1.0, end=3.0, pieces=[1.0, 2.0, 3.0], tokens=6)
    assert r.token_times() == [1.0, 1.0, 2.0, 2.0, 3.0, 3.0]
    assert RequestRecord(0, 0, 0, 10, sent=0.0, pieces=[1.0, 2.0], tokens=2).token_times() == [1.0, 2.0]


def test_the_size_estimate_is_near_what_synth_writes(tiny_model: Path, demo_model: Path) -> None:
    """The disk check before writing a preset: within a fifth of the real file (the tiny files' vocabularies are
    their own; the estimate counts the configured one)."""
    for preset, path in (("tiny", tiny_model), ("demo", demo_model)):
        assert 0.8 < scale.estimated_file_bytes(preset) / path.stat().st_size < 1.25, preset


def test_bench_scale_compares_the_service_with_llama_server_behind_the_proxy(demo_model: Path, tmp_path: Path) -> None:
    limited = memlimit.unavailable_reason() is None
    binary = find_llama_server(None)
    systems = ("sniper", "llama-server") if binary else ("sniper",)
    params = scale.ScaleParams(n_nodes=2, node_memory_mb=600 if limited else 0, concurrency=(2,), warmup_s=1.0,
                               window_s=5.0, max_tokens=6, turns=2, n_ctx=512, unlimited=not limited, systems=systems,
                               parts=("cluster",))
    result = scale.run_scale(str(demo_model), tmp_path, params=params, llama_server=binary, progress=False)
    regime = "limited" if limited else "unlimited"
    for system in systems:
        data = result["regimes"][regime]["systems"][system]
        assert "failed" not in data, data
        run = data["runs"]["2"]
        assert run["tok_s"] > 0 and run["requests_completed"] > 0 and run["errors"] == 0, run
        assert run["ttft_p50_s"] is not None and run["ttft_p50_s"] <= run["ttft_p99_s"]
        assert data["oom_kills"] == 0 and data["start_to_first_answer_s"] >= data["start_to_ready_s"]
        if limited:  # the cgroup's own peak: under its limit
            assert all(0 < peak <= 600 << 20 for peak in run["peak_bytes_per_node"]), run["peak_bytes_per_node"]
    assert result["regimes"][regime]["systems"]["sniper"]["budgets"][0].startswith("auto cache budget")
    report = (tmp_path / "scale.md").read_text()
    assert "--nodes 2" in result["command"] and result["command"] in report
    assert "zero OOM kills and zero failed requests" in report and (tmp_path / "scale-tok-s.png").stat().st_size > 0
    assert json.loads((tmp_path / "scale.json").read_text())["params"]["n_slots"] == 1


def test_one_node_is_measured_beside_stock_llama_cpp_on_the_same_file(demo_model: Path) -> None:
    from cluster.bench import single_node

    binary = find_llama_server(None)
    out = single_node.run_single_node(str(demo_model), regimes=[("no limit", None)], binary=binary,
                                      prompt="kalo meni pumane " * 8, max_tokens=6, n_threads=2, stock_timeout_s=60,
                                      progress=False)
    ours = out["no limit"]["ours"]
    assert "failed" not in ours, ours
    assert ours["tokens"] > 0 and ours["decode_tok_s"] > 0 and ours["ttft_s"] > 0 and ours["prompt_tokens"] > 8
    assert ours["budget"].startswith("auto cache budget") and ours["peak_bytes"] > 0 and ours["oom_kills"] == 0
    aware = out["no limit"]["ours_cache_aware"]  # every expert held without a limit: nothing to change
    assert "failed" not in aware and aware["tokens"] > 0 and aware["selections_changed"] == 0, aware
    if binary:
        stock = out["no limit"]["stock"]
        assert stock["tokens"] == 6 and not stock["cut"] and stock["decode_tok_s"] > 0 and stock["start_s"] > 0


def test_a_run_of_one_part_keeps_the_other_part_of_an_earlier_run_of_the_same_model() -> None:
    from cluster.bench.scale_report import merge_earlier_parts

    model = {"file_bytes": 123}
    earlier = {"model": model, "command": "bench scale --parts cluster", "regimes": {"limited": {"systems": {}}}}
    now = {"model": model, "command": "bench scale --parts node", "node": {"no limit": {}}, "regimes": {}}
    merged = merge_earlier_parts(now, earlier)
    assert merged["regimes"] == earlier["regimes"] and merged["node"] == now["node"]
    assert merged["commands"] == {"node": "bench scale --parts node", "cluster": "bench scale --parts cluster"}
    other_model = merge_earlier_parts(now, {**earlier, "model": {"file_bytes": 7}})
    assert other_model["regimes"] == {} and "cluster" not in other_model["commands"]
