"""AdamW with fp32 master weights and fp32 moments.

The ``step`` stage of the pipeline runs, per optimizer step: ``clip_grad_norm`` (opdgraph.train.grad_clipping; skip
the step when the norm is not finite), ``MasterAdamW.step(lr_at(...), grads)`` (skipped when the update would make a
weight non-finite), then the plan frees the gradients (``zero_grad()`` drops any ``param.grad``).

Why master weights: a bf16 weight has 8 mantissa bits, so an update smaller than ~2^-9 of the weight rounds away
and a long run of small updates is lost entirely. Each non-fp32 parameter gets an fp32 master copy; the update is
applied to the master and the result is rounded into the parameter. fp32 parameters are their own master (no copy).

Update (decoupled AdamW with bias correction, as torch.optim.AdamW), per parameter with a grad, t = its step count:
    master *= 1 - lr * weight_decay                    (only where no_decay(name, param) is False)
    m = beta1 m + (1 - beta1) g ;  v = beta2 v + (1 - beta2) g^2          (g = grad upcast to fp32)
    master -= lr / (1 - beta1^t) * m / (sqrt(v) / sqrt(1 - beta2^t) + eps)

Parameters are updated in buckets of at most ``_BUCKET_ELEMENTS`` elements (the unit an offloaded state streams
through the device; opdgraph.train.optimizer_layout makes the buckets), by one of two implementations of the same
math, picked per bucket by where its state is (constructor ``fused``: None = auto):
- CUDA state, where triton imports: opdgraph.kernels.adamw, two Triton kernels per tensor that each read the state
  once (the check writes nothing; the update writes master, moments and the rounded bf16 parameter in one pass).
- Otherwise (CPU, the reference): torch's foreach kernels, each op reading and writing the bucket again; the fp32
  copies of low-precision grads never exceed one bucket (256 MiB) at a time.
The gradients are the parameters' ``.grad`` or, when given, a mapping name -> gradient (the fp32 accumulators of
opdgraph.runtime.gradients; an fp32 gradient is read in place, never copied).

A step is all or nothing. Pass 1 computes every new master weight and checks it, writing nothing: the foreach path
works on temporaries, in pieces of at most ``_CHECK_ELEMENTS`` elements (copies of one piece's master and moments,
its fp32 gradient and denominators: less than the update's own per-bucket temporaries); the fused path keeps the
new values in registers. Only if every new weight is finite on every rank (one all-reduced flag, one host read)
does pass 2 apply the update. A step size, decay factor or eps beyond fp32 (which torch would refuse as a scalar)
fails the check before any tensor work. So a learning rate that would blow the weights up leaves weights, masters,
moments and step counts exactly as they were, with no copy of the optimizer state: a per-bucket commit could not
undo the buckets before a bad one, and keeping their old values would cost a copy of the state. The price is a
second read of the state (an offloaded state is streamed in twice, out once). Both passes compute the same values
(the foreach path runs the same ops; the fused kernels share one math helper), but a foreach piece's last elements
may take a kernel's scalar tail where the update's vectorised loop fuses a multiply-add, and two compiled kernels
need not contract alike; so the check asks each new weight to be at most half the largest fp32 value (doubled, it
stays finite), and a last-bit difference can never overflow in pass 2 where pass 1 did not (nor round to inf in
bf16, whose largest value is above half fp32's).

Sharded parameters (FSDP2 DTensors, several ranks): masters, moments and the update use each rank's local shard only
(opdgraph.train.optimizer_layout); the clipping norm and the finiteness flag are reduced over ranks, so every rank
takes the same decision; ``state_dict`` gathers full tensors (to the CPU, one at a time) and ``load_state_dict``
takes full tensors and keeps this rank's rows, so a run resumes on any number of ranks.
"""

from __future__ import annotations

import contextlib
import math
from typing import Callable, Iterable, Mapping

import torch

from opdgraph.kernels import adamw as fused_adamw
from opdgraph.kernels import triton_imports
from opdgraph.train.optimizer_layout import _buckets, _gathered, _local, _pieces, _shard_of

_FP32_MAX = torch.finfo(torch.float32).max
_CHECK_ELEMENTS = 1 << 23  # pass 1's piece: at most 5 fp32 temporaries of 32 MiB, under the update's 2 x 256 MiB


def default_no_decay(name: str, param: torch.Tensor) -> bool:
    """Norm weights and biases (1-D) get no weight decay."""
    return param.ndim < 2


