"""Starting and stopping a deployment on a Ray cluster: local clusters, node actors, the router.

``deploy`` places one node actor per Ray node (a STRICT_SPREAD
placement group: two never share a node) and the router on the head node; all are named and detached, so
they keep serving after the command that created them returns, and restartable: a node or
router process that dies is started again (a node comes back cold, with a new ``started_at``,
and the router counts it in ``restarts``). ``shutdown`` removes them.
"""

from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass
from typing import Any

from cluster.distributed.node import NodeActor, NodeConfig
from cluster.distributed.protocol import NAMESPACE, ROUTER_NAME, NodeReady, node_name
from cluster.distributed.status import jsonable
from cluster.engine.expert_selection import EXACT_SELECTION, ExpertSelection
from cluster.engine.model_file import check_model_file
from cluster.engine.node_memory import AUTO
from cluster.errors import InvalidParameterError, SniperError

PLACEMENT_GROUP = "sniper-nodes"
HEAD_NODE_RESOURCE = "node:__internal_head__"  # Ray's resource of the head node alone
NODE_MAX_RESTARTS = -1  # a node process that dies (OOM kill, crash) is started again, in its own bundle
NODE_READY_TIMEOUT_S = 1800.0  # a node's start-up: a 17 GB model read from a slow disk takes minutes (issue 22)


def whole_model_budget(model_path: str) -> int:
    """An expert-cache budget that holds every expert of the model: the budget when none is given."""
    from cluster.engine.cache import discover_layout

    return int(discover_layout(model_path).unit_bytes.sum())


def cache_budget(model_path: str, cache_mb: int | str | None) -> int | str:
    """The expert-cache budget per node: ``cache_mb`` MiB in bytes, ``"auto"`` (each node derives
    it from its memory, ``cluster.engine.node_memory``), or the whole model's when None."""
    if cache_mb == AUTO:
        return AUTO
    return cache_mb << 20 if cache_mb else whole_model_budget(model_path)


def check_model(model_path: str, cache_bytes: int | str | None, chat_template: str | None = None) -> None:
    """What ``deploy`` checks before it starts anything: the file is a readable MoE GGUF
    (ModelFileError: missing, corrupt, truncated, dense), the budget can work for it
    (CacheBudgetError; an ``"auto"`` budget is derived and checked on each node) and an
    overriding chat template compiles (ChatTemplateError)."""
    from cluster.engine.cache import check_budget, discover_layout
    from cluster.engine.chat import ChatTemplate

    layout = discover_layout(model_path)
    if cache_bytes is not None and cache_bytes != AUTO:
        check_budget(layout, cache_bytes)
    if chat_template is not None:
        ChatTemplate.create(chat_template, "override")


def check_deployment(model_path: str, *, cache_bytes: int | str | None, policy: str = "warmth", n_ctx: int = 2048,
                     n_slots: int = 4, max_queue: int = 8, memory_limit_bytes: int | None = None,
                     n_threads: int | None = None, chat_template: str | None = None,
                     expert_selection: ExpertSelection = EXACT_SELECTION) -> NodeConfig:
    """Everything ``deploy`` checks without Ray, before anything starts: the policy's name, the
    nodes' settings (``NodeConfig.validate``: the node's bounds and its engine's, the expert
    selection's among them) and the model (``check_model``). Returns the nodes' config (its
    ``memory_share`` is set by ``deploy``).

    Raises:
        InvalidParameterError, ModelFileError, CacheBudgetError, ChatTemplateError: naming the bad input.
    """
    from cluster.routing import POLICY_NAMES

    if policy not in POLICY_NAMES:
        raise InvalidParameterError(f"unknown policy {policy!r}; expected one of {', '.join(POLICY_NAMES)}",
                                    param="policy")
    check_model_file(model_path)
    config = NodeConfig.create(os.path.abspath(model_path), cache_bytes=cache_bytes, n_ctx=n_ctx, n_slots=n_slots,
                               max_queue=max_queue, memory_limit_bytes=memory_limit_bytes, n_threads=n_threads,
                               expert_selection=expert_selection)
    config.validate()
    check_model(model_path, cache_bytes, chat_template)
    return config


