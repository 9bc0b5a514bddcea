"""What one call of a stage's `execute` receives (opdgraph.stages.<kind>): StageInputs, never the whole RunContext.

- `step`: the plan step being run (its name, reads and writes);
- `loop`: the micro-batch loop iteration it runs for (an empty LoopState outside loops);
- `models`: the models and run objects the stage names, as its kind's `bind(stage_name, config, run)` picked them
  once for the run (the student, one teacher stage's TeacherRuntime, the rollout engine, the optimizer, ...);
- `values`: the plan buffers its steps declare (opdgraph.runtime.declared_buffers): the values it reads and writes;
- `run`: RunServices, the few run-wide things a stage may use: the device, the seed, the step counter, the settings
  of other tables it was handed (`facts`), the current step's metrics record and the metrics log.
The executor (opdgraph.runtime.executor) builds one per call; RunContext stays the executor's and the run loop's.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping


@dataclass
class LoopState:
    """What the steps of one micro-batch loop iteration share."""

    index: int = 0
    count: int = 1
    micro_batch: Any = None
    values: dict[str, Any] = field(default_factory=dict)
    prefix: str = ""  # of the group-local buffers of a routed plan's teacher loop ("math/")

    def local(self, name: str) -> str:
        return f"{self.prefix}{name}"


class RunServices:
    """The run-wide services of a stage call, read from the run's context (no models, no buffers)."""

    def __init__(self, ctx):
        self._ctx = ctx

    @property
    def device(self):
        return self._ctx.device

    @property
    def seed(self) -> int:
        return self._ctx.seed

    @property
    def num_steps(self) -> int:
        return self._ctx.num_steps

    @property
    def step(self) -> int:
        """Training steps completed."""
        return self._ctx.step

    @property
    def facts(self) -> dict[str, Any]:
        """Settings of other tables a stage needs (runtime.build), passed explicitly."""
        return self._ctx.facts

    @property
    def record(self) -> dict[str, Any]:
        """The current training step's metrics (written to metrics.jsonl at the step's end)."""
        return self._ctx.step_record

    @property
    def metrics(self):
        return self._ctx.metrics

    @property
    def last_samples(self) -> list[Any]:
        """A few samples of the last rollout, for the log."""
        return self._ctx.last_samples

    @last_samples.setter
    def last_samples(self, samples: list[Any]) -> None:
        self._ctx.last_samples = samples

    @property
    def eval_records(self) -> list[dict[str, Any]]:
        return self._ctx.eval_records

    def end_step(self) -> None:
        """The optimizer step completed a training step."""
        self._ctx.step += 1

    def request_checkpoint(self) -> None:
        """Save this step: the run loop does it at the step's very end (opdgraph.runtime.run)."""
        self._ctx.checkpoint_due = True


@dataclass(frozen=True)
class StageInputs:
    step: Any  # opdgraph.plan.Step
    loop: LoopState
    models: Mapping[str, Any]
    values: Any  # opdgraph.runtime.declared_buffers.DeclaredBuffers (a BufferTable in tests)
    run: RunServices | Any
