"""Global-norm gradient clipping, the first half of the ``step`` stage (opdgraph.train.optimizer is the second).

The step stage clips every gradient by one global L2 norm before the AdamW update and skips the step when that norm
is not finite. With sharded gradients (FSDP2 DTensors) every rank contributes its local shard and the squared norm
is summed over ranks, so every rank clips by the same norm and takes the same decision.
"""

from __future__ import annotations

from typing import Iterable

import torch

from opdgraph.train.optimizer_layout import _local


@torch.no_grad()
def clip_grad_norm(grads: Iterable[torch.Tensor], max_norm: float) -> tuple[torch.Tensor, bool]:
    """Global fp32 L2 norm of the gradients; if finite and max_norm > 0, scale them in place by
    min(1, max_norm / (norm + 1e-6)).

    Returns (norm as a 0-dim fp32 tensor, finite). A non-finite norm leaves every grad untouched: the caller skips
    the optimizer step. Sharded grads (DTensors) contribute their local shards and the squared norm is summed over
    ranks, so every rank clips by the same global norm.
    """
    grads = [grad for grad in grads if grad is not None]
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
