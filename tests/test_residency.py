"""Page residency of expert units (checked with an independent mincore) and byte-range discovery."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import gguf
import numpy as np
import pagecache
import pytest

from cluster.distributed import memory_limit as memlimit
from cluster.engine import warmth_report as warmth
from cluster.engine.cache import discover_layout
from cluster.engine.moe_engine import MoEEngine
from cluster.models import synth

PS = pagecache.PAGE_SIZE
MIB = 1 << 20


def inner_pages(offset: int, size: int) -> slice:
    """Pages that lie entirely inside [offset, offset + size): no neighbour shares them."""
    return slice((offset + PS - 1) // PS, (offset + size) // PS)


def all_pages(offset: int, size: int) -> slice:
    return slice(offset // PS, (offset + size + PS - 1) // PS)


def unit_page_residency(path: Path, layout) -> dict[str, np.ndarray]:
    """Per unit: (resident inner pages, inner pages, resident pages of its whole span, pages of its span)."""
    pages = pagecache.resident_pages(path)
    out = {key: np.zeros((layout.n_layers, layout.n_experts), dtype=np.int64)
           for key in ("inner_resident", "inner", "span_resident", "span")}
    for layer in range(layout.n_layers):
        for expert in range(layout.n_experts):
            for offset, size, _, _ in layout.unit_slices(layer, expert):
                inner, span = pages[inner_pages(offset, size)], pages[all_pages(offset, size)]
                out["inner_resident"][layer, expert] += int(inner.sum())
                out["inner"][layer, expert] += inner.size
                out["span_resident"][layer, expert] += int(span.sum())
                out["span"][layer, expert] += span.size
    return out


@pytest.fixture()
def small_budget_engine(private_tiny_model: Path) -> Iterator[tuple[MoEEngine, Path, object]]:
    """A 25 % budget engine on a model copy nothing else maps, loaded with the whole file in the page cache (read
    as ``cat`` would: large folios), so that attach keeps a quarter of the experts and must really drop the rest."""
    layout = discover_layout(str(private_tiny_model))
    pagecache.drop_file(private_tiny_model)
    private_tiny_model.read_bytes()
    with MoEEngine(private_tiny_model, int(0.25 * layout.expert_bytes), n_ctx=256, n_threads=2) as engine:
        yield engine, private_tiny_model, layout


def _generate(engine: MoEEngine, path: Path) -> None:
    topics = synth.read_topics(path)
    result = engine.generate(synth.mixed_prompt(topics, [3, 1, 0], 4, seed=5), max_tokens=24)
    assert result.cache["n_evictions"] > 0


def _report(engine: MoEEngine) -> np.ndarray:
    resident = warmth.decode(engine.warmth()).resident
    assert resident.any() and not resident.all()
    return resident


def _assert_non_resident_units_hold_no_inner_pages(path: Path, layout, resident: np.ndarray, when: str) -> None:
    pages = unit_page_residency(path, layout)
    absent = ~resident
    # "almost no": a unit the policy dropped may keep at most a tenth of its inner pages
    leaky = absent & (pages["inner_resident"] > pages["inner"] // 10)
    offenders = [(int(l), int(e), int(pages["inner_resident"][l, e]), int(pages["inner"][l, e]))
                 for l, e in np.argwhere(leaky)]
    assert not offenders, (
        f"{when}: {len(offenders)} of {int(absent.sum())} units reported non-resident still have inner pages in "
        f"the page cache ({int(pages['inner_resident'][absent].sum())} of {int(pages['inner'][absent].sum())} "
        f"inner pages); (layer, expert, resident, inner) first: {offenders[:6]}")


def test_units_dropped_at_attach_have_no_resident_inner_pages(small_budget_engine) -> None:
    engine, path, layout = small_budget_engine
    _assert_non_resident_units_hold_no_inner_pages(path, layout, _report(engine), "after load")


def test_eviction_really_drops_the_pages_of_units_reported_non_resident(small_budget_engine) -> None:
    engine, path, layout = small_budget_engine
    _generate(engine, path)
    _assert_non_resident_units_hold_no_inner_pages(path, layout, _report(engine), "after generate")


def test_units_reported_resident_are_fully_resident(small_budget_engine) -> None:
    engine, path, layout = small_budget_engine
    for when in ("after load", "after generate"):
        if when == "after generate":
            _generate(engine, path)
        resident = _report(engine)
        pages = unit_page_residency(path, layout)
        np.testing.assert_array_equal(pages["span_resident"][resident], pages["span"][resident], err_msg=when)


# -- the budget in the page cache (large folios) -----------------------------------------------


def _topic_prompt(path: Path) -> str:
    topics = synth.read_topics(path)
    return synth.mixed_prompt(topics, [0, 1], 6, seed=3) + synth.topic_prompt(topics, 2, 12, seed=4)


@pytest.mark.parametrize("preset", ["tiny", "demo", "bench", "large"])
def test_the_model_file_holds_no_more_than_budget_and_non_expert_pages_after_load_during_and_after_generation(
        request: pytest.FixtureRequest, preset: str, tmp_path: Path) -> None:
    """Measured independently (our own mapping + mincore), from a cold page cache. The load is lean
    (llama.cpp maps the file, the cache reads its non-expert pages): experts come in when a step
    needs them, and whatever large folios a read makes, the budget must hold."""
    path = request.getfixturevalue(f"{preset}_model")
    if preset == "tiny":  # other tests map the tiny model; this one needs a file nobody else maps
        path = Path(shutil.copyfile(path, tmp_path / "tiny.gguf"))
    layout = discover_layout(str(path))
    budget = int(0.3 * layout.unit_bytes.sum())
    bound = budget + layout.non_expert_bytes
    pagecache.drop_file(path)
    seen = {}
    with MoEEngine(path, budget, n_ctx=512, n_threads=2) as engine:
        seen["after load"] = pagecache.resident_bytes(path)
        kept = engine.cache_stats()["resident_bytes"]
        pieces = engine.stream(_topic_prompt(path), max_tokens=24)
        for i, _ in enumerate(pieces):
            if i == 8:  # decode steps have trimmed what the prefill's last layer may have added
                seen["during decode"] = pagecache.resident_bytes(path)
        seen["after generation"] = pagecache.resident_bytes(path)
        stats = engine.cache_stats()
    seen["after close"] = pagecache.resident_bytes(path)
    assert "during decode" in seen, "the generation ended before its ninth piece"
    over = {when: f"{b / MIB:.1f} MiB" for when, b in seen.items() if b > bound}
    assert not over, (f"{preset}: page cache of the model above budget {budget / MIB:.1f} MiB + non-expert pages "
                      f"{layout.non_expert_bytes / MIB:.1f} MiB: {over} (all: {seen})")
    assert stats["n_evictions"] > 0 and stats["resident_bytes"] <= budget
    assert kept == 0 and seen["after load"] <= layout.non_expert_bytes + PS, \
        "from a cold page cache the load reads no expert: each is read when a step first needs it"
    assert stats["resident_bytes"] >= 0.8 * budget, "the budget is used, not just respected"


def test_a_load_under_a_budget_reads_the_non_expert_pages_not_the_whole_file(demo_model: Path, tmp_path: Path) -> None:
    """The bytes the kernel read for this process (/proc/self/io read_bytes, in a child), from a cold page cache:
    llama.cpp's own load maps the file with MAP_POPULATE and reads all of it; the lean load reads the non-expert
    pages only. A file system that does not count block reads (tmpfs) cannot show it: skipped there."""
    path = Path(shutil.copyfile(demo_model, tmp_path / "demo.gguf"))  # nothing else maps it
    layout = discover_layout(str(path))
    script = textwrap.dedent(f"""
        import json, os
        from cluster.engine.moe_engine import MoEEngine
        from cluster.distributed.memory_limit import drop_page_cache
        def read_bytes():
            return int(dict(line.split(": ") for line in open("/proc/self/io"))["read_bytes"])
        path = {str(path)!r}
        drop_page_cache(path)
        before = read_bytes()
        with open(path, "rb") as f:
            while f.read(1 << 20):
                pass
        whole = read_bytes() - before
        drop_page_cache(path)
        before = read_bytes()
        with MoEEngine(path, {int(0.25 * layout.expert_bytes)}, n_ctx=256, n_threads=2) as engine:
            opened = read_bytes() - before
            text = engine.generate("the", max_tokens=4).text
        print(json.dumps({{"whole": whole, "opened": opened, "text": text}}))
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    got = json.loads(out.stdout.splitlines()[-1])
    size = path.stat().st_size
    if got["whole"] < 0.9 * size:
        pytest.skip(f"this file system counts {got['whole']} read bytes for a cold read of {size}")
    assert got["opened"] <= layout.non_expert_bytes + 2 * MIB, (
        f"opening read {got['opened'] / MIB:.1f} MiB of a {size / MIB:.1f} MiB file whose non-expert pages are "
        f"{layout.non_expert_bytes / MIB:.1f} MiB")
    assert got["text"]


