"""Session fixtures: seeded synthetic models (cluster.models.synth) and bad-file helpers."""

from __future__ import annotations

import os

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

import shutil
import struct
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # tests/observer.py, tests/pagecache.py

from cluster.models import synth
from cluster.engine.cache import discover_layout


def _write_model(directory: Path, name: str, config: synth.SynthConfig) -> Path:
    path = directory / name
    synth.synthesize(path, config, progress=False)
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)  # clean pages: POSIX_FADV_DONTNEED cannot drop dirty ones
    finally:
        os.close(fd)
    return path


@pytest.fixture(scope="session")
def models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("models")


@pytest.fixture(scope="session")
def tiny_model(models_dir: Path) -> Path:
    """The `tiny` preset (llama, 4 layers, 32 experts, top-4), seed 0."""
    return _write_model(models_dir, "tiny.gguf", synth.PRESETS["tiny"])


@pytest.fixture(scope="session")
def demo_model(models_dir: Path) -> Path:
    """The `demo` preset (llama, 8 layers, 32 experts, top-4, ~150 MB), seed 0."""
    return _write_model(models_dir, "demo.gguf", synth.PRESETS["demo"])


@pytest.fixture(scope="session")
def bench_model(models_dir: Path) -> Path:
    """The `bench` preset (qwen3moe, 12 layers, 128 experts, top-8, ~1.8 GB), seed 0."""
    return _write_model(models_dir, "bench.gguf", synth.PRESETS["bench"])


@pytest.fixture(scope="session")
def large_model(models_dir: Path) -> Path:
    """The `large` preset (Qwen3-30B-A3B's expert shapes in Q4_K, 9 layers, ~3.1 GB), seed 0."""
    return _write_model(models_dir, "large.gguf", synth.PRESETS["large"])


@pytest.fixture(scope="session")
def tiny_layout(tiny_model: Path):
    return discover_layout(str(tiny_model))


@pytest.fixture(scope="session")
def tiny_topics(tiny_model: Path) -> list[list[str]]:
    return synth.read_topics(tiny_model)


@pytest.fixture(scope="session")
def qwen_model(models_dir: Path) -> Path:
    """The tiny shape with architecture qwen3moe."""
    return _write_model(models_dir, "tiny-qwen3moe.gguf", synth.config_from_args("tiny", arch="qwen3moe"))


@pytest.fixture(scope="session")
def dense_model(models_dir: Path) -> Path:
    """The tiny shape without experts (dense llama)."""
    return _write_model(models_dir, "tiny-dense.gguf", synth.config_from_args("tiny", experts=0))


@pytest.fixture(scope="session")
def merged_model(models_dir: Path) -> Path:
    """The tiny shape with one merged ffn_gate_up_exps tensor per layer (discovery only)."""
    return _write_model(models_dir, "tiny-merged.gguf", synth.config_from_args("tiny", merged_gate_up=True))


@pytest.fixture(scope="session")
def chatml_model(models_dir: Path) -> Path:
    """The tiny shape with a ChatML template and its control tokens (a synthetic chat model)."""
    return _write_model(models_dir, "tiny-chatml.gguf", synth.config_from_args("tiny", chat_template="chatml"))


@pytest.fixture(scope="session")
def kimi_model(models_dir: Path) -> Path:
    """The tiny shape with a Kimi K2-style template whose call markers are control tokens."""
    return _write_model(models_dir, "tiny-kimi-k2.gguf", synth.config_from_args("tiny", chat_template="kimi_k2"))


@pytest.fixture(scope="session")
def harmony_model(models_dir: Path) -> Path:
    """The tiny shape with a gpt-oss harmony-style template and its control tokens."""
    return _write_model(models_dir, "tiny-harmony.gguf", synth.config_from_args("tiny", chat_template="harmony"))


@pytest.fixture(scope="session")
def llama3_model(models_dir: Path) -> Path:
    """The tiny shape with a Llama-3-style header template (its BOS is <|begin_of_text|>)."""
    return _write_model(models_dir, "tiny-llama3.gguf", synth.config_from_args("tiny", chat_template="llama3"))


@pytest.fixture()
def private_tiny_model(tiny_model: Path, tmp_path: Path) -> Path:
    """A copy of the tiny model (its own inode and page cache) that no other test maps."""
    path = tmp_path / "private-tiny.gguf"
    shutil.copyfile(tiny_model, path)
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    return path


@pytest.fixture(scope="session")
def bad_model_files(tiny_model: Path, models_dir: Path) -> dict[str, Path]:
    """Files that are not loadable models, by kind: truncated, header_only, random, bad_magic, empty, and
    headers that would make llama.cpp abort or allocate absurdly: nan_epsilon, huge_block_count,
    huge_expert_count."""
    return {
        "nan_epsilon": patched_copy(tiny_model, models_dir / "nan-epsilon.gguf",
                                    "llama.attention.layer_norm_rms_epsilon", "<f", float("nan")),
        "huge_block_count": patched_copy(tiny_model, models_dir / "huge-blocks.gguf", "llama.block_count", "<I", 0x7F7F7F7F),
        "huge_expert_count": patched_copy(tiny_model, models_dir / "huge-experts.gguf", "llama.expert_count", "<I",
                                          0x7F7F7F7F),
        "truncated": truncated_copy(tiny_model, models_dir / "truncated.gguf", 0.6),
        "header_only": truncated_copy(tiny_model, models_dir / "header-only.gguf", 0.001),
        "random": corrupt_file(models_dir / "random.gguf", "random"),
        "bad_magic": corrupt_file(models_dir / "bad-magic.gguf", "bad_magic", tiny_model),
        "empty": corrupt_file(models_dir / "empty.gguf", "empty"),
    }


def patched_copy(src: Path, dst: Path, key: str, fmt: str, value: float | int) -> Path:
    """A copy of `src` whose scalar metadata value `key` is `value` (packed with struct `fmt`): the
    value follows the key's bytes and its 4-byte type in the GGUF header."""
    data = bytearray(Path(src).read_bytes())
    at = data.find(key.encode()) + len(key) + 4
    assert at > len(key) + 4, f"{key} not in {src}"
    data[at:at + struct.calcsize(fmt)] = struct.pack(fmt, value)
    Path(dst).write_bytes(bytes(data))
    return Path(dst)


def truncated_copy(src: Path, dst: Path, keep_fraction: float = 0.6) -> Path:
    """Copies the first `keep_fraction` of `src` to `dst` (header intact, tensor data cut)."""
    data = Path(src).read_bytes()
    Path(dst).write_bytes(data[: int(len(data) * keep_fraction)])
    return Path(dst)


def corrupt_file(dst: Path, kind: str = "random", src: Path | None = None) -> Path:
    """Writes a file that is not a GGUF model.

    kind: "random" (1 MiB of seeded random bytes), "bad_magic" (a copy of `src` whose first four
    bytes are not "GGUF"), "empty" (zero bytes).
    """
    dst = Path(dst)
    if kind == "random":
        dst.write_bytes(np.random.default_rng(1234).integers(0, 256, size=1 << 20, dtype=np.uint8).tobytes())
    elif kind == "bad_magic":
        assert src is not None
        data = bytearray(Path(src).read_bytes())
        data[:4] = b"FUGG"
        dst.write_bytes(bytes(data))
    elif kind == "empty":
        dst.write_bytes(b"")
    else:
        raise ValueError(f"unknown corruption kind {kind!r}")
    return dst
