"""How much memory a node has, and the expert-cache budget derived from it (``cache_bytes="auto"``).

The memory a node really has is its cgroup's limit when one applies (a Kubernetes pod, a
systemd slice, the benchmarks' memory-limited children; cgroup v1 or v2, the tightest limit on
the way up), else the machine's available memory. A budget too large starves the page cache
the mapping itself needs (the model's non-expert pages, KV, libraries) and the node thrashes;
too small wastes hits. ``auto_budget`` is measured once the model is loaded and the context
created, so the process's own memory (KV cache, compute buffers, Python) is already counted:

    cgroup:     budget = limit - (usage - model pages charged to it) - non-expert pages - reserve - margin
    no cgroup:  budget = every expert, if available - non-expert pages - reserve - margin holds them all,
                else     available * share - non-expert pages - reserve - margin

``usage - model pages`` is everything else charged to the cgroup (every process's anonymous
memory, libraries). ``available`` (MemAvailable) already counts the model's cached pages as
reclaimable; ``share`` divides a machine that several node actors share. Node actors on one
machine map one file and so share its pages in one page cache: when the machine holds every
expert, each node keeps them all (a node dropping an expert another still maps frees nothing,
and dropping one nobody maps only makes the next node that needs it read it again). ``reserve`` is memory
the process will allocate later (a node's saved conversation KV states). ``margin`` = 16 MiB +
20 % of the memory considered, at most 4 GiB more: the kernel reclaims a file's pages before a
cgroup reaches its limit or the machine runs out, and a page of a resident expert reclaimed behind
the cache's back comes back by 4 KiB faults inside the matrix multiply (``bench scale --dtype q8_0
--parts node``, the 32.5 GB file on a 23.5 GiB machine: with a 5 % / 1 GiB margin the budget was
88 % of available memory and decoding fell below stock llama.cpp's). The result is capped at what holds every
expert and must hold one decode step (``CacheBudgetError`` otherwise).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import mmap
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cluster.errors import CacheBudgetError, InvalidParameterError

AUTO = "auto"  # the value of cache_bytes / --cache-mb that asks for auto_budget
MIB = 1 << 20
MARGIN_BYTES = 16 * MIB
MARGIN_FRACTION = 0.20
MARGIN_MAX_BYTES = 4 << 30
_UNLIMITED = 1 << 60  # cgroup v1 writes 2**63 - 4096 for "no limit"
MAX_CACHE_MB = 1 << 30  # 1 PiB: a larger budget is a typo, not a machine


def parse_cache_mb(value: object, param: str = "cache_mb") -> int | str | None:
    """A cache budget as every surface takes it (``--cache-mb``, ``SNIPER_CACHE_MB``, the gateway's
    ``cache_mb``): MiB as a positive integer (or its digits) up to MAX_CACHE_MB, ``"auto"``, or None
    (a budget holding the whole model). InvalidParameterError names ``param`` otherwise."""
    if value is None or value == AUTO:
        return value
    text = str(value)
    if isinstance(value, bool) or not (isinstance(value, int) or text.isdigit()) or not 1 <= int(text) <= MAX_CACHE_MB:
        raise InvalidParameterError(f"{param} must be a positive integer of MiB (at most {MAX_CACHE_MB}, 1 PiB) or "
                                    f"'{AUTO}', got {value!r}", param=param)
    return int(text)

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.POINTER(ctypes.c_ubyte)]
_libc.mincore.restype = ctypes.c_int


def cached_pages(path: str | os.PathLike[str]) -> np.ndarray:
    """Page-cache residency of every page of a file, bool [n_pages] (our own mapping + mincore:
    creating the mapping reads nothing, and mincore reports pages whoever brought them in)."""
    size = os.path.getsize(path)
    n_pages = (size + mmap.PAGESIZE - 1) // mmap.PAGESIZE
    if size == 0:
        return np.zeros(0, dtype=bool)
    with open(path, "rb") as f:
        mapping = mmap.mmap(f.fileno(), size, access=mmap.ACCESS_READ)
        try:
            view = np.frombuffer(mapping, dtype=np.uint8)  # only the address is used
            try:
                vec = (ctypes.c_ubyte * n_pages)()
                if _libc.mincore(ctypes.c_void_p(view.ctypes.data), size, vec) != 0:
                    err = ctypes.get_errno()
                    raise OSError(err, f"mincore on '{path}': {os.strerror(err)}")
                out = (np.frombuffer(vec, dtype=np.uint8) & 1).astype(bool)
            finally:
                del view
        finally:
            mapping.close()
    return out


class _CachestatRange(ctypes.Structure):
    _fields_ = [("off", ctypes.c_uint64), ("len", ctypes.c_uint64)]


class _Cachestat(ctypes.Structure):
    _fields_ = [(name, ctypes.c_uint64) for name in
                ("nr_cache", "nr_dirty", "nr_writeback", "nr_evicted", "nr_recently_evicted")]


_SYS_CACHESTAT = 451  # Linux 6.5+, the same number on every architecture (the generic table)


def _cachestat_pages(path: str | os.PathLike[str]) -> int | None:
    """Pages of the file in the page cache by cachestat(2), which maps nothing; None where the kernel lacks it."""
    if not sys.platform.startswith("linux"):
        return None
    fd = os.open(path, os.O_RDONLY)
    try:
        stat = _Cachestat()
        if _libc.syscall(_SYS_CACHESTAT, fd, ctypes.byref(_CachestatRange(0, 0)), ctypes.byref(stat), 0) != 0:
            return None
        return int(stat.nr_cache)
    finally:
        os.close(fd)


def cached_bytes(path: str | os.PathLike[str]) -> int:
    """Bytes of the file in the page cache (whole pages). By cachestat(2) where the kernel has it: a mapping made
    to ask mincore, even for a moment, could take the address llama.cpp's own mapping of the file then gets, and
    the cache would take that mapping for another engine's (a start-up progress bar asks while the model loads)."""
    pages = _cachestat_pages(path)
    if pages is not None:
        return pages * mmap.PAGESIZE
    return int(cached_pages(path).sum()) * mmap.PAGESIZE


