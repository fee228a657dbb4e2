"""The quick-start job: a local 3-node Ray cluster serving the generated demo model.

Generates the default ``demo`` MoE model on first use, starts Ray nodes on loopback, deploys
one node actor per Ray node (each with the native expert cache at a budget well below the
model's expert bytes, decoding up to 4 sequences together) and the warmth-aware router, sends
two multi-turn conversations per topic concurrently, and prints where each request went, the
status table (load, batch size, experts per step, hit rate, warmth per node) and where each
topic's requests landed. Everything it started is
stopped at the end unless ``keep`` is set.
"""

from __future__ import annotations

import sys
import time
from collections import Counter, defaultdict
from concurrent.futures import ThreadPoolExecutor

from cluster.distributed import connection
from cluster.distributed import deploy
from cluster.distributed import local_cluster
from cluster.models import synth
from cluster.engine.cache import check_budget, discover_layout
from cluster.engine.node_memory import MIB
from cluster.cli.status_table import status_table
from cluster.models.synth import default_model


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
        from cluster.distributed.client import Client

        client = Client.connect(address)
        # Conversations: two per topic (two users asking about the same thing), turns sent in rounds;
        # each round's turns run concurrently, so a node decodes several of them in one batch.
        n_conversations = 2 * n_topics
        turns = max(1, n_requests // n_conversations)
        history = {c: "" for c in range(n_conversations)}
        where: dict[int, Counter[str]] = defaultdict(Counter)
        with ThreadPoolExecutor(max_workers=n_conversations) as pool:
            for turn in range(turns):
                prompts = {c: history[c] + synth.topic_prompt(topics, c % n_topics, 16, seed=100 * turn + c)
                           for c in range(n_conversations)}
                futures = {c: pool.submit(client.generate, prompts[c], max_tokens=24, session_id=f"conversation-{c}")
                           for c in range(n_conversations)}
                for c, future in futures.items():
                    done = future.result()
                    history[c] = prompts[c] + done.text
                    where[c % n_topics][done.node] += 1
                    cache = done.cache
                    print(f"turn {turn} conversation {c} (topic {c % n_topics}) -> {done.node}: "
                          f"{done.text.strip()[:40]!r} ({done.usage.completion_tokens} tokens, "
                          f"{done.usage.reused_prompt_tokens} prompt tokens reused, decode hit rate "
                          f"{100 * cache.get('decode_hit_rate', float('nan')):.0f} %)")
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
