"""An independent observer of llama.cpp's MoE routing, written without the project's native code.

It loads a model with llama-cpp-python's low-level wrappers, installs a Python
``cb_eval`` that answers "yes" only to the ``ffn_moe_topk-<il>`` nodes and, in the
``ask=false`` call (after the node was computed), reads the I32 ids of the view through its
``nb[0]``/``nb[1]`` strides. The token flow is the engine's (``cluster/engine/moe_engine.py``): tokenize
with BOS, decode the prompt in ``n_batch`` chunks (``n_ubatch == n_batch``; logits only for the
prompt's last token, the one a token is sampled after), greedy-sample,
feed every generated token back except the last. The counts it returns are therefore what the
engine's cache must have seen, computed by separate code.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import llama_cpp
import numpy as np
from llama_cpp import _internals

# Constants of ggml.h (checked against the installed header by `check_ggml_header`).
GGML_MAX_DIMS = 4
GGML_MAX_SRC = 10
GGML_MAX_OP_PARAMS = 64
GGML_MAX_NAME = 64
GGML_TYPE_I32 = 26
GGML_OBJECT_SIZE = 32  # sizeof(struct ggml_object): offs, size, next, type, padding[4]

TOPK_PREFIX = b"ffn_moe_topk-"
HEADER = Path(llama_cpp.__file__).resolve().parent.parent / "include" / "ggml.h"


class GgmlTensor(ctypes.Structure):
    """ctypes mirror of ``struct ggml_tensor`` (ggml.h)."""

    _fields_ = [
        ("type", ctypes.c_int),
        ("buffer", ctypes.c_void_p),
        ("ne", ctypes.c_int64 * GGML_MAX_DIMS),
        ("nb", ctypes.c_size_t * GGML_MAX_DIMS),
        ("op", ctypes.c_int),
        ("op_params", ctypes.c_int32 * (GGML_MAX_OP_PARAMS // 4)),
        ("flags", ctypes.c_int32),
        ("src", ctypes.c_void_p * GGML_MAX_SRC),
        ("view_src", ctypes.c_void_p),
        ("view_offs", ctypes.c_size_t),
        ("data", ctypes.c_void_p),
        ("name", ctypes.c_char * GGML_MAX_NAME),
        ("extra", ctypes.c_void_p),
        ("padding", ctypes.c_char * 8),
    ]


def check_ggml_header() -> None:
    """Asserts that the mirror matches the installed ggml: header constants and struct size."""
    text = HEADER.read_text()
    for name, value in (("GGML_MAX_DIMS", GGML_MAX_DIMS), ("GGML_MAX_SRC", GGML_MAX_SRC),
                        ("GGML_MAX_OP_PARAMS", GGML_MAX_OP_PARAMS), ("GGML_MAX_NAME", GGML_MAX_NAME)):
        found = re.search(rf"#\s*define\s+{name}\s+(\d+)", text)
        assert found is not None and int(found.group(1)) == value, f"{name} in {HEADER} is not {value}"
    assert llama_cpp.GGML_TYPE_I32 == GGML_TYPE_I32
    lib = ctypes.CDLL(str(Path(llama_cpp.__file__).resolve().parent / "lib" / "libggml-base.so"))
    lib.ggml_tensor_overhead.restype = ctypes.c_size_t
    overhead = lib.ggml_tensor_overhead()
    assert ctypes.sizeof(GgmlTensor) == overhead - GGML_OBJECT_SIZE, (
        f"sizeof(GgmlTensor)={ctypes.sizeof(GgmlTensor)} but ggml_tensor_overhead()={overhead}")


@dataclass(frozen=True)
class Observation:
    """What the observer saw for one request.

    Attributes:
        text: generated text (bytes of the pieces decoded as UTF-8 with replacement).
        tokens: generated token ids.
        counts: selections per (layer, expert) over every evaluated token, int64 [L, E].
        n_events: top-k nodes read (one per layer per ubatch with at least one row).
        max_rows: the largest number of tokens one top-k node held.
        saw_strided_view: a top-k node whose nb[1] was not ne[0] * nb[0] (not contiguous).
    """

    text: str
    tokens: tuple[int, ...]
    counts: np.ndarray
    n_events: int
    max_rows: int
    saw_strided_view: bool


@contextlib.contextmanager
def llama_context(model_path: str | os.PathLike[str], on_eval, *, n_ctx: int, n_batch: int,
                  n_threads: int) -> Iterator[tuple[Any, Any, Any]]:
    """llama.cpp's model (mmap, CPU), a context whose graph evaluation calls ``on_eval(tensor address, ask,
    user data)`` as the engine's callback is called, and a batch of ``n_batch`` tokens, closed after."""
    callback = llama_cpp.ggml_backend_sched_eval_callback(on_eval)  # kept alive while the context is
    llama_cpp.llama_backend_init()
    mparams = llama_cpp.llama_model_default_params()
    mparams.n_gpu_layers = 0
    mparams.load_mode = llama_cpp.LLAMA_LOAD_MODE_MMAP
    mparams.lazy_mode = 0
    mparams.use_extra_bufts = False
    model = _internals.LlamaModel(path_model=os.fspath(model_path), params=mparams, verbose=False)
    try:
        cparams = llama_cpp.llama_context_default_params()
        cparams.n_ctx = n_ctx
        cparams.n_batch = n_batch
        cparams.n_ubatch = n_batch
        cparams.n_threads = n_threads
        cparams.n_threads_batch = n_threads
        cparams.no_perf = True
        cparams.cb_eval = callback
        cparams.cb_eval_user_data = None
        ctx = _internals.LlamaContext(model=model, params=cparams, verbose=False)
        batch = _internals.LlamaBatch(n_tokens=n_batch, embd=0, n_seq_max=1, verbose=False)
        try:
            yield model, ctx, batch
        finally:
            batch.close()
            ctx.close()
    finally:
        model.close()


