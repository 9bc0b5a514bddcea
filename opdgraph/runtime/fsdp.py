"""FSDP2 for data-parallel runs: sharding the student and the teacher, gathering them when and as the plan says.

The student's parameters, gradients, fp32 masters and AdamW moments are sharded (`shard_student`: `fully_shard` per
decoder layer and the root), and the rollout engine runs on the gathered weights (`UnshardingEngine`). The plan's
student_gather (opdgraph.placement) sets FSDP's schedule in training: "layer" is FSDP's default (each micro-batch
gathers layer by layer and reduce-scatters its gradients); "step" keeps the weights gathered for rollout through the
micro-batch loop (`begin_step_gather`), lets whole gradients accumulate without reduction until the last
micro-batch's backward (`sync_gradients_if_last`), and reshards at the plan's release of `<student>.gathered_weights`
(`end_step_gather`), before the optimizer step.
Gradients: opdgraph.runtime.gradients folds each reduced bf16 shard into fp32 accumulators (per layer, once per
micro-batch; per step, FSDP accumulates the whole gradients in fp32 itself, `shard_student(reduce_dtype=float32)`).
The teacher is replicated on every rank (the plan counts its full size per rank), or, with the placement
teacher_weights = "shard", sharded forward-only (`shard_teacher`): each rank holds 1/N of its weights, a layer is
all-gathered for its own forward and resharded after it, and the root (embedding, final norm, lm_head) stays
gathered from the teacher's forward until the loss has read the lm_head (the plan's `<teacher>.gathered_root`,
whose release reshards it).
"""

from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist

from opdgraph.runtime.distributed import world_size


def _fsdp_modules(model) -> list:
    return [model, *model.layers]


