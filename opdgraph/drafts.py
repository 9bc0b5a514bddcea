"""The records a stage kind's plan functions return (opdgraph.stages.<kind> plan_steps / plan_buffers): Draft, a
step before placement and lifetime analysis, and `buffer`, a Buffer with the stages' defaults. A leaf module (it
imports only the plan IR and the work model), so stage modules can import it at import time. No torch.

A draft's `roles` say what the step does in the terms a placement and several ranks cost it by
(opdgraph.placement_steps): the stage that drafts it tags it, so the placement code never asks which kind a step
comes from, and a new kind whose step runs a teacher forward or an optimizer update only tags it so.
"""

from __future__ import annotations

import attrs

from opdgraph import work as W
from opdgraph.plan import Buffer


# Draft roles (see the module docstring).
TEACHER_FORWARD = "teacher_forward"  # a teacher's forward per repeat: its layers are streamed or gathered for it
TEACHER_HEAD = "teacher_head"  # reads a teacher's lm_head: a sharded teacher's root stays gathered until it ran
WHOLE_TEACHER = "whole_teacher"  # needs the whole teacher at once: a sharded teacher is all-gathered for it
OPTIMIZER_UPDATE = "optimizer_update"  # the optimizer's update: offloaded optimizer state streams through it
STUDENT_GENERATE = "student_generate"  # generation on the whole student: several ranks all-gather it first, exposed
STUDENT_FORWARD = "student_forward"  # the student's training forward (per layer, FSDP gathers each layer)
STUDENT_BACKWARD = "student_backward"  # the student's backward (FSDP gathers layers and reduce-scatters gradients)


@attrs.frozen
class Draft:
    """A step before lifetime analysis."""

    name: str
    stage: str
    kind: str
    reads: tuple[str, ...]
    writes: tuple[str, ...]
    loops: tuple[str, ...]
    repeats: int
    work: W.Work
    roles: frozenset[str] = frozenset()  # what the step does for placement (the roles above)


def buffer(name: str, category: str, size: int, sized_by, lifetime: str = "transient", formula: str = "",
           offload: bool = False) -> Buffer:
    """A Buffer with the stage modules' defaults (transient, on the device, never offloaded)."""
    return Buffer(name=name, category=category, bytes=int(size), sized_by=tuple(sized_by), lifetime=lifetime,
                  offload_when_idle=offload, formula=formula)
