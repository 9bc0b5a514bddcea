"""What a placement (opdgraph.placement) and several ranks change in the compiler's draft steps: extra reads, the
time of streams and FSDP exchanges, and the transfers each step lists. `opdgraph.compile` drafts the steps of the
plain plan, then hands them here. What a step does is read from its draft's roles (opdgraph.drafts), which the stage
kind that drafts it sets: nothing here depends on which kind a step comes from.

- Streaming the teacher's layers: a teacher forward (teacher_score) also reads the layer buffer, and each
  micro-batch takes the longer of its compute and its copies (the next layer is copied while this one runs).
- Streaming the optimizer state: the optimizer update (step) copies every bucket in for the optimizer's
  finiteness check, then in and back out for the update (copies and update do not overlap): three times the host
  state over PCIe.
- Sharding the teacher: teacher_score gathers every layer and the root once per micro-batch, each micro-batch
  taking the longer of its compute and its all-gathers (FSDP gathers the next layer while this one runs); the root
  stays gathered until the loss has read the lm_head; eval gathers the whole teacher once.
- The sharded student (several ranks): rollout's all-gather, exposed; then per step or per layer (student_gather).
"""

from __future__ import annotations

import attrs

from opdgraph import work as W
from opdgraph.planned_paths import fp32_grads
from opdgraph.config.schema import PipelineConfig
from opdgraph.drafts import (
    OPTIMIZER_UPDATE,
    STUDENT_BACKWARD,
    STUDENT_FORWARD,
    STUDENT_GENERATE,
    TEACHER_FORWARD,
    TEACHER_HEAD,
    WHOLE_TEACHER,
    Draft,
)
from opdgraph.placement import Placement
from opdgraph.plan import Transfer
from opdgraph.sizing import FP32_BYTES
from opdgraph.teachers import teacher_weights

# Host state bytes a streamed optimizer step moves per byte: check pass in, update pass in and out (train.optimizer).
OPTIMIZER_STATE_TRIPS = 3


def place_drafts(drafts: list[Draft], cfg: PipelineConfig, placement: Placement, buffers, hardware,
                  world_size: int = 1) -> list[Draft]:
    """The drafts with the placement's and the ranks' reads and times (see the module docstring)."""
    student, owners = cfg.model_with_role("student"), teacher_weights(cfg)
    student_bytes = _weight_bytes(cfg, student)
    placed = []
    for draft in drafts:
        if world_size > 1:
            draft = _gather_student_draft(draft, student, student_bytes, _reduced_bytes(cfg, placement),
                                          placement.student_gather, hardware, world_size)
        if placement.teacher_weights == "shard":
            (teacher, model), = owners.items()
            draft = _shard_teacher_draft(draft, teacher, _weight_bytes(cfg, model), hardware, world_size)
        teacher = next((name[:-len(".weights")] for name in draft.reads if name[:-len(".weights")] in owners), None)
        if TEACHER_FORWARD in draft.roles and placement.teacher_weights == "stream" and teacher is not None:
            streamed = _streamed_teacher_bytes(cfg, owners[teacher])
            per_micro_batch = max(draft.work.seconds / draft.repeats, streamed / (hardware.pcie_gbps * 1e9))
            work = W.Work(draft.work.flops, draft.work.device_bytes, streamed * draft.repeats,
                          per_micro_batch * draft.repeats)
            draft = attrs.evolve(draft, reads=(*draft.reads, f"{teacher}.layer_stream"), work=work)
        if OPTIMIZER_UPDATE in draft.roles and placement.optimizer_state == "offload":
            moved = OPTIMIZER_STATE_TRIPS * _host_state_bytes(buffers, student)
            draft = attrs.evolve(draft, reads=(*draft.reads, f"{student}.optimizer_stream"),
                                 work=draft.work + W.transfer_work(moved, hardware))
        placed.append(draft)
    return placed


def _student_exchanges(draft: Draft, per_layer: bool) -> list[tuple[str, int]]:
    """The sharded student's exchanges in one step of the plan, (direction, times per training step): rollout's
    all-gather; per layer, each micro-batch's forward gathers the student and its backward gathers it again and
    reduce-scatters the gradients; per step, only the last backward reduce-scatters (the whole gradients)."""
    if STUDENT_GENERATE in draft.roles:
        return [("all_gather", 1)]
    if per_layer and STUDENT_FORWARD in draft.roles:
        return [("all_gather", draft.repeats)]
    if STUDENT_BACKWARD in draft.roles:
        return [("all_gather", draft.repeats), ("reduce_scatter", draft.repeats)] if per_layer else \
            [("reduce_scatter", 1)]
    return []


def _gather_student_draft(draft: Draft, student: str, student_bytes: int, reduced_bytes: int, gather: str,
                          hardware, world_size: int) -> Draft:
    """The sharded student's exchanges (`_student_exchanges`) in the draft's time: rollout's all-gather exposed; the
    training loop's overlapped with compute (FSDP prefetches the next layer; the last backward reduce-scatters
    while it computes). Per step, the training loop also reads the weights gathered for rollout and the backward
    accumulates whole gradients."""
    exchange = W.all_gather_seconds(student_bytes, world_size, hardware)  # a reduce-scatter moves as many bytes
    per_step = gather == "step"
    times = sum(count for _, count in _student_exchanges(draft, per_layer=not per_step))
    if STUDENT_GENERATE in draft.roles:
        return attrs.evolve(draft, work=draft.work + W.Work(seconds=exchange * times))
    if STUDENT_FORWARD in draft.roles and per_step:
        return attrs.evolve(draft, reads=(*draft.reads, f"{student}.gathered_weights"),
                            writes=tuple(name for name in draft.writes if name != f"{student}.fsdp_comm"))
    if STUDENT_BACKWARD in draft.roles and per_step:
        compute = draft.work.seconds / draft.repeats
        reduce_scatter = W.all_gather_seconds(reduced_bytes, world_size, hardware)
        seconds = compute * (draft.repeats - 1) + max(compute, reduce_scatter)
        return attrs.evolve(draft, reads=(*draft.reads, f"{student}.gathered_weights"),
                            writes=(*draft.writes, f"{student}.unsharded_grads"),
                            work=attrs.evolve(draft.work, seconds=seconds))
    return _overlapped(draft, exchange * times / draft.repeats) if times else draft


