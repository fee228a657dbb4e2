"""Routing policies and the router core, driven synchronously (no Ray): each rule of ``warmth``."""

from __future__ import annotations

import random
from collections import Counter

import numpy as np
import pytest

from cluster.routing.decision_audit import MAX_PENDING, DecisionAudit
from cluster.errors import NoNodesError, OverloadedError
from cluster.distributed.protocol import NodeReport, NodeStats
from cluster.distributed.router import RouterCore
from cluster.routing import POLICY_NAMES, NodeView, RouteRequest, make_policy
from cluster.routing.base import RoutingTraceSummary
from cluster.engine.prefix import PREFIX_BLOCK, held_prefixes, prefix_hashes, reusable_tokens
from cluster.routing.warmth import WarmthPolicy
from cluster.engine.token_affinity import TokenAffinity
from cluster.engine.warmth_report import encode

L, E, K = 4, 16, 2
TOPIC_EXPERTS = {0: [0, 1, 2, 3], 1: [8, 9, 10, 11]}  # per layer, the experts each topic's tokens choose
TOPIC_TOKENS = {0: list(range(100, 140)), 1: list(range(200, 240))}


def summary_for(topic: int, tokens: list[int], rng: np.random.Generator) -> RoutingTraceSummary:
    experts = np.stack([[rng.choice(TOPIC_EXPERTS[topic], K, replace=False) for _ in range(L)] for _ in tokens])
    decode = np.zeros((L, E), dtype=np.int64)
    decode[:, TOPIC_EXPERTS[topic]] = 3
    return RoutingTraceSummary(tokens=tuple(tokens), prompt_experts=experts.astype(np.int32), decode_counts=decode)


def resident_for(topic: int | None) -> np.ndarray:
    resident = np.zeros((L, E), dtype=np.float32)
    if topic is not None:
        resident[:, TOPIC_EXPERTS[topic]] = 1.0
    return resident


def view(node_id: str, load: int = 0, topic: int | None = None, capacity: int = 8) -> NodeView:
    return NodeView(node_id=node_id, load=load, capacity=capacity, resident=resident_for(topic))


def trained_policy(seed: int = 0, **knobs) -> WarmthPolicy:
    policy = WarmthPolicy(rng=random.Random(seed), **knobs)
    rng = np.random.default_rng(seed)
    for topic, tokens in TOPIC_TOKENS.items():
        for _ in range(4):
            policy.on_report("trainer", summary_for(topic, tokens, rng))
    return policy


def request(topic: int, n: int = 24, rid: str = "r", offset: int = 0) -> RouteRequest:
    tokens = TOPIC_TOKENS[topic]
    return RouteRequest(request_id=rid, tokens=tuple(tokens[(offset + i) % len(tokens)] for i in range(n)))


def test_every_policy_is_registered_and_chooses_among_the_nodes_given():
    nodes = [view(f"n{i}", load=i % 2) for i in range(4)]  # n0 and n2 idle, n1 and n3 busy
    every, load = ["n0", "n1", "n2", "n3"], {n.node_id: n.load for n in nodes}

    def one_idle_node(ranked: list[str]) -> bool:  # knowing nothing, warmth names one least-loaded node
        return len(ranked) == 1 and ranked[0] in ("n0", "n2")

    expected = {  # the baselines rank every node; warmth names its choice (base.RoutingPolicy.choose)
        "warmth": one_idle_node,
        "warmth_nobatch": one_idle_node,
        "least_loaded": lambda ranked: sorted(ranked) == every and [load[r] for r in ranked] == [0, 0, 1, 1],
        "round_robin": lambda ranked: ranked == every,  # its first turn: name order from the first name
        "random": lambda ranked: sorted(ranked) == every,
    }
    assert sorted(POLICY_NAMES) == sorted(expected)
    for name in POLICY_NAMES:
        ranked = make_policy(name, rng=random.Random(0)).choose(request(0), nodes)
        assert expected[name](ranked), (name, ranked)
        reversed_order = make_policy(name, rng=random.Random(0)).choose(request(0), nodes[::-1])
        assert reversed_order == ranked, (name, ranked, reversed_order)  # ties go to the RNG, never to list position


