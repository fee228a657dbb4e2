"""A local multi-node Ray cluster on loopback that outlives the command that started it.

``ray start --address`` cannot add a node on 127.0.0.1 while RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0
(and with it set to 1 Ray swaps 127.0.0.1 for the machine's outward address), so local
clusters use ``ray.cluster_utils.Cluster`` inside a small daemon process:
``python -m cluster.distributed.local_cluster N STATE.json [CPUS [DASHBOARD_PORT [OWNER_PID]]]`` starts N
nodes (the head with Ray's dashboard and job server on 127.0.0.1:DASHBOARD_PORT, for
``ray job submit``; 0: none), writes ``{"address", "dashboard", "pid", "n_nodes"}`` to STATE.json
and keeps them up until it receives SIGTERM or SIGINT, or its head stops answering.

It also keeps the count: a worker node whose raylet died (killed, OOM) is removed and a new one
added in its place, so the actors Ray restarts (a deployment's node actors, whose placement
group then finds a node again) come back by themselves; the state file counts the nodes
``replaced`` (and ``not_replaced``, when a new node could not start). A head whose GCS server or
raylet died cannot be replaced: the daemon then shuts every node down and removes the state
file, so that the next command starts afresh.

Start-up either finishes or removes what it started: a signal while nodes are being added, or
the death of OWNER_PID (the command waiting for it) before the state file is written, shuts the
nodes started so far down. ``start``, ``stop`` and ``state`` are the other side, used by the CLI:
a state file whose daemon is gone or whose head does not answer is stale, and the next command
removes it and says so in one line.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass

from cluster.errors import InvalidParameterError, SniperError

STATE_FILE = os.environ.get("SNIPER_LOCAL_CLUSTER_FILE") or os.path.join(os.environ.get("TMPDIR", "/tmp"),
                                                                          "sniper-local-cluster.json")
DASHBOARD_PORT = 8265
MAX_NODES = 32  # Ray nodes on one machine (each is a raylet and workers: ~130 MiB before any model)
NODE_OVERHEAD_BYTES = 160 << 20  # what one more local Ray node costs in memory, measured ~130 MiB
HEALTH_INTERVAL_S = 2.0  # how often a running daemon checks that its head answers


def loopback_env() -> dict[str, str]:
    env = dict(os.environ)
    env["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"  # keep Ray on 127.0.0.1 (DESIGN.md)
    return env


def answers(address: str, timeout_s: float = 2.0) -> bool:
    """Whether something accepts TCP connections at ``host:port`` (a Ray GCS address)."""
    host, _, port = address.rpartition(":")
    try:
        with socket.create_connection((host or "127.0.0.1", int(port)), timeout=timeout_s):
            return True
    except (OSError, ValueError):
        return False


def _daemon_alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return b"cluster.distributed.local_cluster" in f.read()
    except OSError:
        return False


@dataclass(frozen=True)
class LocalCluster:
    """A running local cluster, as its state file describes it."""

    address: str
    pid: int
    n_nodes: int
    dashboard: str | None
    replaced: int = 0  # worker nodes the daemon replaced after their raylet died


def state(announce: bool = True, state_file: str | None = None) -> LocalCluster | None:
    """The local cluster that is running, or None. A stale state file (daemon gone, or its head not
    answering) is removed, with one line on stderr when ``announce``."""
    state_file = state_file or STATE_FILE
    try:
        with open(state_file) as f:
            data = json.load(f)
        cluster = LocalCluster(str(data["address"]), int(data["pid"]), int(data.get("n_nodes", 0)), data.get("dashboard"),
                               int(data.get("replaced", 0)))
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError):
        why = "it cannot be read"
    else:
        if not _daemon_alive(cluster.pid):
            why = f"its daemon (pid {cluster.pid}) is not running"
        elif not answers(cluster.address):
            why = f"its head at {cluster.address} does not answer"
        else:
            return cluster
    try:
        os.unlink(state_file)
    except FileNotFoundError:
        pass
    if announce:
        print(f"removed the state of a local Ray cluster that is gone ({state_file}: {why})", file=sys.stderr)
    return None


def check_nodes(n_nodes: int, node_bytes: int = 0) -> None:
    """Refuses a local cluster this machine cannot hold: more than MAX_NODES nodes, or more memory
    than is available at NODE_OVERHEAD_BYTES + ``node_bytes`` (what each node's actor will hold) a node."""
    from cluster.engine.node_memory import mem_available_bytes

    if not isinstance(n_nodes, int) or not 1 <= n_nodes <= MAX_NODES:
        raise InvalidParameterError(f"a local cluster has 1 to {MAX_NODES} nodes, got {n_nodes!r}")
    need = n_nodes * (NODE_OVERHEAD_BYTES + node_bytes)
    available = mem_available_bytes()
    if need > available:
        raise InvalidParameterError(f"{n_nodes} local nodes need about {need >> 20} MiB "
                                    f"({(NODE_OVERHEAD_BYTES + node_bytes) >> 20} MiB each) but this machine has "
                                    f"{available >> 20} MiB available")


def start(n_nodes: int, cpus_per_node: int = 2, timeout_s: float = 180.0, dashboard_port: int = DASHBOARD_PORT,
          node_bytes: int = 0, state_file: str | None = None) -> str:
    """Starts N Ray nodes on loopback in a daemon; returns the address once they are up.

    Interrupted (SIGINT, SIGTERM) or failing, it stops the daemon, which shuts down whatever it
    had started, before it raises. ``state_file`` (default ``STATE_FILE``) is where the cluster
    is recorded: another file runs a second cluster next to the user's (benchmarks).
    """
    state_file = state_file or STATE_FILE
    check_nodes(n_nodes, node_bytes)
    running = state(state_file=state_file)
    if running is not None:
        raise SniperError(f"a local cluster is already running ({running.n_nodes} nodes at {running.address}, "
                          f"daemon pid {running.pid}); stop it with: python -m cluster shutdown --stop-local")
    proc = subprocess.Popen([sys.executable, "-m", "cluster.distributed.local_cluster", str(n_nodes), state_file,
                             str(cpus_per_node), str(dashboard_port), str(os.getpid())], env=loopback_env(),
                            start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    previous = signal.signal(signal.SIGTERM, _raise_interrupt) if threading.current_thread() is threading.main_thread() \
        else None
    try:
        deadline = time.monotonic() + timeout_s
        while not os.path.exists(state_file):
            if proc.poll() is not None:
                raise SniperError(f"the local Ray cluster failed to start: {proc.stderr.read()[-400:]}")
            if time.monotonic() > deadline:
                raise SniperError(f"the local Ray cluster did not start within {timeout_s:.0f} s")
            time.sleep(0.2)
        with open(state_file) as f:
            return json.load(f)["address"]
    except BaseException:
        _stop_daemon(proc.pid, timeout_s=60.0)
        raise
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _raise_interrupt(*_: object) -> None:
    raise KeyboardInterrupt


def _stop_daemon(pid: int, timeout_s: float) -> None:
    """SIGTERM, then SIGKILL of its whole session (the Ray processes it started) if it lingers."""
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + timeout_s
    while _daemon_alive(pid) and time.monotonic() < deadline:
        time.sleep(0.2)
    if _daemon_alive(pid):
        try:
            os.killpg(pid, signal.SIGKILL)  # the daemon leads its own session (start_new_session)
        except ProcessLookupError:
            pass
    try:  # reap it if it is our child
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass


def stop(timeout_s: float = 60.0, state_file: str | None = None) -> bool:
    """Stops the running local cluster; False if none was running (a stale state is cleaned)."""
    state_file = state_file or STATE_FILE
    running = state(state_file=state_file)
    if running is None:
        return False
    _stop_daemon(running.pid, timeout_s)
    try:
        os.unlink(state_file)
    except FileNotFoundError:
        pass
    return True


# -- the daemon ----------------------------------------------------------------------------------

def _dead(node: object) -> bool:
    """Whether a Ray node of this daemon lost a process it cannot run without (GCS server, raylet)."""
    from ray._private import ray_constants

    vital = (ray_constants.PROCESS_TYPE_GCS_SERVER, ray_constants.PROCESS_TYPE_RAYLET)
    return any(kind in vital for kind, _ in node.dead_processes())  # type: ignore[attr-defined]


def _write_state(path: str, record: dict[str, object]) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(record, f)
    os.replace(tmp, path)


def main(argv: list[str]) -> int:
    n_nodes, state_path = int(argv[0]), argv[1]
    cpus = int(argv[2]) if len(argv) > 2 else 2
    dashboard_port = int(argv[3]) if len(argv) > 3 else 0
    owner = int(argv[4]) if len(argv) > 4 else 0
    stop_event = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):  # first: a signal during start-up must stop it cleanly
        signal.signal(sig, lambda *_: stop_event.set())

    def abandoned() -> bool:  # the command waiting for the cluster went away before it was up
        if stop_event.is_set():
            return True
        if owner:
            try:
                os.kill(owner, 0)
            except ProcessLookupError:
                return True
        return False

    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    # workers (the gateway's proxy and replica, the router, the nodes) at the daemon's niceness, not
    # Ray's 15 more: the nodes take theirs back (node.take_back_priority) and the HTTP path would wait
    os.environ.setdefault("RAY_worker_niceness", "0")
    # job entrypoints (`ray job submit -- python ...`) run with the interpreter this cluster runs
    os.environ["PATH"] = os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", "")
    from ray.cluster_utils import Cluster

    head: dict[str, object] = {"num_cpus": cpus, "node_ip_address": "127.0.0.1", "include_dashboard": bool(dashboard_port)}
    if dashboard_port:
        head.update(dashboard_host="127.0.0.1", dashboard_port=dashboard_port)
    cluster = Cluster(initialize_head=True, head_node_args=head)
    written = False
    try:
        for _ in range(n_nodes - 1):
            if abandoned():
                return 1
            cluster.add_node(num_cpus=cpus, node_ip_address="127.0.0.1")
        cluster.wait_for_nodes()
        if abandoned():
            return 1
        record = {"address": cluster.address, "pid": os.getpid(), "n_nodes": n_nodes,
                  "dashboard": f"http://127.0.0.1:{dashboard_port}" if dashboard_port else None, "replaced": 0}
        _write_state(state_path, record)
        written = True
        while not stop_event.wait(HEALTH_INTERVAL_S):
            if not answers(cluster.address) or _dead(cluster.head_node):  # nothing left to keep up
                break
            for node in [n for n in cluster.worker_nodes if _dead(n)]:
                try:
                    cluster.remove_node(node, allow_graceful=False)
                except Exception:  # noqa: BLE001  (a process that outlived SIGKILL: the node is gone for Ray anyway)
                    cluster.worker_nodes.discard(node)
                try:
                    cluster.add_node(num_cpus=cpus, node_ip_address="127.0.0.1")
                    record["replaced"] += 1
                except Exception:  # noqa: BLE001  (no room for another node: the cluster goes on with fewer)
                    record["not_replaced"] = int(record.get("not_replaced", 0)) + 1
                _write_state(state_path, record)
        return 0
    finally:
        cluster.shutdown()
        for path in (state_path + ".tmp",) + ((state_path,) if written else ()):
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