def _overlapped(draft: Draft, exchange_per_repeat: float) -> Draft:
    """Each repeat takes the longer of its compute and its exchanges."""
    per_repeat = max(draft.work.seconds / draft.repeats, exchange_per_repeat)
    return attrs.evolve(draft, work=attrs.evolve(draft.work, seconds=per_repeat * draft.repeats))


def _shard_teacher_draft(draft: Draft, teacher: str, teacher_bytes: int, hardware, world_size: int) -> Draft:
    if TEACHER_FORWARD in draft.roles:
        gathered = _overlapped(draft, W.all_gather_seconds(teacher_bytes, world_size, hardware))
        return attrs.evolve(gathered, writes=(*draft.writes, f"{teacher}.gathered_layer",
                                              f"{teacher}.gathered_root"))
    if TEACHER_HEAD in draft.roles and f"{teacher}.weights" in draft.reads:  # the chunked loss
        return attrs.evolve(draft, reads=(*draft.reads, f"{teacher}.gathered_root"))
    if WHOLE_TEACHER in draft.roles:
        seconds = W.all_gather_seconds(teacher_bytes, world_size, hardware)
        return attrs.evolve(draft, writes=(*draft.writes, f"{teacher}.gathered_weights"),
                            work=draft.work + W.Work(seconds=seconds))
    return draft


def _exchange(draft: Draft, buffer: str, direction: str, size: int, times: int, world_size: int,
              hardware) -> Transfer:
    """`times` FSDP exchanges of a tensor set of `size` bytes during `draft`: bytes each rank receives."""
    return Transfer(step=draft.name, when="during", buffer=buffer, direction=direction,
                    bytes=int(W.all_gather_bytes(size, world_size) * times),
                    seconds=times * W.all_gather_seconds(size, world_size, hardware))


def _gather_transfers(drafts: list[Draft], cfg: PipelineConfig, placement: Placement, hardware,
                      world_size: int) -> list[Transfer]:
    """A sharded teacher's all-gathers over the GPU interconnect: bytes each rank receives per training step."""
    if placement.teacher_weights != "shard":
        return []
    (teacher, model), = teacher_weights(cfg).items()
    size = _weight_bytes(cfg, model)
    return [_exchange(draft, f"{teacher}.weights", "all_gather", size, draft.repeats, world_size, hardware)
            for draft in drafts if TEACHER_FORWARD in draft.roles]  # eval's gather is periodic: its own time


def _student_transfers(drafts: list[Draft], cfg: PipelineConfig, placement: Placement, hardware,
                       world_size: int) -> list[Transfer]:
    """The sharded student's all-gathers and reduce-scatters per training step (bytes each rank receives)."""
    if world_size == 1:
        return []
    student = cfg.model_with_role("student")
    per_layer = placement.student_gather == "layer"
    sizes = {"all_gather": _weight_bytes(cfg, student), "reduce_scatter": _reduced_bytes(cfg, placement)}
    return [_exchange(draft, f"{student}.weights" if direction == "all_gather" else f"{student}.grads", direction,
                      sizes[direction], times, world_size, hardware)
            for draft in drafts for direction, times in _student_exchanges(draft, per_layer)]


def _reduced_bytes(cfg: PipelineConfig, placement: Placement) -> int:
    """Bytes of the student's gradients one reduce-scatter moves: fp32 when gathered per step with fp32 gradient
    sums (FSDP reduces the fp32 whole gradients, opdgraph.runtime.gradients), else the model dtype."""
    student = cfg.model_with_role("student")
    if placement.student_gather == "step" and fp32_grads(cfg):
        return cfg.shapes[student].parameter_count() * FP32_BYTES
    return _weight_bytes(cfg, student)


def _weight_bytes(cfg: PipelineConfig, model: str) -> int:
    return cfg.shapes[model].parameter_count() * cfg.models[model].dtype_bytes


def _streamed_teacher_bytes(cfg: PipelineConfig, teacher: str) -> int:
    shape = cfg.shapes[teacher]
    return shape.all_layer_parameters() * cfg.models[teacher].dtype_bytes


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
                                              bytes=OPTIMIZER_STATE_TRIPS * state.bytes,
                                              seconds=OPTIMIZER_STATE_TRIPS * state.bytes
                                              / (hardware.pcie_gbps * 1e9)))
    return transfers


def placement_transfers(drafts: list[Draft], cfg: PipelineConfig, placement: Placement, buffers, hardware,
                        world_size: int) -> list[Transfer]:
    """Streams over PCIe, then the FSDP exchanges of a sharded teacher and of a sharded student."""
    return [*_stream_transfers(drafts, buffers, placement, hardware),
            *_gather_transfers(drafts, cfg, placement, hardware, world_size),
            *_student_transfers(drafts, cfg, placement, hardware, world_size)]
