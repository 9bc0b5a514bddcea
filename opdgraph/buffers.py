"""Every buffer of a training step, sized with opdgraph.sizing and tagged with the config keys that size it.

Each stage kind sizes its own buffers (opdgraph.stages.<kind>.plan_buffers, given opdgraph.stage_plan.StageFacts);
`build_buffers` collects them in stage-graph order around what no stage owns: the models' weights and optimizer
state and the data source's prompts first, then the training stages' buffers, the gradients, the sharded student's
exchange buffers and the CUDA library overheads, and last the periodic stages' (eval's pools).

Fusion changes three sizes: fused, the teacher hidden states, the student's saved activations and its hidden-state
gradient exist for one micro-batch at a time; unfused, for the whole batch (they cross from one stage's loop to
the next). Everything else is the same in both plans.

The student's gradients (`<student>.grads`) are summed over a step's micro-batches in fp32 accumulators when the
student is not fp32 (backward.grad_accumulation_dtype = "float32", the default: P x 4 plus one gradient being folded
in), else in param.grad (P x d) beside a full fp32 lm_head accumulator; the fp32 buffer's formula shows the size
the other choice would have.
With N ranks (FSDP2 data parallel) the student's weights, fp32 masters, AdamW moments and gradients are divided by
N; rollout adds `<student>.gathered_weights` (the full weights, all-gathered for the engine) and training adds
`<student>.fsdp_comm` (the root's gathered embedding/norm/lm_head, two layers' gathered weights for the current and
the prefetched layer, one layer's unreduced gradient, and the full fp32 lm_head gradient that is all-reduced).
On a CUDA target the library workspaces and the decode graphs' pool are planned too (opdgraph.cuda_overheads).
The student's activations, the logit chunk and the workspaces follow the path that runs on the target
(pipeline.device, loss.kernel, loss.divergence): see sizing.py and opdgraph.planned_paths (the plain-torch
attention's S x S scores in the activations and the no-grad forward workspaces).
The teacher is replicated (its full weights on every rank) unless the placement shards it (below). The batch
buffers are per rank (see counts.py).
With pipeline.release_phase_buffers = false the rollout KV pool and the student's gradients are held (live at every
step, never released), the plan without the releases between rollout and training.
`place_buffers` then applies a Placement (opdgraph.placement): it marks buffers offloaded or host-resident and adds
the device buffers that streaming needs (two teacher layers; one optimizer bucket). With N ranks and the student
gathered per step (placement.student_gather = "step"), `<student>.gathered_weights` stays from rollout through the
training loop, the whole gradients accumulate in `<student>.unsharded_grads` (P x d, or P x 4 with fp32 gradient
sums, from the first backward to the last, which reduce-scatters them) and `<student>.fsdp_comm` is only that
reduce-scatter's buffers; per layer, it is as described above. A sharded teacher keeps 1/N of
its weights per rank and adds what FSDP gathers: `<teacher>.gathered_layer` (the running layer and the prefetched
next one, during teacher_score), `<teacher>.gathered_root` (embedding, final norm and lm_head, from teacher_score
until the loss has read the lm_head) and, with an eval stage, `<teacher>.gathered_weights` (the whole teacher, for
eval's teacher generation).
An eval stage allocates its own KV pools (student and teacher, sized by counts.eval_counts) and a workspace, all
freed after it.
"""

from __future__ import annotations

import attrs

from opdgraph import sizing
from opdgraph.config.schema import PipelineConfig
from opdgraph.counts import setting_key
from opdgraph.cuda_overheads import overhead_buffers
from opdgraph.drafts import buffer
from opdgraph.placement import Placement
from opdgraph.plan import Buffer
from opdgraph.planned_paths import fp32_grads
from opdgraph.errors import OpdgraphError
from opdgraph.stage_plan import StageFacts, planned_stages
from opdgraph.teachers import teacher_weights
from opdgraph.stages import SOURCE_KINDS, stage_kind, stage_module


