"""The first check of a model path, made before llama.cpp (or ggml's GGUF reader) sees the file.

``check_model_file`` reads the fixed GGUF header with Python alone: the path names a readable
regular file, long enough to hold the header, that starts with the GGUF magic and a version
llama.cpp reads. Every entry point that takes a model goes through it: the command line checks
``--model`` with it before any start-up work (``cluster.cli.main``), and ``cache.discover_layout``,
which the engine, a node and ``deploy`` open every model with, calls it first. What it cannot
see (a header cut short past these bytes, an inconsistent one) is left to the native reader,
whose log ``discover_layout`` keeps off the terminal.

Importing this module loads neither Ray nor llama.cpp.
"""

from __future__ import annotations

import os
import stat
import struct

from cluster.errors import ModelFileError

GGUF_MAGIC = b"GGUF"
GGUF_VERSIONS = (2, 3)
"""The GGUF versions llama.cpp reads."""
GGUF_HEADER = struct.Struct("<4sIQQ")
"""magic, version, tensor count, key-value count: the fixed start of every GGUF file."""


def check_model_file(path: str | os.PathLike[str]) -> None:
    """Refuses ``path`` unless it can be a GGUF model: one line naming the path and what was expected.

    Raises:
        ModelFileError: missing, not a regular file, unreadable, shorter than the GGUF header,
            not starting with the GGUF magic, or a GGUF version llama.cpp does not read.
    """
    path = os.fspath(path)
    try:
        info = os.stat(path)
    except FileNotFoundError:
        raise ModelFileError(f"model file not found: '{path}'") from None
    except OSError as exc:
        raise ModelFileError(f"cannot read the model file '{path}': {_reason(exc)}") from None
    if not stat.S_ISREG(info.st_mode):
        raise ModelFileError(f"model path is not a regular file: '{path}'")
    try:
        with open(path, "rb") as f:
            head = f.read(GGUF_HEADER.size)
    except OSError as exc:
        raise ModelFileError(f"cannot read the model file '{path}': {_reason(exc)}") from None
    if len(head) < GGUF_HEADER.size:
        raise ModelFileError(f"not a valid GGUF file: '{path}' ({len(head)} bytes; a GGUF model starts with a "
                             f"{GGUF_HEADER.size}-byte header)")
    magic, version, _, _ = GGUF_HEADER.unpack(head)
    if magic != GGUF_MAGIC:
        raise ModelFileError(f"not a valid GGUF file: '{path}' (it starts with {magic!r}, expected {GGUF_MAGIC!r})")
    if version not in GGUF_VERSIONS:
        raise ModelFileError(f"not a valid GGUF file: '{path}' (GGUF version {version}; llama.cpp reads versions "
                             f"{' and '.join(map(str, GGUF_VERSIONS))})")


def _reason(exc: OSError) -> str:
    return (exc.strerror or type(exc).__name__).lower()
