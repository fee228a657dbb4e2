"""ExpertAdmission: which waiting sequences an engine starts under memory pressure (pure logic)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from cluster.engine.batch_admission import ExpertAdmission
from cluster.engine.trace_summary import RoutingTraceSummary

N_LAYERS, N_EXPERTS = 2, 8
TOPIC_A, TOPIC_B = (1, 2, 3, 4), (5, 6, 7, 8)  # prompt tokens of two kinds
EXPERTS_A, EXPERTS_B = (0, 1), (6, 7)  # the experts each kind selects in every layer


@dataclass
class Waiting:
    prompt: list[int]
    passed_over: int = 0


def learned(**knobs: float) -> ExpertAdmission:
    admission = ExpertAdmission(**knobs)
    for tokens, experts in ((TOPIC_A, EXPERTS_A), (TOPIC_B, EXPERTS_B)):
        chosen = np.tile(np.array(experts, dtype=np.int32), (len(tokens), N_LAYERS, 1))
        admission.learn(RoutingTraceSummary(tokens=tokens, prompt_experts=chosen,
                                            decode_counts=np.zeros((N_LAYERS, N_EXPERTS), dtype=np.int64)))
    return admission


def resident(experts: tuple[int, ...]) -> np.ndarray:
    flags = np.zeros((N_LAYERS, N_EXPERTS), dtype=np.uint8)
    flags[:, list(experts)] = 1
    return flags


def test_with_nothing_running_the_sequence_whose_experts_are_resident_starts_first():
    admission = learned()
    waiting = [Waiting([5, 6, 7]), Waiting([8, 5]), Waiting([1, 2, 3])]
    assert admission.pick(waiting, resident(EXPERTS_A), batch=None) == 2
    assert [w.passed_over for w in waiting] == [1, 1, 0] and admission.reordered == 1
    assert admission.pick(waiting[:2], resident(EXPERTS_B), batch=None) == 0  # already the cheapest
    assert admission.reordered == 1 and admission.held == 0


def test_a_sequence_joins_a_running_batch_only_if_it_needs_the_same_experts():
    admission = learned()
    assert admission.pick([Waiting([5, 6]), Waiting([2, 3])], resident(()), batch=[1, 4]) == 1
    assert admission.pick([Waiting([5, 6]), Waiting([7])], resident(()), batch=[1, 4]) is None
    assert admission.held == 1
    # what is resident does not decide the kind: a batch of B waits for B even with A's experts loaded
    assert admission.pick([Waiting([1, 2]), Waiting([8])], resident(EXPERTS_A), batch=[5]) == 1


def test_a_sequence_passed_over_max_passes_times_starts_once_the_batch_has_drained_whatever_it_costs():
    admission = learned(max_passes=2)
    old = Waiting([5, 6])
    for _ in range(2):
        assert admission.pick([old, Waiting([1, 2])], resident(EXPERTS_A), batch=[1]) == 1
    assert old.passed_over == 2
    assert admission.pick([old, Waiting([1, 2])], resident(EXPERTS_A), batch=[1]) is None, "no more of A"
    assert admission.pick([old, Waiting([1, 2])], resident(EXPERTS_A), batch=None) == 0


def test_a_prompt_of_unknown_kind_runs_alone_in_its_turn():
    nothing_learned = ExpertAdmission()
    assert nothing_learned.pick([Waiting([5, 6]), Waiting([1, 2])], resident(EXPERTS_A), batch=None) == 0
    assert nothing_learned.pick([Waiting([5, 6]), Waiting([1, 2])], resident(EXPERTS_A), batch=[5, 6]) is None
    admission = learned()
    unknown_first = [Waiting([40, 41]), Waiting([1, 2])]  # the oldest's tokens were never seen
    assert admission.pick(unknown_first, resident(EXPERTS_A), batch=None) == 0
    assert admission.pick([Waiting([1, 2])], resident(()), batch=[40, 41]) is None, "nothing joins it"
    assert admission.pick([Waiting([5]), Waiting([40])], resident(EXPERTS_A), batch=None) == 0, "not before older ones"
    assert admission.pick([Waiting([1, 40, 41, 42])], resident(()), batch=[1]) is None, "one known token of four"
    assert admission.pick([Waiting([1, 2, 3, 40])], resident(()), batch=[1]) == 0


def test_only_the_first_window_sequences_are_considered():
    admission = learned(window=2)
    waiting = [Waiting([5]), Waiting([6]), Waiting([1])]  # the cheap one is third
    assert admission.pick(waiting, resident(EXPERTS_A), batch=None) == 0
    assert admission.pick(waiting, resident(()), batch=[1]) is None