def build_buffers(cfg: PipelineConfig, facts: StageFacts) -> dict[str, Buffer]:
    """The model state's buffers, the data source's, each training stage's (opdgraph.stages.<kind>.plan_buffers, in
    stage-graph order), the gradients, the sharded student's exchange buffers and the CUDA library overheads, then
    what the periodic stages (eval) allocate."""
    buffers = [*_model_state(cfg, facts),
               *(buffer for source in SOURCE_KINDS
                 for buffer in stage_module(source).plan_buffers(source, None, facts))]
    periodic = []
    for name, stage_facts in planned_stages(cfg, facts):
        stage = cfg.stages[name]
        kind = stage_kind(stage.kind)
        (periodic if kind.periodic else buffers).extend(kind.plan_buffers(name, stage.config, stage_facts))
    buffers += [*_training_state(cfg, facts), *periodic]
    return {buffer.name: buffer for buffer in buffers}


def _model_state(cfg: PipelineConfig, facts: StageFacts) -> list[Buffer]:
    """The models' weights and the student's optimizer state, held across steps (the student's sharded N ways)."""
    student, shards = facts.student, facts.world_size
    shape, per_rank = facts.student_shape, (" / N" if shards > 1 else "")
    state = [buffer(f"{student}.weights", "weights",
                    _ceil_div(sizing.parameter_bytes(shape, facts.student_dtype_bytes), shards), facts.student_keys,
                    "held", "P x d" + per_rank, cfg.models[student].offload_when_idle)]
    if not facts.student_fp32:
        state.append(buffer(f"{student}.master_weights", "master_weights",
                            _ceil_div(sizing.master_weight_bytes(shape), shards), facts.student_keys, "held",
                            "P x 4" + per_rank))
    state.append(buffer(f"{student}.optimizer_state", "optimizer_state",
                        _ceil_div(sizing.adamw_state_bytes(shape), shards), facts.student_keys, "held",
                        "P x 2 x 4" + per_rank))
    held = {}  # one weights buffer per teacher that has its own (a model named by two stages is held once)
    for teacher in facts.teachers:
        if teacher.spec.own_weights and teacher.weights_buffer not in held:
            offload = cfg.models[teacher.spec.model].offload_when_idle and not teacher.spec.self_teacher
            formula = "P x d" if not teacher.spec.self_teacher else "P x d (a frozen copy of the initial student)"
            held[teacher.weights_buffer] = buffer(teacher.weights_buffer, "weights",
                                                  sizing.parameter_bytes(teacher.shape, teacher.dtype_bytes),
                                                  teacher.keys, "held", formula, offload)
    return [*state, *held.values()]


def _training_state(cfg: PipelineConfig, facts: StageFacts) -> list[Buffer]:
    """The student's gradients, with several ranks its gathered weights and FSDP's exchange buffers, and the CUDA
    library workspaces and decode-graph pool (opdgraph.cuda_overheads)."""
    state = [_grads_buffer(facts)]
    if facts.world_size > 1:
        shape, dtype_bytes = facts.student_shape, facts.student_dtype_bytes
        state.append(buffer(f"{facts.student}.gathered_weights", "weights", sizing.parameter_bytes(shape, dtype_bytes),
                            facts.student_keys, formula="P x d (all-gathered for rollout)"))
        layer = shape.layer_parameters() * dtype_bytes
        root = (shape.parameter_count() - shape.layers * shape.layer_parameters()) * dtype_bytes
        state.append(buffer(f"{facts.student}.fsdp_comm", "workspace", root + 3 * layer, facts.student_keys,
                            formula="root params x d + 3 x layer params x d (2 gathered + 1 unreduced grad)"))
    return state + overhead_buffers(cfg, facts.student_keys)  # cuBLAS / flashinfer workspaces, graph pool (CUDA only)


def _gib(size: int) -> str:
    return f"{size / 2**30:.2f} GiB"


