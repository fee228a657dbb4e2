"""RAM-limited processes: a cgroup memory limit that counts the page cache (benchmarks, tests, `serve --node-memory-mb`).

A cgroup v1 memory controller (``/sys/fs/cgroup/memory/<name>/memory.limit_in_bytes``) or
a cgroup v2 ``memory.max`` charges a process for the file pages it faults in, so an mmap'd
model larger than the limit really thrashes (DESIGN.md "Running Ray on these machines").
Needs root; ``unavailable_reason()`` says why not otherwise.
"""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path
from typing import Sequence

V1_ROOT = Path("/sys/fs/cgroup/memory")
V2_ROOT = Path("/sys/fs/cgroup")


def _v2_usable() -> bool:
    controllers = V2_ROOT / "cgroup.controllers"
    return controllers.exists() and "memory" in controllers.read_text().split()


def unavailable_reason() -> str | None:
    """None if memory-limited children can be started here, else why not."""
    if os.geteuid() != 0:
        return "creating a memory cgroup needs root"
    if (V1_ROOT / "memory.limit_in_bytes").exists() or _v2_usable():
        return None
    return "no cgroup memory controller (v1 /sys/fs/cgroup/memory or v2 memory.max) is mounted"


def drop_page_cache(path: str | os.PathLike[str]) -> None:
    """Writes back and drops every cached page of ``path`` (a cold start for the next run)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fdatasync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


PEAK_FILES = ("memory.max_usage_in_bytes", "memory.peak")  # cgroup v1, v2


def cgroup_peak_bytes(path: Path) -> int | None:
    """The most a memory cgroup has been charged (since it was made or its peak was reset), or None."""
    for name in PEAK_FILES:
        try:
            return int((path / name).read_text())
        except (OSError, ValueError):
            continue
    return None


def reset_cgroup_peak(path: Path) -> None:
    """Starts a new peak from the cgroup's usage now (where the kernel allows it)."""
    for name in PEAK_FILES:
        try:
            (path / name).write_text("0")
        except OSError:
            continue


class MemoryLimit:
    """A fresh memory cgroup with ``limit_bytes``; ``run`` starts a command inside it.

    Used as a context manager, it removes the cgroup on exit.
    """

    def __init__(self, name: str, limit_bytes: int) -> None:
        reason = unavailable_reason()
        if reason:
            raise RuntimeError(f"cannot limit memory: {reason}")
        self.limit_bytes = int(limit_bytes)
        if (V1_ROOT / "memory.limit_in_bytes").exists():
            self.path = V1_ROOT / f"{name}-{os.getpid()}"
            self.path.mkdir(exist_ok=True)
            self._limit_file, self._usage_file = "memory.limit_in_bytes", "memory.usage_in_bytes"
        else:
            self.path = V2_ROOT / f"{name}-{os.getpid()}"
            self.path.mkdir(exist_ok=True)
            (self.path / "memory.swap.max").write_text("0")
            self._limit_file, self._usage_file = "memory.max", "memory.current"
        self.set_limit(self.limit_bytes)

    def enter(self) -> None:
        """Moves the calling process into the cgroup (pages it faults in from now on count)."""
        (self.path / "cgroup.procs").write_text(str(os.getpid()))

    def run(self, argv: Sequence[str], timeout_s: float, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
        """Runs ``argv`` in the cgroup; raises subprocess.TimeoutExpired past ``timeout_s``."""
        return subprocess.run(list(argv), preexec_fn=self.enter, capture_output=True, text=True,
                              timeout=timeout_s, env=env)

    def set_limit(self, limit_bytes: int) -> None:
        """Changes the limit; lowering it makes the kernel reclaim the cgroup's pages at once."""
        self.limit_bytes = int(limit_bytes)
        (self.path / self._limit_file).write_text(str(self.limit_bytes))

    def usage_bytes(self) -> int:
        """What the cgroup is charged now (anonymous memory and page cache)."""
        return int((self.path / self._usage_file).read_text())

    def peak_bytes(self) -> int:
        peak = cgroup_peak_bytes(self.path)
        return -1 if peak is None else peak

    def oom_kills(self) -> int:
        """Processes of the cgroup the kernel's OOM killer has killed (``oom_kill`` of
        memory.events, or memory.oom_control on cgroup v1); 0 if the kernel does not say."""
        for name in ("memory.events", "memory.oom_control"):
            try:
                for line in (self.path / name).read_text().splitlines():
                    key, _, value = line.partition(" ")
                    if key == "oom_kill":
                        return int(value)
            except (OSError, ValueError):
                continue
        return 0

    def close(self) -> None:
        for _ in range(50):
            try:
                self.path.rmdir()
                return
            except OSError:
                time.sleep(0.1)

    def __enter__(self) -> "MemoryLimit":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
