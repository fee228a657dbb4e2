"""The quick-start job: a local 3-node Ray cluster serving the generated demo model.

Generates the default ``demo`` MoE model on first use, starts Ray nodes on loopback, deploys
one node actor per Ray node (each with the native expert cache at a budget well below the
model's expert bytes) and the warmth-aware router, sends a mixed-topic batch of multi-turn
conversations concurrently, and prints where each request went, the status table (load, hit
rate, warmth per node) and where each topic's requests landed. Everything it started is
stopped at the end unless ``keep`` is set.
"""

from __future__ import annotations

import sys
import time
from collections import Counter, defaultdict
from concurrent.futures import ThreadPoolExecutor

from cluster import connection, deploy, local_cluster, synth
from cluster.cache import check_budget, discover_layout
from cluster.node_memory import MIB
from cluster.status_table import status_table
from cluster.synth import default_model


def run_demo(model: str | None = None, cache_mb: int | None = None, n_requests: int = 12, n_nodes: int = 3,
             policy: str = "warmth", keep: bool = False) -> int:
    path = str(model or default_model("demo").resolve())
    layout = discover_layout(path)
    footprint = int(layout.unit_bytes.sum())
    budget = cache_mb * MIB if cache_mb else int(0.4 * footprint)
    check_budget(layout, budget)  # before a local cluster starts for nothing
    try:
        topics = synth.read_topics(path)
    except ValueError:
        topics = [["mixture", "of", "experts"]]
    n_topics = min(len(topics), n_nodes)
    print(f"model {path}: {layout.arch}, {layout.n_layers} layers x {layout.n_experts} experts "
          f"(top-{layout.n_experts_used}), experts {footprint / MIB:.0f} MiB; cache budget per node {budget / MIB:.0f} MiB")

    t0 = time.perf_counter()
    address = local_cluster.start(n_nodes, dashboard_port=local_cluster.DASHBOARD_PORT if keep else 0)
    try:
        connection.connect(address)
        deploy.deploy(path, n_nodes, cache_bytes=budget, policy=policy, n_threads=1)
        print(f"local Ray cluster of {n_nodes} nodes at {address}, node actors and router ready in "
              f"{time.perf_counter() - t0:.1f} s (policy {policy})\n")
        from cluster.client import Client

        client = Client.connect(address)
        # Conversations: one per topic, turns sent in rounds; each round's turns run concurrently.
        turns = max(1, n_requests // n_topics)
        history = {t: "" for t in range(n_topics)}
        where: dict[int, Counter[str]] = defaultdict(Counter)
        with ThreadPoolExecutor(max_workers=n_topics) as pool:
            for turn in range(turns):
                prompts = {t: history[t] + synth.topic_prompt(topics, t, 16, seed=100 * turn + t) for t in range(n_topics)}
                futures = {t: pool.submit(client.generate, prompts[t], max_tokens=24, session_id=f"conversation-{t}")
                           for t in range(n_topics)}
                for t, future in futures.items():
                    done = future.result()
                    history[t] = prompts[t] + done.text
                    where[t][done.node] += 1
                    cache = done.cache
                    print(f"turn {turn} topic {t} -> {done.node}: {done.text.strip()[:48]!r} "
                          f"({done.usage['completion_tokens']} tokens, {done.usage['reused_prompt_tokens']} prompt "
                          f"tokens reused, decode hit rate {100 * cache.get('decode_hit_rate', float('nan')):.0f} %)")
        print()
        print(status_table(client.status()))
        print("\nwhere each topic's requests went:")
        for t in range(n_topics):
            print(f"  topic {t}: " + ", ".join(f"{node} x{n}" for node, n in sorted(where[t].items())))
        return 0
    finally:
        if not keep:
            deploy.shutdown()
            local_cluster.stop()
        print(f"\ndone in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
