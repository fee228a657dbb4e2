"""Independent page-cache measurement of a file: our own mmap of it, then libc ``mincore``.

For a file mapping, ``mincore`` reports whether each page is in the page cache (whoever
brought it there), without faulting anything in: creating the mapping reads nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import mmap
import os

import numpy as np

from cluster.distributed.memory_limit import drop_page_cache

PAGE_SIZE = mmap.PAGESIZE

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.POINTER(ctypes.c_ubyte)]
_libc.mincore.restype = ctypes.c_int


def resident_pages(path: str | os.PathLike[str]) -> np.ndarray:
    """Page-cache residency of every page of the file, bool [n_pages]."""
    size = os.path.getsize(path)
    n_pages = (size + PAGE_SIZE - 1) // PAGE_SIZE
    if size == 0:
        return np.zeros(0, dtype=bool)
    with open(path, "rb") as f:
        mapping = mmap.mmap(f.fileno(), size, access=mmap.ACCESS_READ)
        try:
            view = np.frombuffer(mapping, dtype=np.uint8)  # no read: only the address is used
            try:
                vec = (ctypes.c_ubyte * n_pages)()
                if _libc.mincore(ctypes.c_void_p(view.ctypes.data), size, vec) != 0:
                    err = ctypes.get_errno()
                    raise OSError(err, f"mincore: {os.strerror(err)}")
                out = np.frombuffer(vec, dtype=np.uint8) & 1
            finally:
                del view
        finally:
            mapping.close()
    return out.astype(bool)


def resident_bytes(path: str | os.PathLike[str]) -> int:
    """Bytes of the file in the page cache (whole pages)."""
    return int(resident_pages(path).sum()) * PAGE_SIZE


def drop_file(path: str | os.PathLike[str]) -> None:
    """Writes the file back and drops it from the page cache (pages mapped elsewhere stay)."""
    drop_page_cache(path)
