"""llama.cpp's own ``llama-server``, the anchor the serving and batching benchmarks compare against.

``scripts/build-llama-server.sh`` builds it from the llama.cpp sources in the pinned
llama-cpp-python distribution, into the virtual environment's ``bin``.
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Sequence

import requests

from cluster.bench import free_port

N_CTX = 1024  # tokens of each slot's context


def find_llama_server(path: str | None) -> str | None:
    """``path``, else ``llama-server`` next to this Python (where the build script puts it), else on PATH."""
    if path:
        return path
    beside = Path(sys.executable).parent / "llama-server"
    return str(beside) if beside.is_file() else shutil.which("llama-server")


# A model larger than the memory llama-server may use: by default it repacks its Q4_K/Q8_0 weights into private
# (anonymous) buffers at load, which no memory limit below the model survives (`bench scale` measures the default
# being OOM-killed); with this flag the weights stay in the file mapping, as a user must run it there.
NO_REPACK = ("--no-repack",)


class LlamaServer:
    """llama.cpp's ``llama-server`` on 127.0.0.1 (``n_slots`` parallel slots of ``n_ctx`` each; in a
    memory cgroup when ``limit`` is given), stopped on exit."""

    def __init__(self, binary: str, model: str, n_threads: int, n_slots: int = 1, n_ctx: int = N_CTX,
                 limit: Any = None, extra_args: Sequence[str] = ()) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._cmd = [binary, "-m", model, "--host", "127.0.0.1", "--port", str(self.port), "-t", str(n_threads),
                     "-tb", str(n_threads), "-c", str(n_ctx * n_slots), "-np", str(n_slots), "--no-webui", *extra_args]
        self._limit = limit
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def __enter__(self) -> "LlamaServer":
        self._log = tempfile.TemporaryFile()  # a pipe nobody reads would fill and stop the server
        self._proc = subprocess.Popen(self._cmd, stdout=subprocess.DEVNULL, stderr=self._log,
                                      preexec_fn=self._limit.enter if self._limit is not None else None)
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                self._log.seek(0)
                raise RuntimeError(f"llama-server exited ({self._proc.returncode}): "
                                   f"{self._log.read().decode(errors='replace')[-2000:]}")
            try:
                if requests.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return self
            except requests.ConnectionError:
                pass
            time.sleep(0.2)
        self.__exit__()
        raise RuntimeError("llama-server did not answer /health within 600 s")

    def __exit__(self, *exc: object) -> None:
        if self._proc is not None and self._proc.poll() is None:
            self._proc.send_signal(signal.SIGTERM)
            try:
                self._proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()

    def stream(self, prompt: str, n_tokens: int) -> int:
        body = {"prompt": prompt, "n_predict": n_tokens, "temperature": 0.0, "stream": True, "ignore_eos": True}
        n = 0
        with requests.post(f"{self.url}/completion", json=body, stream=True, timeout=600) as response:
            response.raise_for_status()
            for line in response.iter_lines():
                if line.startswith(b"data: "):
                    event = json.loads(line[6:])
                    n = event.get("tokens_predicted", n) if event.get("stop") else n + (1 if event.get("content") else 0)
        return n
