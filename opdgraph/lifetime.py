"""Lifetime analysis: from an ordered schedule and its buffers, when each buffer is allocated, released and live.

Input: steps in execution order (each with its enclosing loops, outer first) and buffers. Rules:
- A buffer's home is the innermost loop enclosing every step that touches it; it is allocated and released at
  that level. Its interval runs from its first write to its last access, widened to whole iterations of any loop
  deeper than its home (a gradient first written inside the micro-batch loop is live for the whole loop, because
  the second iteration's first step already runs beside it).
- Transient buffers are allocated before the interval's first step and freed after its last step.
- Held buffers are live at every step; with offload_when_idle they live on the device only over their interval:
  reloaded before it, offloaded after it, at most once per training step: their home is the step itself, so an
  interval inside a loop widens to the whole outermost loop (the teacher is reloaded before the first micro-batch
  and dropped after the last, not once per micro-batch).
- A transient buffer that spans loops (an accumulator written inside a loop) has the step as its home too: it is
  allocated before the loop's first iteration and freed after its last.
- Live bytes per step come from a difference array (prefix sum); the peak is its first maximum.
The order of steps is the caller's (the compiler sorts the stage graph deterministically).
"""

from __future__ import annotations

import attrs


@attrs.frozen
class ScheduleStep:
    name: str
    loops: tuple[str, ...]
    reads: tuple[str, ...]
    writes: tuple[str, ...]


@attrs.frozen
class ScheduleBuffer:
    name: str
    bytes: int
    held: bool = False
    offload_when_idle: bool = False
    spans_loops: bool = False


@attrs.frozen
class Lifetimes:
    intervals: dict[str, tuple[int, int]]  # buffer -> (first step index, last step index), inclusive
    allocates: list[list[str]]  # per step: allocated (or reloaded, for held buffers) before it
    releases: list[list[tuple[str, str]]]  # per step: (buffer, "free" | "offload") after it
    live_bytes: list[int]
    peak_index: int


def _common_prefix(paths) -> tuple[str, ...]:
    paths = list(paths)
    prefix = paths[0]
    for path in paths[1:]:
        length = 0
        while length < min(len(prefix), len(path)) and prefix[length] == path[length]:
            length += 1
        prefix = prefix[:length]
    return prefix


def _widen(steps: list[ScheduleStep], index: int, home: tuple[str, ...], direction: int) -> int:
    """Move index to the edge of the loop (one level below home) that encloses it, if any."""
    loops = steps[index].loops
    if len(loops) <= len(home):
        return index
    loop = loops[: len(home) + 1]
    while 0 <= index + direction < len(steps) and steps[index + direction].loops[: len(home) + 1] == loop:
        index += direction
    return index


def analyze(steps: list[ScheduleStep], buffers: list[ScheduleBuffer]) -> Lifetimes:
    touched: dict[str, list[int]] = {}
    for index, step in enumerate(steps):
        for name in (*step.reads, *step.writes):
            touched.setdefault(name, []).append(index)
    count = len(steps)
    allocates: list[list[str]] = [[] for _ in steps]
    releases: list[list[tuple[str, str]]] = [[] for _ in steps]
    delta = [0] * (count + 1)
    intervals = {}
    for buffer in buffers:
        indices = touched.get(buffer.name)
        if buffer.held and not buffer.offload_when_idle:
            intervals[buffer.name] = (0, count - 1)
            delta[0] += buffer.bytes
            delta[count] -= buffer.bytes
            continue
        if not indices:  # never touched: never on the device (an idle offloaded buffer stays on the host)
            continue
        home = () if buffer.held or buffer.spans_loops else _common_prefix(steps[index].loops for index in indices)
        first = _widen(steps, indices[0], home, -1)
        last = _widen(steps, indices[-1], home, +1)
        intervals[buffer.name] = (first, last)
        allocates[first].append(buffer.name)
        releases[last].append((buffer.name, "offload" if buffer.held else "free"))
        delta[first] += buffer.bytes
        delta[last + 1] -= buffer.bytes
    live_bytes, running = [], 0
    for index in range(count):
        running += delta[index]
        live_bytes.append(running)
    peak_index = max(range(count), key=lambda index: (live_bytes[index], -index)) if count else 0
    return Lifetimes(intervals, allocates, releases, live_bytes, peak_index)
