"""The memory a node has (cgroup v1 / v2 limits, available memory) and the auto budget from it."""

from __future__ import annotations

import json
import os
import sys
import textwrap
from pathlib import Path

import pytest

from cluster.distributed import memory_limit as memlimit
from cluster.engine import node_memory
from cluster.engine.cache import discover_layout
from cluster.errors import CacheBudgetError

MIB = 1 << 20


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def test_cgroup_v1_limit_is_read_from_the_memory_controller_path(tmp_path: Path) -> None:
    _write(tmp_path / "proc", "9:name=systemd:/\n4:memory:/pods/node-1\n1:cpu:/\n0::/\n")
    _write(tmp_path / "cg/memory/pods/node-1/memory.limit_in_bytes", str(900 * MIB))
    _write(tmp_path / "cg/memory/pods/node-1/memory.usage_in_bytes", str(300 * MIB))
    _write(tmp_path / "cg/memory/pods/memory.limit_in_bytes", "9223372036854771712")  # unlimited parent
    _write(tmp_path / "cg/memory/pods/memory.usage_in_bytes", str(300 * MIB))
    got = node_memory.cgroup_memory(str(tmp_path / "proc"), str(tmp_path / "cg"))
    assert got == node_memory.CgroupMemory(str(tmp_path / "cg/memory/pods/node-1"), 900 * MIB, 300 * MIB)


def test_cgroup_v2_takes_the_tightest_limit_on_the_way_up(tmp_path: Path) -> None:
    _write(tmp_path / "proc", "0::/kubepods/pod-a/ctr\n")
    _write(tmp_path / "cg/cgroup.controllers", "cpu memory pids\n")
    _write(tmp_path / "cg/kubepods/pod-a/ctr/memory.max", "max\n")
    _write(tmp_path / "cg/kubepods/pod-a/ctr/memory.current", str(100 * MIB))
    _write(tmp_path / "cg/kubepods/pod-a/memory.max", str(2048 * MIB))
    _write(tmp_path / "cg/kubepods/pod-a/memory.current", str(400 * MIB))
    _write(tmp_path / "cg/kubepods/memory.max", str(8192 * MIB))
    _write(tmp_path / "cg/kubepods/memory.current", str(4000 * MIB))
    got = node_memory.cgroup_memory(str(tmp_path / "proc"), str(tmp_path / "cg"))
    assert got is not None and got.limit_bytes == 2048 * MIB and got.usage_bytes == 400 * MIB
    assert got.path.endswith("kubepods/pod-a")


def test_no_limit_anywhere_is_none(tmp_path: Path) -> None:
    _write(tmp_path / "proc", "4:memory:/a\n")
    _write(tmp_path / "cg/memory/a/memory.limit_in_bytes", "9223372036854771712")
    _write(tmp_path / "cg/memory/a/memory.usage_in_bytes", "1")
    assert node_memory.cgroup_memory(str(tmp_path / "proc"), str(tmp_path / "cg")) is None
    assert node_memory.cgroup_memory(str(tmp_path / "missing"), str(tmp_path / "cg")) is None


def test_available_memory_is_read_from_meminfo(tmp_path: Path) -> None:
    _write(tmp_path / "meminfo", "MemTotal:       24000000 kB\nMemFree:  1 kB\nMemAvailable:   20000000 kB\n")
    assert node_memory.mem_available_bytes(str(tmp_path / "meminfo")) == 20000000 * 1024
    assert node_memory.mem_available_bytes() > 0  # this machine's


def test_auto_budget_without_a_cgroup_limit_takes_its_share_of_available_memory(tiny_model: Path) -> None:
    if node_memory.cgroup_memory() is not None:
        pytest.skip("this test process runs under a cgroup memory limit")
    layout = discover_layout(str(tiny_model))
    footprint = 1 << 50  # nothing caps it
    whole = node_memory.auto_budget(str(tiny_model), non_expert_bytes=layout.non_expert_bytes, footprint_bytes=footprint,
                                    min_bytes=1)
    half = node_memory.auto_budget(str(tiny_model), non_expert_bytes=layout.non_expert_bytes, footprint_bytes=footprint,
                                   min_bytes=1, share=0.5)
    assert 0 < half.budget_bytes < whole.budget_bytes < node_memory.mem_available_bytes()
    assert whole.budget_bytes == whole.memory_bytes - whole.non_expert_bytes - whole.margin_bytes
    reserved = node_memory.auto_budget(str(tiny_model), non_expert_bytes=layout.non_expert_bytes,
                                       footprint_bytes=footprint, min_bytes=1, reserve_bytes=64 * MIB)
    assert abs(whole.budget_bytes - reserved.budget_bytes - 64 * MIB) < 16 * MIB  # available memory moves a little
    assert "reserved 64 MiB" in reserved.explain()
    assert "available memory" in whole.explain() and "x 0.5" in half.explain()
    # nodes on one machine share the file's pages: where the machine holds every expert, each node keeps them all
    fits = whole.budget_bytes // 2
    shared = node_memory.auto_budget(str(tiny_model), non_expert_bytes=layout.non_expert_bytes, footprint_bytes=fits,
                                     min_bytes=1, share=0.25)
    assert shared.budget_bytes == fits and "capped" in shared.explain() and "x 0.25" not in shared.explain()
    capped = node_memory.auto_budget(str(tiny_model), non_expert_bytes=layout.non_expert_bytes,
                                     footprint_bytes=int(layout.unit_bytes.sum()), min_bytes=1)
    assert capped.budget_bytes == int(layout.unit_bytes.sum()) and "capped" in capped.explain()
    with pytest.raises(CacheBudgetError, match="less than one decode step"):
        node_memory.auto_budget(str(tiny_model), non_expert_bytes=layout.non_expert_bytes, footprint_bytes=footprint,
                                min_bytes=1 << 50)
    with pytest.raises(ValueError, match="share"):
        node_memory.auto_budget(str(tiny_model), non_expert_bytes=0, footprint_bytes=1, min_bytes=1, share=0)


