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
from opdgraph.plan import Peak, Plan, Release, Step, StepWork, Transfer
from opdgraph.stages import KIND_NAMES, stage_kind

PERIODIC_KINDS = ("eval", "checkpoint", "log")  # run every n steps; not part of one training step's time
FUSED_LOOP = "train_micro_batch"
GIB = 1024**3
WHEN = ("before", "during", "after")


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


def compile_plan(cfg: PipelineConfig, placement: Placement | None = None, world_size: int = 1) -> Plan:
    """The plan of one rank of `world_size` (> 1: the student's state is sharded with FSDP2 and rollout gathers it);
    `placement` (default: what the config asks for) says where teacher weights and optimizer state live
    (opdgraph.placement; chosen by opdgraph.fit when the plan would not fit)."""
    fused = cfg.pipeline.fuse_training
    counts = step_counts(cfg, world_size)
    hardware = W.Hardware(**attrs.asdict(cfg.pipeline.hardware))
    placement = placement or configured_placement(cfg)
    buffers = place_buffers(build_buffers(cfg, counts, fused, world_size), cfg, placement, world_size)
    drafts = _place_drafts(_drafts(cfg, counts, hardware, fused, world_size), cfg, placement, buffers, hardware,
                           world_size)
    on_device = [b for b in buffers.values() if b.device == "device"]  # host-resident state never takes device memory
    lifetimes = analyze([ScheduleStep(d.name, d.loops, d.reads, d.writes) for d in drafts],
                        [ScheduleBuffer(b.name, b.bytes, b.lifetime == "held", b.offload_when_idle, b.spans_loops)
                         for b in on_device])
    written = {name for draft in drafts for name in draft.writes}
    steps, transfers = [], [*_stream_transfers(drafts, buffers, placement, hardware),
                             *_gather_transfers(drafts, cfg, placement, hardware, world_size),
                             *_student_transfers(drafts, cfg, placement, hardware, world_size)]
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


# --- Placement (opdgraph.placement): the streamed steps' extra reads, PCIe bytes and time --------------------------

def _place_drafts(drafts: list[Draft], cfg: PipelineConfig, placement: Placement, buffers, hardware,
                  world_size: int = 1) -> list[Draft]:
    """Streaming the teacher's layers: teacher_score also reads the layer buffer, and each micro-batch takes the
    longer of its compute and its copies (the next layer is copied while this one runs). Streaming the optimizer
    state: the step copies every bucket in and back out, then updates it (copies and update do not overlap).
    Sharding the teacher: teacher_score gathers every layer and the root once per micro-batch, each micro-batch
    taking the longer of its compute and its all-gathers (FSDP gathers the next layer while this one runs); the
    root stays gathered until the loss has read the lm_head; eval gathers the whole teacher once."""
    student, teacher = cfg.model_with_role("student"), cfg.model_with_role("teacher")
    teacher_bytes = cfg.shapes[teacher].parameter_count() * cfg.models[teacher].dtype_bytes
    student_bytes = cfg.shapes[student].parameter_count() * cfg.models[student].dtype_bytes
    placed = []
    for draft in drafts:
        if world_size > 1:
            draft = _gather_student_draft(draft, student, student_bytes, placement.student_gather, hardware,
                                          world_size)
        if placement.teacher_weights == "shard":
            draft = _shard_teacher_draft(draft, teacher, teacher_bytes, hardware, world_size)
        if draft.kind == "teacher_score" and placement.teacher_weights == "stream":
            streamed = _streamed_teacher_bytes(cfg)
            per_micro_batch = max(draft.work.seconds / draft.repeats, streamed / (hardware.pcie_gbps * 1e9))
            work = W.Work(draft.work.flops, draft.work.device_bytes, streamed * draft.repeats,
                          per_micro_batch * draft.repeats)
            draft = attrs.evolve(draft, reads=(*draft.reads, f"{teacher}.layer_stream"), work=work)
        if draft.kind == "step" and placement.optimizer_state == "offload":
            moved = 2 * _host_state_bytes(buffers, student)
            draft = attrs.evolve(draft, reads=(*draft.reads, f"{student}.optimizer_stream"),
                                 work=draft.work + W.transfer_work(moved, hardware))
        placed.append(draft)
    return placed


def _gather_student_draft(draft: Draft, student: str, student_bytes: int, gather: str, hardware,
                          world_size: int) -> Draft:
    """The sharded student's exchanges (module docstring of opdgraph.placement): rollout's all-gather, exposed, for
    both schedules; per layer, each micro-batch's forward gathers the student and its backward gathers it again and
    reduce-scatters the gradients, each overlapped with that micro-batch's compute (FSDP prefetches the next layer);
    per step, the training loop reads the weights gathered for rollout, the backward accumulates whole gradients and
    the last one reduce-scatters them, overlapped with its compute."""
    exchange = W.all_gather_seconds(student_bytes, world_size, hardware)  # a reduce-scatter moves as many bytes
    per_step = gather == "step"
    if draft.name.endswith(".prefill") and draft.kind == "rollout":
        return attrs.evolve(draft, work=draft.work + W.Work(seconds=exchange))
    if draft.kind == "loss" and draft.name.endswith(".student_forward"):
        if per_step:
            return attrs.evolve(draft, reads=(*draft.reads, f"{student}.gathered_weights"),
                                writes=tuple(name for name in draft.writes if name != f"{student}.fsdp_comm"))
        return _overlapped(draft, exchange)
    if draft.kind == "backward":
        if not per_step:
            return _overlapped(draft, 2 * exchange)
        compute = draft.work.seconds / draft.repeats
        seconds = compute * (draft.repeats - 1) + max(compute, exchange)
        return attrs.evolve(draft, reads=(*draft.reads, f"{student}.gathered_weights"),
                            writes=(*draft.writes, f"{student}.unsharded_grads"),
                            work=attrs.evolve(draft.work, seconds=seconds))
    return draft