def test_knowing_nothing_falls_back_to_least_loaded_explicitly():
    policy = WarmthPolicy(rng=random.Random(0))
    ranked = policy.choose(request(0), [view("a", load=2), view("b", load=0), view("c", load=1)])
    assert ranked == ["b"] and policy.explain()["fallback"] == "least_loaded"
    assert policy.decision_kind() == "fallback"


def test_knowing_nothing_prefers_the_least_loaded_node_used_least_lately():
    now = [0.0]
    policy = WarmthPolicy(rng=random.Random(0), clock=lambda: now[0], recent_half_life_s=10.0)
    nodes = [view("a"), view("b"), view("c", load=1)]
    for _ in range(3):
        policy.on_routed(request(0), "a")
    assert {policy.choose(request(0), nodes)[0] for _ in range(20)} == {"b"}
    now[0] = 60.0  # six half-lives later "a" is as unused as "b": ties go to the RNG
    assert {policy.choose(request(0), nodes)[0] for _ in range(40)} == {"a", "b"}


def test_a_request_warm_nowhere_goes_to_the_node_used_least_lately():
    now = [0.0]
    policy = trained_policy()
    policy.clock = lambda: now[0]
    nodes = [view("a", topic=0), view("b"), view("c")]
    policy.on_routed(request(0), "a")
    policy.on_routed(request(1), "b")
    assert policy.choose(request(0), nodes) == ["a"] and policy.decision_kind() == "ranked"  # warm there
    assert policy.choose(request(1), nodes) == ["c"] and policy.decision_kind() == "spread"  # not "a": warm for other work
    assert policy.explain()["spread"] and policy.explain()["coverage"]["a"] < 0.1
    policy.on_routed(request(1), "c")
    nodes = [view("a", topic=0), view("b", topic=1), view("c")]
    assert policy.choose(request(1), nodes) == ["b"]  # once warm somewhere, it goes there
    mostly_new = RouteRequest("m", tokens=tuple(TOPIC_TOKENS[0][:4]) + tuple(range(5000, 5020)))
    assert policy.choose(mostly_new, nodes) == ["a"] and policy.decision_kind() == "spread"  # 20 of 24 tokens never seen:
    policy.on_routed(request(0), "a")  # ... cold everywhere, so the node used least lately (then the cheapest)
    assert policy.choose(mostly_new, nodes) in (["b"], ["c"]) and policy.decision_kind() == "spread"
    blind = trained_policy(warm_margin=0)  # spreading off: the cheapest node, whatever it is warm for
    assert {blind.choose(request(1, rid=f"x{i}"), [view("a", topic=0), view("c")])[0] for i in range(30)} == {"a", "c"}
    with pytest.raises(ValueError, match="warm_margin"):
        WarmthPolicy(warm_margin=1.5)


def test_a_topic_goes_to_the_node_whose_cache_holds_its_experts():
    policy = trained_policy()
    nodes = [view("cold"), view("warm0", topic=0), view("warm1", topic=1)]
    assert policy.choose(request(0, rid="a"), nodes)[0] == "warm0"
    assert policy.choose(request(1, rid="b"), nodes)[0] == "warm1"
    costs = policy.explain()["costs"]
    assert costs["warm1"] < costs["warm0"] and costs["warm1"] < costs["cold"]


def test_prediction_names_the_topic_experts():
    policy = trained_policy()
    policy.choose(request(1, rid="p"), [view("a", topic=0), view("b", topic=1)])
    predicted = policy.pop_prediction("p")
    assert predicted.shape == (L, E)
    assert set(np.flatnonzero(predicted[0])) == set(TOPIC_EXPERTS[1])
    assert policy.pop_prediction("p") is None


def test_load_slack_keeps_a_busy_warm_node_out():
    policy = trained_policy(load_slack=1)
    warm_busy, cold_idle = view("warm", load=3, topic=0), view("cold", load=0)
    assert policy.choose(request(0), [warm_busy, cold_idle])[0] == "cold"
    warm_slightly_busy = view("warm", load=1, topic=0)
    assert policy.choose(request(0), [warm_slightly_busy, cold_idle])[0] == "warm"


