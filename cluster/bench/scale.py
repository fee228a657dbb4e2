"""``python -m cluster bench scale``: the whole service on a model of real size, against what users would run instead.

Two systems on one machine, one after the other, on the same GGUF file (by default ``synth --preset qwen3-30b-a3b``,
written into ``--work-dir`` and deleted afterwards; about 18.6 GB of disk):

* ``sniper``: a local Ray cluster of ``nodes`` nodes, each node actor in a memory cgroup of its own
  (``--node-memory-mb``; the node makes it, see ``NodeServer``), ``--cache-mb auto``, served through the HTTP gateway;
* ``llama-server``: one ``llama-server`` per node under the same limit, with as many slots, behind a round-robin
  proxy (``cluster.bench.round_robin_proxy``), as a user without this project would deploy it.

Both map the one file (a copy per node does not fit the disk at this size): the page cache is shared and each page
is charged to the cgroup that first read it, the same for both systems. Each runs with the limits, then with none
(the file in the page cache). For each ``C`` of ``--concurrency``, C closed-loop chat users
(``cluster.bench.chat_users``: multi-turn conversations over the model's topics) talk to it for ``--warmup-s`` then
``--window-s`` seconds; the window gives aggregate tok/s (tokens that arrived in it), time to first token (p50,
p99, of the requests whose first token came in the window and of those still waiting at its end, counted as having
waited until then: censored), time per output token (p50, p99), errors, and, over the whole run of that C,
expert bytes read per token (the nodes' counters) and disk bytes per token (the block device's own counter,
``/sys/dev/block``). Each start is timed from
the first process launched to the first answer. Peak memory per node comes from its cgroup (``max_usage``), or
from the process's ``VmHWM`` without limits; OOM kills from ``/proc/vmstat``. The disk's sequential read rate is
measured on the model file from a cold page cache. ``docs/scale.md`` (``scale_report``) states every target of
issue 22 met or missed, with the figures.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

from cluster.bench import (
    command_line,
    log_progress,
    out_flag,
    percentile,
    routing_bench,  # noqa: F401  (sets RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 before ray)
)
from cluster.bench.chat_users import RequestRecord, run_chat_users
from cluster.bench.machine import block_device_stat, device_read_bytes, disk_read_rate, oom_kills, vm_hwm_bytes
from cluster.distributed.memory_limit import cgroup_peak_bytes, reset_cgroup_peak

MIB = 1 << 20
GIB = 1 << 30
SYSTEMS = ("sniper", "llama-server")
PARTS = ("node", "cluster")  # cluster.bench.single_node, then the systems below
CONCURRENCY = (1, 4, 8, 16)
DEFAULT_WORK_DIR = "/var/tmp/sniper-scale"
BITS_PER_WEIGHT = {"q4_k": 4.5, "q4_k_m": 5.0, "q8_0": 8.5, "f16": 16.0}  # for the disk check before writing


@dataclass(frozen=True)
class ScaleParams:
    """What one run measures (see the module docstring)."""

    n_nodes: int = 3
    node_memory_mb: int = 6144
    concurrency: tuple[int, ...] = CONCURRENCY
    warmup_s: float = 20.0
    window_s: float = 90.0
    max_tokens: int = 32
    turns: int = 3
    n_ctx: int = 1024
    n_threads: int = 1
    unlimited: bool = True
    systems: tuple[str, ...] = SYSTEMS
    parts: tuple[str, ...] = PARTS
    node_limits: tuple[float, ...] = (0.25, 0.5)  # node part: cgroup limits as fractions of the file
    truncated_layers: tuple[int, ...] = (4, 8)  # node part: the copies whose in-RAM rate gives the compute bound
    stock_timeout_s: float = 300.0  # node part: how long one llama-server request may take

    @property
    def n_slots(self) -> int:
        """Slots per node: the most users at once, spread over the nodes."""
        return max(1, -(-max(self.concurrency) // self.n_nodes))


# -- the machine --------------------------------------------------------------------------------

def estimated_file_bytes(preset: str, dtype: str | None = None) -> int:
    """About how many bytes ``synth --preset`` writes (parameters x bits per weight of the type; +3 %)."""
    from cluster.models import synth

    c = synth.PRESETS[preset]
    head_dim = c.head_dim or c.n_embd // c.n_head
    per_layer = (c.n_embd * head_dim * (2 * c.n_head + 2 * c.n_head_kv)
                 + 3 * c.n_embd * c.n_ff * max(1, c.n_experts) + c.n_embd * c.n_experts)
    params = c.n_layers * per_layer + 2 * (c.n_vocab or 0) * c.n_embd
    return int(params * BITS_PER_WEIGHT.get(dtype or c.dtype, 16.0) / 8 * 1.03)


# -- the systems --------------------------------------------------------------------------------

class _System:
    """One deployment a benchmark starts as a context manager: ``_start`` enters what it starts into ``_stack``,
    which stops it all, in reverse, on exit or when starting fails."""

    def __init__(self) -> None:
        self._stack = contextlib.ExitStack()

    def _start(self) -> None:
        raise NotImplementedError

    def __enter__(self):  # noqa: ANN204 (the subclass)
        try:
            self._start()
        except BaseException:
            self._stack.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self._stack.close()


class SniperSystem(_System):
    """A local Ray cluster serving the model through the gateway; each node in a cgroup of ``limit_bytes``."""

    name = "sniper"

    def __init__(self, model: str, params: ScaleParams, limit_bytes: int | None) -> None:
        super().__init__()
        self.model, self.params, self.limit_bytes = model, params, limit_bytes
        self.api_key = "bench-scale"
        self.nodes: list[Any] = []

    def _start(self) -> None:
        from cluster.api.gateway import GatewayConfig, start_http
        from cluster.bench import free_port
        from cluster.distributed import connection, deploy
        from cluster.distributed.client import Client
        from cluster.distributed.protocol import NAMESPACE

        p = self.params
        cluster = self._stack.enter_context(routing_bench.LocalRayCluster(p.n_nodes, cpus_per_node=p.n_threads))
        connection.connect(cluster.address, NAMESPACE)
        self._stack.callback(deploy.shutdown, NAMESPACE)
        info = deploy.deploy(self.model, p.n_nodes, cache_bytes="auto", memory_limit_bytes=self.limit_bytes,
                             n_threads=p.n_threads, n_ctx=p.n_ctx, n_slots=p.n_slots, max_queue=max(8, 2 * p.n_slots))
        self.nodes = list(info.nodes)
        if self.limit_bytes:
            self._stack.callback(routing_bench._remove_node_cgroups, self.nodes)
        self.url = start_http(GatewayConfig(namespace=NAMESPACE, api_key=self.api_key), "127.0.0.1", free_port())
        self.client = Client.connect(cluster.address, NAMESPACE)

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"}

    def budgets(self) -> list[str]:
        return [n.cache_budget or "" for n in self.nodes]

    def expert_bytes_read(self) -> int:
        return sum(n.bytes_read or 0 for n in self.client.status().nodes)

    def cgroups(self) -> list[Path]:
        from cluster.distributed import memory_limit as memlimit

        root = memlimit.V1_ROOT if (memlimit.V1_ROOT / "memory.limit_in_bytes").exists() else memlimit.V2_ROOT
        return [root / f"sniper-{n.node}-{n.pid}" for n in self.nodes] if self.limit_bytes else []

    def pids(self) -> list[int]:
        return [n.pid for n in self.nodes]


class LlamaServerSystem(_System):
    """One ``llama-server`` per node (each in a cgroup of ``limit_bytes``) behind a round-robin proxy."""

    name = "llama-server"

    def __init__(self, binary: str, model: str, params: ScaleParams, limit_bytes: int | None) -> None:
        super().__init__()
        self.binary, self.model, self.params, self.limit_bytes = binary, model, params, limit_bytes
        self.headers: dict[str, str] = {}
        self._servers: list[Any] = []
        self._limits: list[Any] = []

    def _start(self) -> None:
        from concurrent.futures import ThreadPoolExecutor

        from cluster.bench.llama_server import NO_REPACK, LlamaServer
        from cluster.bench.round_robin_proxy import RoundRobinProxy
        from cluster.distributed.memory_limit import MemoryLimit

        p = self.params
        for i in range(p.n_nodes):
            limit = None
            if self.limit_bytes:
                limit = self._stack.enter_context(MemoryLimit(f"sniper-scale-llama-{i}", self.limit_bytes))
                self._limits.append(limit)
            self._servers.append(LlamaServer(self.binary, self.model, p.n_threads, n_slots=p.n_slots,
                                             n_ctx=p.n_ctx, limit=limit, extra_args=NO_REPACK))
        with ThreadPoolExecutor(len(self._servers)) as pool:  # they start together, as machines would
            started = list(pool.map(lambda s: self._stack.enter_context(s), self._servers))
        self.url = self._stack.enter_context(RoundRobinProxy([s.url for s in started])).url

    def budgets(self) -> list[str]:
        return []

    def expert_bytes_read(self) -> int | None:
        return None  # llama.cpp does not count them: its disk bytes stand for them

    def cgroups(self) -> list[Path]:
        return [limit.path for limit in self._limits]

    def pids(self) -> list[int]:
        return [s.pid for s in self._servers if s.pid is not None]


def probe_default_llama_server(binary: str, model: str, limit_bytes: int, timeout_s: float = 600) -> dict[str, Any]:
    """One ``llama-server`` with its default options (weights repacked at load) in a cgroup of ``limit_bytes``:
    whether it comes up, or how it ends."""
    from cluster.bench.llama_server import LlamaServer
    from cluster.distributed.memory_limit import MemoryLimit

    t0 = time.perf_counter()
    with MemoryLimit("sniper-scale-default", limit_bytes) as limit:
        try:
            with LlamaServer(binary, model, 1, n_slots=1, limit=limit):
                return {"started": True, "seconds": time.perf_counter() - t0, "oom_kills": limit.oom_kills()}
        except RuntimeError as exc:
            return {"started": False, "seconds": time.perf_counter() - t0, "oom_kills": limit.oom_kills(),
                    "error": str(exc).splitlines()[0][:200]}


# -- one system, measured --------------------------------------------------------------------------

def _window_metrics(records: list[RequestRecord], w0: float, w1: float) -> dict[str, Any]:
    """What the users saw in the window [w0, w1] (see the module docstring)."""
    tokens = sum(1 for r in records for t in r.token_times() if w0 <= t <= w1)
    sent = [r for r in records if w0 <= r.sent <= w1 and r.error is None]
    # time to first token: every request whose first token came in the window, and every one still waiting at its
    # end (censored there: it waited at least that long), wherever it was sent
    waited = [r for r in records if r.error is None and r.sent <= w1 and (r.first is None or r.first >= w0)]
    ttft = [min(r.first if r.first is not None else w1, w1) - r.sent for r in waited]
    censored = sum(1 for r in waited if r.first is None or r.first > w1)
    tpot = [(r.end - r.first) / (r.tokens - 1) for r in records
            if r.end is not None and r.first is not None and r.tokens > 1 and w0 <= r.end <= w1]
    return {"tok_s": tokens / (w1 - w0), "tokens": tokens, "requests_sent": len(sent),
            "requests_completed": sum(1 for r in records if r.end is not None and w0 <= r.end <= w1),
            "ttft_p50_s": percentile(ttft, 50, observed=True), "ttft_p99_s": percentile(ttft, 99, observed=True),
            "ttft_censored": censored,
            "tpot_p50_s": percentile(tpot, 50, observed=True), "tpot_p99_s": percentile(tpot, 99, observed=True),
            "errors": sum(1 for r in records if r.error), "error_examples": sorted({r.error for r in records if r.error})[:3]}


def _first_answer(system: Any, model_name: str, prompt: str) -> None:
    """Waits for one short answer through the system's front door (the clock of its start-up)."""
    import requests

    body = {"model": model_name, "prompt": prompt, "max_tokens": 1, "temperature": 0.0}
    response = requests.post(f"{system.url}/v1/completions", json=body, headers=system.headers, timeout=900)
    response.raise_for_status()


