"""Recurrent-state slots for models with linear-attention layers (Qwen3.5): which sequence owns which slot.

Beside the paged KV pool of the attention layers, each linear-attention layer keeps one fixed-size state per running
sequence (models/linear_state.py: conv window + delta-rule state). This module is the slot accounting (pure python,
like kv_pool.PagePool): a sequence takes a slot when its first chunk is scheduled and gives it back when it finishes
or is preempted (a preempted sequence prefills again from position 0, so it starts from a zero state in whichever
slot it gets next). When a prompt's n samples fork after its prefill, the first sample keeps the prompt's slot and
each other sample gets a new one holding a copy of it; the scheduler lists those copies and the engine makes them
before the next forward, in order (a slot freed and handed out again within one update is copied from first).
There are as many slots as max_num_seqs: a sequence before its fork holds one slot for n admitted sample slots.
"""

from __future__ import annotations

from typing import Iterable


class StateSlotPool:
    def __init__(self, num_slots: int):
        self.num_slots = num_slots
        self.free_slots = list(range(num_slots - 1, -1, -1))
        self.peak_slots_used = 0

    def allocate(self) -> int:
        slot = self.free_slots.pop()
        self.peak_slots_used = max(self.peak_slots_used, self.num_slots - len(self.free_slots))
        return slot

    def release(self, slot: int) -> None:
        self.free_slots.append(slot)


def check_slot_accounting(pool: StateSlotPool, held: Iterable[int]) -> None:
    """AssertionError unless every live sequence holds a distinct slot and free + held slots are all the slots."""
    held = [slot for slot in held]
    assert all(slot >= 0 for slot in held), f"a live sequence holds no slot: {held}"
    assert len(set(held)) == len(held), f"two sequences hold one slot: {held}"
    assert not set(held) & set(pool.free_slots), "a held slot is also free"
    assert len(set(pool.free_slots)) == len(pool.free_slots), "a slot is free twice"
    assert len(held) + len(pool.free_slots) == pool.num_slots, "slots leaked"
