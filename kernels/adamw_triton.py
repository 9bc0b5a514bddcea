"""Triton bodies of the fused AdamW step; only `opdgraph.kernels.adamw` imports this module.

- ``check_kernel``: computes one tensor's new master weights and writes nothing to the state; stores 1 into
  ``bad_ptr`` when some new weight is not finite when doubled (the factor-2 margin of opdgraph.train.optimizer).
- ``update_kernel``: the same new values, written into the master and both moments in place, and (WRITE_PARAM)
  rounded into the low-precision parameter in the same pass.

Both kernels get their new values from one helper, ``_adamw``, so they compute the same numbers by the same
instructions. Its op order is that of MasterAdamW's foreach path (decay multiply, lerp, v * beta2 + (1 - beta2) g^2,
sqrt(v) / second + eps, master + step_size * (m / denominator)), with IEEE-rounded sqrt and divisions as torch's.
The host passes every scalar as torch's foreach ops get it (1 - beta1 and 1 - beta2 formed in double, then rounded
to fp32; 1 - beta2 formed in fp32 from a rounded beta2 would differ by ~1e-5 relative). Each program handles BLOCK
consecutive elements of the flattened tensors.
"""

import triton
import triton.language as tl

FP32_MAX = tl.constexpr(3.4028234663852886e38)


@triton.jit
def _adamw(master_ptr, grad_ptr, exp_avg_ptr, exp_avg_sq_ptr, offsets, inside, step_size, second, decay_factor,
           lerp_weight, beta2, square_weight, eps):
    master = tl.load(master_ptr + offsets, mask=inside, other=0.0)
    grad = tl.load(grad_ptr + offsets, mask=inside, other=0.0).to(tl.float32)
    exp_avg = tl.load(exp_avg_ptr + offsets, mask=inside, other=0.0)
    exp_avg_sq = tl.load(exp_avg_sq_ptr + offsets, mask=inside, other=0.0)
    master = master * decay_factor  # 1.0 where the parameter does not decay: exact, as skipping it
    # torch's lerp: the formula is picked by the weight so that weight 0 and weight 1 are exact.
    exp_avg = tl.where(lerp_weight < 0.5, exp_avg + lerp_weight * (grad - exp_avg),
                       grad - (grad - exp_avg) * (1.0 - lerp_weight))
    exp_avg_sq = exp_avg_sq * beta2 + square_weight * (grad * grad)
    denominator = tl.math.div_rn(tl.math.sqrt_rn(exp_avg_sq), second) + eps
    master = master + step_size * tl.math.div_rn(exp_avg, denominator)
    return master, exp_avg, exp_avg_sq


@triton.jit
def check_kernel(master_ptr, grad_ptr, exp_avg_ptr, exp_avg_sq_ptr, bad_ptr, numel, step_size, second,
                 decay_factor, lerp_weight, beta2, square_weight, eps, BLOCK: tl.constexpr):
    offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    inside = offsets < numel
    master, _, _ = _adamw(master_ptr, grad_ptr, exp_avg_ptr, exp_avg_sq_ptr, offsets, inside, step_size, second,
                          decay_factor, lerp_weight, beta2, square_weight, eps)
    doubled = master * 2.0
    bad = inside & ~(tl.abs(doubled) <= FP32_MAX)  # NaN fails every comparison
    # Every program that finds one stores the same 1, so the racing stores need no atomics.
    tl.store(bad_ptr, 1, mask=tl.max(bad.to(tl.int32), axis=0) > 0)


@triton.jit
def update_kernel(master_ptr, grad_ptr, exp_avg_ptr, exp_avg_sq_ptr, param_ptr, numel, step_size, second,
                  decay_factor, lerp_weight, beta2, square_weight, eps, WRITE_PARAM: tl.constexpr, BLOCK: tl.constexpr):
    offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    inside = offsets < numel
    master, exp_avg, exp_avg_sq = _adamw(master_ptr, grad_ptr, exp_avg_ptr, exp_avg_sq_ptr, offsets, inside,
                                         step_size, second, decay_factor, lerp_weight, beta2, square_weight, eps)
    tl.store(master_ptr + offsets, master, mask=inside)
    tl.store(exp_avg_ptr + offsets, exp_avg, mask=inside)
    tl.store(exp_avg_sq_ptr + offsets, exp_avg_sq, mask=inside)
    if WRITE_PARAM:
        tl.store(param_ptr + offsets, master.to(param_ptr.dtype.element_ty), mask=inside)
