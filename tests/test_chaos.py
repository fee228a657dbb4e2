"""A short chaos run (``bench chaos``) on a real local cluster with the HTTP gateway: node, Ray
node, router and client faults under load from both ways in; nothing hangs, nothing raw."""

from __future__ import annotations

from pathlib import Path

from cluster.bench import chaos


def test_a_short_chaos_run_hangs_nothing_and_every_killed_node_comes_back(tiny_model: Path, tmp_path: Path) -> None:
    result = chaos.bench_chaos(str(tiny_model), n_nodes=2, clients=4, duration_s=24, max_tokens=32, progress=False)
    assert result["hung"] == 0 and result["raw error"] == 0, result["errors"]
    assert result["completed"] > 20 and all(row["completed"] > 0 for row in result["by_way"].values()), result["by_way"]
    faults = {f["kind"]: f for f in result["faults"]}
    assert set(faults) == {"node", "ray-node", "router", "client", "http-client", "router-gone"}
    assert faults["ray-node"]["ray_nodes_replaced"] == 1, "the daemon put a new Ray node in place of the dead one"
    assert all(f.get("node_back_s") is not None for f in result["faults"] if f["kind"] in ("node", "ray-node"))
    assert faults["router-gone"]["answers"] == ["typed error"]
    assert result["in_flight_after_run"] == 0
    assert sum(f["kind"] == "node" for f in result["faults"]) == 3
    assert result["mismatched"] == 0 and result["leaked"] == 0, result["errors"]
    assert sum(result["streams"][r] for r in ("typed error", "raw error", "hung")) == 0, result["errors"]
    report = chaos.write_report(result, tmp_path, "python -m cluster bench chaos")
    assert "Targets" in report.read_text() and "NOT met" not in report.read_text()