def measure_system(make: Any, model: str, params: ScaleParams, topic_prompts: Sequence[Sequence[str]],
                   progress: bool, label: str) -> dict[str, Any]:
    """Starts one system, times it to its first answer, then runs every C; returns its figures."""
    from cluster.distributed.memory_limit import drop_page_cache

    drop_page_cache(model)  # every system starts from a cold page cache
    device = block_device_stat(model)
    model_name = os.path.basename(model).removesuffix(".gguf")
    oom_before = oom_kills()
    t0 = time.perf_counter()
    disk0 = device_read_bytes(device)
    result: dict[str, Any] = {"runs": {}}
    with make() as system:
        ready_s = time.perf_counter() - t0
        _first_answer(system, model_name, topic_prompts[0][0])
        result["start_to_first_answer_s"] = time.perf_counter() - t0
        result["start_to_ready_s"] = ready_s
        disk1 = device_read_bytes(device)
        result["start_disk_bytes"] = None if disk0 is None or disk1 is None else disk1 - disk0
        result["budgets"] = system.budgets()
        log_progress(progress, f"  {label}: first answer {result['start_to_first_answer_s']:.1f} s after start"
                     + (f" ({result['start_disk_bytes'] / GIB:.1f} GiB read from disk)" if result["start_disk_bytes"] else ""))
        for c in params.concurrency:
            for path in system.cgroups():
                reset_cgroup_peak(path)
            expert0, disk0 = system.expert_bytes_read(), device_read_bytes(device)
            start = time.perf_counter()
            records = run_chat_users(system.url, c, topic_prompts, duration_s=params.warmup_s + params.window_s,
                                     max_tokens=params.max_tokens, turns=params.turns, model=model_name,
                                     headers=system.headers)
            window = _window_metrics(records, start + params.warmup_s, start + params.warmup_s + params.window_s)
            window["requests"] = [[r.user, r.conversation, r.turn, r.prompt_chars, round(r.sent - start, 3),
                                   None if r.first is None else round(r.first - start, 3),
                                   None if r.end is None else round(r.end - start, 3), r.tokens, r.error]
                                  for r in records]  # times from the start of the run (warm-up first)
            generated = sum(len(r.token_times()) for r in records)
            expert1, disk1 = system.expert_bytes_read(), device_read_bytes(device)
            window["expert_bytes_per_token"] = (expert1 - expert0) / generated if expert0 is not None and generated \
                else None
            window["disk_bytes_per_token"] = (disk1 - disk0) / generated if disk0 is not None and generated else None
            peaks = [cgroup_peak_bytes(p) for p in system.cgroups()] or [vm_hwm_bytes(pid) for pid in system.pids()]
            window["peak_bytes_per_node"] = peaks
            result["runs"][str(c)] = window
            log_progress(progress, f"  {label} C={c}: {window['tok_s']:.2f} tok/s, TTFT p50 "
                         f"{window['ttft_p50_s'] or 0:.1f} s p99 {window['ttft_p99_s'] or 0:.1f} s, "
                         f"{window['errors']} errors, peak {max((p or 0) for p in peaks) / GIB:.2f} GiB/node")
    result["oom_kills"] = oom_kills() - oom_before
    return result


