"""`ray job submit --working-dir . -- python -m cluster ...` against a running local cluster.

The cluster is the one `serve --local-nodes` starts (``cluster.distributed.local_cluster``, with Ray's
dashboard and job server on loopback); every command of the README runs as a Ray job.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cluster.bench import free_port

REPO = Path(__file__).resolve().parent.parent
RAY = str(Path(sys.executable).parent / "ray")


@pytest.fixture(scope="module")
def job_server(tmp_path_factory):
    state = tmp_path_factory.mktemp("jobs") / "cluster.json"
    port = free_port()
    env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
    proc = subprocess.Popen([sys.executable, "-m", "cluster.distributed.local_cluster", "2", str(state), "2", str(port)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 180
        while not state.exists():
            assert proc.poll() is None, proc.stderr.read()[-2000:]
            assert time.monotonic() < deadline, "the local cluster did not start"
            time.sleep(0.2)
        info = json.loads(state.read_text())
        assert info["dashboard"] == f"http://127.0.0.1:{port}"
        yield info["dashboard"]
    finally:
        proc.terminate()
        proc.wait(timeout=120)


def submit(dashboard: str, *args: str, runtime_env: str | None = None) -> tuple[int, str]:
    """Runs `ray job submit --working-dir <repo> -- python -m cluster ARGS` (or with ``--runtime-env FILE``
    from the repo root); returns (status, job output)."""
    env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
    upload = ["--runtime-env", runtime_env] if runtime_env else ["--working-dir", str(REPO)]
    cmd = [RAY, "job", "submit", "--address", dashboard, *upload, "--", "python", "-m", "cluster", *args]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=REPO)
    return done.returncode, done.stdout + done.stderr


def _json_line(output: str) -> dict:
    lines = [line for line in output.splitlines() if line.startswith("{")]
    assert lines, output[-3000:]
    return json.loads(lines[-1])


def test_serve_generate_status_shutdown_as_ray_jobs(job_server, tiny_model):
    rc, out = submit(job_server, "serve", "--model", str(tiny_model), "--nodes", "2", "--cache-mb", "4", "--threads", "1",
                     "--namespace", "jobs", "--json")
    assert rc == 0, out[-3000:]
    served = _json_line(out)
    nodes = sorted(n["node"] for n in served["nodes"])
    assert nodes == ["sniper-node-0", "sniper-node-1"] and served["policy"] == "warmth"

    rc, out = submit(job_server, "generate", "the experts of a mixture", "--max-tokens", "6", "--namespace", "jobs",
                     "--json")
    assert rc == 0, out[-3000:]
    done = _json_line(out)
    assert done["usage"]["completion_tokens"] == 6 and done["node"] in nodes

    rc, out = submit(job_server, "generate", "the experts of a mixture", "--max-tokens", "6", "--stream",
                     "--namespace", "jobs")
    assert rc == 0 and done["text"].strip() in out, out[-3000:]  # same greedy text, streamed

    rc, out = submit(job_server, "status", "--namespace", "jobs", "--json", runtime_env="ray_configs/runtime_env.yaml")
    assert rc == 0, out[-3000:]
    status = _json_line(out)
    assert sum(n["served"] for n in status["nodes"]) == 2 and all(n["alive"] for n in status["nodes"])

    rc, out = submit(job_server, "shutdown", "--namespace", "jobs", "--json")
    assert rc == 0 and set(_json_line(out)["removed"]) >= {"sniper-router", "sniper-node-0", "sniper-node-1"}, out[-3000:]


def test_a_failing_job_reports_the_clear_error(job_server):
    rc, out = submit(job_server, "serve", "--model", "/nonexistent/model.gguf", "--nodes", "1", "--namespace", "jobs-bad")
    assert rc != 0 and "model file not found: '/nonexistent/model.gguf'" in out