def observe(model_path: str | os.PathLike[str], prompt: str, *, max_tokens: int, n_layers: int, n_experts: int,
            n_ctx: int, n_batch: int, n_threads: int) -> Observation:
    """Runs greedy generation exactly as the engine does and counts every top-k selection."""
    check_ggml_header()
    counts = np.zeros((n_layers, n_experts), dtype=np.int64)
    state = {"events": 0, "max_rows": 0, "strided": False, "errors": []}

    def on_eval(t_addr: int, ask: bool, user_data: int) -> bool:
        t = ctypes.cast(t_addr, ctypes.POINTER(GgmlTensor)).contents
        name = t.name
        if not name.startswith(TOPK_PREFIX):
            return not ask
        if ask:
            return True
        try:
            layer = int(name[len(TOPK_PREFIX):])
            if t.type != GGML_TYPE_I32:
                raise AssertionError(f"{name!r} has type {t.type}, expected I32")
            k, n_tokens = int(t.ne[0]), int(t.ne[1])
            nb0, nb1 = int(t.nb[0]), int(t.nb[1])
            if n_tokens <= 0 or k <= 0:
                return True
            raw = ctypes.string_at(t.data, (n_tokens - 1) * nb1 + (k - 1) * nb0 + 4)
            ids = np.ndarray((n_tokens, k), dtype=np.int32, buffer=raw, offset=0, strides=(nb1, nb0))
            np.add.at(counts[layer], ids.ravel(), 1)
            state["events"] += 1
            state["max_rows"] = max(state["max_rows"], n_tokens)
            if nb1 != k * nb0:
                state["strided"] = True
        except Exception as exc:  # noqa: BLE001  (nothing may escape a C callback; re-raised after decode)
            state["errors"].append(repr(exc))
        return True

    with llama_context(model_path, on_eval, n_ctx=n_ctx, n_batch=n_batch, n_threads=n_threads) as (model, ctx, batch):
        sampler = _internals.LlamaSampler()
        sampler.add_greedy()
        try:
            vocab = model.vocab
            tokens = model.tokenize(prompt.encode("utf-8"), add_bos=bool(model.add_bos_token()), special=False)

            def decode(chunk_tokens: list[int], n_past: int) -> None:
                for start in range(0, len(chunk_tokens), n_batch):
                    chunk = chunk_tokens[start:start + n_batch]
                    batch.set_batch(chunk, n_past=n_past + start, logits_all=False)
                    batch.batch.logits[len(chunk) - 1] = start + len(chunk) == len(chunk_tokens)  # sampled after it
                    rc = llama_cpp.llama_decode(ctx.ctx, batch.batch)
                    assert rc == 0, f"llama_decode returned {rc}"
                    assert not state["errors"], state["errors"]

            decode(tokens, 0)
            n_past = len(tokens)
            generated: list[int] = []
            pieces = b""
            while len(generated) < max_tokens:
                token = llama_cpp.llama_sampler_sample(sampler.sampler, ctx.ctx, -1)
                if llama_cpp.llama_vocab_is_eog(vocab, token):
                    break
                generated.append(token)
                buf = ctypes.create_string_buffer(256)
                n = llama_cpp.llama_token_to_piece(vocab, token, buf, 256, 0, False)
                assert n >= 0
                pieces += buf.raw[:n]
                if len(generated) == max_tokens or n_past >= n_ctx:
                    break
                decode([token], n_past)
                n_past += 1
        finally:
            sampler.close()
    return Observation(text=pieces.decode("utf-8", errors="replace"), tokens=tuple(generated), counts=counts,
                       n_events=state["events"], max_rows=state["max_rows"], saw_strided_view=state["strided"])