def test_a_node_holding_the_conversation_prefix_wins_over_equal_warmth():
    policy = trained_policy()
    req = request(0, n=4 * PREFIX_BLOCK)
    policy.on_prefixes("holder", prefix_hashes(req.tokens[: 3 * PREFIX_BLOCK]))
    nodes = [view("other", topic=0), view("holder", topic=0)]
    assert policy.choose(req, nodes)[0] == "holder"
    assert policy.explain()["matched_tokens"] == {"other": 0, "holder": 3 * PREFIX_BLOCK}
    policy.on_node_removed("holder")
    assert policy.prefix_holders == {}


def test_a_conversations_next_turn_finds_the_node_it_was_routed_to_before_that_node_reports():
    """The node's report of what it holds may reach the router after the conversation's next turn
    (they come from different processes): the router counts the prompt it routed as held there."""
    policy = trained_policy()
    first = request(0, n=3 * PREFIX_BLOCK, rid="turn1")
    nodes = [view("a", topic=0), view("b", topic=0)]
    served = policy.choose(first, nodes)[0]
    policy.on_routed(first, served)
    follow = RouteRequest("turn2", first.tokens + tuple(TOPIC_TOKENS[0][:PREFIX_BLOCK]))
    for _ in range(4):  # the tie between equally warm nodes no longer decides
        assert policy.choose(follow, nodes)[0] == served
    assert policy.explain()["matched_tokens"][served] == 3 * PREFIX_BLOCK
    policy.on_prefixes(served, [])  # then its report: it holds nothing (the state was dropped), and that stands
    assert served not in {n for h in prefix_hashes(first.tokens) for n in policy.prefix_holders.get(h, ())}


def test_a_conversation_stays_on_its_busier_node_while_that_node_has_a_free_slot():
    """Its node holds the conversation's KV state and can start it at once (a free slot): the
    prefill it saves counts there, whatever the experts' regime (a trained MoE's requests spread
    over most experts, so warmth alone would not keep it)."""
    policy = trained_policy()
    req = request(0, n=4 * PREFIX_BLOCK)
    policy.on_prefixes("holder", prefix_hashes(req.tokens[: 3 * PREFIX_BLOCK]))
    nodes = [NodeView("idle", load=0, capacity=8, slots=4, resident=resident_for(None)),
             NodeView("holder", load=1, capacity=8, slots=4, resident=resident_for(None))]
    assert policy.choose(req, nodes)[0] == "holder"
    full = [nodes[0], NodeView("holder", load=4, capacity=8, slots=4, resident=resident_for(None))]
    assert policy.choose(req, full)[0] == "idle", "no free slot there: it would wait behind the batch"


def test_warmth_weighs_itself_by_whether_its_warmest_guess_was_warm():
    """Audits in which the node warmth expected warmest covered no more of the request's experts
    than an average candidate (learned routing) take the weight of expected misses to 0: a held
    conversation then wins over a node merely warmer by the estimate. Audits where the guess
    was far warmer keep the weight at 1."""
    flat, sharp = trained_policy(min_audits=4), trained_policy(min_audits=4)
    assert flat.warmth_weight == sharp.warmth_weight == 1.0  # nothing measured yet: as before
    for i in range(8):
        for policy, covered in ((flat, 0.40), (sharp, 0.95)):
            policy.choose(request(0, rid=f"a{i}"), [view("warm", topic=0), view("cold")])
            policy.on_audited(f"a{i}", {"warm": covered, "cold": 0.40})
    assert flat.warmth_weight == 0.0 and sharp.warmth_weight == 1.0
    assert flat.state().warmth_audits == 8 and flat.state().warmth_weight == 0.0
    req = request(0, n=4 * PREFIX_BLOCK, rid="turn")
    for policy, expected in ((flat, "holder"), (sharp, "warm")):
        policy.on_prefixes("holder", prefix_hashes(req.tokens[: PREFIX_BLOCK]))
        assert policy.choose(req, [view("warm", topic=0), view("holder")])[0] == expected


def _weighed(policy: WarmthPolicy, covered: float, n: int = 20) -> WarmthPolicy:
    """``policy`` after ``n`` audits in which its warmest guess covered ``covered`` (the other 0.40)."""
    for i in range(n):
        policy.choose(request(0, rid=f"w{i}"), [view("warm", topic=0), view("cold")])
        policy.on_audited(f"w{i}", {"warm": covered, "cold": 0.40})
    return policy


