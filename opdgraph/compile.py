"""`compile_plan(cfg)`: typed config -> Plan. Orders the stage graph, expands each stage into plan steps, sizes the
buffers, runs lifetime analysis and attaches each step's roofline work.

The compiler is generic: each stage kind's module (opdgraph.stages.<kind>) drafts its own steps and buffers from its
Config and one StageFacts record (opdgraph.stage_plan); here they are collected in stage-graph order, placed
(opdgraph.placement_steps), and analysed.

Fusion (pipeline.fuse_training, default on): teacher_score -> loss -> backward become one micro-batch loop, with
the loss in a chunk loop inside it, so teacher hidden states live for one micro-batch and logits for one chunk.
Unfused: each stage runs over the whole batch before the next: teacher_score over every micro-batch (its hidden
states held for the whole batch), then every student forward + chunked loss (the autograd activations and the
hidden-state gradient held for the whole batch), then every backward. Same FLOPs, far more memory.
"""

from __future__ import annotations

import attrs

from opdgraph import work as W
from opdgraph.buffers import build_buffers, place_buffers
from opdgraph.config.schema import PipelineConfig
from opdgraph.counts import step_counts
from opdgraph.drafts import Draft
from opdgraph.lifetime import ScheduleBuffer, ScheduleStep, analyze
from opdgraph.placement import Placement, configured_placement
from opdgraph.placement_steps import place_drafts, placement_transfers
from opdgraph.plan import Peak, Plan, Release, Step, StepWork, Transfer
from opdgraph.stage_plan import StageFacts, ordered_stages, planned_stages, stage_facts
from opdgraph.teachers import FUSED_LOOP
from opdgraph.stages import SOURCE_KINDS, stage_kind, stage_module

GIB = 1024**3
WHEN = ("before", "during", "after")


def compile_plan(cfg: PipelineConfig, placement: Placement | None = None, world_size: int = 1) -> Plan:
    """The plan of one rank of `world_size` (> 1: the student's state is sharded with FSDP2 and rollout gathers it);
    `placement` (default: what the config asks for) says where teacher weights and optimizer state live
    (opdgraph.placement; chosen by opdgraph.fit when the plan would not fit)."""
    fused = cfg.pipeline.fuse_training
    _check_composition_ranks(cfg, world_size)
    counts = step_counts(cfg, world_size)
    hardware = W.Hardware(**attrs.asdict(cfg.pipeline.hardware))
    placement = placement or configured_placement(cfg)
    for_stages = stage_facts(cfg, counts, hardware, world_size)
    buffers = place_buffers(build_buffers(cfg, for_stages), cfg, placement, world_size)
    drafts = place_drafts(_drafts(cfg, for_stages), cfg, placement, buffers, hardware, world_size)
    on_device = [b for b in buffers.values() if b.device == "device"]  # host-resident state never takes device memory
    lifetimes = analyze([ScheduleStep(d.name, d.loops, d.reads, d.writes) for d in drafts],
                        [ScheduleBuffer(b.name, b.bytes, b.lifetime == "held", b.offload_when_idle, b.spans_loops)
                         for b in on_device])
    written = {name for draft in drafts for name in draft.writes}
    steps, transfers = [], placement_transfers(drafts, cfg, placement, buffers, hardware, world_size)
    for index, draft in enumerate(drafts):
        moved = [name for name in lifetimes.allocates[index] if buffers[name].lifetime == "held"]
        releases = tuple(Release(buffer=name, action=action) for name, action in lifetimes.releases[index])
        # An offloaded buffer that no step writes (the teacher's weights) still has a current host copy: offloading
        # it only drops the device copy, so only buffers a step writes cost a copy back.
        offloaded = [release.buffer for release in releases if release.action == "offload"]
        transfers += [Transfer(step=draft.name, when="before", buffer=name, direction="reload",
                               bytes=buffers[name].bytes, seconds=buffers[name].bytes / (hardware.pcie_gbps * 1e9))
                      for name in moved]
        transfers += [Transfer(step=draft.name, when="after", buffer=name, direction="offload",
                               bytes=buffers[name].bytes * (name in written),
                               seconds=buffers[name].bytes * (name in written) / (hardware.pcie_gbps * 1e9))
                      for name in offloaded]
        transfer = sum(buffers[name].bytes for name in moved) + sum(buffers[name].bytes for name in offloaded
                                                                    if name in written)
        total = draft.work + W.transfer_work(transfer, hardware)
        steps.append(Step(
            name=draft.name, stage=draft.stage, kind=draft.kind, reads=draft.reads, writes=draft.writes,
            loops=draft.loops, scope=_scope(draft.loops), repeats=draft.repeats,
            fused_group=draft.loops[0] if draft.loops and draft.loops[0].endswith(FUSED_LOOP) else None,
            work=StepWork(flops=total.flops, device_bytes=total.device_bytes, pcie_bytes=total.pcie_bytes,
                          seconds=total.seconds),
            allocates=tuple(name for name in lifetimes.allocates[index] if name not in moved),
            reloads=tuple(moved), releases=releases, live_bytes=lifetimes.live_bytes[index]))
    order = {draft.name: index for index, draft in enumerate(drafts)}
    peak_step = steps[lifetimes.peak_index]
    live_there = [name for name, (first, last) in lifetimes.intervals.items()
                  if first <= lifetimes.peak_index <= last]
    contributors = sorted(((name, buffers[name].bytes) for name in live_there), key=lambda item: (-item[1], item[0]))
    facts = {**counts.facts(), **_model_facts(cfg)}
    for name in ordered_stages(cfg):
        facts.update(stage_kind(cfg.stages[name].kind).plan_facts(name, cfg.stages[name].config, for_stages))
    periodic = {name for name, stage in cfg.stages.items() if stage_kind(stage.kind).periodic}
    if world_size > 1:  # only then, so single-process plans (and their goldens) do not change
        facts["world_size"] = world_size
    if for_stages.linear_core is not None:  # hybrid pipelines only, so the others' plans keep their facts
        facts["linear_attention_core"] = for_stages.linear_core
    return Plan(name=cfg.pipeline.name, fused=fused, steps=tuple(steps), buffers=buffers,
                peak=Peak(bytes=peak_step.live_bytes, step=peak_step.name, contributors=tuple(contributors)),
                budget_bytes=int(cfg.pipeline.memory_budget_gib * GIB),
                step_seconds=sum(step.work.seconds for step in steps if step.stage not in periodic),
                facts=facts, transfers=tuple(sorted(transfers, key=lambda t: (order[t.step], WHEN.index(t.when)))))


