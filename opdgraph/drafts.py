"""The records a stage kind's plan functions return (opdgraph.stages.<kind> plan_steps / plan_buffers): Draft, a
step before placement and lifetime analysis, and `buffer`, a Buffer with the stages' defaults. A leaf module (it
imports only the plan IR and the work model), so stage modules can import it at import time. No torch.
"""

from __future__ import annotations

import attrs

from opdgraph import work as W
from opdgraph.plan import Buffer


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


def buffer(name: str, category: str, size: int, sized_by, lifetime: str = "transient", formula: str = "",
           offload: bool = False) -> Buffer:
    """A Buffer with the stage modules' defaults (transient, on the device, never offloaded)."""
    return Buffer(name=name, category=category, bytes=int(size), sized_by=tuple(sized_by), lifetime=lifetime,
                  offload_when_idle=offload, formula=formula)
