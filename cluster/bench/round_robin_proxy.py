"""A round-robin HTTP proxy: the deployment users build without this project, in front of several ``llama-server``.

``bench scale`` puts it before one ``llama-server`` per node: each request goes to the next backend in turn, its
body and headers forwarded unchanged, its answer streamed back as it comes (server-sent events included). It runs
on 127.0.0.1 in a thread of its own (aiohttp on its own event loop), started and stopped as a context manager.
"""

from __future__ import annotations

import asyncio
import itertools
import threading
from typing import Sequence

import aiohttp
from aiohttp import web

from cluster.bench import free_port

HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "content-length", "host", "upgrade"}


class RoundRobinProxy:
    """Forwards every request to ``backends`` (base URLs) in turn; ``url`` is where it listens."""

    def __init__(self, backends: Sequence[str]) -> None:
        if not backends:
            raise ValueError("a round-robin proxy needs at least one backend")
        self.backends = list(backends)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.forwarded = [0] * len(self.backends)  # requests sent to each backend
        self._next = itertools.cycle(range(len(self.backends)))
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._started = threading.Event()
        self._stop: asyncio.Event | None = None
        self._error: BaseException | None = None

    async def _forward(self, request: web.Request) -> web.StreamResponse:
        index = next(self._next)
        self.forwarded[index] += 1
        headers = {k: v for k, v in request.headers.items() if k.lower() not in HOP_BY_HOP}
        body = await request.read()
        assert self._session is not None
        async with self._session.request(request.method, self.backends[index] + request.path_qs, data=body,
                                         headers=headers) as upstream:
            response = web.StreamResponse(status=upstream.status, headers={
                k: v for k, v in upstream.headers.items() if k.lower() not in HOP_BY_HOP})
            await response.prepare(request)
            try:
                async for chunk in upstream.content.iter_any():
                    await response.write(chunk)
                await response.write_eof()
            except ConnectionResetError:  # the client went away (aiohttp's reset error is one): so does the upstream
                pass
            return response

    async def _serve(self) -> None:
        # no time-out: a first token under memory pressure may take minutes, as a user's proxy would allow
        # a connection per request: llama-server closes idle keep-alive connections, and a pooled one it closed
        # fails the next request's body write (loopback connections cost nothing)
        self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=None, sock_read=None),
                                              connector=aiohttp.TCPConnector(force_close=True))
        app = web.Application(client_max_size=64 << 20)
        app.router.add_route("*", "/{tail:.*}", self._forward)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", self.port).start()
        self._stop = asyncio.Event()
        self._started.set()
        try:
            await self._stop.wait()
        finally:
            await runner.cleanup()
            await self._session.close()

    def _run(self) -> None:
        self._loop = asyncio.new_event_loop()
        try:
            self._loop.run_until_complete(self._serve())
        except BaseException as exc:  # reported by __enter__
            self._error = exc
            self._started.set()
        finally:
            self._loop.close()

    def __enter__(self) -> "RoundRobinProxy":
        self._session: aiohttp.ClientSession | None = None
        self._thread = threading.Thread(target=self._run, name="round-robin-proxy", daemon=True)
        self._thread.start()
        self._started.wait(30)
        if self._error is not None or self._stop is None:
            raise RuntimeError(f"the round-robin proxy did not start: {self._error!r}")
        return self

    def __exit__(self, *exc: object) -> None:
        if self._loop is not None and self._stop is not None and self._thread is not None and self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._stop.set)
            self._thread.join(30)