def _check_composition_ranks(cfg: PipelineConfig, world_size: int) -> None:
    """Routed rows and a live self-teacher change the number of forwards per rank and loop, which FSDP's paired
    collectives need equal on every rank: one process only, for now."""
    if world_size == 1:
        return
    from opdgraph.errors import OpdgraphError
    from opdgraph.teachers import route_field, teacher_specs

    specs = teacher_specs(cfg.models, cfg.stages, cfg.data.max_prompt_tokens)
    if route_field(cfg.stages) and len(specs) > 1:
        raise OpdgraphError(f"routed teachers (loss.route_field, {cfg.provenance.get('loss.route_field', 'default')})"
                            f" run on one process only for now; run without torchrun, or use a mixture")
    live = [spec.stage for spec in specs if spec.self_teacher and not spec.own_weights]
    if live:
        raise OpdgraphError(f"[{live[0]}] scores with the live student (frozen = false), which runs on one process "
                            f"only for now; run without torchrun, or set frozen = true")


def _scope(loops: tuple[str, ...]) -> str:
    if not loops:
        return "step"
    return "chunk" if loops[-1].endswith("chunk") else "micro_batch"


def _model_facts(cfg: PipelineConfig) -> dict[str, object]:
    facts = {}
    for name, shape in cfg.shapes.items():
        for key, value in shape.facts().items():
            facts[f"models.{name}.{key}"] = value
        facts[f"models.{name}.dtype"] = cfg.models[name].dtype
    return facts


def _drafts(cfg: PipelineConfig, facts: StageFacts) -> list[Draft]:
    """The data source's step, then each stage's steps in stage-graph order (opdgraph.stages.<kind>.plan_steps)."""
    drafts = [draft for source in SOURCE_KINDS for draft in stage_module(source).plan_steps(source, None, facts)]
    for name, stage_facts_ in planned_stages(cfg, facts):
        stage = cfg.stages[name]
        drafts += stage_kind(stage.kind).plan_steps(name, stage.config, stage_facts_)
    return drafts
