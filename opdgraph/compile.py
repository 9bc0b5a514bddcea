"""`compile_plan(cfg)`: typed config -> Plan. Orders the stage graph, expands each stage into plan steps, sizes the
buffers, runs lifetime analysis and attaches each step's roofline work.

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
from opdgraph.counts import StepCounts, eval_counts, step_counts
from opdgraph.cuda_overheads import uses_flashinfer
from opdgraph.graph import StageNode, build_stage_graph, stage_order
from opdgraph.lifetime import ScheduleBuffer, ScheduleStep, analyze
from opdgraph.placement import Placement, configured_placement
from opdgraph.placement_steps import Draft, place_drafts, placement_transfers
from opdgraph.plan import Peak, Plan, Release, Step, StepWork, Transfer
from opdgraph.stages import KIND_NAMES, stage_kind

PERIODIC_KINDS = ("eval", "checkpoint", "log")  # run every n steps; not part of one training step's time
FUSED_LOOP = "train_micro_batch"
GIB = 1024**3
WHEN = ("before", "during", "after")


def compile_plan(cfg: PipelineConfig, placement: Placement | None = None, world_size: int = 1) -> Plan:
    """The plan of one rank of `world_size` (> 1: the student's state is sharded with FSDP2 and rollout gathers it);
    `placement` (default: what the config asks for) says where teacher weights and optimizer state live
    (opdgraph.placement; chosen by opdgraph.fit when the plan would not fit)."""
    fused = cfg.pipeline.fuse_training
    counts = step_counts(cfg, world_size)
    hardware = W.Hardware(**attrs.asdict(cfg.pipeline.hardware))
    placement = placement or configured_placement(cfg)
    buffers = place_buffers(build_buffers(cfg, counts, fused, world_size), cfg, placement, world_size)
    drafts = place_drafts(_drafts(cfg, counts, hardware, fused, world_size), cfg, placement, buffers, hardware,
                          world_size)
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
            fused_group=FUSED_LOOP if FUSED_LOOP in draft.loops else None,
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
    for stage in cfg.stages_of_kind("eval"):
        facts.update(eval_counts(cfg, stage.name).facts())
    if world_size > 1:  # only then, so single-process plans (and their goldens) do not change
        facts["world_size"] = world_size
    return Plan(name=cfg.pipeline.name, fused=fused, steps=tuple(steps), buffers=buffers,
                peak=Peak(bytes=peak_step.live_bytes, step=peak_step.name, contributors=tuple(contributors)),
                budget_bytes=int(cfg.pipeline.memory_budget_gib * GIB),
                step_seconds=sum(step.work.seconds for step in steps if step.kind not in PERIODIC_KINDS),
                facts=facts, transfers=tuple(sorted(transfers, key=lambda t: (order[t.step], WHEN.index(t.when)))))


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


def _ordered_stages(cfg: PipelineConfig) -> list[str]:
    nodes = [StageNode(name, stage.kind, stage_kind(stage.kind).reads, stage_kind(stage.kind).writes)
             for name, stage in cfg.stages.items()]
    return stage_order(build_stage_graph(nodes), {kind: rank for rank, kind in enumerate(KIND_NAMES)})


def _drafts(cfg: PipelineConfig, counts: StepCounts, hardware: W.Hardware, fused: bool,
            world_size: int = 1) -> list[Draft]:
    student, teacher = cfg.model_with_role("student"), cfg.model_with_role("teacher")
    s_shape, t_shape = cfg.shapes[student], cfg.shapes[teacher]
    s_dtype, t_dtype = cfg.models[student].dtype_bytes, cfg.models[teacher].dtype_bytes
    s_weights, t_weights = s_shape.parameter_count() * s_dtype, t_shape.parameter_count() * t_dtype
    optimizer_reads = tuple(name for name in (f"{student}.master_weights", f"{student}.optimizer_state")
                            if cfg.models[student].dtype != "float32" or not name.endswith("master_weights"))
    micro, chunks, seq = counts.num_micro_batches, counts.num_micro_batches * counts.chunks_per_micro_batch, \
        counts.sequence_tokens
    micro_tokens, chunk_tokens = counts.micro_batch_tokens, counts.chunk_tokens
    s_kv = s_shape.kv_bytes_per_token(s_dtype)
    drafts = [Draft("data.load", "data", "data", (), ("prompts",), (), 1, W.Work())]
    # Sharded: rollout runs on the all-gathered weights, training holds FSDP's all-gather / reduce-scatter buffers.
    gathered = (f"{student}.gathered_weights",) if world_size > 1 else ()
    comm = (f"{student}.fsdp_comm",) if world_size > 1 else ()

    def loop(name):
        return (FUSED_LOOP,) if fused else (f"{name}.micro_batch",)

    for stage_name in _ordered_stages(cfg):
        stage = cfg.stages[stage_name]
        kind, config = stage.kind, stage.config
        if kind == "rollout":
            kv, workspace = f"{stage_name}.kv_cache", f"{stage_name}.workspace"
            graph_pool = (f"{stage_name}.decode_graph_pool",) if uses_flashinfer(cfg) else ()
            drafts.append(Draft(f"{stage_name}.prefill", stage_name, kind, (f"{student}.weights", "prompts"),
                                (kv, workspace, *gathered), (), 1, W.prefill_work(
                                    s_shape, sequences=counts.sequences, prompt_tokens=counts.prompt_tokens,
                                    token_budget=config.prefill_token_budget, weight_bytes=s_weights,
                                    kv_bytes_per_token=s_kv, hardware=hardware)))
            drafts.append(Draft(f"{stage_name}.decode", stage_name, kind,
                                (f"{student}.weights", kv, workspace, *graph_pool, *gathered),
                                ("responses",), (), counts.decode_rounds, W.decode_work(
                                    s_shape, sequences=counts.sequences, concurrent_seqs=counts.concurrent_seqs,
                                    prompt_tokens=counts.prompt_tokens, new_tokens=counts.new_tokens,
                                    weight_bytes=s_weights, kv_bytes_per_token=s_kv, hardware=hardware)))
        elif kind == "teacher_score":
            flops = W.forward_flops(t_shape, micro_tokens, seq)
            moved = t_weights + micro_tokens * t_shape.hidden * t_dtype
            drafts.append(Draft(stage_name, stage_name, kind, (f"{teacher}.weights", "responses"),
                                ("teacher_hidden", f"{stage_name}.workspace"), loop(stage_name), micro,
                                W.roofline(flops, moved, 0, hardware, micro)))
        elif kind == "loss":
            forward_bytes = s_weights + (micro_tokens * s_shape.hidden * s_dtype)
            drafts.append(Draft(f"{stage_name}.student_forward", stage_name, kind, (f"{student}.weights", "responses"),
                                ("student_hidden", "student_activations", *comm), loop(stage_name), micro, W.roofline(
                                    W.forward_flops(s_shape, micro_tokens, seq), forward_bytes, 0, hardware, micro)))
            flops = 3 * W.lm_head_flops(s_shape, chunk_tokens) + W.lm_head_flops(t_shape, chunk_tokens)
            moved = (s_shape.vocab * s_shape.hidden * s_dtype + t_shape.vocab * t_shape.hidden * t_dtype
                     + 2 * chunk_tokens * (2 * s_shape.vocab + t_shape.vocab) * 4)
            drafts.append(Draft(stage_name, stage_name, kind,
                                (f"{student}.weights", f"{teacher}.weights", "student_hidden", "teacher_hidden",
                                 "responses"), ("logit_chunk", "hidden_grad", f"{student}.grads"),
                                (*loop(stage_name), f"{stage_name}.chunk"), chunks,
                                W.roofline(flops, moved, 0, hardware, chunks)))
        elif kind == "backward":
            checkpointing = config.activation_checkpointing
            flops = W.forward_flops(s_shape, micro_tokens, seq) * (3 if checkpointing else 2)
            moved = s_weights + 2 * s_weights  # read weights; read+write gradient accumulators
            # responses: the micro-batch's trained positions, where the hidden-state gradient is scattered.
            drafts.append(Draft(stage_name, stage_name, kind, (f"{student}.weights", "hidden_grad",
                                                               "student_activations", "responses", *comm),
                                (f"{student}.grads", f"{stage_name}.workspace"), loop(stage_name), micro,
                                W.roofline(flops, moved, 0, hardware, micro)))
        elif kind == "step":
            drafts.append(Draft(stage_name, stage_name, kind, (f"{student}.grads", *optimizer_reads),
                                (f"{student}.weights",), (), 1,
                                W.optimizer_work(s_shape.parameter_count(), s_dtype, hardware)))
        elif kind == "eval":
            evaluated = eval_counts(cfg, stage_name)
            eval_work = W.decode_work(s_shape, sequences=config.num_prompts, concurrent_seqs=evaluated.concurrent_seqs,
                                      prompt_tokens=counts.prompt_tokens, new_tokens=config.max_new_tokens,
                                      weight_bytes=s_weights, kv_bytes_per_token=s_kv, hardware=hardware)
            allocated = (f"{stage_name}.kv_cache", f"{stage_name}.teacher_kv_cache", f"{stage_name}.workspace",
                         *((f"{stage_name}.gathered_weights",) if world_size > 1 else ()))
            drafts.append(Draft(stage_name, stage_name, kind, (f"{student}.weights",), allocated, (), 1, eval_work))
        elif kind == "checkpoint":
            saved = s_weights + (s_shape.parameter_count() * 12)
            drafts.append(Draft(stage_name, stage_name, kind, (f"{student}.weights", f"{student}.optimizer_state"),
                                (), (), 1, W.transfer_work(saved, hardware)))
        elif kind == "log":
            drafts.append(Draft(stage_name, stage_name, kind, (), (), (), 1, W.Work()))
    return drafts
