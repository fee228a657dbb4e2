"""Chat templates compiled and rendered in worker processes, with a time, size and memory limit.

A chat template is code that came with a model file or from an operator: it can loop for minutes
(nested ``range`` loops), write megabytes, or make Jinja allocate gigabytes while compiling (Jinja
folds constant expressions such as ``'x' | center(10**9)`` at compile time). Rendering it in the
serving process would stall every other request meanwhile (the GIL) and could not be stopped. So
templates are compiled and rendered in small worker processes (``python -m
cluster.engine.template_render``, jinja2's immutable sandbox, the helpers templates use), spoken to
over their stdin/stdout with msgpack frames:

* a render (or compile) that does not answer within ``RENDER_TIME_LIMIT_S`` is ended: the worker
  is killed, the caller gets ``TemplateLimitError``, and the next render starts a fresh worker;
* a rendering longer than ``RENDER_MAX_CHARS`` characters is stopped as it is written;
* a worker's address space is capped (``WORKER_MEMORY_HEADROOM`` above what it has at start), so a
  template that allocates a huge string gets a ``MemoryError`` there, reported as the limit.

``render_pool()`` is the process's pool: up to ``POOL_SIZE`` workers, started when first needed (a
worker starts in about 0.1 s), so one slow template holds one worker, not the others. Errors come
back typed: the template raised (``raise_exception``), it failed (sandbox, undefined values, its own
code) or it hit a limit.
"""

from __future__ import annotations

import atexit
import json
import os
import queue
import resource
import select
import struct
import subprocess
import sys
import threading
import time
from datetime import datetime
from typing import Any

import msgpack

RENDER_TIME_LIMIT_S = 2.0
RENDER_MAX_CHARS = 4 << 20
WORKER_MEMORY_HEADROOM = 1 << 30
POOL_SIZE = 4
_FRAME = struct.Struct("<I")
_MAX_TEMPLATES_KEPT = 8  # compiled templates a worker keeps (a deployment uses one or two)


class TemplateRaised(Exception):
    """The template called ``raise_exception(message)``."""


class RenderFailure(Exception):
    """A worker's answer that is not a text. ``kind``: ``syntax`` (it does not compile: the line and
    the parser's message), ``raised`` (the template refused the conversation), ``failed`` (it broke:
    its message names how) or ``limit`` (time, size or memory)."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind, self.message = kind, message


# -- the worker side ------------------------------------------------------------------------------


def sandbox():
    """The Jinja environment templates render in: immutable sandbox, the helpers chat templates
    use, and no constant folding of ``*`` and ``**`` (so ``'x' * 10**10`` is not built while compiling)."""
    import jinja2
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class Sandbox(ImmutableSandboxedEnvironment):
        intercepted_binops = frozenset({"*", "**"})

        def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
            if operator == "*" and isinstance(left, (str, list, tuple)) and isinstance(right, int) \
                    and len(left) * right > RENDER_MAX_CHARS:
                raise RenderFailure("limit", f"the template repeats a value of {len(left)} items {right} times")
            if operator == "**" and isinstance(right, int) and abs(right) > 4096:
                raise RenderFailure("limit", f"the template raises a number to the power {right}")
            return super().call_binop(context, operator, left, right)

    env = Sandbox(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols], undefined=jinja2.Undefined,
                  autoescape=False)
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    env.filters["tojson"] = _tojson
    return env


def _raise_exception(message: str) -> None:
    raise TemplateRaised(message)


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None,
            separators: tuple[str, str] | None = None, sort_keys: bool = False) -> str:
    """JSON as templates expect it (Jinja's own ``tojson`` escapes HTML characters)."""
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _answer(env: Any, compiled: dict[str, Any], request: dict[str, Any]) -> dict[str, Any]:
    import jinja2

    source = request["source"]
    try:
        template = compiled.get(source)
        if template is None:
            template = env.from_string(source)
            if len(compiled) >= _MAX_TEMPLATES_KEPT:
                compiled.pop(next(iter(compiled)))
            compiled[source] = template
        if request["op"] == "compile":
            return {"text": ""}
        parts, size = [], 0
        for part in template.generate(**request["variables"]):
            size += len(part)
            if size > request["max_chars"]:
                return {"kind": "limit", "message": f"the rendering is longer than {request['max_chars']} characters"}
            parts.append(part)
        return {"text": "".join(parts)}
    except jinja2.TemplateSyntaxError as exc:
        return {"kind": "syntax", "message": f"line {exc.lineno}: {exc.message}"}
    except TemplateRaised as exc:
        return {"kind": "raised", "message": str(exc)}
    except RenderFailure as exc:
        return {"kind": exc.kind, "message": exc.message}
    except MemoryError:
        return {"kind": "limit", "message": "the template needs more memory than a rendering may use"}
    except RecursionError:
        return {"kind": "limit", "message": "the template recurses too deeply"}
    except Exception as exc:  # undefined values, sandbox violations, and whatever a template's code raises
        return {"kind": "failed", "message": f"{type(exc).__name__}: {exc}"}


def main() -> None:
    """The worker: answers frames from stdin on stdout until stdin closes."""
    vm = _vm_bytes()
    if vm:
        resource.setrlimit(resource.RLIMIT_AS, (vm + WORKER_MEMORY_HEADROOM, resource.RLIM_INFINITY))
    env, compiled = sandbox(), {}
    stdin, stdout = sys.stdin.buffer, sys.stdout.buffer
    while True:
        header = stdin.read(_FRAME.size)
        if len(header) < _FRAME.size:
            return
        request = msgpack.unpackb(stdin.read(_FRAME.unpack(header)[0]))
        reply = msgpack.packb(_answer(env, compiled, request))
        stdout.write(_FRAME.pack(len(reply)) + reply)
        stdout.flush()


def _vm_bytes() -> int:
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmSize:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


# -- the caller's side ----------------------------------------------------------------------------


class _Worker:
    def __init__(self) -> None:
        env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}
        self.process = subprocess.Popen([sys.executable, "-m", "cluster.engine.template_render"],
                                        stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env)

    def ask(self, request: dict[str, Any], deadline: float) -> dict[str, Any]:
        """The worker's reply, or ``RenderFailure("limit")`` at the deadline (the worker is then
        killed: the caller must drop it)."""
        payload = msgpack.packb(request)
        assert self.process.stdin is not None and self.process.stdout is not None
        try:
            self.process.stdin.write(_FRAME.pack(len(payload)) + payload)
            self.process.stdin.flush()
        except BrokenPipeError:
            raise RenderFailure("limit", "the template's worker process ended") from None
        header = self._read(_FRAME.size, deadline)
        return msgpack.unpackb(self._read(_FRAME.unpack(header)[0], deadline))

    def _read(self, n: int, deadline: float) -> bytes:
        fd = self.process.stdout.fileno()
        chunks, got = [], 0
        while got < n:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not select.select([fd], [], [], remaining)[0]:
                self.kill()
                raise RenderFailure("limit", f"the template took longer than {RENDER_TIME_LIMIT_S:g} s to render")
            chunk = os.read(fd, n - got)
            if not chunk:
                self.kill()
                raise RenderFailure("limit", "the template's worker process ended while rendering (out of memory?)")
            chunks.append(chunk)
            got += len(chunk)
        return b"".join(chunks)

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait()
        for pipe in (self.process.stdin, self.process.stdout):
            if pipe is not None:
                try:
                    pipe.close()
                except OSError:
                    pass


