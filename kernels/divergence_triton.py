"""Triton body of the fused full-vocabulary divergence: one program per row, a loop over V in blocks.

Only `opdgraph.kernels.divergence` imports this module (lazily, so the package imports without triton).
Given one row of unscaled student logits z_s and teacher logits z_t over the student vocabulary, the program
  sweep 1: streams both rows once, computing the two log-sum-exps online (running max + rescaled sum, fp32) and,
           for forward/reverse KL, the divergence D itself (its sum is rescaled with the same running max);
  sweep 2 (JSD only): streams again to get KL(T||M) and KL(S||M), which need both normalisers first;
  last sweep: streams again and writes w * dD/dz_s into the gradient buffer, which may alias the student row:
           - same dtype (fp32 weights): element j is loaded and then stored by the same thread, race free;
           - GRAD_IN_STUDENT_ROW (16-bit gradient in the first half of the row's fp32 bytes): block b's gradient
             overwrites student entries of blocks <= b, which other warps may still be reading, so a CTA barrier
             separates each block's loads from its stores.
Per row it stores D (for sampled_token: a, the one-sample reverse-KL estimate) and the loss term L (D, or the
surrogate a log p_S(y) for sampled_token). Rows with weight 0 skip the math and get zero gradient, D and L.

Legend: V = student vocabulary size, s/t = logits divided by the temperature tau, p = probabilities,
logp = log-probabilities (we never take log of a probability: p * logp is exp(logp) * logp, which is 0 when p
underflows), M = beta p_T + (1 - beta) p_S (the JSD mixture).
"""

import triton
import triton.language as tl

# Values of the DIVERGENCE constexpr; kernels/divergence.py maps the config names onto these. (Compiled Triton
# only lets a kernel read globals declared constexpr.)
FORWARD_KL = tl.constexpr(0)
REVERSE_KL = tl.constexpr(1)
JSD = tl.constexpr(2)
SAMPLED_TOKEN = tl.constexpr(3)


@triton.jit
def _log_mixture(logp_s, logp_t, log_beta, log_one_minus_beta):
    """log M = log(beta exp(logp_t) + (1 - beta) exp(logp_s)), stable by factoring out the larger term."""
    a = log_beta + logp_t
    b = log_one_minus_beta + logp_s
    larger = tl.maximum(a, b)
    smaller = tl.minimum(a, b)
    return larger + tl.log(1.0 + tl.exp(smaller - larger))


