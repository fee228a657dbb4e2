"""The local cluster's life: a daemon killed under it, interrupted start-ups, nothing to connect to.

Every command runs as a user would run it (``python -m cluster ...`` in a subprocess) against a
state file of its own (``SNIPER_LOCAL_CLUSTER_FILE``), and must answer in one line, quickly.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from polling import wait_until

from cluster.distributed import local_cluster


def _env(state: Path) -> dict[str, str]:
    return {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "SNIPER_LOCAL_CLUSTER_FILE": str(state),
            "RAY_ADDRESS": ""}


def _cli(state: Path, *args: str, timeout_s: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cluster", *args], env=_env(state), capture_output=True, text=True,
                          timeout=timeout_s)


def _daemons(state: Path) -> list[int]:
    """Local-cluster daemons started for this state file."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        if b"cluster.distributed.local_cluster" in cmdline and str(state).encode() in cmdline:
            pids.append(int(entry.name))
    return pids


def _start_daemon(state: Path, n_nodes: int) -> tuple[subprocess.Popen, str]:
    """A local-cluster daemon of ``n_nodes`` one-CPU nodes (no dashboard), and its address once up."""
    daemon = subprocess.Popen([sys.executable, "-m", "cluster.distributed.local_cluster", str(n_nodes), str(state), "1", "0"],
                              env=_env(state), start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while not state.exists():
        if daemon.poll() is not None or time.monotonic() > deadline:
            if daemon.poll() is None:
                os.killpg(daemon.pid, signal.SIGKILL)
            raise AssertionError("the local cluster did not start")
        time.sleep(0.2)
    return daemon, json.loads(state.read_text())["address"]


def _wait_gone(state: Path, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while _daemons(state) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not _daemons(state), "the local-cluster daemon is still running"


def test_a_daemon_killed_with_sigkill_leaves_a_state_the_next_command_cleans(tmp_path: Path) -> None:
    state = tmp_path / "cluster.json"
    daemon, address = _start_daemon(state, 1)
    try:
        os.killpg(daemon.pid, signal.SIGKILL)  # the daemon and what it started
        daemon.wait(timeout=30)
        deadline = time.monotonic() + 60
        while local_cluster.answers(address) and time.monotonic() < deadline:
            time.sleep(0.5)
        assert state.exists(), "the state file a killed daemon leaves behind"

        started = time.monotonic()
        done = _cli(state, "generate", "hello", timeout_s=60)
        assert done.returncode == 2 and time.monotonic() - started < 30
        lines = done.stderr.strip().splitlines()
        assert lines[0].startswith("removed the state of a local Ray cluster that is gone") and len(lines) == 2, lines
        assert lines[1].startswith("error: no Ray cluster") and not state.exists()

        done = _cli(state, "shutdown", "--stop-local", timeout_s=60)  # the documented way out, on a clean state now
        assert done.returncode == 0 and "Traceback" not in done.stderr
    finally:
        if daemon.poll() is None:
            os.killpg(daemon.pid, signal.SIGKILL)


def test_an_address_nobody_listens_at_is_one_line_not_a_hang(tmp_path: Path) -> None:
    state = tmp_path / "cluster.json"
    for args in (["generate", "hi", "--address", "127.0.0.1:1"], ["status", "--address", "127.0.0.1:1"],
                 ["status"], ["generate", "hi"]):
        started = time.monotonic()
        done = _cli(state, *args, timeout_s=60)
        assert done.returncode == 2 and time.monotonic() - started < 30, (args, done.stderr[-500:])
        assert done.stderr.strip().count("\n") == 0 and done.stderr.startswith("error: no Ray cluster"), done.stderr


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_a_start_up_interrupted_by_a_signal_removes_what_it_started(tmp_path: Path, tiny_model: Path, sig: int) -> None:
    state = tmp_path / "cluster.json"
    before = set(_all_raylets())  # Ray nodes of other clusters (none in a plain run)
    serve = subprocess.Popen([sys.executable, "-c", _WITH_DEFAULT_SIGNALS, "-m", "cluster", "serve", "--model", str(tiny_model),
                              "--local-nodes", "3", "--threads", "1"], env=_env(state), stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    wait_until(lambda: _daemons(state), 60, "serve --local-nodes starting its daemon", interval_s=0.05)
    serve.send_signal(sig)  # the daemon has just started: its three Ray nodes take seconds more, the deployment longer
    _, err = serve.communicate(timeout=120)
    assert serve.returncode in (130, 143, 2, -sig), err[-1000:]
    _wait_gone(state)
    assert not state.exists()
    wait_until(lambda: not set(_all_raylets()) - before, 60, "the Ray nodes it started ending")


def test_a_local_cluster_this_machine_cannot_hold_is_refused_before_anything_starts() -> None:
    with pytest.raises(ValueError, match="1 to 32 nodes"):
        local_cluster.check_nodes(100)
    with pytest.raises(ValueError, match="MiB available"):
        local_cluster.check_nodes(2, node_bytes=1 << 50)
    local_cluster.check_nodes(3)


def _raylets(daemon_pid: int) -> dict[int, bool]:
    """The raylets the daemon started: pid -> whether it is the head's."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except (OSError, IndexError, ValueError):
            continue
        if parent == daemon_pid and argv[0].endswith(b"/raylet"):
            found[int(entry.name)] = b"--head" in argv
    return found


# Runs the command after it with SIGINT and SIGTERM at their defaults and unblocked, as a user's
# shell starts a command: the test process may hand its children SIGINT ignored or blocked, and
# serve then never saw the signal, finished its start-up and exited 0. (An exec, not preexec_fn,
# which is unsafe in a process with threads.)
_WITH_DEFAULT_SIGNALS = ("import os, signal, sys; "
                         "[signal.signal(s, signal.SIG_DFL) for s in (signal.SIGINT, signal.SIGTERM)]; "
                         "signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT, signal.SIGTERM}); "
                         "os.execv(sys.executable, [sys.executable, *sys.argv[1:]])")


def _all_raylets() -> list[int]:
    """Every raylet running on this machine (whoever started it), by pid."""
    found = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and (entry / "cmdline").read_bytes().split(b"\0")[0].endswith(b"/raylet") \
                    and _running(int(entry.name)):
                found.append(int(entry.name))
        except OSError:
            continue
    return found


def _running(pid: int) -> bool:
    """Whether process ``pid`` exists and is not a zombie."""
    try:
        return (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def _live_nodes(address: str) -> int:
    probe = "import ray, sys; ray.init(address=sys.argv[1], logging_level='ERROR'); " \
            "print('live nodes:', sum(1 for n in ray.nodes() if n['Alive']))"
    done = subprocess.run([sys.executable, "-c", probe, address], env=_env(Path("/nonexistent")), capture_output=True,
                          text=True, timeout=120)
    return int(next(line for line in done.stdout.splitlines() if line.startswith("live nodes:")).split(":")[1])


def test_a_dead_worker_node_is_replaced_and_a_dead_head_ends_the_cluster_cleanly(tmp_path: Path) -> None:
    state = tmp_path / "cluster.json"
    daemon, address = _start_daemon(state, 2)
    try:
        raylets = _raylets(daemon.pid)
        workers = [pid for pid, head in raylets.items() if not head]
        assert len(raylets) == 2 and len(workers) == 1, raylets

        os.kill(workers[0], signal.SIGKILL)  # a worker node dies (its raylet: the node's life)
        deadline = time.monotonic() + 60
        while json.loads(state.read_text()).get("replaced", 0) < 1:
            assert time.monotonic() < deadline, "the daemon did not replace the dead worker node"
            time.sleep(0.5)
        now = _raylets(daemon.pid)
        assert len(now) == 2 and workers[0] not in now, now
        assert local_cluster.state(announce=False, state_file=str(state)).replaced == 1
        deadline = time.monotonic() + 90
        while (alive := _live_nodes(address)) != 2:  # Ray marks the dead one, counts the new one
            assert time.monotonic() < deadline, f"{alive} live Ray nodes, expected 2"
            time.sleep(2)

        head = next(pid for pid, is_head in now.items() if is_head)
        os.kill(head, signal.SIGKILL)  # a head cannot be replaced: everything goes, the state file too
        daemon.wait(timeout=90)
        assert not state.exists() and not _raylets(daemon.pid)
        assert local_cluster.state(announce=False, state_file=str(state)) is None
    finally:
        if daemon.poll() is None:
            os.killpg(daemon.pid, signal.SIGKILL)


@pytest.mark.parametrize("flags, needle", [
    (["--slots", "100000"], "--slots: n_slots must be an integer in [1, 256], got 100000"),
    (["--slots", "300", "--nodes", "1"], "--slots: n_slots must be an integer in [1, 256], got 300"),
    (["--threads", "5000"], "--threads: n_threads must be an integer in [1, 1024], got 5000"),
    (["--policy", "fastest"], "--policy: unknown policy 'fastest'"),
    (["--nodes", "2"], "--nodes 2: a local cluster of --local-nodes 1 holds at most 1"),
])
def test_serve_refuses_an_out_of_bounds_setting_before_starting_anything(
        tmp_path: Path, tiny_model: Path, flags: list[str], needle: str) -> None:
    state = tmp_path / "cluster.json"
    started = time.monotonic()
    done = _cli(state, "serve", "--model", str(tiny_model), "--local-nodes", "1", *flags, timeout_s=30)
    assert done.returncode == 2 and time.monotonic() - started < 10, done.stderr[-500:]
    assert done.stderr.count("\n") == 1 and done.stderr.startswith(f"error: {needle}"), done.stderr
    assert not state.exists() and not _daemons(state)  # no local Ray cluster was started (nor removed)