class MasterAdamW:
    """AdamW over named parameters with fp32 master weights and moments (see module docstring).

    Build it after the model's weights are loaded: the masters are copied from the parameters at construction.
    """

    def __init__(
        self,
        named_params: Iterable[tuple[str, torch.nn.Parameter]],
        *,
        lr: float,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        no_decay: Callable[[str, torch.Tensor], bool] = default_no_decay,
        fused: bool | None = None,
    ):
        self.lr, self.betas, self.eps, self.weight_decay = lr, betas, eps, weight_decay
        self.fused = fused  # None: the Triton kernels for CUDA state where triton imports, foreach otherwise
        self.params = dict(named_params)
        self.decays = {name: not no_decay(name, param) for name, param in self.params.items()}
        # The master of an fp32 parameter is the parameter's own storage, so updating it updates the model.
        self.masters = {
            name: _local(param.detach()) if param.dtype == torch.float32 else _local(param.detach()).float()
            for name, param in self.params.items()
        }
        self.exp_avg = {name: torch.zeros_like(master) for name, master in self.masters.items()}
        self.exp_avg_sq = {name: torch.zeros_like(master) for name, master in self.masters.items()}
        self.steps = {name: 0 for name in self.params}

    def _has_separate_master(self, name: str) -> bool:
        return self.params[name].dtype != torch.float32

    @torch.no_grad()
    def step(self, lr: float | None = None, grads: Mapping[str, torch.Tensor] | None = None) -> bool:
        """One AdamW update of every parameter with a gradient (``grads`` by name, else each ``param.grad``), applied
        only if every new weight is finite on every rank; returns whether it was applied. Grads are read, not
        cleared."""
        lr = self.lr if lr is None else lr
        if grads is None:
            grads = {name: param.grad for name, param in self.params.items() if param.grad is not None}
        grads = {name: _local(grad) for name, grad in grads.items()}
        buckets = list(_buckets(list(grads), self.params))
        if not self._update_is_finite(buckets, grads, lr):
            return False
        for bucket in buckets:
            with self.staging(bucket, write_back=True):
                self._update(bucket, grads, lr)
        return True

    def staging(self, names: list[str], *, write_back: bool):
        """Where a bucket's state is while it is read (and, with write_back, updated): in place here; an offloaded
        optimizer (opdgraph.runtime.offload.StreamedAdamW) replaces this to stream it through the device."""
        return contextlib.nullcontext()

    def _bias_corrections(self, names: list[str], steps: dict[str, int], lr: float) -> tuple[list, list]:
        beta1, beta2 = self.betas
        step_sizes = [-lr / (1.0 - beta1 ** steps[name]) for name in names]
        second = [math.sqrt(1.0 - beta2 ** steps[name]) for name in names]
        return step_sizes, second

    def _runs_fused(self, names: list[str], grads: Mapping[str, torch.Tensor]) -> bool:
        """Whether a bucket takes the Triton path; asked inside `staging`, where the state is when it is read. The
        kernels walk flat contiguous tensors: a bucket holding a non-contiguous master, moment, gradient or
        parameter (a transposed view, say) takes the foreach path, which reads any layout."""
        if self.fused is False:
            return False
        contiguous = all(tensor.is_contiguous() for name in names for tensor in (
            self.masters[name], self.exp_avg[name], self.exp_avg_sq[name], grads[name], _local(self.params[name])))
        if self.fused:
            return contiguous
        return contiguous and self.masters[names[0]].is_cuda and triton_imports()

    def _kernel_arguments(self, names: list[str], grads, steps: dict[str, int], lr: float) -> dict:
        """The tensors and per-tensor scalars of opdgraph.kernels.adamw, the same values `_adamw` uses."""
        step_sizes, seconds = self._bias_corrections(names, steps, lr)
        decay_factor = 1.0 - lr * self.weight_decay
        return dict(masters=[self.masters[name] for name in names], grads=[grads[name] for name in names],
                    exp_avgs=[self.exp_avg[name] for name in names],
                    exp_avg_sqs=[self.exp_avg_sq[name] for name in names], step_sizes=step_sizes, seconds=seconds,
                    decay_factors=[decay_factor if self.decays[name] else 1.0 for name in names],
                    betas=self.betas, eps=self.eps)

    def _update(self, names: list[str], grads: Mapping[str, torch.Tensor], lr: float) -> None:
        for name in names:
            self.steps[name] += 1
        if self._runs_fused(names, grads):
            params = [_local(self.params[name]) if self._has_separate_master(name) else None for name in names]
            fused_adamw.update(**self._kernel_arguments(names, grads, self.steps, lr), params=params)
            return
        self._adamw(names, [grads[name] for name in names], self.steps, lr,
                    masters=[self.masters[name] for name in names], exp_avgs=[self.exp_avg[name] for name in names],
                    exp_avg_sqs=[self.exp_avg_sq[name] for name in names])
        for name in names:
            if self._has_separate_master(name):
                _local(self.params[name]).copy_(self.masters[name])

    def _adamw(self, names, grads, steps, lr, *, masters, exp_avgs, exp_avg_sqs) -> None:
        """The AdamW math, in place on the given masters and moments (pass 2: the state; pass 1: copies)."""
        beta1, beta2 = self.betas
        grads = [grad.float() for grad in grads]  # a copy only for low-precision grads
        decayed = [master for name, master in zip(names, masters) if self.decays[name]]
        if self.weight_decay != 0.0 and decayed:
            torch._foreach_mul_(decayed, 1.0 - lr * self.weight_decay)
        torch._foreach_lerp_(exp_avgs, grads, 1.0 - beta1)
        torch._foreach_mul_(exp_avg_sqs, beta2)
        torch._foreach_addcmul_(exp_avg_sqs, grads, grads, 1.0 - beta2)
        del grads
        step_sizes, second = self._bias_corrections(names, steps, lr)
        denominators = torch._foreach_sqrt(exp_avg_sqs)
        torch._foreach_div_(denominators, second)
        torch._foreach_add_(denominators, self.eps)
        torch._foreach_addcdiv_(masters, exp_avgs, denominators, step_sizes)

    def _update_is_finite(self, buckets: list[list[str]], grads: Mapping[str, torch.Tensor], lr: float) -> bool:
        """Pass 1: would every new weight be finite (with the module docstring's factor-2 margin)? Writes nothing;
        one host read (and, sharded, one all-reduce) for the whole step."""
        if not grads:
            return True
        steps = {name: self.steps[name] + 1 for bucket in buckets for name in bucket}
        device = next(iter(grads.values())).device
        bad = torch.zeros((), dtype=torch.int32, device=device)  # a rank whose shards are empty still votes
        step_sizes, _ = self._bias_corrections(list(steps), steps, lr)
        if not all(abs(value) <= _FP32_MAX for value in (*step_sizes, self.eps, 1.0 - lr * self.weight_decay)):
            bad += 1  # inf, NaN or beyond fp32: so is the update (and torch would refuse the scalar)
        else:
            flags = [flag for bucket in buckets for flag in self._bucket_flags(bucket, grads, steps, lr)]
            if flags:
                bad += ~torch.stack([flag.to(device) for flag in flags]).all()
        if any(hasattr(param, "device_mesh") for param in self.params.values()):
            import torch.distributed as dist

            dist.all_reduce(bad)  # every rank skips, or none does
        return not bool(bad)

    def _bucket_flags(self, bucket: list[str], grads, steps: dict[str, int], lr: float) -> list[torch.Tensor]:
        """0-dim bools, each true when its new weights are within the margin: one per tensor of each piece, computed
        on copies (foreach path), or one for the whole bucket (fused path, computed in registers)."""
        flags = []
        with self.staging(bucket, write_back=False):
            if self._runs_fused(bucket, grads):
                return [fused_adamw.check(**self._kernel_arguments(bucket, grads, steps, lr)) == 0]
            for piece in _pieces(bucket, self.masters, _CHECK_ELEMENTS):
                def flat(tensors, copy):
                    views = [tensors[name].reshape(-1)[span] for name, span in piece]
                    return [view.clone() for view in views] if copy else views

                new = flat(self.masters, copy=True)
                self._adamw([name for name, _ in piece], flat(grads, copy=False), steps, lr, masters=new,
                            exp_avgs=flat(self.exp_avg, copy=True), exp_avg_sqs=flat(self.exp_avg_sq, copy=True))
                torch._foreach_mul_(new, 2.0)  # the margin: inf where a weight exceeds half the largest value
                flags += [torch.isfinite(tensor).all() for tensor in new]
        return flags

    def zero_grad(self) -> None:
        """Drop every grad (set to None) so its memory can be released."""
        for param in self.params.values():
            param.grad = None

    def state_bytes(self) -> int:
        """Bytes held by the optimizer itself: separate fp32 masters plus both fp32 moments."""
        total = 0
        for name in self.params:
            total += self.exp_avg[name].nbytes + self.exp_avg_sq[name].nbytes
            if self._has_separate_master(name):
                total += self.masters[name].nbytes
        return total

    def state_dict(self) -> dict:
        """Everything needed for an exact resume, keyed by parameter name: full tensors (references, not copies,
        when unsharded; gathered CPU copies when sharded, and then every rank must call it)."""
        def gathered(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
            return {name: _gathered(self.params[name], tensor) for name, tensor in tensors.items()}

        return {
            "steps": dict(self.steps),
            "exp_avg": gathered(self.exp_avg),
            "exp_avg_sq": gathered(self.exp_avg_sq),
            "master": gathered({name: self.masters[name] for name in self.params if self._has_separate_master(name)}),
        }

    @torch.no_grad()
    def load_state_dict(self, state: dict) -> None:
        """Restore a ``state_dict``; separate masters are also written back into their (low-precision) params."""
        expected_masters = {name for name in self.params if self._has_separate_master(name)}
        for key, expected in [("steps", set(self.params)), ("exp_avg", set(self.params)),
                              ("exp_avg_sq", set(self.params)), ("master", expected_masters)]:
            found = set(state[key])
            if found != expected:
                raise ValueError(
                    f"optimizer state '{key}' does not match the model: missing {sorted(expected - found)}, "
                    f"unexpected {sorted(found - expected)}; resume with the same model and trainable parameters"
                )
        for name, param in self.params.items():
            self.steps[name] = int(state["steps"][name])
            self.exp_avg[name].copy_(_shard_of(param, state["exp_avg"][name]))
            self.exp_avg_sq[name].copy_(_shard_of(param, state["exp_avg_sq"][name]))
        for name in expected_masters:
            self.masters[name].copy_(_shard_of(self.params[name], state["master"][name]))
            _local(self.params[name]).copy_(self.masters[name])
