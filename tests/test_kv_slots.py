"""KvSlots: which slot and which held KV prefix a request starts from (no llama.cpp)."""

from __future__ import annotations

from cluster.engine.kv_slots import KvSlots, SavedState


def start(kv: KvSlots, tokens: list[int], session: str | None = None):
    placement = kv.place(tokens, session)
    assert placement is not None
    kv.occupy(placement, tokens, session)
    return placement


def finish(kv: KvSlots, placement, tokens: list[int]) -> None:
    placement.slot.tokens = list(tokens)
    kv.release(placement.slot, keep=True)


def test_a_request_takes_the_free_slot_holding_its_longest_prefix_and_keeps_one_token_to_evaluate():
    kv = KvSlots(2, session_bytes=1 << 20)
    a = start(kv, [1, 2, 3, 4])
    finish(kv, a, [1, 2, 3, 4, 5])
    b = start(kv, [9, 9])
    finish(kv, b, [9, 9, 8])
    again = kv.place([1, 2, 3, 4, 5, 6], None)
    assert again.slot is a.slot and again.n_reused == 5 and again.copy_from is None
    whole = kv.place([1, 2, 3, 4, 5], None)
    assert whole.n_reused == 4, "the prompt's last token is evaluated: its logits start the answer"


def test_a_prefix_held_by_a_busy_slot_is_copied_not_recomputed():
    kv = KvSlots(2, session_bytes=1 << 20)
    first = start(kv, [7, 7, 7, 7, 1])
    first.slot.tokens = [7, 7, 7, 7, 1, 2]  # decoding: its KV grows
    second = kv.place([7, 7, 7, 7, 3], None)
    assert second.slot is not first.slot
    assert second.copy_from is first.slot and second.n_reused == 4


def test_every_slot_busy_means_no_placement():
    kv = KvSlots(1, session_bytes=0)
    start(kv, [1, 2])
    assert kv.place([1, 2, 3], None) is None and kv.n_free == 0


def test_a_conversation_displaced_from_its_slot_is_saved_and_restored_on_its_next_turn():
    kv = KvSlots(1, session_bytes=100)
    turn1 = start(kv, [1, 2, 3], "alice")
    finish(kv, turn1, [1, 2, 3, 4])
    other = start(kv, [5, 6], "bob")
    assert other.save == "alice", "alice's KV must be saved before bob's request overwrites the slot"
    kv.store("alice", SavedState((1, 2, 3, 4), n_bytes=40))
    finish(kv, other, [5, 6, 7])
    turn2 = kv.place([1, 2, 3, 4, 9], "alice")
    assert turn2.restore == "alice" and turn2.n_reused == 4 and turn2.save == "bob"
    kv.occupy(turn2, [1, 2, 3, 4, 9], "alice")
    assert "alice" not in kv.saved, "a restored state lives in its slot again (its bytes are not counted twice)"
    assert set(kv.sessions()) == {"alice"}


def test_saved_states_stay_within_their_byte_budget_least_recently_used_out():
    kv = KvSlots(1, session_bytes=100)
    for name in ("a", "b", "c"):
        kv.store(name, SavedState((1,), n_bytes=40))
    assert list(kv.saved) == ["b", "c"] and kv.saved_bytes == 80
    kv.store("huge", SavedState((1,), n_bytes=101))
    assert "huge" not in kv.saved