def read_chat_template(path: str | None) -> str | None:
    """The text of a ``--chat-template FILE`` (None: none given); a missing or empty file is an error."""
    if path is None:
        return None
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except OSError as exc:
        raise InvalidParameterError(f"--chat-template: cannot read '{path}': {exc.strerror}", param="chat_template") from None
    if not text.strip():
        raise InvalidParameterError(f"--chat-template: '{path}' is empty", param="chat_template")
    return text


@dataclass(frozen=True)
class Deployed:
    """What ``deploy`` started: the router's name, every node as it answered ``ready``, the policy,
    the nodes' config and where the chat template comes from (``model`` or ``override``)."""

    router: str
    nodes: tuple[NodeReady, ...]
    policy: str
    config: NodeConfig
    chat_template: str

    def as_json(self) -> dict[str, Any]:
        return jsonable(asdict(self))


def deploy(model_path: str, n_nodes: int, *, cache_bytes: int | str | None, policy: str = "warmth",
           namespace: str = NAMESPACE, n_ctx: int = 2048, n_slots: int = 4, max_queue: int = 8,
           memory_limit_bytes: int | None = None, n_threads: int | None = None,
           node_model_paths: list[str] | None = None, chat_template: str | None = None,
           expert_selection: ExpertSelection = EXACT_SELECTION,
           timeout_s: float = 300.0, ready_timeout_s: float = NODE_READY_TIMEOUT_S) -> Deployed:
    """Creates the router and ``n_nodes`` node actors (one per Ray node) and waits until they serve.

    ``node_model_paths`` gives each node its own copy of the model (identical bytes): simulated
    nodes on one machine then have separate page caches, as separate machines would.
    ``chat_template`` (Jinja text) replaces the model's own for chat requests (rendered where they
    enter: ``cluster.distributed.edge``). ``expert_selection``: every node's (exact, the default, or
    cache-aware within bounds: ``cluster.engine.expert_selection``). ``timeout_s`` bounds the
    waits for the router and the nodes' placement, ``ready_timeout_s`` the nodes' start-up (model
    load; a node that fails says so at once, this only bounds one that is still loading).
    """
    import ray
    from ray.util.placement_group import placement_group
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    from cluster.distributed.router import RouterActor

    config = check_deployment(model_path, cache_bytes=cache_bytes, policy=policy, n_ctx=n_ctx, n_slots=n_slots,
                              max_queue=max_queue, memory_limit_bytes=memory_limit_bytes, n_threads=n_threads,
                              chat_template=chat_template, expert_selection=expert_selection)
    if node_model_paths is not None:
        if len(node_model_paths) != n_nodes:
            raise InvalidParameterError(f"node_model_paths must name {n_nodes} files, got {node_model_paths!r}")
        for path in node_model_paths:
            check_model_file(path)
    model_path = config.engine.model_path
    alive = [n for n in ray.nodes() if n.get("Alive")]
    if n_nodes < 1 or n_nodes > len(alive):
        raise InvalidParameterError(f"--nodes {n_nodes}: the Ray cluster has {len(alive)} live nodes "
                                    f"(one node actor per Ray node)")
    try:
        ray.get_actor(ROUTER_NAME, namespace=namespace)
        raise SniperError(f"a deployment already runs in namespace '{namespace}' (use shutdown first)")
    except ValueError:
        pass
    # an "auto" budget on a machine that several node actors share (a local cluster): each plans
    # for its part of the machine's memory
    hosts = {n.get("NodeManagerAddress") for n in alive}
    config = config.with_engine(memory_share=1.0 / n_nodes if len(hosts) == 1 else 1.0)
    try:
        router = ray.remote(RouterActor).options(  # on the head: it outlives any worker node
            name=ROUTER_NAME, namespace=namespace, lifetime="detached", max_restarts=-1, max_concurrency=1000,
            num_cpus=0, resources={HEAD_NODE_RESOURCE: 0.001}).remote(model_path, policy, namespace, chat_template,
                                                                    n_ctx=config.engine.n_ctx)
        ray.get(router.ping.remote(), timeout=timeout_s)
        pg = placement_group([{"CPU": 1}] * n_nodes, strategy="STRICT_SPREAD", name=f"{PLACEMENT_GROUP}-{namespace}",
                             lifetime="detached")
        ray.get(pg.ready(), timeout=timeout_s)
        handles = []
        for i in range(n_nodes):
            node_config = (config if node_model_paths is None
                           else config.with_engine(model_path=os.path.abspath(node_model_paths[i])))
            handles.append(ray.remote(NodeActor).options(
                name=node_name(i), namespace=namespace, lifetime="detached", max_restarts=NODE_MAX_RESTARTS,
                max_concurrency=max_queue + 4, num_cpus=1,
                scheduling_strategy=PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=i),
            ).remote(node_name(i), node_config, namespace))
        ready = ray.get([h.ready.remote() for h in handles], timeout=ready_timeout_s)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:  # the router knows a node once its first report arrived
            if len(ray.get(router.status.remote()).live_nodes()) >= n_nodes:
                break
            time.sleep(0.2)
    except BaseException as exc:  # nothing is left half-deployed
        shutdown(namespace)
        if isinstance(exc, ray.exceptions.RayError):
            raise SniperError(f"the deployment in namespace '{namespace}' did not start: {_cause(exc)}") from None
        raise
    return Deployed(router=ROUTER_NAME, nodes=tuple(ready), policy=policy, config=config,
                    chat_template="override" if chat_template is not None else "model")


