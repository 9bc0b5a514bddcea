"""MasterAdamW's step in two Triton kernels per tensor instead of about ten foreach ops over the whole state.

opdgraph.train.optimizer.MasterAdamW sends CUDA state here (its foreach path stays the CPU path and the reference the
tests compare with). Each foreach op reads and writes the whole state once more; here each pass reads it once:
- ``check(...)`` -> int32 0-dim flag, 1 when some new weight would not be finite with the factor-2 margin. Reads
  masters, grads and moments; writes nothing else (the all-or-nothing check of the optimizer's pass 1).
- ``update(...)``: the step in place: masters, moments and, for a low-precision parameter, its rounded new value.
Both take, per tensor, the master, grad (any float dtype, read as fp32), both moments, and the tensor's scalars:
step size (-lr / bias correction 1), ``second`` (sqrt of bias correction 2) and the decay factor (1.0 where it does
not decay). Tensors are flat, contiguous, one launch each (a 1.5B model has ~340 of them; a few microseconds each).
Triton is imported lazily.
"""

from __future__ import annotations

import torch

BLOCK = 1024


def _body():
    from opdgraph.kernels import adamw_triton

    return adamw_triton


def _flat(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.view(-1)  # a non-contiguous tensor raises here rather than being updated in the wrong order


def _shared(betas: tuple[float, float], eps: float) -> tuple[float, float, float, float]:
    """lerp weight, beta2, 1 - beta2, eps: formed in double as the foreach path forms them, rounded at launch."""
    beta1, beta2 = betas
    return 1.0 - beta1, beta2, 1.0 - beta2, eps


def check(masters, grads, exp_avgs, exp_avg_sqs, step_sizes, seconds, decay_factors, *, betas, eps) -> torch.Tensor:
    """0-dim int32 on the masters' device: 1 when some tensor's new weights fail the margin, else 0 (no host sync)."""
    bad = torch.zeros((), dtype=torch.int32, device=masters[0].device)
    shared = _shared(betas, eps)
    for master, grad, exp_avg, exp_avg_sq, step_size, second, decay_factor in zip(
            masters, grads, exp_avgs, exp_avg_sqs, step_sizes, seconds, decay_factors):
        numel = master.numel()
        if numel:
            _body().check_kernel[(-(-numel // BLOCK),)](
                _flat(master), _flat(grad), _flat(exp_avg), _flat(exp_avg_sq), bad, numel, step_size, second,
                decay_factor, *shared, BLOCK=BLOCK, num_warps=4)
    return bad


def update(masters, grads, exp_avgs, exp_avg_sqs, params, step_sizes, seconds, decay_factors, *, betas,
           eps) -> None:
    """In place; ``params[i]`` is the low-precision parameter to round into, or None when the master is the
    parameter itself."""
    shared = _shared(betas, eps)
    for master, grad, exp_avg, exp_avg_sq, param, step_size, second, decay_factor in zip(
            masters, grads, exp_avgs, exp_avg_sqs, params, step_sizes, seconds, decay_factors):
        numel = master.numel()
        if numel:
            _body().update_kernel[(-(-numel // BLOCK),)](
                _flat(master), _flat(grad), _flat(exp_avg), _flat(exp_avg_sq),
                _flat(master if param is None else param), numel, step_size, second, decay_factor, *shared,
                WRITE_PARAM=param is not None, BLOCK=BLOCK, num_warps=4)
