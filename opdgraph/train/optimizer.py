"""AdamW with fp32 master weights and fp32 moments, plus global-norm gradient clipping.

The ``step`` stage of the pipeline runs, per optimizer step: ``clip_grad_norm`` (skip the step when the norm is not
finite), ``MasterAdamW.step(lr_at(...))``, ``zero_grad()`` (grads become None, so the plan can free their buffers).

Why master weights: a bf16 weight has 8 mantissa bits, so an update smaller than ~2^-9 of the weight rounds away
and a long run of small updates is lost entirely. Each non-fp32 parameter gets an fp32 master copy; the update is
applied to the master and the result is rounded into the parameter. fp32 parameters are their own master (no copy).

Update (decoupled AdamW with bias correction, as torch.optim.AdamW), per parameter with a grad, t = its step count:
    master *= 1 - lr * weight_decay                    (only where no_decay(name, param) is False)
    m = beta1 m + (1 - beta1) g ;  v = beta2 v + (1 - beta2) g^2          (g = grad upcast to fp32)
    master -= lr / (1 - beta1^t) * m / (sqrt(v) / sqrt(1 - beta2^t) + eps)
Parameters are updated with torch's foreach kernels, in buckets of at most ``_BUCKET_ELEMENTS`` elements so the
fp32 copies of low-precision grads never exceed one bucket (256 MiB) at a time.

Sharded parameters (FSDP2 DTensors, several ranks): masters, moments and the update use each rank's local shard
only; the clipping norm is summed over ranks; ``state_dict`` gathers full tensors (to the CPU, one at a time) and
``load_state_dict`` takes full tensors and keeps this rank's rows, so a run resumes on any number of ranks.
"""

from __future__ import annotations

import math
from typing import Callable, Iterable

import torch

_BUCKET_ELEMENTS = 1 << 26


def _local(tensor: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a DTensor (a view: writing it writes the parameter); a plain tensor as is."""
    return tensor.to_local() if hasattr(tensor, "device_mesh") else tensor


def _gathered(param: torch.Tensor, local: torch.Tensor) -> torch.Tensor:
    """The full tensor whose shard on this rank is `local`, laid out like `param` (collective when sharded)."""
    if not hasattr(param, "device_mesh"):
        return local
    from torch.distributed.tensor import DTensor

    return DTensor.from_local(local, param.device_mesh, param.placements, shape=param.shape,
                              stride=param.stride()).full_tensor().cpu()


def _shard_of(param: torch.Tensor, full: torch.Tensor) -> torch.Tensor:
    """This rank's rows of a full tensor, for a parameter sharded like `param` (no communication)."""
    if not hasattr(param, "device_mesh"):
        return full
    from torch.distributed.tensor import distribute_tensor

    return distribute_tensor(full.to(_local(param).device), param.device_mesh, param.placements,
                             src_data_rank=None).to_local()


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
    ):
        self.lr, self.betas, self.eps, self.weight_decay = lr, betas, eps, weight_decay
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
    def step(self, lr: float | None = None) -> None:
        """One AdamW update of every parameter that has a grad; grads are read, not cleared."""
        lr = self.lr if lr is None else lr
        names = [name for name, param in self.params.items() if param.grad is not None]
        for bucket in _buckets(names, self.params):
            self._update(bucket, lr)

    def _update(self, names: list[str], lr: float) -> None:
        beta1, beta2 = self.betas
        for name in names:
            self.steps[name] += 1
        grads = [_local(self.params[name].grad).float() for name in names]
        masters = [self.masters[name] for name in names]
        exp_avgs = [self.exp_avg[name] for name in names]
        exp_avg_sqs = [self.exp_avg_sq[name] for name in names]
        decayed = [self.masters[name] for name in names if self.decays[name]]
        if self.weight_decay != 0.0 and decayed:
            torch._foreach_mul_(decayed, 1.0 - lr * self.weight_decay)
        torch._foreach_lerp_(exp_avgs, grads, 1.0 - beta1)
        torch._foreach_mul_(exp_avg_sqs, beta2)
        torch._foreach_addcmul_(exp_avg_sqs, grads, grads, 1.0 - beta2)
        del grads
        denominators = torch._foreach_sqrt(exp_avg_sqs)
        torch._foreach_div_(denominators, [math.sqrt(1.0 - beta2 ** self.steps[name]) for name in names])
        torch._foreach_add_(denominators, self.eps)
        step_sizes = [-lr / (1.0 - beta1 ** self.steps[name]) for name in names]
        torch._foreach_addcdiv_(masters, exp_avgs, denominators, step_sizes)
        for name in names:
            if self._has_separate_master(name):
                _local(self.params[name]).copy_(self.masters[name])

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


def _buckets(names: list[str], params: dict[str, torch.Tensor]) -> Iterable[list[str]]:
    """Consecutive groups of parameter names with at most _BUCKET_ELEMENTS elements (a bigger one goes alone)."""
    bucket, size = [], 0
    for name in names:
        numel = params[name].numel()
        if bucket and size + numel > _BUCKET_ELEMENTS:
            yield bucket
            bucket, size = [], 0
        bucket.append(name)
        size += numel
    if bucket:
        yield bucket


@torch.no_grad()
def clip_grad_norm(params: Iterable[torch.Tensor], max_norm: float) -> tuple[torch.Tensor, bool]:
    """Global fp32 L2 norm of all grads; if finite and max_norm > 0, scale grads by min(1, max_norm / (norm + 1e-6)).

    Returns (norm as a 0-dim fp32 tensor, finite). A non-finite norm leaves every grad untouched: the caller skips
    the optimizer step. Sharded grads (DTensors) contribute their local shards and the squared norm is summed over
    ranks, so every rank clips by the same global norm.
    """
    grads = [param.grad for param in params if param.grad is not None]
    if not grads:
        return torch.zeros((), dtype=torch.float32), True
    sharded = any(hasattr(grad, "device_mesh") for grad in grads)
    grads = [_local(grad) for grad in grads]
    per_param = [torch.linalg.vector_norm(grad, dtype=torch.float32) for grad in grads]
    total_norm = torch.linalg.vector_norm(torch.stack([norm.to(per_param[0].device) for norm in per_param]))
    if sharded:
        import torch.distributed as dist

        squared = total_norm.square()
        dist.all_reduce(squared)
        total_norm = squared.sqrt()
    finite = bool(torch.isfinite(total_norm))
    if finite and max_norm > 0:
        scale = torch.clamp(max_norm / (total_norm + 1e-6), max=1.0)
        for grad in grads:
            grad.mul_(scale.to(grad.device))
    return total_norm, finite