# -- the benchmark --------------------------------------------------------------------------------

@contextlib.contextmanager
def _model_file(model: str | None, preset: str, dtype: str | None, work_dir: str, keep: bool,
                progress: bool) -> Iterator[tuple[str, bool]]:
    """The model to measure: ``model``, else the preset written into ``work_dir`` (deleted afterwards unless ``keep``)."""
    if model:
        yield model, False
        return
    from cluster.models import synth

    os.makedirs(work_dir, exist_ok=True)
    path = os.path.join(work_dir, f"{preset}{'-' + dtype if dtype else ''}.gguf")
    if not os.path.exists(path):
        need = estimated_file_bytes(preset, dtype)
        free = shutil.disk_usage(work_dir).free
        if free < need + 2 * GIB:
            raise OSError(f"bench scale: writing the {preset} model needs about {need / GIB:.1f} GiB of disk in "
                          f"{work_dir} (and 2 GiB to spare); {free / GIB:.1f} GiB are free there")
        config = synth.PRESETS[preset]
        if dtype:
            config = synth.config_from_args(preset, dtype=dtype)
        log_progress(progress, f"writing {path} (about {need / GIB:.1f} GiB)")
        synth.synthesize(path, config, progress=progress)
    try:
        yield path, True
    finally:
        if not keep:
            os.remove(path)


