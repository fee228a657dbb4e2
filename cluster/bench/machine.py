"""What the machine itself did during a benchmark: its block device's reads, a process's peak memory, OOM kills,
and the disk's sequential read rate (``bench scale``'s two parts read them the same way)."""

from __future__ import annotations

import os
import time
from pathlib import Path

MIB = 1 << 20
GIB = 1 << 30


def block_device_stat(path: str) -> Path | None:
    """The ``stat`` file of the block device holding ``path`` (its whole disk where it is a partition), or None."""
    st = os.stat(path)
    dev = Path(f"/sys/dev/block/{os.major(st.st_dev)}:{os.minor(st.st_dev)}")
    if not dev.exists():
        return None
    return dev / "stat" if (dev / "stat").exists() else None


def device_read_bytes(stat_file: Path | None) -> int | None:
    """Bytes the device has read since boot (sectors read x 512), or None where it cannot be told."""
    if stat_file is None:
        return None
    return int(stat_file.read_text().split()[2]) * 512


def oom_kills() -> int:
    for line in Path("/proc/vmstat").read_text().splitlines():
        key, _, value = line.partition(" ")
        if key == "oom_kill":
            return int(value)
    return 0


def vm_hwm_bytes(pid: int) -> int | None:
    """A process's peak resident memory (VmHWM: anonymous and mapped file pages), or None once it is gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def disk_read_rate(path: str, n_bytes: int = 2 * GIB) -> float:
    """Bytes per second of a sequential read of ``path``'s first ``n_bytes`` from a cold page cache."""
    from cluster.distributed.memory_limit import drop_page_cache

    drop_page_cache(path)
    n_bytes = min(n_bytes, os.path.getsize(path))
    done = 0
    t0 = time.perf_counter()
    with open(path, "rb", buffering=0) as f:
        while done < n_bytes:
            chunk = f.read(min(8 * MIB, n_bytes - done))
            if not chunk:
                break
            done += len(chunk)
    rate = done / (time.perf_counter() - t0)
    drop_page_cache(path)
    return rate