def _cause(exc: BaseException) -> str:
    """The line of a Ray error that says what went wrong (an actor's constructor raising, a timeout)."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    named = [line for line in lines if line.split(":", 1)[0].endswith(("Error", "Exception"))]
    return (named or lines or [type(exc).__name__])[-1][:400]


APP_NAME = "sniper"  # the HTTP gateway's Serve application of the default namespace (``app_name``)


def app_name(namespace: str) -> str:
    return APP_NAME if namespace == NAMESPACE else f"{APP_NAME}-{namespace}"


def stop_http(namespace: str = NAMESPACE) -> bool:
    """Removes the gateway of ``namespace`` (and Serve, if nothing else runs on it); False if absent."""
    import ray
    from ray import serve

    try:
        ray.get_actor("SERVE_CONTROLLER_ACTOR", namespace="serve")
    except ValueError:
        return False
    name = app_name(namespace)
    apps = serve.status().applications
    if name not in apps:
        return False
    if set(apps) == {name}:
        serve.shutdown()
    else:
        serve.delete(name)
    return True


def deployment_actors(namespace: str) -> list[str]:
    """The router's and the node actors' names that live in ``namespace`` (asked of Ray, router first)."""
    import ray

    names = {a["name"] for a in ray.util.list_named_actors(all_namespaces=True) if a.get("namespace") == namespace}
    nodes = sorted((n for n in names if n.startswith(node_name(0)[:-1])), key=lambda n: int(n.rsplit("-", 1)[1]))
    return ([ROUTER_NAME] if ROUTER_NAME in names else []) + nodes


def shutdown(namespace: str = NAMESPACE) -> list[str]:
    """Removes the HTTP gateway, the router and every node actor of the namespace; returns what was removed."""
    import ray
    from ray.util.placement_group import get_placement_group, remove_placement_group

    removed = [f"serve application '{app_name(namespace)}'"] if stop_http(namespace) else []
    for name in deployment_actors(namespace):
        try:
            handle = ray.get_actor(name, namespace=namespace)
        except ValueError:
            continue
        ray.kill(handle, no_restart=True)
        removed.append(name)
    try:
        remove_placement_group(get_placement_group(f"{PLACEMENT_GROUP}-{namespace}"))
    except Exception:
        pass
    return removed