@dataclass(frozen=True)
class CgroupMemory:
    """The tightest memory limit over this process's cgroup and its ancestors, and that cgroup's usage."""

    path: str
    limit_bytes: int
    usage_bytes: int
    file_bytes: int | None = None  # page cache charged to it (None: not told)


def _read_int(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    if text == "max":
        return _UNLIMITED
    try:
        return int(text)
    except ValueError:
        return None


def cgroup_memory(proc_cgroup: str = "/proc/self/cgroup", root: str = "/sys/fs/cgroup") -> CgroupMemory | None:
    """This process's memory cgroup limit (v1 ``memory`` controller or v2), or None if unlimited."""
    try:
        lines = Path(proc_cgroup).read_text().splitlines()
    except OSError:
        return None
    candidates: list[tuple[Path, Path, str, str]] = []  # (hierarchy root, directory, limit file, usage file)
    for line in lines:
        _, controllers, rel = line.split(":", 2)
        if "memory" in controllers.split(","):
            base = Path(root) / "memory"
            candidates.append((base, base / rel.lstrip("/"), "memory.limit_in_bytes", "memory.usage_in_bytes"))
        elif controllers == "":
            for base in (Path(root), Path(root) / "unified"):
                if (base / "cgroup.controllers").exists():
                    candidates.append((base, base / rel.lstrip("/"), "memory.max", "memory.current"))
    best: CgroupMemory | None = None
    for base, directory, limit_file, usage_file in candidates:
        for here in (directory, *directory.parents):  # a parent's limit binds its children too
            if here != base and base not in here.parents:
                break
            limit, usage = _read_int(here / limit_file), _read_int(here / usage_file)
            if limit is not None and usage is not None and limit < _UNLIMITED and (best is None or limit < best.limit_bytes):
                best = CgroupMemory(str(here), limit, usage, _file_bytes(here))
    return best


def _file_bytes(directory: Path) -> int | None:
    """Page cache charged to the cgroup (memory.stat: ``total_cache`` on v1, ``file`` on v2), or None."""
    try:
        stats = dict(line.split() for line in (directory / "memory.stat").read_text().splitlines() if line.strip())
    except (OSError, ValueError):
        return None
    for key in ("total_cache", "file", "cache"):
        if key in stats:
            return int(stats[key])
    return None


def mem_available_bytes(meminfo: str = "/proc/meminfo") -> int:
    """MemAvailable: what the kernel estimates can be allocated without swapping (page cache counts)."""
    for line in Path(meminfo).read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    raise OSError(f"no MemAvailable line in {meminfo}")


@dataclass(frozen=True)
class AutoBudget:
    """A derived expert-cache budget and the terms it came from (bytes)."""

    budget_bytes: int
    source: str  # "cgroup <path>" or "available memory"
    memory_bytes: int  # the cgroup limit, or available memory x share
    other_bytes: int  # memory already used by everything but the model's pages (cgroup case; 0 otherwise)
    non_expert_bytes: int
    reserve_bytes: int  # memory the process will allocate later
    margin_bytes: int
    footprint_bytes: int  # what holds every expert (the cap)

    def explain(self) -> str:
        """One line: the budget and why."""
        terms = f"{self.source} {self.memory_bytes / MIB:.0f} MiB"
        if self.other_bytes:
            terms += f" - other memory {self.other_bytes / MIB:.0f} MiB"
        terms += f" - non-expert pages {self.non_expert_bytes / MIB:.0f} MiB"
        if self.reserve_bytes:
            terms += f" - reserved {self.reserve_bytes / MIB:.0f} MiB"
        terms += f" - margin {self.margin_bytes / MIB:.0f} MiB"
        capped = " (capped: every expert fits)" if self.budget_bytes == self.footprint_bytes else ""
        return f"auto cache budget {self.budget_bytes / MIB:.0f} MiB = {terms}{capped}"


def _margin(memory: int) -> int:
    return MARGIN_BYTES + min(MARGIN_MAX_BYTES, int(MARGIN_FRACTION * memory))


def auto_budget(model_path: str, *, non_expert_bytes: int, footprint_bytes: int, min_bytes: int,
                share: float = 1.0, reserve_bytes: int = 0) -> AutoBudget:
    """The expert budget for this process now (call it after the model is loaded and the context made).

    Args:
        model_path: the mapped GGUF (its pages in the page cache are not "other" memory).
        non_expert_bytes: pages of the file that are not expert slices (they stay resident).
        footprint_bytes: bytes that hold every expert (the budget is capped there).
        min_bytes: the least budget that works (one decode step's experts).
        share: fraction of the machine's available memory this node may plan for when no cgroup
            limit applies (several node actors on one machine) and the machine cannot hold every
            expert, in (0, 1].
        reserve_bytes: memory the process will allocate after this call (>= 0).

    Raises:
        CacheBudgetError: the memory left is less than ``min_bytes``.
    """
    if not 0.0 < share <= 1.0:
        raise ValueError(f"share must be in (0, 1], got {share!r}")
    if reserve_bytes < 0:
        raise ValueError(f"reserve_bytes must be >= 0, got {reserve_bytes!r}")
    cgroup = cgroup_memory()
    if cgroup is not None:
        memory = cgroup.limit_bytes
        # the model's pages count as the cache's own only where they are charged here: nodes on one machine share
        # one file, and a page another node's cgroup read first is charged there
        model_pages = cached_bytes(model_path)
        if cgroup.file_bytes is not None:
            model_pages = min(model_pages, cgroup.file_bytes)
        other = max(0, cgroup.usage_bytes - model_pages)
        source = f"cgroup limit ({cgroup.path})"
    else:
        available = mem_available_bytes()
        whole_machine_holds_all = available - non_expert_bytes - reserve_bytes - _margin(available) >= footprint_bytes
        memory = available if whole_machine_holds_all else int(available * share)
        other = 0
        source = "available memory" + (f" x {share:g}" if memory < available else "")
    margin = _margin(memory)
    raw = memory - other - non_expert_bytes - reserve_bytes - margin
    budget = min(raw, footprint_bytes)
    result = AutoBudget(budget_bytes=max(budget, 0), source=source, memory_bytes=memory, other_bytes=other,
                        non_expert_bytes=non_expert_bytes, reserve_bytes=reserve_bytes, margin_bytes=margin,
                        footprint_bytes=footprint_bytes)
    if budget < min_bytes:
        raise CacheBudgetError(f"{result.explain()}: less than one decode step's experts ({min_bytes / MIB:.1f} MiB); "
                               f"give the node more memory or a smaller model")
    return result
