"""The status of a deployment as a table (``python -m cluster status``, the demo): one row per node,
then what the router predicted and how its decisions compare with the nodes' warmth."""

from __future__ import annotations

from cluster.distributed.status import RouterStatus
from cluster.engine.node_memory import MIB
from cluster.routing.decision_audit import WARMEST_TOLERANCE


def status_table(status: RouterStatus) -> str:
    """The status table printed by ``status`` and the demo."""
    def pct(value: float | None) -> str:
        return "-" if value is None or value != value else f"{100 * value:.0f}%"

    def number(value: float | None) -> str:
        return "-" if value is None or value != value else f"{value:.1f}"

    decisions = ", ".join(f"{policy} {outcome}: {count}" for (policy, outcome), count in sorted(status.decisions.items()))
    rows = [f"policy: {status.policy}   decisions: {decisions or 'none yet'}",
            f"{'node':16} {'alive':5} {'load':>4} {'served':>6} {'batch':>5} {'exp/step':>8} {'hit rate':>8} {'warm':>6} "
            f"{'MiB read':>9} {'sessions':>8} {'restarts':>8}"]
    for n in status.nodes:
        read = "-" if n.bytes_read is None else f"{n.bytes_read / MIB:.0f}"
        rows.append(f"{n.name:16} {str(n.alive):5} {n.load:>4} {n.served:>6} {number(n.decode_batch):>5} "
                    f"{number(n.experts_per_step):>8} {pct(n.hit_rate):>8} {pct(n.warm_fraction):>6} {read:>9} "
                    f"{n.sessions:>8} {n.restarts:>8}")
    rows.append("batch: mean decoding sequences per step; exp/step: expert units a step selected (all layers)")
    p = status.prediction
    if p.n:
        rows.append(f"expert-demand prediction over {p.n} requests: precision {pct(p.precision)}, recall {pct(p.recall)}")
    a = status.decision_audit
    if a.n:
        rows.append(f"decisions vs warmth over {a.n} requests: the serving node held {pct(a.served_coverage)} of the "
                    f"experts they selected (best node {pct(a.best_coverage)}, average {pct(a.mean_coverage)}); "
                    f"warmest node (within {100 * WARMEST_TOLERANCE:.0f} points) chosen in {pct(a.warmest_share)} "
                    f"of {a.n_choices} choices")
    w = status.policy_state
    if w.warmth_audits is not None and w.warmth_separation is not None and w.warmth_weight is not None:
        rows.append(f"warmth weighs itself: the node it expected warmest held {100 * w.warmth_separation:+.1f} points "
                    f"of a request's experts over an average candidate ({w.warmth_audits} audited requests), so "
                    f"expected misses count with weight {w.warmth_weight:.2f} (1: full, 0: prefix, prefill and load "
                    f"decide)")
    return "\n".join(rows)