def test_where_warmth_does_not_fully_separate_a_node_holding_most_of_the_request_takes_it():
    req = request(0, n=4 * PREFIX_BLOCK, rid="turn3")
    partial = _weighed(trained_policy(), 0.45)  # 5 points of separation: weight 0.5
    assert 0 < partial.warmth_weight < 1
    partial.on_prefixes("holder", prefix_hashes(req.tokens[: 3 * PREFIX_BLOCK]))  # 3 of its 4 blocks
    assert partial.choose(req, [view("warm", topic=0), view("holder", topic=1)])[0] == "holder"
    short = _weighed(trained_policy(prefix_threshold=0.9), 0.45)  # below the threshold the estimate still counts
    short.on_prefixes("holder", prefix_hashes(req.tokens[: PREFIX_BLOCK]))
    assert short.choose(req, [view("warm", topic=0), view("holder", topic=1)])[0] == "warm"
    full = _weighed(trained_policy(), 0.95)  # warmth separates fully: its costs decide, the prefill saved included
    full.on_prefixes("holder", prefix_hashes(req.tokens[: 3 * PREFIX_BLOCK]))
    assert full.warmth_weight == 1.0
    assert full.choose(req, [view("warm", topic=0), view("holder", topic=1)])[0] == "warm"


def test_ties_do_not_always_go_to_the_same_node():
    policy = trained_policy(seed=3)
    nodes = [view(f"n{i}", topic=0) for i in range(4)]
    winners = Counter(policy.choose(request(0, rid=str(i)), nodes)[0] for i in range(200))
    assert len(winners) == 4 and min(winners.values()) > 20, winners


def test_demand_of_a_long_prompt_is_estimated_from_a_bounded_sample():
    policy = trained_policy()
    long_request = RouteRequest("long", tokens=tuple(TOPIC_TOKENS[0] * 20 + TOPIC_TOKENS[1]))
    demand = policy.affinity.demand(policy.affinity.rows_of(long_request.tokens), [0, len(TOPIC_TOKENS[0]) * 20])
    distinct = len(set(TOPIC_TOKENS[0] + TOPIC_TOKENS[1]))
    assert distinct > policy.affinity.max_demand_tokens
    assert demand.known.tolist() == [distinct, len(set(TOPIC_TOKENS[1]))]
    assert demand.prefill.shape == (2, L * E) and np.all((0 <= demand.prefill) & (demand.prefill <= 1))


def _report(node_id: str, topic: int | None, load: int = 0, capacity: int = 2, **extra) -> NodeReport:
    resident = resident_for(topic).astype(bool)
    warmth = encode(resident)  # as a node sends it: no heat
    return NodeReport(node_id=node_id, load=load, capacity=capacity, healthy=True, warmth=warmth, prefixes=(),
                      sessions=(), stats=None, sent_at=0.0, **extra)


def test_router_core_routes_refuses_and_times_out_silent_nodes():
    now = [0.0]
    core = RouterCore("warmth", clock=lambda: now[0])
    with pytest.raises(NoNodesError):
        core.choose(request(0), set())
    core.on_report(_report("a", 0))
    core.on_report(_report("b", 1))
    rng = np.random.default_rng(0)
    core.on_report(_report("b", 1, request_id="x", summary=summary_for(1, TOPIC_TOKENS[1], rng)))
    assert core.choose(request(1), set())[0] == "b"
    for i, node_id in enumerate(("a", "b", "a", "b")):
        core.acquire(node_id, f"held{i}")
    with pytest.raises(OverloadedError, match="at capacity"):
        core.choose(request(1), set())
    for i in range(4):
        core.release(f"held{i}")
    assert core.choose(request(1), {"b"}) == ["a"]  # excluded after a failed attempt
    now[0] = 100.0  # both silent for longer than NODE_TIMEOUT_S
    assert [n.alive for n in core.status().nodes] == [False, False]
    assert core.status().decisions == {("warmth", "ranked"): 1, ("warmth", "spread"): 1,  # "a" holds the other topic
                                       ("warmth", "overloaded"): 1, ("warmth", "no_nodes"): 1}
    with pytest.raises(NoNodesError):
        core.choose(request(1), set())


