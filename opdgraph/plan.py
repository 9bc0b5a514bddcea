"""The plan IR: what the runtime executes and what `opdgraph plan` renders. Plain attrs records, no torch.

A Plan is an ordered list of Steps (one representative iteration of each loop; `repeats` says how often a step
runs per training step) and the Buffers they read and write. Lifetime analysis (opdgraph.lifetime) fills in, per
step, which buffers are allocated or reloaded before it, which are released after it (free or offload to host),
and the live device bytes while it runs.
"""

from __future__ import annotations

from typing import Literal

import attrs

CATEGORIES = ("weights", "master_weights", "optimizer_state", "grads", "kv_cache", "activations", "teacher_hidden",
              "logit_chunk", "io", "workspace")
SCOPES = ("step", "micro_batch", "chunk")


@attrs.frozen(kw_only=True)
class Buffer:
    name: str
    category: str
    bytes: int
    sized_by: tuple[str, ...]  # config keys whose values set the size
    lifetime: Literal["held", "transient"]  # held: kept across training steps; transient: allocated and freed
    device: Literal["device", "host"] = "device"  # where it lives while live
    offload_when_idle: bool = False  # held buffers only: moved to host between uses
    # Transient only: an accumulator written inside a loop that lives from before the loop's first iteration to after
    # its last (the sharded student's whole gradients under student_gather = "step"), not one iteration at a time.
    spans_loops: bool = False
    formula: str = ""


@attrs.frozen(kw_only=True)
class Release:
    buffer: str
    action: Literal["free", "offload"]


@attrs.frozen(kw_only=True)
class StepWork:
    flops: float
    device_bytes: float
    pcie_bytes: float
    seconds: float


@attrs.frozen(kw_only=True)
class Step:
    name: str
    stage: str  # the stage table it comes from ("data" for the data source)
    kind: str  # that stage's kind
    reads: tuple[str, ...]
    writes: tuple[str, ...]
    loops: tuple[str, ...]  # enclosing loops, outer first (empty: once per training step)
    scope: Literal["step", "micro_batch", "chunk"]
    repeats: int  # runs per training step
    fused_group: str | None = None
    work: StepWork
    allocates: tuple[str, ...] = ()  # buffers allocated just before this step (first write, hoisted to its loop)
    reloads: tuple[str, ...] = ()  # offloaded buffers moved back to the device before this step
    releases: tuple[Release, ...] = ()  # after this step
    live_bytes: int = 0  # device bytes live while this step runs


@attrs.frozen(kw_only=True)
class Transfer:
    """Bytes moved over PCIe by an offload decision (opdgraph.placement), or exchanged over the GPU interconnect by
    FSDP2 (the student's and a sharded teacher's all-gathers, the student's gradient reduce-scatters; bytes each
    rank receives), with their predicted time."""

    step: str  # the step the transfer belongs to
    when: Literal["before", "during", "after"]
    buffer: str
    direction: Literal["reload", "offload", "stream", "all_gather", "reduce_scatter"]
    bytes: int  # per training step
    seconds: float


@attrs.frozen(kw_only=True)
class Peak:
    bytes: int
    step: str
    contributors: tuple[tuple[str, int], ...]  # (buffer, bytes), largest first


@attrs.frozen(kw_only=True)
class Plan:
    name: str
    fused: bool
    steps: tuple[Step, ...]
    buffers: dict[str, Buffer]
    peak: Peak
    budget_bytes: int
    step_seconds: float  # roofline time of one training step
    facts: dict[str, object]
    transfers: tuple[Transfer, ...] = ()  # host <-> device traffic of offloaded or streamed buffers
    fit: dict[str, object] | None = None  # what the fit search chose, when it ran (opdgraph.fit)

    @property
    def peak_bytes(self) -> int:
        return self.peak.bytes

    @property
    def over_budget(self) -> bool:
        return self.peak.bytes > self.budget_bytes

    def step(self, name: str) -> Step:
        return next(step for step in self.steps if step.name == name)

    def live_buffers(self) -> list[tuple[str, ...]]:
        """Device-resident buffers at each step, replayed from the allocate / reload / release actions."""
        live = {name for name, buffer in self.buffers.items()
                if buffer.lifetime == "held" and not buffer.offload_when_idle and buffer.device == "device"}
        per_step = []
        for step in self.steps:
            live |= {*step.allocates, *step.reloads}
            per_step.append(tuple(sorted(live)))
            live -= {release.buffer for release in step.releases}
        return per_step