class RenderPool:
    """Up to ``size`` template workers of this process (started on demand, replaced when killed)."""

    def __init__(self, size: int = POOL_SIZE, time_limit_s: float = RENDER_TIME_LIMIT_S,
                 max_chars: int = RENDER_MAX_CHARS) -> None:
        self.size, self.time_limit_s, self.max_chars = size, time_limit_s, max_chars
        self._idle: queue.LifoQueue[_Worker] = queue.LifoQueue()
        self._started = 0
        self._lock = threading.Lock()
        self._all: set[_Worker] = set()

    def compile(self, source: str) -> None:
        """Raises ``RenderFailure`` (kind ``syntax`` with the line, ``failed`` or ``limit``)."""
        self._ask({"op": "compile", "source": source})

    def render(self, source: str, variables: dict[str, Any]) -> str:
        """``source`` rendered with ``variables`` (msgpack-able values). Raises ``RenderFailure``."""
        return self._ask({"op": "render", "source": source, "variables": variables, "max_chars": self.max_chars})

    def _ask(self, request: dict[str, Any]) -> str:
        worker = self._take()
        deadline = time.monotonic() + self.time_limit_s
        try:
            reply = worker.ask(request, deadline)
        except RenderFailure:
            self._drop(worker)
            raise
        except BaseException:
            self._drop(worker)
            worker.kill()
            raise
        self._idle.put(worker)
        if "text" in reply:
            return reply["text"]
        raise RenderFailure(reply["kind"], reply["message"])

    def _take(self) -> _Worker:
        try:
            return self._idle.get_nowait()
        except queue.Empty:
            pass
        with self._lock:
            start = self._started < self.size
            if start:
                self._started += 1
        if not start:
            return self._idle.get()
        worker = _Worker()
        with self._lock:
            self._all.add(worker)
        return worker

    def _drop(self, worker: _Worker) -> None:
        with self._lock:
            self._started -= 1
            self._all.discard(worker)

    def close(self) -> None:
        with self._lock:
            workers, self._all = list(self._all), set()
        for worker in workers:
            worker.kill()


_POOLS: dict[int, RenderPool] = {}  # by process id: a forked child starts its own
_POOLS_LOCK = threading.Lock()


def render_pool() -> RenderPool:
    """This process's pool of template workers (closed when the process exits)."""
    with _POOLS_LOCK:
        pool = _POOLS.get(os.getpid())
        if pool is None:
            pool = _POOLS[os.getpid()] = RenderPool()
            atexit.register(pool.close)
        return pool


if __name__ == "__main__":
    main()