def run_scale(model: str | None, out_dir: Path | None, *, preset: str = "qwen3-30b-a3b", dtype: str | None = None,
              params: ScaleParams = ScaleParams(), llama_server: str | None = None,
              work_dir: str = DEFAULT_WORK_DIR, keep_model: bool = False, progress: bool = True) -> dict[str, Any]:
    """Runs the comparison (module docstring); writes ``docs/scale.md`` when ``out_dir`` is set."""
    from cluster.bench.batch_bench import ensure_llama_server
    from cluster.distributed import memory_limit as memlimit
    from cluster.engine.cache import discover_layout
    from cluster.models import synth

    if params.node_memory_mb and memlimit.unavailable_reason():
        raise ValueError(f"bench scale limits each node's memory with a cgroup, but {memlimit.unavailable_reason()}")
    binary = ensure_llama_server(llama_server, progress) if "llama-server" in params.systems else None
    t_start = time.perf_counter()
    with _model_file(model, preset, dtype, work_dir, keep_model, progress) as (path, generated):
        layout = discover_layout(path)
        try:
            topics = synth.read_topics(path)
        except ValueError:
            topics = []
        if not topics:
            raise ValueError(f"'{path}' has no synthetic topics to make chat users' prompts from")
        topic_prompts = [[synth.topic_prompt(topics, t, 24, seed=1000 * t + i) for i in range(12)]
                         for t in range(len(topics))]
        result: dict[str, Any] = {
            "model": {"path": path, "generated": generated, "preset": preset if generated else None,
                      "file_bytes": os.path.getsize(path), "expert_bytes": int(layout.unit_bytes.sum()),
                      "non_expert_bytes": int(layout.non_expert_bytes), "n_layers": layout.n_layers,
                      "n_experts": layout.n_experts},
            "params": {**params.__dict__, "n_slots": params.n_slots},
            "machine": {"cpus": os.cpu_count(), "mem_total_bytes": os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")},
            "regimes": {},
        }
        result["machine"]["disk_read_bytes_per_s"] = rate = disk_read_rate(path)
        log_progress(progress, f"disk: {rate / MIB:.0f} MiB/s sequential from a cold page cache")
        if "node" in params.parts:
            from cluster.bench import single_node

            size = os.path.getsize(path)
            node_regimes = [(f"cgroup {round(100 * f)} %", int(f * size)) for f in params.node_limits]
            node_regimes.append(("no limit", None))
            prompt = topic_prompts[0][0] + " " + topic_prompts[1][0]
            result["node"] = single_node.run_single_node(
                path, regimes=node_regimes, binary=binary, prompt=prompt, max_tokens=params.max_tokens,
                n_threads=os.cpu_count() or 1, stock_timeout_s=params.stock_timeout_s, progress=progress)
            if generated and params.truncated_layers:
                result["compute_bound"] = single_node.compute_bound(
                    preset, dtype, params.truncated_layers, work_dir, prompt=prompt, max_tokens=params.max_tokens,
                    n_threads=os.cpu_count() or 1, progress=progress)
        regimes = [("limited", params.node_memory_mb * MIB)] if params.node_memory_mb and "cluster" in params.parts else []
        if params.unlimited and "cluster" in params.parts:
            regimes.append(("unlimited", None))
        for regime, limit in regimes:
            result["regimes"][regime] = {"node_limit_bytes": limit, "systems": {}}
            for system in params.systems:
                label = f"{regime}/{system}"
                log_progress(progress, f"{label}: {params.n_nodes} nodes" + (f", {limit / GIB:.1f} GiB each" if limit else ""))
                if system == "sniper":
                    def make(limit: int | None = limit) -> SniperSystem:
                        return SniperSystem(path, params, limit)
                else:
                    if binary is None:
                        result["regimes"][regime]["systems"][system] = {"skipped": "no llama-server binary"}
                        continue
                    if limit:
                        probe = probe_default_llama_server(binary, path, limit)
                        result["regimes"][regime]["default_llama_server"] = probe
                        log_progress(progress, "  llama-server with its default options under the limit: "
                                     + ("started" if probe["started"] else f"did not start ({probe['oom_kills']} OOM kills)"))

                    def make(limit: int | None = limit) -> LlamaServerSystem:
                        return LlamaServerSystem(binary, path, params, limit)
                try:
                    result["regimes"][regime]["systems"][system] = measure_system(
                        make, path, params, topic_prompts, progress, label)
                except Exception as exc:  # a system that cannot start is a result, not a crash of the benchmark
                    result["regimes"][regime]["systems"][system] = {"failed": f"{type(exc).__name__}: {exc}"[:500]}
                    log_progress(progress, f"  {label}: failed: {exc}")
    result["wall_s"] = time.perf_counter() - t_start
    result["command"] = command_line("scale", [
        ("--model", model), ("--preset", None if model or preset == "qwen3-30b-a3b" else preset), ("--dtype", dtype),
        ("--nodes", params.n_nodes), ("--node-memory-mb", params.node_memory_mb),
        ("--concurrency", ",".join(map(str, params.concurrency))), ("--warmup-s", params.warmup_s),
        ("--window-s", params.window_s), ("--max-tokens", params.max_tokens), ("--ctx", params.n_ctx),
        ("--no-unlimited", not params.unlimited),
        ("--parts", None if params.parts == PARTS else ",".join(params.parts)), ("--out", out_flag(out_dir))])
    if out_dir is not None:
        from cluster.bench.scale_report import write_scale_report

        result["report"] = str(write_scale_report(result, Path(out_dir)))
    return result