@triton.jit
def divergence_rows_kernel(
    student_ptr, student_row_stride,
    teacher_ptr, teacher_row_stride,
    grad_ptr, grad_row_stride,
    weights_ptr, sampled_ptr, per_token_ptr, loss_term_ptr,
    V, inv_tau, beta, log_beta, log_one_minus_beta,
    DIVERGENCE: tl.constexpr,
    BLOCK_V: tl.constexpr,
    GRAD_IN_STUDENT_ROW: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    student_row = student_ptr + row * student_row_stride
    teacher_row = teacher_ptr + row * teacher_row_stride
    grad_row = grad_ptr + row * grad_row_stride
    weight = tl.load(weights_ptr + row).to(tl.float32)
    block = tl.arange(0, BLOCK_V)

    if weight == 0.0:
        # Masked position (padding, prompt): its gradient is zero and its logits may be garbage; skip all math.
        zeros = tl.zeros([BLOCK_V], dtype=tl.float32)
        for start in range(0, V, BLOCK_V):
            offsets = start + block
            tl.store(grad_row + offsets, zeros.to(grad_ptr.dtype.element_ty), mask=offsets < V)
        tl.store(per_token_ptr + row, 0.0)
        tl.store(loss_term_ptr + row, 0.0)
    else:
        # Sweep 1: online normalisers of both rows; the reverse/forward KL sum rides along, rescaled like the sum.
        max_s = tl.full([], float("-inf"), tl.float32)
        max_t = tl.full([], float("-inf"), tl.float32)
        sum_s = tl.zeros([], tl.float32)
        sum_t = tl.zeros([], tl.float32)
        kl_sum = tl.zeros([], tl.float32)
        for start in range(0, V, BLOCK_V):
            offsets = start + block
            in_vocab = offsets < V
            s = tl.load(student_row + offsets, mask=in_vocab, other=float("-inf")).to(tl.float32) * inv_tau
            t = tl.load(teacher_row + offsets, mask=in_vocab, other=float("-inf")).to(tl.float32) * inv_tau
            new_max_s = tl.maximum(max_s, tl.max(s, axis=0))
            new_max_t = tl.maximum(max_t, tl.max(t, axis=0))
            rescale_s = tl.exp(max_s - new_max_s)
            rescale_t = tl.exp(max_t - new_max_t)
            exp_s = tl.exp(s - new_max_s)
            exp_t = tl.exp(t - new_max_t)
            old_sum_s = sum_s
            old_sum_t = sum_t
            sum_s = sum_s * rescale_s + tl.sum(exp_s, axis=0)
            sum_t = sum_t * rescale_t + tl.sum(exp_t, axis=0)
            # The KL sums use logits shifted by their running maxes, (s - max_s) - (t - max_t), so that the
            # large common offset max_s - max_t cancels exactly instead of in fp32; when a max moves, every
            # earlier term's shift changes by the same amount, a correction proportional to the running sum.
            shifted_diff = tl.where(in_vocab, (s - new_max_s) - (t - new_max_t), 0.0)
            # (On the first block the old maxes are -inf and the old sums 0: no earlier terms to correct.)
            shift_change = tl.where(old_sum_s > 0.0, (new_max_s - max_s) - (new_max_t - max_t), 0.0)
            if DIVERGENCE == REVERSE_KL:
                # sum_v exp(s - max_s) ((s - max_s) - (t - max_t)), i.e. E_S[...] * sum_s.
                kl_sum = (kl_sum - shift_change * old_sum_s) * rescale_s + tl.sum(exp_s * shifted_diff, axis=0)
            if DIVERGENCE == FORWARD_KL:
                kl_sum = (kl_sum + shift_change * old_sum_t) * rescale_t - tl.sum(exp_t * shifted_diff, axis=0)
            max_s = new_max_s
            max_t = new_max_t
        lse_s = max_s + tl.log(sum_s)
        lse_t = max_t + tl.log(sum_t)

        # Row statistics: D and whatever the gradient needs besides the per-element log-probs.
        grad_scale = weight * inv_tau
        kl_student_mixture = tl.zeros([], tl.float32)
        sampled_advantage = tl.zeros([], tl.float32)
        sampled_id = 0
        if DIVERGENCE == REVERSE_KL:
            divergence = kl_sum / sum_s - tl.log(sum_s) + tl.log(sum_t)
        elif DIVERGENCE == FORWARD_KL:
            divergence = kl_sum / sum_t - tl.log(sum_t) + tl.log(sum_s)
        elif DIVERGENCE == SAMPLED_TOKEN:
            sampled_id = tl.load(sampled_ptr + row).to(tl.int64)
            logp_s_sampled = tl.load(student_row + sampled_id).to(tl.float32) * inv_tau - lse_s
            logp_t_sampled = tl.load(teacher_row + sampled_id).to(tl.float32) * inv_tau - lse_t
            sampled_advantage = logp_s_sampled - logp_t_sampled  # a stop-gradient coefficient
            divergence = sampled_advantage  # reported per token: the one-sample reverse-KL estimate a
        else:
            # Sweep 2 (JSD): KL(T||M) and KL(S||M) need log M, which needs both normalisers first.
            kl_teacher_mixture = tl.zeros([], tl.float32)
            for start in range(0, V, BLOCK_V):
                offsets = start + block
                in_vocab = offsets < V
                logp_s = tl.load(student_row + offsets, mask=in_vocab, other=0.0).to(tl.float32) * inv_tau - lse_s
                logp_t = tl.load(teacher_row + offsets, mask=in_vocab, other=0.0).to(tl.float32) * inv_tau - lse_t
                log_m = _log_mixture(logp_s, logp_t, log_beta, log_one_minus_beta)
                kl_teacher_mixture += tl.sum(tl.where(in_vocab, tl.exp(logp_t) * (logp_t - log_m), 0.0), axis=0)
                kl_student_mixture += tl.sum(tl.where(in_vocab, tl.exp(logp_s) * (logp_s - log_m), 0.0), axis=0)
            divergence = beta * kl_teacher_mixture + (1.0 - beta) * kl_student_mixture
            grad_scale = grad_scale * (1.0 - beta)
        tl.store(per_token_ptr + row, divergence)
        if DIVERGENCE == SAMPLED_TOKEN:
            tl.store(loss_term_ptr + row, sampled_advantage * logp_s_sampled)  # the surrogate a log p_S(y)
        else:
            tl.store(loss_term_ptr + row, divergence)

        # Last sweep: w * dD/dz_s, written over the gradient buffer (possibly the student row itself).
        for start in range(0, V, BLOCK_V):
            offsets = start + block
            in_vocab = offsets < V
            logp_s = tl.load(student_row + offsets, mask=in_vocab, other=0.0).to(tl.float32) * inv_tau - lse_s
            p_s = tl.exp(logp_s)
            if DIVERGENCE == SAMPLED_TOKEN:
                # Teacher row not needed here: the sampled-token gradient is a * (onehot(y) - p_S).
                grad = sampled_advantage * (tl.where(offsets == sampled_id, 1.0, 0.0) - p_s)
            else:
                logp_t = tl.load(teacher_row + offsets, mask=in_vocab, other=0.0).to(tl.float32) * inv_tau - lse_t
                if DIVERGENCE == REVERSE_KL:
                    grad = p_s * (logp_s - logp_t - divergence)
                elif DIVERGENCE == FORWARD_KL:
                    grad = p_s - tl.exp(logp_t)
                else:
                    log_m = _log_mixture(logp_s, logp_t, log_beta, log_one_minus_beta)
                    grad = p_s * (logp_s - log_m - kl_student_mixture)
            if GRAD_IN_STUDENT_ROW:
                # The 16-bit gradient of this block lands on fp32 student entries [start/2, (start+BLOCK_V)/2):
                # this block's or earlier ones, never a later one. Other warps may still be loading them (this
                # sweep has no reduction to keep warps in step), so wait for every load before the first store.
                tl.debug_barrier()
            tl.store(grad_row + offsets, (grad * grad_scale).to(grad_ptr.dtype.element_ty), mask=in_vocab)