def _overlapped(draft: Draft, exchange_per_repeat: float) -> Draft:
    per_repeat = max(draft.work.seconds / draft.repeats, exchange_per_repeat)
    return attrs.evolve(draft, work=attrs.evolve(draft.work, seconds=per_repeat * draft.repeats))


def _shard_teacher_draft(draft: Draft, teacher: str, teacher_bytes: int, hardware, world_size: int) -> Draft:
    if draft.kind == "teacher_score":
        per_micro_batch = max(draft.work.seconds / draft.repeats,
                              W.all_gather_seconds(teacher_bytes, world_size, hardware))
        work = attrs.evolve(draft.work, seconds=per_micro_batch * draft.repeats)
        return attrs.evolve(draft, writes=(*draft.writes, f"{teacher}.gathered_layer", f"{teacher}.gathered_root"),
                            work=work)
    if draft.kind == "loss" and f"{teacher}.weights" in draft.reads:  # the chunked loss reads the lm_head
        return attrs.evolve(draft, reads=(*draft.reads, f"{teacher}.gathered_root"))
    if draft.kind == "eval":
        seconds = W.all_gather_seconds(teacher_bytes, world_size, hardware)
        return attrs.evolve(draft, writes=(*draft.writes, f"{teacher}.gathered_weights"),
                            work=draft.work + W.Work(seconds=seconds))
    return draft


def _gather_transfers(drafts: list[Draft], cfg: PipelineConfig, placement: Placement, hardware,
                      world_size: int) -> list[Transfer]:
    """A sharded teacher's all-gathers over the GPU interconnect: bytes each rank receives per training step."""
    if placement.teacher_weights != "shard":
        return []
    teacher = cfg.model_with_role("teacher")
    size = cfg.shapes[teacher].parameter_count() * cfg.models[teacher].dtype_bytes
    received = W.all_gather_bytes(size, world_size)
    return [Transfer(step=draft.name, when="during", buffer=f"{teacher}.weights", direction="all_gather",
                     bytes=int(received * draft.repeats),
                     seconds=draft.repeats * W.all_gather_seconds(size, world_size, hardware))
            for draft in drafts if draft.kind == "teacher_score"]  # eval's gather is periodic: in its own time


def _student_transfers(drafts: list[Draft], cfg: PipelineConfig, placement: Placement, hardware,
                       world_size: int) -> list[Transfer]:
    """The sharded student's all-gathers and reduce-scatters per training step (bytes each rank receives)."""
    if world_size == 1:
        return []
    student = cfg.model_with_role("student")
    size = cfg.shapes[student].parameter_count() * cfg.models[student].dtype_bytes
    received, seconds = W.all_gather_bytes(size, world_size), W.all_gather_seconds(size, world_size, hardware)
    per_layer = placement.student_gather == "layer"
    transfers = []
    for draft in drafts:
        exchanges = []
        if draft.kind == "rollout" and draft.name.endswith(".prefill"):
            exchanges = [("all_gather", 1)]
        elif per_layer and draft.kind == "loss" and draft.name.endswith(".student_forward"):
            exchanges = [("all_gather", draft.repeats)]
        elif draft.kind == "backward":
            exchanges = [("all_gather", draft.repeats), ("reduce_scatter", draft.repeats)] if per_layer else \
                [("reduce_scatter", 1)]
        transfers += [Transfer(step=draft.name, when="during", buffer=f"{student}.weights" if direction == "all_gather"
                               else f"{student}.grads", direction=direction, bytes=int(received * times),
                               seconds=seconds * times) for direction, times in exchanges]
    return transfers


def _streamed_teacher_bytes(cfg: PipelineConfig) -> int:
    teacher = cfg.model_with_role("teacher")
    shape = cfg.shapes[teacher]
    return shape.layers * shape.layer_parameters() * cfg.models[teacher].dtype_bytes


def _host_state_bytes(buffers, student: str) -> int:
    return sum(buffer.bytes for buffer in buffers.values() if buffer.device == "host" and buffer.name.startswith(
        f"{student}."))


def _stream_transfers(drafts: list[Draft], buffers, placement: Placement, hardware) -> list[Transfer]:
    transfers = []
    for draft in drafts:
        for name in draft.reads:
            if name.endswith(".layer_stream"):
                streamed = draft.work.pcie_bytes
                transfers.append(Transfer(step=draft.name, when="during", buffer=name, direction="stream",
                                          bytes=int(streamed), seconds=streamed / (hardware.pcie_gbps * 1e9)))
            if name.endswith(".optimizer_stream"):
                for state in (b for b in buffers.values() if b.device == "host"):
                    transfers.append(Transfer(step=draft.name, when="during", buffer=state.name, direction="stream",
                                              bytes=2 * state.bytes,
                                              seconds=2 * state.bytes / (hardware.pcie_gbps * 1e9)))
    return transfers
