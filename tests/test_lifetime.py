"""Lifetime analysis on tiny schedules written as tables, every one checked by the same invariant checker."""

from __future__ import annotations

import itertools

import pytest

from opdgraph.lifetime import ScheduleBuffer, ScheduleStep, analyze


def check_invariants(steps: list[ScheduleStep], buffers: list[ScheduleBuffer]):
    """Replay the analysis' actions and check: every access hits a live buffer (no read after release, no use
    before allocation), every transient buffer is released exactly once and only after its last access, and the
    reported live bytes and peak equal a brute-force sum over the replayed live sets."""
    result = analyze(steps, buffers)
    by_name = {buffer.name: buffer for buffer in buffers}
    live = {b.name for b in buffers if b.held and not b.offload_when_idle}
    released = {name: 0 for name in by_name}
    last_access = {}
    for index, step in enumerate(steps):
        for name in (*step.reads, *step.writes):
            last_access[name] = index
    brute_force = []
    for index, step in enumerate(steps):
        for name in result.allocates[index]:
            assert name not in live, f"{name} allocated twice (step {step.name})"
            live.add(name)
        for name in (*step.reads, *step.writes):
            assert name in live, f"step {step.name} touches {name}, which is not live"
        brute_force.append(sum(by_name[name].bytes for name in live))
        for name, action in result.releases[index]:
            assert name in live
            assert index >= last_access[name], f"{name} released before its last access"
            assert action == ("offload" if by_name[name].held else "free")
            live.remove(name)
            released[name] += 1
    for buffer in buffers:
        if not buffer.held and buffer.name in last_access:
            assert released[buffer.name] == 1, f"{buffer.name} released {released[buffer.name]} times"
        if buffer.held and not buffer.offload_when_idle:
            assert released[buffer.name] == 0
    assert result.live_bytes == brute_force
    assert result.live_bytes[result.peak_index] == max(brute_force)
    return result


def s(name, loops="", reads="", writes=""):
    split = lambda text: tuple(text.split()) if text else ()
    return ScheduleStep(name, split(loops), split(reads), split(writes))


# Each schedule: (steps, buffers, expected live bytes per step). Expected values are worked out by hand.
SCHEDULES = {
    "straight line": (
        [s("a", writes="x"), s("b", reads="x", writes="y"), s("c", reads="y")],
        [ScheduleBuffer("x", 10), ScheduleBuffer("y", 100)],
        [10, 110, 100]),
    "held weights never released": (
        [s("a", reads="w", writes="x"), s("b", reads="w x")],
        [ScheduleBuffer("w", 1000, held=True), ScheduleBuffer("x", 1)],
        [1001, 1001]),
    "micro-batch buffer freed inside the loop": (
        [s("roll", writes="r"), s("t", "mb", reads="r", writes="h"), s("l", "mb", reads="h r"), s("opt")],
        [ScheduleBuffer("r", 5), ScheduleBuffer("h", 50)],
        [5, 55, 55, 0]),
    "accumulator written in a loop lives over the whole loop": (
        [s("t", "mb", writes="h"), s("b", "mb", reads="h", writes="g"), s("opt", reads="g")],
        [ScheduleBuffer("h", 7), ScheduleBuffer("g", 300)],
        [307, 307, 300]),
    "accumulator that spans loops: allocated before the loop, freed after its last iteration": (
        [s("roll", writes="w"), s("t", "mb", reads="w"), s("b", "mb", reads="w", writes="g"), s("opt")],
        [ScheduleBuffer("w", 1000), ScheduleBuffer("g", 300, spans_loops=True)],
        [1000, 1300, 1300, 0]),
    "the same accumulator without spans_loops is one iteration's buffer": (
        [s("roll", writes="w"), s("t", "mb", reads="w"), s("b", "mb", reads="w", writes="g"), s("opt")],
        [ScheduleBuffer("w", 1000), ScheduleBuffer("g", 300)],
        [1000, 1000, 1300, 0]),
    "chunk buffer released at the end of the chunk loop": (
        [s("f", "mb", writes="h"), s("loss", "mb chunk", reads="h", writes="c"), s("b", "mb", reads="c")],
        [ScheduleBuffer("h", 2), ScheduleBuffer("c", 20)],
        [2, 22, 20]),
    "offloaded held buffer lives on device only when used": (
        [s("roll", writes="kv"), s("done", reads="kv"), s("score", "mb", reads="teacher")],
        [ScheduleBuffer("kv", 40), ScheduleBuffer("teacher", 100, held=True, offload_when_idle=True)],
        [40, 40, 100]),
    "buffer written once and never read is freed after its step": (
        [s("a", writes="scratch"), s("b")],
        [ScheduleBuffer("scratch", 3)],
        [3, 0]),
}


@pytest.mark.parametrize("name", list(SCHEDULES))
def test_table_schedules(name):
    """If this fails, the lifetime analysis frees too early/late, double-frees, or miscounts live bytes."""
    steps, buffers, expected = SCHEDULES[name]
    result = check_invariants(steps, buffers)
    assert result.live_bytes == expected


def test_random_schedules_hold_invariants():
    """If this fails, some loop nesting / access pattern breaks an invariant the hand tables did not cover."""
    import random
    generator = random.Random(0)
    loop_choices = [(), ("mb",), ("mb", "chunk"), ("other",)]
    for _ in range(200):
        count = generator.randint(1, 7)
        loops = [generator.choice(loop_choices) for _ in range(count)]
        names = [f"b{index}" for index in range(generator.randint(1, 5))]
        steps = []
        for index in range(count):
            reads = tuple(name for name in names if generator.random() < 0.3)
            writes = tuple(name for name in names if generator.random() < 0.3)
            steps.append(ScheduleStep(f"s{index}", loops[index], reads, writes))
        buffers = [ScheduleBuffer(name, generator.randint(1, 100), held=generator.random() < 0.2,
                                  offload_when_idle=generator.random() < 0.5, spans_loops=generator.random() < 0.3)
                   for name in names]
        check_invariants(steps, buffers)


def test_peak_is_first_maximum():
    """If this fails, the reported peak step is not deterministic when two steps tie."""
    steps = [s("a", writes="x"), s("b", reads="x"), s("c", writes="y")]
    result = check_invariants(steps, [ScheduleBuffer("x", 10), ScheduleBuffer("y", 10)])
    assert result.peak_index == 0


def test_all_orders_of_a_small_schedule():
    """If this fails, the checker and the analysis disagree for some execution order of the same steps."""
    base = [s("a", writes="x"), s("b", reads="x", writes="y"), s("c", reads="y", writes="z"), s("d", reads="x z")]
    buffers = [ScheduleBuffer("x", 1), ScheduleBuffer("y", 10), ScheduleBuffer("z", 100)]
    for order in itertools.permutations(base):
        written = set()
        if any(not set(step.reads) <= written or written.update(step.writes) for step in order):
            continue
        check_invariants(list(order), buffers)