def test_affinity_learns_selection_frequencies_per_token_and_layer():
    affinity = TokenAffinity(max_tokens=16)
    no_decode = np.zeros((2, 4), dtype=np.int64)
    # token 7 twice: layer 0 picks experts (0, 1) then (0, 2); layer 1 picks (3, -1) then nothing (-1, -1)
    experts = np.array([[[0, 1], [3, -1]], [[0, 2], [-1, -1]]], dtype=np.int32)
    affinity.learn(RoutingTraceSummary(tokens=(7, 7), prompt_experts=experts, decode_counts=no_decode))
    affinity.learn(RoutingTraceSummary(tokens=(-1, 9), prompt_experts=experts, decode_counts=no_decode))
    demand = affinity.demand(affinity.rows_of([7]), [0])
    p = demand.prefill[0].reshape(2, 4)
    np.testing.assert_allclose(p, [[0.99, 0.5, 0.5, 0.0], [0.0, 0.0, 0.0, 0.5]], atol=0.01)
    assert demand.known.tolist() == [1] and len(affinity) == 2  # token -1 is not learned
    p9 = affinity.demand(affinity.rows_of([9]), [0]).prefill[0].reshape(2, 4)
    np.testing.assert_allclose(p9, [[0.99, 0.0, 0.99, 0.0], [0.0, 0.0, 0.0, 0.0]], atol=0.01)


def test_a_node_reports_each_held_prefix_once_and_a_held_state_serves_all_but_the_last_token():
    a, b = list(range(3 * PREFIX_BLOCK)), list(range(2 * PREFIX_BLOCK)) + [7] * PREFIX_BLOCK
    held = held_prefixes([a, b, a[:PREFIX_BLOCK]])
    assert list(held) == sorted(set(prefix_hashes(a)) | set(prefix_hashes(b)))  # shared blocks once, sorted
    assert len(held) == 4 and held_prefixes([]) == ()
    assert [reusable_tokens(n) for n in (0, 1, 2, 100)] == [0, 0, 1, 99]


def test_prefix_hashes_are_cumulative_deterministic_and_order_sensitive():
    import subprocess
    import sys

    tokens = list(range(1000, 1000 + 5 * PREFIX_BLOCK + 7))
    hashes = prefix_hashes(tokens)
    assert len(hashes) == 5 and len(set(hashes)) == 5  # whole blocks only
    assert prefix_hashes(tokens[: 3 * PREFIX_BLOCK]) == hashes[:3]  # a prefix's hashes are a prefix of them
    swapped = tokens[:]
    swapped[0], swapped[1] = swapped[1], swapped[0]
    assert not set(prefix_hashes(swapped)) & set(hashes)  # a change anywhere before a block changes its hash
    assert prefix_hashes(tokens, max_blocks=2) == hashes[:2] and prefix_hashes(tokens[:PREFIX_BLOCK - 1]) == []
    other_process = subprocess.run(  # nodes and router hash in different processes (and machines)
        [sys.executable, "-c", f"from cluster.engine.prefix import prefix_hashes; print(prefix_hashes({tokens!r}))"],
        capture_output=True, text=True, check=True).stdout
    assert other_process.strip() == str(hashes)


def test_decision_audit_scores_the_served_node_against_every_candidates_warmth():
    audit = DecisionAudit()
    half = resident_for(None)
    half[:, TOPIC_EXPERTS[1][:2]] = 1.0  # holds half of topic 1's experts
    audit.on_decision("r1", [view("cold"), view("warm", topic=1), NodeView("half", 0, 8, resident=half)])
    summary = summary_for(1, TOPIC_TOKENS[1][:10], np.random.default_rng(0))
    counts = summary.selections((L, E))
    assert counts.sum() == 10 * L * K + 3 * 4 * L  # prefill selections + decode counts
    share_half = counts[:, TOPIC_EXPERTS[1][:2]].sum() / counts.sum()
    scored = audit.on_report("r1", "half", summary)
    assert scored is not None and not scored.warmest and scored.n_candidates == 3
    assert scored.served == pytest.approx(share_half) and scored.best == 1.0
    assert scored.mean == pytest.approx((0.0 + 1.0 + share_half) / 3)
    assert audit.on_report("r1", "half", summary) is None  # scored once
    audit.on_decision("r2", [view("cold"), view("warm", topic=1)])
    audit.on_decision("r2", [view("cold")])  # a retry after "warm" failed replaces the decision
    assert audit.on_report("r2", "warm", summary) is None  # not a candidate of the decision that stands
    audit.on_decision("r3", [view("warm", topic=1), view("cold")])
    assert audit.on_report("r3", "warm", summary).warmest
    s = audit.summary()
    assert s.n == 2 and s.n_choices == 2 and s.warmest_share == 0.5
    assert s.served_coverage == pytest.approx((share_half + 1.0) / 2) and s.best_coverage == 1.0


