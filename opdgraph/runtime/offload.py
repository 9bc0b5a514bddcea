"""Executes a plan's placement (opdgraph.placement): teacher weights and optimizer state in pinned host memory.

- ParameterSwap: pinned host copies of some parameters, made once; `to_host()` points each parameter at its host
  copy (the device copy is dropped: the teacher is never written, so the host copy is always current) and
  `to_device()` copies them back with non-blocking copies. The module keeps its parameters; only `param.data` moves.
- LayerStreamer: a streamed model's layers live in host memory; a pre-forward hook copies a layer in (the next one
  is prefetched on a side CUDA stream) and a post-forward hook drops it, so two layers are on the device at a time.
- StreamedAdamW: MasterAdamW whose fp32 masters and moments live in pinned host memory; `step` streams them through
  the device one optimizer bucket at a time (copy in, the optimizer's own update, copy out), as the plan's cost
  model assumes (copies and update do not overlap); the optimizer's finiteness check before the update streams
  each bucket in once more (no copy out).
- HostOffloader: what the executor calls at the plan's reload / offload points, dispatching on the buffer. With
  a sharded teacher (teacher_weights = "shard", opdgraph.runtime.distributed) nothing moves over PCIe; its `swap`
  gathers the whole teacher for eval instead.

On a CPU device every move is a no-op (host and device memory are the same), but the same calls run.
"""

from __future__ import annotations

import contextlib

import torch

from opdgraph.placement import Placement


