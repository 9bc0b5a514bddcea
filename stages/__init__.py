"""Stage kinds: each `opdgraph.stages.<kind>` module owns its typed Config and declares what it reads and writes.

The registry is lazy: `stage_kind("loss")` imports `opdgraph.stages.loss` only when asked. Stage modules import
no torch at import time (their runtime glue imports it inside functions), so the compiler stays torch-free.
A stage module defines `Config` (attrs frozen, kw_only, help on every field), `READS` and `WRITES` (value names the
stage graph is built from) and `MODEL_FIELDS` (Config fields that name a `[models.<name>]` entry).
What one stage of the kind reads and writes may depend on its name and on the other stages (`[teacher_score.math]`
writes `teacher_hidden.math`, the loss reads every teacher's): an optional `values(stage_name, config, stages) ->
(reads, writes)` says so; `stage_nodes` builds the stage graph's nodes from it.
Its plan contribution (opdgraph.stage_plan): `plan_steps(stage_name, config, facts)`, the Drafts it adds to a
training step; optionally `plan_buffers(...)` (the Buffers it allocates), `plan_facts(...)` (entries of the plan's
facts), `MICRO_BATCH = True` (it runs once per training micro-batch: the compiler fuses such stages into one
loop, one per teacher when rows are routed), `PERIODIC = True` (it runs every n steps, outside one training step's time) and `GATHERS_TEACHER = True`
(it needs the whole teacher at once, so a sharded teacher is all-gathered for it).
"""

from __future__ import annotations

import importlib
from typing import Callable

import attrs

KIND_NAMES = ("rollout", "teacher_score", "loss", "sft", "backward", "step", "eval", "checkpoint", "log")
REQUIRED_KINDS = ("rollout", "teacher_score", "loss", "backward", "step")


@attrs.frozen
class StageKind:
    name: str
    config_class: type
    reads: tuple[str, ...]
    writes: tuple[str, ...]
    model_fields: tuple[str, ...]
    plan_steps: Callable  # (stage_name, config, facts) -> list[Draft]
    plan_buffers: Callable  # (stage_name, config, facts) -> list[Buffer]
    plan_facts: Callable  # (stage_name, config, facts) -> dict[str, object]
    periodic: bool
    gathers_teacher: bool
    values: Callable  # (stage_name, config, stages) -> (reads, writes) of one stage of this kind
    micro_batch: bool  # MICRO_BATCH = True: runs once per training micro-batch (the fused loop)


def stage_kind(name: str) -> StageKind:
    """The registered stage kind `name` (KeyError when there is none)."""
    if name not in KIND_NAMES:
        raise KeyError(name)
    module = importlib.import_module(f"opdgraph.stages.{name}")
    return StageKind(name, module.Config, tuple(module.READS), tuple(module.WRITES),
                     tuple(getattr(module, "MODEL_FIELDS", ())), module.plan_steps,
                     getattr(module, "plan_buffers", _nothing(list)), getattr(module, "plan_facts", _nothing(dict)),
                     getattr(module, "PERIODIC", False), getattr(module, "GATHERS_TEACHER", False),
                     getattr(module, "values", lambda stage_name, config, stages: (module.READS, module.WRITES)),
                     getattr(module, "MICRO_BATCH", False))


def stage_nodes(stages: dict) -> list:
    """The stage graph's nodes (opdgraph.graph.StageNode) of a pipeline's stage entries."""
    from opdgraph.graph import StageNode

    nodes = []
    for name, stage in stages.items():
        reads, writes = stage_kind(stage.kind).values(name, stage.config, stages)
        nodes.append(StageNode(name, stage.kind, tuple(reads), tuple(writes)))
    return nodes


def _nothing(empty: type) -> Callable:
    """A plan function of a kind that contributes nothing of that sort."""
    return lambda stage_name, config, facts: empty()