def test_decision_audit_keeps_a_bounded_number_of_pending_decisions():
    audit = DecisionAudit()
    for i in range(MAX_PENDING + 10):
        audit.on_decision(f"r{i}", [view("a", topic=0)])
    summary = summary_for(0, TOPIC_TOKENS[0][:4], np.random.default_rng(0))
    assert audit.on_report("r0", "a", summary) is None  # the oldest were dropped
    assert audit.on_report(f"r{MAX_PENDING + 9}", "a", summary).served == 1.0
    audit.on_decision("blind", [NodeView("a", 0, 8)])  # no warmth report yet: nothing to check against
    assert audit.on_report("blind", "a", summary) is None


def test_router_status_reports_how_warm_the_chosen_nodes_were():
    core = RouterCore("warmth")
    rng = np.random.default_rng(0)
    core.on_report(_report("a", 0))
    core.on_report(_report("b", 1))
    core.on_report(_report("b", 1, request_id="learn", summary=summary_for(1, TOPIC_TOKENS[1], rng)))
    core.on_report(_report("a", 0, request_id="learn0", summary=summary_for(0, TOPIC_TOKENS[0], rng)))
    for i, topic in enumerate([0, 1, 1, 0]):
        rid = f"q{i}"
        node = core.choose(request(topic, rid=rid), set())[0]
        core.on_report(_report(node, topic if node == "ab"[topic] else 1 - topic, request_id=rid,
                               summary=summary_for(topic, TOPIC_TOKENS[topic], rng)))
    audit = core.status().decision_audit
    assert audit.n == 4 and audit.warmest_share == 1.0 and audit.served_coverage == 1.0
    assert audit.mean_coverage == pytest.approx(0.5)


def test_a_restarted_node_counts_once_comes_back_cold_and_keeps_its_totals():
    core = RouterCore("warmth")
    prefix = prefix_hashes(TOPIC_TOKENS[0])
    stats = NodeStats(hits=90, misses=10, bytes_read=1000, generated_tokens=50)
    core.on_report(NodeReport(**{**vars(_report("a", 0, started_at=1.0)), "prefixes": tuple(prefix), "stats": stats}))
    core.on_report(_report("b", None, started_at=1.0))
    assert core.policy.prefix_holders[prefix[0]] == {"a"}
    # a's process died and a new one reports: a busy heartbeat first (no warmth, no prefixes, no stats)
    core.on_report(NodeReport(**{**vars(_report("a", None, started_at=2.0)), "warmth": None, "prefixes": None}))
    a = core.status().node("a")
    assert a.alive and a.restarts == 1 and a.warm_fraction is None  # the old process's warmth is gone
    assert prefix[0] not in core.policy.prefix_holders  # and so are the KV states it held
    assert a.bytes_read == 1000 and a.generated_tokens == 50 and a.hit_rate == pytest.approx(0.9)
    later = NodeStats(hits=5, misses=5, bytes_read=300, generated_tokens=7)
    core.on_report(NodeReport(**{**vars(_report("a", 0, started_at=2.0)), "stats": later}))
    core.on_report(NodeReport(**{**vars(_report("a", 0, started_at=2.0)), "stats": later}))  # same process again
    a = core.status().node("a")
    assert a.restarts == 1 and a.bytes_read == 1300 and a.generated_tokens == 57
    assert a.hit_rate == pytest.approx(95 / 110) and a.warm_fraction > 0