def _grads_buffer(facts: StageFacts) -> Buffer:
    """`<student>.grads`, per rank: what the gradients of a step's micro-batches are summed in.

    fp32 (see fp32_grads): an fp32 accumulator per parameter (its shard with N ranks) plus the one bf16 gradient
    being folded in (unsharded: one parameter's; sharded: one FSDP unit's reduced shard). Unsharded, the lm_head's
    analytic gradient adds into its own accumulator; sharded, it has a full [V, h] fp32 one (each rank's
    contribution, summed over ranks at the optimizer step). Model dtype: param.grad (P x d) and the full fp32 lm_head accumulator. The
    formula of the fp32 buffer also gives the size in the model dtype: what grad_accumulation_dtype = "model" saves.
    """
    shape, dtype_bytes = facts.student_shape, facts.student_dtype_bytes
    world_size, lifetime, keys = facts.world_size, facts.between_phases, facts.student_keys
    if not facts.student_fp32:
        keys = (*keys, facts.setting_keys["grad_accumulation_dtype"])
    lm_head = shape.vocab * shape.hidden * sizing.FP32_BYTES
    model_size = _ceil_div(sizing.gradient_bytes(shape, dtype_bytes), world_size) + lm_head
    if world_size == 1:
        model_formula = "P x d + V x h x 4 (fp32 lm_head grad accumulator)"
        fp32_size = sizing.fp32_gradient_bytes(shape, dtype_bytes)
        fp32_formula = ("P x 4 (fp32 accumulators; the lm_head grad adds into its own) + largest param x d (one "
                        "gradient being folded in)")
    else:
        model_formula = "P x d / N + V x h x 4 (full fp32 lm_head grad)"
        layer = shape.layer_parameters()
        unit = max(shape.parameter_count() - shape.layers * layer, layer)
        fp32_size = (_ceil_div(shape.parameter_count() * sizing.FP32_BYTES, world_size) + lm_head
                     + _ceil_div(unit * dtype_bytes, world_size))
        fp32_formula = ("P x 4 / N (fp32 accumulators of the shards) + V x h x 4 (full fp32 lm_head grad) + "
                        "max(root, layer) params x d / N (one unit's reduced gradient being folded in)")
    name = f"{facts.student}.grads"
    if not facts.fp32_grads:
        return Buffer(name=name, category="grads", bytes=model_size, sized_by=keys, lifetime=lifetime,
                      formula=model_formula)
    return Buffer(name=name, category="grads", bytes=fp32_size, sized_by=keys, lifetime=lifetime,
                  formula=f"{fp32_formula}; {facts.setting_keys['grad_accumulation_dtype']} = \"model\" would hold "
                          f"{model_formula} = {_gib(model_size)}")