def test_cache_view_agrees_with_mincore_after_the_kernel_reclaims_expert_pages(demo_model: Path, tmp_path: Path) -> None:
    """Real pressure: the engine runs in a child under a cgroup limit; once it has generated,
    the limit is lowered below what it holds and the kernel reclaims pages. The cache's stats and
    warmth report must then agree with mincore within one page per unit."""
    reason = memlimit.unavailable_reason()
    if reason:
        pytest.skip(reason)
    path = Path(shutil.copyfile(demo_model, tmp_path / "demo.gguf"))
    layout = discover_layout(str(path))
    budget = int(0.5 * layout.unit_bytes.sum())
    pagecache.drop_file(path)
    child = textwrap.dedent(f"""
        import json, sys
        import numpy as np
        import pagecache
        from cluster.engine import warmth_report as warmth
        from cluster.engine.moe_engine import MoEEngine
        path = {str(path)!r}
        engine = MoEEngine(path, {budget}, n_ctx=256, n_threads=2)
        engine.generate({_topic_prompt(path)!r}, max_tokens=16)
        before = engine.cache_stats()["resident_bytes"]
        print("ready", flush=True)
        sys.stdin.readline()  # the parent lowers the limit meanwhile
        stats = engine.cache_stats()
        resident = warmth.decode(engine.warmth()).resident
        pages = pagecache.resident_pages(path)
        rows = []
        for layer in range(engine.layout.n_layers):
            for expert in range(engine.layout.n_experts):
                held = span = 0
                for offset, size, _, _ in engine.layout.unit_slices(layer, expert):
                    inner = pages[(offset + pagecache.PAGE_SIZE - 1) // pagecache.PAGE_SIZE:(offset + size) // pagecache.PAGE_SIZE]
                    held += int(inner.sum())
                    span += inner.size
                rows.append([bool(resident[layer, expert]), held, span])
        print(json.dumps({{"before": before, "after": stats["resident_bytes"], "reclaimed": stats["n_units_reclaimed"],
                          "units": rows}}), flush=True)
    """)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")])}
    with memlimit.MemoryLimit("sniper-reclaim-test", 4 << 30) as limit:
        proc = subprocess.Popen([sys.executable, "-c", child], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, env=env, preexec_fn=limit.enter)
        try:
            assert proc.stdout.readline().strip() == "ready", proc.stderr.read()[-2000:]
            limit.set_limit(limit.usage_bytes() - budget // 2)  # the kernel must give back half the budget's pages
            out, err = proc.communicate("go\n", timeout=120)
        finally:
            proc.kill()
    assert proc.returncode == 0, err[-2000:]
    result = json.loads(out.strip().splitlines()[-1])
    assert result["reclaimed"] > 0 and result["after"] < result["before"], result | {"units": "..."}
    wrong = [(i, r) for i, r in enumerate(result["units"])
             if (r[0] and r[1] < r[2] - 1) or (not r[0] and r[1] > 1)]
    assert not wrong, f"{len(wrong)} units where the warmth report and mincore disagree by more than a page: {wrong[:8]}"


# -- discovery -----------------------------------------------------------------------------


def _exps_tensors(path: Path) -> list[gguf.ReaderTensor]:
    return [t for t in gguf.GGUFReader(path).tensors if "_exps." in t.name]


def test_expert_bytes_equal_the_sizes_of_all_exps_tensors(tiny_model: Path, tiny_layout) -> None:
    tensors = _exps_tensors(tiny_model)
    assert sorted(tiny_layout.expert_tensors) == sorted(t.name for t in tensors)
    assert tiny_layout.expert_bytes == sum(int(t.n_bytes) for t in tensors)
    assert tiny_layout.file_size == tiny_model.stat().st_size
    assert tiny_layout.page_size == PS
    config = synth.read_config(tiny_model)
    assert (tiny_layout.arch, tiny_layout.n_layers, tiny_layout.n_experts, tiny_layout.n_experts_used,
            tiny_layout.n_embd) == (config.arch, config.n_layers, config.n_experts, config.n_experts_used,
                                    config.n_embd)


def test_expert_e_is_the_eth_equal_slice_of_every_exps_tensor_of_its_layer(tiny_model: Path, tiny_layout) -> None:
    layout = tiny_layout
    by_layer: dict[int, list[gguf.ReaderTensor]] = {}
    for t in _exps_tensors(tiny_model):
        by_layer.setdefault(int(t.name.split(".")[1]), []).append(t)
    assert sorted(by_layer) == list(range(layout.n_layers))
    for layer, tensors in by_layer.items():
        for expert in range(layout.n_experts):
            want = sorted((int(t.data_offset) + expert * (int(t.n_bytes) // layout.n_experts),
                           int(t.n_bytes) // layout.n_experts) for t in tensors)
            got = sorted((offset, size) for offset, size, _, _ in layout.unit_slices(layer, expert))
            assert got == want, f"unit ({layer}, {expert})"


def test_unit_footprint_is_its_slices_rounded_out_to_whole_pages(tiny_layout) -> None:
    layout = tiny_layout
    for layer in range(layout.n_layers):
        for expert in range(layout.n_experts):
            want = sum((all_pages(o, s).stop - all_pages(o, s).start) * PS for o, s, _, _ in
                       layout.unit_slices(layer, expert))
            assert int(layout.unit_bytes[layer, expert]) == want


def test_boundary_page_owners_name_the_neighbouring_unit(tiny_model: Path, tiny_layout) -> None:
    layout = tiny_layout
    starts, ends = {}, {}
    for layer in range(layout.n_layers):
        for expert in range(layout.n_experts):
            for offset, size, _, _ in layout.unit_slices(layer, expert):
                starts[offset] = layer * layout.n_experts + expert
                ends[offset + size] = layer * layout.n_experts + expert
    for layer in range(layout.n_layers):
        for expert in range(layout.n_experts):
            for offset, size, head, tail in layout.unit_slices(layer, expert):
                want_head = -1 if offset % PS == 0 else ends.get(offset, -2)
                want_tail = -1 if (offset + size) % PS == 0 else starts.get(offset + size, -2)
                assert (head, tail) == (want_head, want_tail), f"unit ({layer}, {expert}) slice at {offset}"


def test_merged_gate_up_tensor_is_discovered_with_twice_the_gate_slice(merged_model: Path, tiny_layout) -> None:
    layout = discover_layout(str(merged_model))
    names = set(layout.expert_tensors)
    assert {f"blk.{l}.ffn_gate_up_exps.weight" for l in range(layout.n_layers)} <= names
    assert not any("ffn_gate_exps" in n or "ffn_up_exps" in n for n in names)
    assert layout.expert_bytes == sum(int(t.n_bytes) for t in _exps_tensors(merged_model))
    assert layout.expert_bytes == tiny_layout.expert_bytes
    gate_up = {t.name: t for t in _exps_tensors(merged_model)}["blk.0.ffn_gate_up_exps.weight"]
    merged_slice = [s for s in layout.unit_slices(0, 3) if s[0] == int(gate_up.data_offset) + 3 * s[1]]
    assert len(merged_slice) == 1
    separate = {t.name: t for t in _exps_tensors(Path(tiny_layout.path))}["blk.0.ffn_gate_exps.weight"]
    gate_slice = [s for s in tiny_layout.unit_slices(0, 3) if s[0] == int(separate.data_offset) + 3 * s[1]]
    assert len(gate_slice) == 1
    assert merged_slice[0][1] == 2 * gate_slice[0][1]
    assert len(layout.unit_slices(0, 3)) == 2 and len(tiny_layout.unit_slices(0, 3)) == 3


def test_qwen3moe_file_is_discovered_like_llama(qwen_model: Path, tiny_layout) -> None:
    layout = discover_layout(str(qwen_model))
    assert layout.arch == "qwen3moe"
    assert (layout.n_layers, layout.n_experts, layout.n_experts_used) == (
        tiny_layout.n_layers, tiny_layout.n_experts, tiny_layout.n_experts_used)
    assert layout.expert_bytes == sum(int(t.n_bytes) for t in _exps_tensors(qwen_model))