def test_batch_affinity_sends_a_request_where_running_requests_use_its_experts():
    """Two nodes with free slots, nothing resident anywhere: the node already decoding a request of
    the same topic adds no expert loads for it (their union), so it decodes there, in one batch."""
    def nodes(load_a: int, load_b: int) -> list[NodeView]:
        return [NodeView("a", load=load_a, capacity=8, slots=4, resident=resident_for(None)),
                NodeView("b", load=load_b, capacity=8, slots=4, resident=resident_for(None))]

    policy = trained_policy()
    first = policy.choose(request(0, rid="t0"), nodes(0, 0))[0]
    policy.on_routed(request(0, rid="t0"), first)
    other = "b" if first == "a" else "a"
    loads = (1, 0) if first == "a" else (0, 1)
    assert {policy.choose(request(0, rid=f"s{i}", offset=i), nodes(*loads))[0] for i in range(10)} == {first}
    assert policy.choose(request(1, rid="u"), nodes(*loads))[0] == other, "another topic's experts are no cheaper there"
    assert first not in policy.explain()["costs"], "a busier node whose batch is not warm for it is no candidate"
    policy.on_ended("t0")  # once it ended, nothing runs there
    assert not policy.running.get(first)
    off = trained_policy(batch_affinity=False)  # without it: the least-loaded node, as before
    off.on_routed(request(0, rid="t0"), "a")
    assert {off.choose(request(0, rid=f"w{i}"), nodes(1, 0))[0] for i in range(10)} == {"b"}


def test_batch_affinity_ignores_a_batch_whose_experts_cover_nearly_everything():
    """Learned routing spreads requests over most experts: the union of a few running requests'
    predicted experts covers nearly all of them, so it says nothing about this request, and the
    busier node must not draw it (the cause of twice round_robin's p50 latency on a trained MoE)."""
    policy = trained_policy()
    policy.choose(request(0, rid="t0"), [NodeView("a", load=0, capacity=8, slots=4, resident=resident_for(None))])
    n_bytes = policy.predicted["t0"].size
    policy.running["a"] = {"r1": np.full(n_bytes, 0xFF, dtype=np.uint8)}  # its batch uses every expert
    policy._running_node["r1"] = "a"
    nodes = [NodeView("a", load=1, capacity=8, slots=4, resident=resident_for(None)),
             NodeView("b", load=0, capacity=8, slots=4, resident=resident_for(None))]
    assert {policy.choose(request(0, rid=f"s{i}", offset=i), nodes)[0] for i in range(10)} == {"b"}


def test_batch_affinity_never_picks_a_node_without_a_free_slot_when_one_has_room():
    policy = trained_policy()
    full = NodeView("warm", load=4, capacity=8, slots=4, resident=resident_for(0))
    free = NodeView("cold", load=1, capacity=8, slots=4, resident=resident_for(None))
    assert policy.choose(request(0), [full, free])[0] == "cold"


def test_the_status_table_says_what_warmth_concluded_about_itself():
    from cluster.cli.status_table import status_table

    from cluster.distributed.status import RouterStatus
    from cluster.routing.base import PolicyState

    status = RouterStatus(model="m", pid=1, n_routes=0, route_s=0.0, policy="warmth", started_at=0.0, nodes=(),
                          policy_state=PolicyState(warmth_weight=0.0, warmth_separation=-0.012, warmth_audits=40))
    line = status_table(status).splitlines()[-1]
    assert "-1.2 points" in line and "40 audited" in line and "weight 0.00" in line


def test_a_named_conversation_goes_back_to_the_node_of_its_last_turn_while_that_node_is_a_candidate():
    """Step 0: its node holds the whole conversation, answers included, before any report says so."""
    from dataclasses import replace

    policy = trained_policy()
    nodes = [NodeView("a", load=0, capacity=8, slots=4, resident=resident_for(0)),
             NodeView("b", load=0, capacity=8, slots=4, resident=resident_for(None))]
    first = replace(request(0, rid="t1"), session_id="chat-1")
    policy.on_routed(first, "b")  # the first turn went to b (say, b was idle then)
    second = replace(request(0, rid="t2"), session_id="chat-1")
    assert policy.choose(second, nodes) == ["b"], "a warmer node does not take a conversation from its node"
    other = replace(request(0, rid="t3"), session_id="chat-2")
    assert policy.choose(other, nodes)[0] == "a", "a new conversation goes where warmth says"
    busy = [nodes[0], NodeView("b", load=4, capacity=8, slots=4, resident=resident_for(None))]
    assert policy.choose(second, busy)[0] == "a", "its node has no free slot: it would wait there"
    policy.on_node_removed("b")
    assert "chat-1" not in policy.session_nodes