def _ceil_div(size: int, parts: int) -> int:
    """Bytes per rank of a tensor set sharded `parts` ways (FSDP2 pads the last shard up to the others)."""
    return -(-size // parts)


def place_buffers(buffers: dict[str, Buffer], cfg: PipelineConfig, placement: Placement,
                  world_size: int = 1) -> dict[str, Buffer]:
    """The buffers with the placement applied (the input is not changed)."""
    student = cfg.model_with_role("student")
    placed = dict(buffers)
    owners = teacher_weights(cfg)
    if placement.teacher_weights == "shard" and len(owners) != 1:
        raise OpdgraphError(f"teacher_weights = 'shard' takes exactly one teacher with weights of its own, but this "
                            f"pipeline holds {len(owners)} ({', '.join(owners) or 'none'}); keep, offload or stream "
                            f"them (pipeline.fit.teacher_weights)")
    for teacher, model in owners.items():
        weights = placed[f"{teacher}.weights"]
        placed[weights.name] = attrs.evolve(weights,
                                            offload_when_idle=placement.teacher_weights in ("offload", "stream"))
        if placement.teacher_weights == "shard":
            placed.update(_sharded_teacher_buffers(weights, cfg, world_size))
        if placement.teacher_weights == "stream":
            shape, dtype_bytes = cfg.shapes[model], cfg.models[model].dtype_bytes
            placed[weights.name] = attrs.evolve(
                placed[weights.name], bytes=sizing.teacher_resident_bytes(shape, dtype_bytes),
                formula="(P - L x layer) x d: embedding, final norm, lm_head; layers streamed")
            placed[f"{teacher}.layer_stream"] = Buffer(
                name=f"{teacher}.layer_stream", category="weights",
                bytes=sizing.layer_stream_bytes(shape, dtype_bytes), sized_by=weights.sized_by, lifetime="transient",
                formula="2 x layer params x d (running + next)")
    if world_size > 1 and placement.student_gather == "step":
        placed.update(_gathered_student_buffers(placed[f"{student}.fsdp_comm"], cfg, world_size))
    if placement.optimizer_state == "offload":
        state_names = [name for name in (f"{student}.master_weights", f"{student}.optimizer_state") if name in placed]
        for name in state_names:
            placed[name] = attrs.evolve(placed[name], device="host")
        shape = cfg.shapes[student]
        placed[f"{student}.optimizer_stream"] = Buffer(
            name=f"{student}.optimizer_stream", category="optimizer_state",
            bytes=sizing.optimizer_stream_bytes(shape, separate_masters=len(state_names) == 2),
            sized_by=placed[f"{student}.optimizer_state"].sized_by, lifetime="transient",
            formula="largest bucket x (state + fp32 grad + denominator) bytes per element")
    return placed


def _gathered_student_buffers(comm: Buffer, cfg: PipelineConfig, world_size: int) -> dict[str, Buffer]:
    """The student gathered for the whole step: whole gradients, and only the last backward's reduce-scatter.

    With fp32 gradient sums (fp32_grads) FSDP keeps the whole gradients in fp32 (P x 4, plus one unit's gradient
    in the model dtype before FSDP adds it in) and reduce-scatters them in fp32 (its inputs x 4, and a shard-sized
    fp32 output that becomes the d-byte gradient `<student>.grads` folds in)."""
    student = cfg.model_with_role("student")
    shape, dtype_bytes = cfg.shapes[student], cfg.models[student].dtype_bytes
    grads = f"{student}.unsharded_grads"
    layer = shape.layer_parameters()
    root = shape.parameter_count() - shape.layers * layer
    unit = max(root, layer)
    # The root (embedding, final norm, lm_head) is reduce-scattered last: its copy for the exchange beside the
    # previous layer's (a big vocabulary's root can be larger than several layers).
    if fp32_grads(cfg):
        whole = Buffer(name=grads, category="grads",
                       bytes=shape.parameter_count() * sizing.FP32_BYTES + unit * dtype_bytes,
                       sized_by=comm.sized_by + (setting_key(cfg, "grad_accumulation_dtype"),),
                       lifetime="transient", spans_loops=True,
                       formula="P x 4 + max(root, layer) params x d (whole gradients summed in fp32 and one unit's "
                               "being added; reduce-scattered by the last micro-batch's backward)")
        exchange = attrs.evolve(comm, bytes=(unit + layer) * sizing.FP32_BYTES
                                + _ceil_div(unit * sizing.FP32_BYTES, world_size),
                                formula="(max(root, layer) + layer) params x 4 + max(root, layer) params x 4 / N (the "
                                        "fp32 gradients being reduce-scattered, and a unit's fp32 output)")
        return {grads: whole, comm.name: exchange}
    return {grads: Buffer(name=grads, category="grads", bytes=sizing.gradient_bytes(shape, dtype_bytes),
                          sized_by=comm.sized_by, lifetime="transient", spans_loops=True,
                          formula="P x d (whole gradients, reduce-scattered by the last micro-batch's backward)"),
            comm.name: attrs.evolve(comm, bytes=(unit + layer) * dtype_bytes,
                                    formula="(max(root, layer) + layer) params x d (the gradients being "
                                            "reduce-scattered)")}


def _sharded_teacher_buffers(weights: Buffer, cfg: PipelineConfig, world_size: int) -> dict[str, Buffer]:
    """The teacher's FSDP2 shard and what its forwards gather (see the module docstring)."""
    if world_size == 1:
        raise ValueError("teacher_weights = 'shard' needs several ranks (world_size > 1); this plan is for one process")
    (teacher, model), = teacher_weights(cfg).items()
    shape, dtype_bytes = cfg.shapes[model], cfg.models[model].dtype_bytes
    full = sizing.parameter_bytes(shape, dtype_bytes)
    sharded = {weights.name: attrs.evolve(weights, bytes=_ceil_div(full, world_size),
                                          formula="P x d / N (FSDP2 shard)")}
    gathered = [("gathered_layer", sizing.layer_stream_bytes(shape, dtype_bytes),
                 "2 x layer params x d (the running layer + the prefetched next one)"),
                ("gathered_root", sizing.teacher_resident_bytes(shape, dtype_bytes),
                 "(P - L x layer) x d: embedding, final norm, lm_head, gathered until the loss is done")]
    if any(stage_kind(stage.kind).gathers_teacher for stage in cfg.stages.values()):
        gathered.append(("gathered_weights", full, "P x d (all-gathered for eval's teacher generation)"))
    for suffix, size, formula in gathered:
        name = f"{teacher}.{suffix}"
        sharded[name] = Buffer(name=name, category="weights", bytes=size, sized_by=weights.sized_by,
                               lifetime="transient", formula=formula)
    return sharded