def _pinned_copy(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host copy, pinned when the device is a GPU (so copies are asynchronous); on the host itself, the tensor."""
    if tensor.device.type == "cpu" and device.type == "cpu":
        return tensor
    host = torch.empty(tensor.shape, dtype=tensor.dtype, device="cpu", pin_memory=device.type == "cuda")
    host.copy_(tensor)
    return host


class ParameterSwap:
    """Moves a fixed set of parameters between the device and their pinned host copies (never written)."""

    def __init__(self, parameters: list[torch.nn.Parameter], device: torch.device):
        self.parameters = parameters
        self.device = torch.device(device)
        self.host = [_pinned_copy(parameter.data, self.device) for parameter in parameters]
        self.on_device = all(parameter.device == self.device for parameter in parameters)

    def to_host(self) -> None:
        for parameter, host in zip(self.parameters, self.host):
            parameter.data = host
        self.on_device = False

    def to_device(self) -> None:
        if self.on_device:  # the executor reloads before every micro-batch; only the first one copies
            return
        for parameter, host in zip(self.parameters, self.host):
            parameter.data = host.to(self.device, non_blocking=True)
        self.on_device = True


class LayerStreamer:
    """Keeps `layers` in host memory and streams each one onto the device for its own forward only."""

    def __init__(self, layers, device: torch.device):
        self.device = torch.device(device)
        self.layers = list(layers)
        self.swaps = [ParameterSwap(list(layer.parameters()), self.device) for layer in self.layers]
        for swap in self.swaps:
            swap.to_host()
        self.copy_stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        self.prefetched: dict[int, tuple[list[torch.Tensor], object]] = {}
        for index, layer in enumerate(self.layers):
            layer.register_forward_pre_hook(lambda module, args, index=index: self._bring(index))
            layer.register_forward_hook(lambda module, args, output, index=index: self._drop(index))

    def _fetch(self, index: int) -> None:
        if self.copy_stream is None:
            self.prefetched[index] = ([host.to(self.device) for host in self.swaps[index].host], None)
            return
        self.copy_stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self.copy_stream):
            copies = [host.to(self.device, non_blocking=True) for host in self.swaps[index].host]
            done = torch.cuda.Event()
            done.record(self.copy_stream)
        self.prefetched[index] = (copies, done)

    def _bring(self, index: int) -> None:
        if index not in self.prefetched:
            self._fetch(index)
        copies, done = self.prefetched.pop(index)
        if done is not None:
            compute = torch.cuda.current_stream(self.device)
            compute.wait_event(done)
            for copy in copies:  # made on the copy stream, used on this one: keep the allocator from reusing early
                copy.record_stream(compute)
        for parameter, copy in zip(self.swaps[index].parameters, copies):
            parameter.data = copy
        if index + 1 < len(self.layers):
            self._fetch(index + 1)

    def _drop(self, index: int) -> None:
        self.swaps[index].to_host()


class StreamedAdamW:
    """A MasterAdamW whose separate fp32 masters and moments live in pinned host memory (see module docstring)."""

    def __init__(self, optimizer, device: torch.device):
        self.inner = optimizer
        self.device = torch.device(device)
        self.state_dicts = [optimizer.exp_avg, optimizer.exp_avg_sq]
        self.separate_masters = [name for name in optimizer.params if optimizer._has_separate_master(name)]
        for state in self.state_dicts:
            for name in list(state):  # one tensor at a time, so host memory never holds two copies of all
                state[name] = _pinned_copy(state[name], self.device)
        for name in self.separate_masters:
            optimizer.masters[name] = _pinned_copy(optimizer.masters[name], self.device)
        optimizer.staging = self._staged  # both optimizer passes bring each bucket onto the device this way

    def __getattr__(self, name):
        return getattr(self.inner, name)

    @torch.no_grad()
    def step(self, lr: float | None = None, grads=None) -> bool:
        """MasterAdamW.step with each bucket's state streamed through the device (`_staged`): both of its passes
        (the finiteness check, then the update) copy a bucket in; only the update copies it back."""
        applied = self.inner.step(lr, grads)
        if self.device.type == "cuda":
            torch.cuda.current_stream(self.device).synchronize()  # the host copies are read by checkpoints
        return applied

    @contextlib.contextmanager
    def _staged(self, bucket: list[str], *, write_back: bool):
        inner = self.inner
        separate = set(self.separate_masters)
        held = [(state, name) for state in self.state_dicts for name in bucket]
        held += [(inner.masters, name) for name in bucket if name in separate]
        host = [state[name] for state, name in held]
        for state, name in held:
            state[name] = state[name].to(self.device, non_blocking=True)
        updated = False
        try:
            yield
            updated = write_back
        finally:  # the host tensors are the state again, updated only by a completed update
            for (state, name), host_tensor in zip(held, host):
                if updated:
                    host_tensor.copy_(state[name], non_blocking=True)
                state[name] = host_tensor


def build_optimizer(placement: Placement, student, device: torch.device, **hyperparameters):
    """MasterAdamW for the student; with offloaded state, built while the parameters sit on the host, so the fp32
    masters and moments (12 bytes per parameter) never exist on the device all at once."""
    from opdgraph.train.optimizer import MasterAdamW

    named = list(student.named_parameters())
    if placement.optimizer_state == "keep":
        return MasterAdamW(named, **hyperparameters)
    on_device = [parameter.data for _, parameter in named]
    for _, parameter in named:
        parameter.data = parameter.data.to("cpu")
    optimizer = MasterAdamW(named, **hyperparameters)
    for (name, parameter), data in zip(named, on_device):
        parameter.data = data
        if not optimizer._has_separate_master(name):  # an fp32 parameter is its own master: follow it back
            optimizer.masters[name] = parameter.data
    return StreamedAdamW(optimizer, device)


def plan_placement(plan) -> Placement:
    """The placement a compiled plan was made with, read back from its buffers."""
    streamed = any(name.endswith(".layer_stream") for name in plan.buffers)
    sharded = any(name.endswith(".gathered_root") for name in plan.buffers)
    teachers = teacher_weight_buffers(plan)
    offloaded = bool(teachers) and all(plan.buffers[name].offload_when_idle for name in teachers)
    teacher_weights = "stream" if streamed else "shard" if sharded else "offload" if offloaded else "keep"
    host_state = any(buffer.device == "host" for buffer in plan.buffers.values())
    per_step = any(name.endswith(".unsharded_grads") for name in plan.buffers) or "world_size" not in plan.facts
    return Placement(teacher_weights=teacher_weights, optimizer_state="offload" if host_state else "keep",
                     student_gather="step" if per_step else "layer")


def teacher_weight_buffers(plan) -> list[str]:
    """The held weights no step writes, in the order steps first read them: the teachers' (a frozen self-teacher's
    copy included). The student's weights are written by the optimizer step, so a live self-teacher, which scores
    with them, has none of its own; being never written is also what keeps a host copy current (ParameterSwap)."""
    written = {name for step in plan.steps for name in step.writes}
    found = []
    for step in plan.steps:
        for name in step.reads:
            buffer = plan.buffers[name]
            if (buffer.category == "weights" and buffer.lifetime == "held" and name not in written
                    and name not in found):
                found.append(name)
    return found


class HostOffloader:
    """The plan's reload / offload actions for the buffers a placement moves; `handles(name)` says which.
    `teachers` maps each teacher weights buffer of the plan to the model that holds those weights."""

    def __init__(self, plan, teachers: dict, device: torch.device):
        self.placement = plan_placement(plan)
        self.swaps = {}
        self.streamers = {}
        for name, teacher in teachers.items():
            swap = None
            if self.placement.teacher_weights == "stream":
                self.streamers[name] = LayerStreamer(teacher.layers, device)
                layer_parameters = {id(p) for layer in teacher.layers for p in layer.parameters()}
                swap = ParameterSwap([p for p in teacher.parameters() if id(p) not in layer_parameters], device)
            elif self.placement.teacher_weights == "offload":
                swap = ParameterSwap(list(teacher.parameters()), device)
            if swap is not None:
                swap.to_host()  # the plan starts with the teacher off the device (rollout comes first)
            if self.placement.teacher_weights == "shard":  # eval gathers the whole teacher through the same calls
                from opdgraph.runtime.fsdp import GatheredTeacher

                swap = GatheredTeacher(teacher)
            self.swaps[name] = swap

    def swap_for(self, name: str):
        """What moves the weights buffer `name` (None when nothing does)."""
        return self.swaps.get(name)

    def handles(self, name: str) -> bool:
        return self.placement.teacher_weights in ("offload", "stream") and name in self.swaps

    def offload(self, name: str) -> None:
        self.swaps[name].to_host()

    def reload(self, name: str) -> None:
        self.swaps[name].to_device()
