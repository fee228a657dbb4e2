"""Defects of concurrent code found in review, each pinned by a test that would have caught it:
an actor lookup that blocked the caller's event loop, errors told apart by their text, and a
shutdown that found only the first 256 node names. (The node's heartbeat cases are in
tests/test_node.py.)"""

from __future__ import annotations

import asyncio
import os
import threading

import pytest

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

import ray  # noqa: E402

from cluster.distributed import deploy  # noqa: E402
from cluster.distributed.dispatch import Deployment, unwrap  # noqa: E402
from cluster.errors import NoNodesError, OverloadedError, SniperError  # noqa: E402
from cluster.distributed.protocol import ROUTER_NAME, node_name  # noqa: E402


def test_looking_an_actor_up_does_not_block_the_callers_event_loop(monkeypatch: pytest.MonkeyPatch) -> None:
    ticked = threading.Event()

    def slow_lookup(name: str, namespace: str | None = None) -> str:
        # a round trip to a busy GCS, answered only once the caller's event loop has run meanwhile:
        # a lookup made on that loop would hold it, so the wait would end at its timeout
        assert ticked.wait(timeout=30), "the caller's event loop did not run while the lookup waited"
        return f"handle of {name}"

    monkeypatch.setattr(ray, "get_actor", slow_lookup)

    async def scenario() -> tuple[str, int]:
        ticks = 0

        async def ticker() -> None:
            nonlocal ticks
            while True:
                await asyncio.sleep(0.01)
                ticks += 1
                if ticks == 20:
                    ticked.set()

        task = asyncio.create_task(ticker())
        handle = await Deployment(namespace="t").router()
        task.cancel()
        return handle, ticks

    handle, ticks = asyncio.run(scenario())
    assert handle == f"handle of {ROUTER_NAME}"
    assert ticks >= 20, f"the event loop ran only {ticks} times during the lookup"


class _Wrapped(Exception):
    """What Ray raises in a caller for an actor's exception: the original is its ``cause``."""

    def __init__(self, cause: BaseException) -> None:
        super().__init__(f"ray.exceptions.RayTaskError(OverloadedError): {cause}")
        self.cause = cause


def test_errors_are_told_apart_by_their_type_never_by_their_text() -> None:
    misleading = NoNodesError("OverloadedError: every node is full (a message that names another error)")
    assert type(unwrap(_Wrapped(misleading))) is NoNodesError
    overloaded = OverloadedError("no room")
    assert unwrap(_Wrapped(overloaded)) is overloaded
    not_ours = _Wrapped(RuntimeError("SniperError in the text only"))
    assert unwrap(not_ours) is not_ours and not isinstance(unwrap(not_ours), SniperError)


def test_shutdown_finds_every_node_of_its_namespace_however_many(monkeypatch: pytest.MonkeyPatch) -> None:
    listed = ([{"name": node_name(i), "namespace": "mine"} for i in (0, 1, 255, 256, 300, 1000)]
              + [{"name": ROUTER_NAME, "namespace": "mine"}, {"name": node_name(2), "namespace": "other"}])
    monkeypatch.setattr(ray.util, "list_named_actors", lambda all_namespaces=False: listed)
    assert deploy.deployment_actors("mine") == [ROUTER_NAME] + [node_name(i) for i in (0, 1, 255, 256, 300, 1000)]
