"""Executes a compiled plan, training step after training step.

The plan is an ordered list of steps; consecutive steps that share a micro-batch loop form one loop body that runs
once per micro-batch (chunk loops run inside the loss stage itself, whose chunk size the plan used). Each step is
dispatched to its stage module's `execute(step, config, inputs)` (the data source's too: opdgraph.stages.data), with
a StageInputs (opdgraph.runtime.stage_inputs): the models the stage bound once (its module's `bind`), the buffers
its plan steps declare and the loop iteration; after it, the executor applies exactly the
releases the plan lists for it (free, or offload to host) and reloads offloaded buffers before the step that needs
them. Nothing is freed anywhere else, so memory follows the plan, and a stage call sees only the buffers its plan
steps declare (opdgraph.runtime.declared_buffers): an access the plan does not know of fails at once. What drops the
memory behind a buffer at its release (the KV pools' engines) comes from the stage modules' `release_hooks`, beside
the caller's. Buffers the plan's placement moves (the teacher's weights) go through opdgraph.runtime.offload, which
moves parameter storage to pinned host memory and back.
"""

from __future__ import annotations

import time
from typing import Any

from opdgraph.runtime.context import RunContext
from opdgraph.runtime.declared_buffers import DeclaredBuffers, declared_by_stage
from opdgraph.runtime.offload import HostOffloader
from opdgraph.runtime.stage_inputs import LoopState, RunServices, StageInputs
from opdgraph.runtime.teachers import offloaded_models
from opdgraph.stages import stage_module

__all__ = ["LoopState", "PlanExecutor"]


def _segments(steps) -> list[tuple[str | None, list]]:
    """Group the plan's steps into (loop name or None, steps) segments, in order."""
    segments: list[tuple[str | None, list]] = []
    for step in steps:
        loop = step.loops[0] if step.loops else None
        if segments and loop is not None and segments[-1][0] == loop:
            segments[-1][1].append(step)
        else:
            segments.append((loop, [step]))
    return segments


class PlanExecutor:
    """Runs the plan's steps with the stage configs of the pipeline, applying the plan's releases."""

    def __init__(self, plan, stage_configs: dict[str, Any], ctx: RunContext, *, release_hooks: dict[str, Any],
                 memory_recorder=None):
        self.plan = plan
        self.memory_recorder = memory_recorder
        self.stage_configs = stage_configs
        self.ctx = ctx
        self.segments = _segments(plan.steps)
        # Buffers first allocated inside a loop are freed per iteration; a buffer from outside the loop that is last
        # read inside it, or an accumulator that spans the loop, is freed once, after the loop's last iteration.
        self.allocated_in_loop = {(step.loops[0], name) for step in plan.steps if step.loops for name in step.allocates
                                  if not plan.buffers[name].spans_loops}
        self.declared = declared_by_stage(plan)  # what each stage's calls may touch (runtime.declared_buffers)
        self.offloader = HostOffloader(plan, offloaded_models(ctx.teachers), ctx.device)
        ctx.teacher_offloader = self.offloader  # eval brings teachers in through it, outside their plan steps
        self.services = RunServices(ctx)
        kinds = {step.stage: step.kind for step in plan.steps}
        self.modules = {stage: stage_module(kind) for stage, kind in kinds.items()}
        self.bound = {stage: _bind(module, stage, stage_configs.get(stage), ctx)
                      for stage, module in self.modules.items()}
        # buffer name -> callable that drops what holds it (e.g. the KV pool): the stages' own, then the caller's
        self.release_hooks = {}
        for stage, module in self.modules.items():
            if hasattr(module, "release_hooks"):
                self.release_hooks.update(module.release_hooks(stage, stage_configs.get(stage), self.bound[stage]))
        self.release_hooks.update(release_hooks)

    def run_before_training(self) -> None:
        """The steps whose stage does something before the first training step (eval's evaluation), with the plan's
        releases of that step after each, as in a training step."""
        for step in self.plan.steps:
            module = self.modules[step.stage]
            if hasattr(module, "before_training") and self._call(step, module.before_training, LoopState()):
                self.apply_releases(step)

    def run_training_step(self) -> None:
        for loop, steps in self.segments:
            if loop is None:
                for step in steps:
                    self._run(step, LoopState())
            else:
                self._run_loop(steps)

    def _run_loop(self, steps) -> None:
        batches = self.ctx.buffers.get("responses").micro_batches
        loop = steps[0].loops[0]
        if "/" in loop:  # a routed plan's loop of one teacher: that teacher's micro-batches
            group = loop.split("/", 1)[0]
            batches = [batch for batch in batches if batch.group == group]
        if not batches:  # no row of this step went to this loop's teacher: free what its steps would have freed
            for step in steps:
                self.apply_releases(step, LoopState(), only_free=True)
        for index, micro_batch in enumerate(batches):
            state = LoopState(index=index, count=len(batches), micro_batch=micro_batch,
                              prefix=loop.split("/", 1)[0] + "/" if "/" in loop else "")
            for step in steps:
                self._run(step, state)

    def _run(self, step, loop: LoopState) -> None:
        for name in step.reloads:
            self._reload(name)
        if self.memory_recorder is not None:
            self.memory_recorder.before(step)
        started = time.perf_counter()
        self._call(step, self.modules[step.stage].execute, loop)
        self.ctx.add_seconds(step.name, time.perf_counter() - started)
        if self.memory_recorder is not None:
            self.memory_recorder.after(step)
        self.apply_releases(step, loop)

    def _call(self, step, function, loop: LoopState):
        """`function(step, config, inputs)` of the step's stage, on the buffers its plan steps declare."""
        values = DeclaredBuffers(self.ctx.buffers, step.stage, self.declared[step.stage])
        inputs = StageInputs(step=step, loop=loop, models=self.bound[step.stage], values=values, run=self.services)
        return function(step, self.stage_configs.get(step.stage), inputs)

    def apply_releases(self, step, loop: LoopState | None = None, only_free: bool = False) -> None:
        """Free or offload what the plan releases after `step` (also for a step run outside the training step: the
        eval before training); `only_free`: for a step that did not run, whose offloaded buffers never came in."""
        loop = loop or LoopState()
        last_iteration = loop.index == loop.count - 1
        for release in step.releases:
            per_iteration = bool(step.loops) and (step.loops[0], release.buffer) in self.allocated_in_loop
            if not (per_iteration or last_iteration):
                continue
            if release.action == "free":
                self._free(release.buffer)
            elif not only_free:
                self._offload(release.buffer)

    def _free(self, name: str) -> None:
        hook = self.release_hooks.get(name)
        if hook is not None:
            hook()
        self.ctx.buffers.release(name)

    def _offload(self, name: str) -> None:
        self._move(name, to_host=True)

    def _reload(self, name: str) -> None:
        self._move(name, to_host=False)

    def _move(self, name: str, *, to_host: bool) -> None:
        """Offload to / reload from host memory: through the offloader when it owns the buffer, else `.to()`."""
        if self.offloader.handles(name):
            (self.offloader.offload if to_host else self.offloader.reload)(name)
            return
        target = self.ctx.buffers.get(name) if self.ctx.buffers.has(name) else None
        if hasattr(target, "to"):
            target.to("cpu" if to_host else self.ctx.device)


def _bind(module, stage: str, config, ctx: RunContext) -> dict[str, Any]:
    """What the stage's calls use, named once for the run (its module's `bind`; nothing when it has none)."""
    return module.bind(stage, config, ctx) if hasattr(module, "bind") else {}