def test_auto_budget_under_a_cgroup_limit_fits_the_limit_and_decodes(demo_model: Path) -> None:
    """An engine with cache_bytes='auto' in a child under a cgroup limit of 60 % of the model:
    its budget leaves room for everything else in the limit, it is not killed, and its text is the
    text of an engine without a cache."""
    reason = memlimit.unavailable_reason()
    if reason:
        pytest.skip(reason)
    layout = discover_layout(str(demo_model))
    limit_bytes = int(0.6 * layout.file_size) + 200 * MIB  # the model's 60 % plus the process itself
    child = textwrap.dedent(f"""
        import json
        from cluster.engine.moe_engine import MoEEngine
        prompt = " kalo meni pumane" * 4
        with MoEEngine({str(demo_model)!r}, None, n_ctx=256, n_threads=2) as plain:
            want = plain.generate(prompt, max_tokens=24).text
        with MoEEngine({str(demo_model)!r}, "auto", n_ctx=256, n_threads=2) as engine:
            got = engine.generate(prompt, max_tokens=24).text
            print(json.dumps({{"budget": engine.auto_budget.budget_bytes, "line": engine.auto_budget.explain(),
                              "resident": engine.cache_stats()["resident_bytes"], "same": got == want}}))
    """)
    with memlimit.MemoryLimit("sniper-auto-test", limit_bytes) as limit:
        proc = limit.run([sys.executable, "-c", child], timeout_s=300, env=dict(os.environ))
        peak = limit.peak_bytes()
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["line"].startswith("auto cache budget") and "cgroup limit" in result["line"]
    assert "\n" not in result["line"]
    assert 0 < result["budget"] < limit_bytes - layout.non_expert_bytes
    assert result["resident"] <= result["budget"] and result["same"]
    assert peak <= limit_bytes


def test_a_process_the_oom_killer_ends_in_a_memory_limit_is_counted() -> None:
    import sys

    from cluster.distributed import memory_limit

    reason = memory_limit.unavailable_reason()
    if reason:
        pytest.skip(f"no memory cgroup here: {reason}")
    hog = "import numpy as np; a = np.ones(512 << 20, dtype=np.uint8); print(a.sum())"  # 512 MiB, touched
    with memory_limit.MemoryLimit("sniper-oom-test", 64 << 20) as limit:
        assert limit.oom_kills() == 0
        done = limit.run([sys.executable, "-c", hog], timeout_s=60)
        assert done.returncode == -9 and limit.oom_kills() >= 1
    with memory_limit.MemoryLimit("sniper-oom-test-ok", 256 << 20) as limit:
        done = limit.run([sys.executable, "-c", "print(1)"], timeout_s=60)
        assert done.returncode == 0 and limit.oom_kills() == 0


def test_the_kv_memory_of_long_contexts_is_counted_before_the_budget(bench_model: Path) -> None:
    """llama.cpp clears its KV buffer when the context is made, so every byte of it is charged before the budget is
    derived: under one cgroup limit, 4 slots of 4 k tokens leave a smaller budget than 4 slots of 256 by about
    their KV, and the engine still decodes within the limit."""
    from cluster.models import synth

    reason = memlimit.unavailable_reason()
    if reason:
        pytest.skip(reason)
    layout = discover_layout(str(bench_model))
    c = synth.PRESETS["bench"]
    kv_per_token = c.n_layers * 2 * c.n_head_kv * (c.n_embd // c.n_head) * 2  # K and V in f16
    kv_bytes = 4 * (4096 - 256) * kv_per_token  # 4096: the preset's training context (longer ones are cut to it)
    limit_bytes = int(0.6 * layout.file_size) + kv_bytes + 400 * MIB  # neither budget holds every expert
    child = textwrap.dedent(f"""
        import json
        from cluster.engine.moe_engine import MoEEngine
        budgets = {{}}
        for n_ctx in (256, 4096):
            with MoEEngine({str(bench_model)!r}, "auto", n_ctx=n_ctx, n_slots=4, n_threads=2) as engine:
                engine.generate(" kalo meni pumane" * 4, max_tokens=4)
                budgets[n_ctx] = engine.auto_budget.budget_bytes
        print(json.dumps(budgets))
    """)
    with memlimit.MemoryLimit("sniper-kv-test", limit_bytes) as limit:
        proc = limit.run([sys.executable, "-c", child], timeout_s=300, env=dict(os.environ))
        peak = limit.peak_bytes()
    assert proc.returncode == 0, proc.stderr[-2000:]
    budgets = {int(k): v for k, v in json.loads(proc.stdout.strip().splitlines()[-1]).items()}
    assert budgets[256] < layout.expert_bytes, "the limit must leave both budgets below the model's experts"
    assert abs((budgets[256] - budgets[4096]) - kv_bytes) < 0.25 * kv_bytes, (budgets, kv_bytes)
    assert peak <= limit_bytes