def _fully_shard_units(model, reduce_dtype: torch.dtype | None = None) -> None:
    """FSDP2 units: each decoder layer, then the root (embedding, final norm, lm_head). FSDP's default mesh is CUDA
    wherever CUDA exists, so a CPU run there (under torchrun, with fewer GPUs than ranks it fails) gets a CPU mesh.
    `reduce_dtype`: the dtype FSDP accumulates unreduced gradients in and reduce-scatters them in (None: the
    parameter dtype)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mesh = None
    if model.device.type == "cpu" and torch.cuda.is_available():
        from torch.distributed.device_mesh import init_device_mesh

        mesh = init_device_mesh("cpu", (world_size(),))
    policy = MixedPrecisionPolicy(reduce_dtype=reduce_dtype)
    for layer in model.layers:
        fully_shard(layer, mesh=mesh, mp_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=policy)


def shard_student(model, *, reduce_dtype: torch.dtype | None = None) -> None:
    """FSDP2: each decoder layer is one all-gather unit, the root holds embedding, final norm and lm_head.

    Gradients are summed across ranks (divide factor 1): the loss weights already divide by the global token count.
    `reduce_dtype` float32 (fp32 gradient accumulation under student_gather = "step"): the whole gradients that FSDP
    sums over the step's micro-batches before its one reduce-scatter are fp32, and so is that reduce-scatter
    (opdgraph.runtime.gradients); None keeps both in the parameter dtype.
    """
    _fully_shard_units(model, reduce_dtype)
    for module in _fsdp_modules(model):
        module.set_gradient_divide_factor(1.0)
        module.set_force_sum_reduction_for_comms(True)  # plain SUM: gloo has no PREMUL_SUM
    _initialise_root(model)


def shard_teacher(model) -> None:
    """FSDP2 for the frozen teacher (no gradients, no optimizer): the same units as the student's.

    A layer is all-gathered in its forward's pre-hook and resharded after it (FSDP's default for non-root units;
    the next layer's all-gather is issued while this one computes, so about two layers are gathered at a time).
    FSDP never reshards a root after its forward (in training the backward would gather it again at once), and the
    teacher has no backward: after `forward_hidden` the root's parameters stay full, so the loss reads a full
    `lm_head_weight`; `reshard_forward_only` (the release of the plan's `<teacher>.gathered_root`) frees them again.
    Every rank runs the same number of teacher forwards (`pad_micro_batches`), so the all-gathers pair up.
    """
    _fully_shard_units(model)
    _initialise_root(model)


def _initialise_root(model) -> None:
    """Make `forward_hidden` the root's forward and run it once on one token, so FSDP initialises from the root;
    otherwise a rollout engine, which calls the layers directly, would make a layer its own root."""
    from torch.distributed.fsdp import register_fsdp_forward_method
    from opdgraph.models.packing import pack

    register_fsdp_forward_method(model, "forward_hidden")
    with torch.no_grad():
        model.forward_hidden(*pack([[0]], device=model.device))
    model.reshard()


def is_sharded(model) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def reshard_forward_only(model) -> None:
    """Reshard a forward-only FSDP model (the sharded teacher) and drop FSDP's per-forward backward bookkeeping.

    FSDP2 records every unit's forward (for the backward's prefetch order) and clears the record only at the end of
    a backward, which a frozen teacher never runs: without this the lists grow by a few entries per micro-batch for
    the whole run (host memory). Attribute names differ across torch versions; what is missing is skipped.
    """
    model.reshard()
    state = model._get_fsdp_state() if hasattr(model, "_get_fsdp_state") else None
    comm_ctx = getattr(state, "_comm_ctx", None)
    if comm_ctx is not None and hasattr(comm_ctx, "post_forward_order"):
        comm_ctx.post_forward_order.clear()
    for unit_state in getattr(getattr(state, "_state_ctx", None), "all_states", []):
        groups = getattr(unit_state, "_fsdp_param_groups", None)
        if groups is None:
            group = getattr(unit_state, "_fsdp_param_group", None)
            groups = [] if group is None else [group]
        for group in groups:
            if hasattr(group, "_post_forward_indices"):
                group._post_forward_indices.clear()


def gather_all(model) -> None:
    """All-gather every unit and keep it gathered, even across forwards (collective: all ranks call it)."""
    for module in _fsdp_modules(model):
        module.unshard()
    for layer in model.layers:
        layer.set_reshard_after_forward(False)


def reshard_all(model) -> None:
    """Undo `gather_all`: layers reshard after each forward again, and every unit drops its full weights now."""
    for layer in model.layers:
        layer.set_reshard_after_forward(True)
    for module in _fsdp_modules(model):
        module.reshard()


def begin_step_gather(model) -> None:
    """Gather the student for the rest of the training step (collective): no reshard after a forward or a backward,
    no gradient reduction until `sync_gradients_if_last` says so. Gathering twice is a no-op."""
    gather_all(model)
    for module in _fsdp_modules(model):
        module.set_reshard_after_backward(False, recurse=False)
        module.set_requires_gradient_sync(False, recurse=False)


def sync_gradients_if_last(model, index: int, count: int) -> None:
    """Before micro-batch `index` of `count`'s backward: only the last one reduce-scatters the accumulated whole
    gradients (every rank runs the same count, `pad_micro_batches`, so the reduce-scatters pair up)."""
    last = index == count - 1
    for module in _fsdp_modules(model):
        module.set_requires_gradient_sync(last, recurse=False)


def end_step_gather(model) -> None:
    """The release of `<student>.gathered_weights` under student_gather = "step": back to FSDP's per-layer defaults,
    and every unit drops its full weights (the reduce-scattered gradients stay, sharded, for the optimizer)."""
    for module in _fsdp_modules(model):
        module.set_reshard_after_backward(True, recurse=False)
        module.set_requires_gradient_sync(True, recurse=False)
    reshard_all(model)


@contextlib.contextmanager
def unsharded_for_rollout(model):
    """All-gather every parameter and keep it gathered until the block ends (collective: all ranks enter).

    Inside, the module's parameters are plain full tensors, so the rollout engine's `forward_paged` (and
    `save_pretrained`) see an ordinary module. Layers do not reshard after their forward while inside: ranks decode
    different numbers of steps, and a per-forward all-gather would need every rank to take part. Costs the full
    weights (P x dtype) per rank for the duration; the plan lists it as `<student>.gathered_weights`.
    """
    if not is_sharded(model):
        yield model
        return
    gather_all(model)
    try:
        yield model
    finally:
        reshard_all(model)


class GatheredTeacher:
    """The sharded teacher gathered whole for eval (the teacher generates its own answers with the rollout engine,
    whose ranks decode different numbers of steps, so per-layer all-gathers would not pair up); the plan counts
    it as `<teacher>.gathered_weights` of the eval step. Same calls as offload.ParameterSwap, which eval uses to
    bring an offloaded teacher onto the device: `to_device()` gathers, `to_host()` reshards."""

    def __init__(self, model):
        self.model = model

    def to_device(self) -> None:
        gather_all(self.model)

    def to_host(self) -> None:
        reshard_all(self.model)


class GatheredModel:
    """What `save_pretrained` reads of a model (config, dtype, state_dict) with every tensor gathered in full on
    the CPU; collective (all ranks build it), one tensor at a time, so the device holds at most one extra tensor."""

    def __init__(self, model):
        self.config, self.dtype = model.config, model.dtype
        self._state = {name: (tensor.full_tensor() if hasattr(tensor, "device_mesh") else tensor).detach().cpu()
                       for name, tensor in model.state_dict().items()}

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self._state


class UnshardingEngine:
    """The rollout engine of a sharded student: gathers the weights around each `generate` (with `keep_gathered`,
    the student_gather = "step" schedule, they stay gathered after it: `begin_step_gather`); else the engine."""

    def __init__(self, engine, model, *, keep_gathered: bool = False):
        self._engine = engine
        self._model = model
        self._keep_gathered = keep_gathered

    def generate(self, requests):
        # FSDP re-creates the gathered weights' storage at every gather, so their addresses can change between
        # rollouts; graphs captured on the last ones must go (with the plan's releases they already went with the KV
        # pool; with release_phase_buffers = false they would survive).
        if self._keep_gathered:
            begin_step_gather(self._model)
            self._engine.drop_graphs()
            return self._engine.generate(requests)
        with unsharded_for_rollout(self._model):
            self._engine.drop_graphs()
            return self._engine.generate(requests)

    def __getattr__(self, name):
        return getattr(self._engine, name)


@torch.no_grad()
def add_full_grad(param, full_grad: torch.Tensor, *, into: torch.Tensor | None = None) -> None:
    """Add a gradient held as a full [V, H] fp32 tensor (the lm_head accumulator) to this rank's gradient of `param`:
    into `into` (this rank's fp32 accumulator of it, opdgraph.runtime.gradients) when given, else into `param.grad`,
    summed in fp32 and rounded once to the parameter dtype (never rounded before the add).

    Sharded: the accumulators of all ranks are summed (all-reduce, in fp32) and each rank takes its own rows (FSDP2
    shards dimension 0 in `torch.chunk` pieces). Unsharded: the tensor as it is.
    """
    if not hasattr(param, "device_mesh"):
        if into is not None:
            into.add_(full_grad)
            return
        from opdgraph.train.two_stage import add_lm_head_grad

        add_lm_head_grad(param, full_grad)
        return
    from torch.distributed.tensor import distribute_tensor

    dist.all_reduce(full_grad)
    rows = distribute_tensor(full_grad, param.device_mesh, param.placements, src_data_rank=None)
    if into is not None:
        into.add_(rows.to_local())
    elif param.grad is None:
        param.grad = rows.to(param.dtype)
    else:
        local = param.grad.to_local()
        local.copy_(local.float() + rows.to_local())
