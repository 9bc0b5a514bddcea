"""Fused full-vocabulary divergence for the loss/backward stage: logits, divergence and gradients per chunk.

The OPD loss compares the student's next-token distribution with the teacher's over the whole vocabulary at every
response position. Materialising [N, V] logits for a whole batch costs tens of GiB, so the trainer walks the
positions in chunks of C and, per chunk, does
  1. two tensor-core matmuls: student logits h W_s^T and teacher logits g W_t[:V]^T, bf16 in -> fp32 out
     (fp32 logits because the divergence is a small difference of large log-sum-exps; bf16 logits would cost
     ~0.4% of the logit magnitude per entry, which is larger than the KL of a well-distilled student),
  2. ONE Triton kernel (kernels/divergence_triton.py) that computes both log-softmaxes online, the per-position
     divergence D_i, and w_i dD_i/dz (z = student logits before the temperature), written over a [C, V] buffer,
  3. two gradient matmuls: dlogits @ W_s -> d(hidden) and dlogits^T @ h accumulated in fp32 into d(lm_head).
The extra memory is O(C x V): two fp32 logit buffers plus, for bf16 weights, one bf16 gradient buffer (for fp32
weights the gradient overwrites the student logits). Two options trade that down: bf16 teacher logits, and the bf16
gradient written into the first half of each fp32 student row (6 instead of 10 bytes per logit with both).
Nothing here records an autograd graph: the caller feeds the returned hidden-state gradient into the decoder's
backward.

Divergences (p_S, p_T = softmax of logits / tau over the student vocab; w = per-position weight, 0 = masked):
  forward_kl KL(T||S), reverse_kl KL(S||T), jsd beta KL(T||M) + (1-beta) KL(S||M) with M = beta p_T + (1-beta) p_S,
  sampled_token a * log p_S(y) with a = stopgrad(log p_S(y) - log p_T(y)) for the sampled id y (the loss term;
  the per-token value reported is a itself, as in opdgraph.train.losses).
Shapes: C positions in a chunk, N in a batch, Hs/Ht hidden sizes, V student vocab, Vt >= V teacher vocab.
"""

import math
import os

import torch
from torch import Tensor

DIVERGENCES = ("forward_kl", "reverse_kl", "jsd", "sampled_token")
_DEFAULT_BLOCK_V = 4096


def triton_available() -> bool:
    """True when triton imports and has somewhere to run: a CUDA device, or the CPU interpreter
    (TRITON_INTERPRET=1 set before triton was first imported)."""
    from opdgraph.kernels import triton_imports

    return triton_imports() and (torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1")


def _check_divergence_args(divergence: str, beta: float, temperature: float, sampled_ids: Tensor | None) -> None:
    if divergence not in DIVERGENCES:
        raise ValueError(f"divergence {divergence!r} is not one of {', '.join(DIVERGENCES)}")
    if divergence == "jsd" and not 0.0 < beta < 1.0:
        raise ValueError(f"jsd needs beta strictly between 0 and 1 (got {beta}); "
                         "use forward_kl/reverse_kl for the ends")
    if not temperature > 0.0:
        raise ValueError(f"temperature must be > 0 (got {temperature})")
    if (divergence == "sampled_token") != (sampled_ids is not None):
        raise ValueError("sampled_ids must be given for divergence 'sampled_token' and only for it")


def _launch(student_logits: Tensor, teacher_logits: Tensor, grad_out: Tensor, weights: Tensor, *, divergence: str,
            beta: float, temperature: float, sampled_ids: Tensor | None, block_v: int | None) -> tuple[Tensor, Tensor]:
    """Runs the row kernel. grad_out may be student_logits itself, or a 16-bit view of the first half of each of its
    rows (_gradient_in_student_rows). Returns (sum_i w_i L_i, per-token [C]) in fp32."""
    import triton

    from opdgraph.kernels import divergence_triton as body

    num_rows, vocab = student_logits.shape
    for name, matrix in (("student_logits", student_logits), ("teacher_logits", teacher_logits),
                         ("grad_out", grad_out)):
        if matrix.shape != (num_rows, vocab) or matrix.stride(1) != 1:
            raise ValueError(f"{name} must be [{num_rows}, {vocab}] with unit stride along V, got "
                             f"{tuple(matrix.shape)} strides {matrix.stride()}")
    if weights.shape != (num_rows,):
        raise ValueError(f"weights must be [{num_rows}], got {tuple(weights.shape)}")
    per_token = torch.empty(num_rows, dtype=torch.float32, device=student_logits.device)
    loss_terms = torch.empty_like(per_token)
    if num_rows == 0:
        return loss_terms.sum(), per_token
    weights = weights.to(torch.float32).contiguous()
    # A dummy pointer keeps one kernel signature; the kernel only reads it for sampled_token.
    sampled = (sampled_ids if sampled_ids is not None else weights).contiguous()
    block = block_v or min(_DEFAULT_BLOCK_V, triton.next_power_of_2(vocab))
    # A narrower gradient starting at the student buffer is the in-row layout, which needs the kernel's barrier.
    grad_in_student_row = (grad_out.data_ptr() == student_logits.data_ptr()
                           and grad_out.element_size() < student_logits.element_size())
    code = {"forward_kl": body.FORWARD_KL, "reverse_kl": body.REVERSE_KL, "jsd": body.JSD,
            "sampled_token": body.SAMPLED_TOKEN}[divergence].value
    log_beta = math.log(beta) if 0.0 < beta else 0.0
    log_one_minus_beta = math.log1p(-beta) if beta < 1.0 else 0.0
    body.divergence_rows_kernel[(num_rows,)](
        student_logits, student_logits.stride(0), teacher_logits, teacher_logits.stride(0),
        grad_out, grad_out.stride(0), weights, sampled, per_token, loss_terms,
        vocab, 1.0 / temperature, beta, log_beta, log_one_minus_beta,
        DIVERGENCE=code, BLOCK_V=block, GRAD_IN_STUDENT_ROW=grad_in_student_row,
        num_warps=8 if block >= 2048 else 4,
    )
    return (weights * loss_terms).sum(), per_token


def divergence_logit_grad_(student_logits: Tensor, teacher_logits: Tensor, weights: Tensor, *, divergence: str,
                           beta: float = 0.5, temperature: float = 1.0, sampled_ids: Tensor | None = None,
                           block_v: int | None = None) -> tuple[Tensor, Tensor]:
    """The Triton part alone. student_logits [C, V] fp32 is overwritten with w_i dD_i/dz (z = unscaled logits);
    teacher_logits [C, V] (fp32 or bf16) over the student vocab. Returns (sum_i w_i L_i fp32 0-dim, per-token [C]
    fp32), where L_i = D_i and per-token = D_i, except for sampled_token: L_i = a_i log p_S(y_i) (the surrogate)
    and per-token = a_i (the one-sample reverse-KL estimate). Both are 0 where w is 0. sampled_ids [C] must lie in
    [0, V) wherever w != 0 (masked rows may hold any id, e.g. -100). Same contract as
    opdgraph.train.losses.divergence_chunk_grad."""
    _check_divergence_args(divergence, beta, temperature, sampled_ids)
    if student_logits.dtype != torch.float32:
        raise ValueError(f"student_logits must be float32 (it receives the gradient), got {student_logits.dtype}")
    return _launch(student_logits, teacher_logits, student_logits, weights, divergence=divergence, beta=beta,
                   temperature=temperature, sampled_ids=sampled_ids, block_v=block_v)


def _matmul_logits(left: Tensor, right: Tensor, dtype: torch.dtype) -> Tensor:
    """left @ right with `dtype` output, rounded once from the fp32 accumulator; bf16/fp16 inputs still run on
    tensor cores (fp32 accumulate)."""
    if not left.is_cuda:
        # CPU (tests): upcasting is exact, so this matches the tensor-core product up to summation order.
        return (left.float() @ right.float()).to(dtype)
    if left.dtype == dtype:
        return left @ right
    if dtype == torch.float32:
        return torch.mm(left, right, out_dtype=torch.float32)
    return (left @ right).to(dtype)  # fp32 weights, 16-bit teacher logits: not a fast path, just correct


def _gradient_in_student_rows(student_logits: Tensor, dtype: torch.dtype) -> Tensor:
    """A [C, V] view in a 16-bit dtype over the first half of each fp32 student-logit row: the kernel writes the
    gradient there (see GRAD_IN_STUDENT_ROW), so no separate [C, V] gradient buffer is allocated. Row stride 2V,
    unit stride along V: cuBLAS takes it as is (leading dimension 2V), no copy."""
    return student_logits.view(dtype)[:, : student_logits.shape[1]]


def _addmm_fp32_(accumulator: Tensor, left: Tensor, right: Tensor) -> None:
    """accumulator (fp32) += left @ right without materialising a low-precision partial product."""
    if left.dtype == torch.float32 and right.dtype == torch.float32:
        accumulator.addmm_(left, right)
    elif left.is_cuda:
        torch.addmm(accumulator, left, right, out_dtype=torch.float32, out=accumulator)
    else:
        accumulator.addmm_(left.float(), right.float())


def _hidden_gradient(logit_grad: Tensor, lm_head: Tensor, splits: int) -> Tensor:
    """dlogits [C, V] @ W_s [V, Hs] in dlogits' dtype. The output is small (C x Hs: ~48 tensor-core tiles at
    C = 1024 for 132 SMs) and the reduction long (V), so with splits > 1 the vocabulary is cut into `splits`
    slices multiplied as one batched matmul with fp32 partial products, then summed (split-K by hand, in case the
    library does not split on its own); a remainder of V not divisible by splits goes through one more addmm."""
    lm_head = lm_head.to(logit_grad.dtype)
    if splits == 1:
        return logit_grad @ lm_head
    num_rows, vocab = logit_grad.shape
    slice_size = vocab // splits
    covered = slice_size * splits
    left = logit_grad[:, :covered].unflatten(1, (splits, slice_size)).transpose(0, 1)  # [S, C, V/S], no copy
    right = lm_head[:covered].view(splits, slice_size, lm_head.shape[1])
    if logit_grad.dtype == torch.float32:
        partial = torch.bmm(left, right)
    elif logit_grad.is_cuda:
        partial = torch.bmm(left, right, out_dtype=torch.float32)
    else:
        partial = torch.bmm(left.float(), right.float())
    total = partial.sum(0)
    if covered < vocab:
        _addmm_fp32_(total, logit_grad[:, covered:], lm_head[covered:])
    return total.to(logit_grad.dtype)


@torch.no_grad()
def fused_divergence_chunk(student_hidden: Tensor, student_lm_head: Tensor, teacher_hidden: Tensor,
                           teacher_lm_head: Tensor, weights: Tensor, *, divergence: str, beta: float = 0.5,
                           temperature: float = 1.0, sampled_ids: Tensor | None = None,
                           lm_head_grad: Tensor | None = None, block_v: int | None = None,
                           teacher_logits_dtype: torch.dtype = torch.float32, grad_in_student_logits: bool = False,
                           hidden_grad_splits: int = 1) -> tuple[Tensor, Tensor, Tensor]:
    """Loss and gradients of one chunk: student_hidden [C, Hs], student_lm_head [V, Hs], teacher_hidden [C, Ht],
    teacher_lm_head [Vt >= V, Ht] (its first V rows are used), weights [C]. Returns (sum_i w_i L_i fp32 0-dim,
    dL/d(student_hidden) [C, Hs] in the hidden dtype, per-token [C] fp32) as in divergence_logit_grad_; adds
    dL/d(student_lm_head) into lm_head_grad ([V, Hs] fp32) when given.
    Memory options (extra memory per logit: 4 student + 4 teacher + 2 gradient bytes by default, for 16-bit weights):
      teacher_logits_dtype=torch.bfloat16 stores the teacher logits in bf16 (-2 bytes, and 4 fewer bytes of kernel
        traffic); each teacher logit is then off by up to 2^-9 of its magnitude, see docs/kernel_divergence.md;
      grad_in_student_logits=True writes the 16-bit gradient into the first half of each fp32 student row (-2 bytes;
        no effect for fp32 weights, whose gradient always overwrites the student logits).
    hidden_grad_splits > 1 computes dL/d(student_hidden) as a split-K batched matmul (_hidden_gradient)."""
    _check_divergence_args(divergence, beta, temperature, sampled_ids)
    if teacher_logits_dtype not in (torch.float32, torch.bfloat16):
        raise ValueError(f"teacher_logits_dtype must be torch.float32 or torch.bfloat16, got {teacher_logits_dtype}")
    if hidden_grad_splits < 1:
        raise ValueError(f"hidden_grad_splits must be >= 1 (got {hidden_grad_splits})")
    num_rows, vocab = student_hidden.shape[0], student_lm_head.shape[0]
    if student_hidden.shape[1] != student_lm_head.shape[1] or teacher_hidden.shape[1] != teacher_lm_head.shape[1]:
        raise ValueError(f"hidden sizes disagree: student {tuple(student_hidden.shape)} x "
                         f"{tuple(student_lm_head.shape)}, teacher {tuple(teacher_hidden.shape)} x "
                         f"{tuple(teacher_lm_head.shape)}")
    if teacher_hidden.shape[0] != num_rows:
        raise ValueError(f"teacher_hidden has {teacher_hidden.shape[0]} positions, student_hidden {num_rows}")
    if teacher_lm_head.shape[0] < vocab:
        raise ValueError(f"teacher vocab {teacher_lm_head.shape[0]} is smaller than the student vocab {vocab}")
    if lm_head_grad is not None and (lm_head_grad.shape != student_lm_head.shape
                                     or lm_head_grad.dtype != torch.float32):
        raise ValueError(f"lm_head_grad must be float32 {tuple(student_lm_head.shape)}, got "
                         f"{lm_head_grad.dtype} {tuple(lm_head_grad.shape)}")

    student_logits = _matmul_logits(student_hidden, student_lm_head.t(), torch.float32)
    teacher_logits = _matmul_logits(teacher_hidden, teacher_lm_head[:vocab].t(), teacher_logits_dtype)
    # The gradient matmuls want dlogits in the weights' dtype; the kernel writes it there directly, which saves a
    # separate cast pass over [C, V] (for fp32 weights it simply overwrites the student logits).
    if student_lm_head.dtype == torch.float32:
        logit_grad = student_logits
    elif grad_in_student_logits:
        logit_grad = _gradient_in_student_rows(student_logits, student_lm_head.dtype)
    else:
        logit_grad = torch.empty(num_rows, vocab, dtype=student_lm_head.dtype, device=student_logits.device)
    loss, per_token = _launch(student_logits, teacher_logits, logit_grad, weights, divergence=divergence, beta=beta,
                              temperature=temperature, sampled_ids=sampled_ids, block_v=block_v)
    # Free before the gradient matmuls so the peak stays at the kernel (an in-row gradient keeps its storage alive).
    del student_logits, teacher_logits

    hidden_grad = _hidden_gradient(logit_grad, student_lm_head, hidden_grad_splits)
    if lm_head_grad is not None:
        _addmm_fp32_(lm_head_grad, logit_grad.t(), student_hidden.to(logit_grad.dtype))
    return loss, hidden_grad.to(student_hidden.dtype), per_token


def chunked_fused_divergence(student_hidden: Tensor, student_lm_head: Tensor, teacher_hidden: Tensor,
                             teacher_lm_head: Tensor, weights: Tensor, *, divergence: str, chunk_tokens: int,
                             beta: float = 0.5, temperature: float = 1.0, sampled_ids: Tensor | None = None,
                             lm_head_grad: Tensor | None = None, block_v: int | None = None,
                             teacher_logits_dtype: torch.dtype = torch.float32, grad_in_student_logits: bool = False,
                             hidden_grad_splits: int = 1) -> tuple[Tensor, Tensor, Tensor]:
    """fused_divergence_chunk over N positions in chunks of chunk_tokens, so extra memory is O(chunk_tokens x V)
    (the memory options are fused_divergence_chunk's). Returns (sum_i w_i L_i fp32 0-dim, dL/d(student_hidden)
    [N, Hs], per-token [N] fp32)."""
    if chunk_tokens < 1:
        raise ValueError(f"chunk_tokens must be >= 1 (got {chunk_tokens})")
    num_positions = student_hidden.shape[0]
    hidden_grad = torch.empty_like(student_hidden)
    per_token = torch.empty(num_positions, dtype=torch.float32, device=student_hidden.device)
    loss = torch.zeros((), dtype=torch.float32, device=student_hidden.device)
    for start in range(0, num_positions, chunk_tokens):
        rows = slice(start, min(start + chunk_tokens, num_positions))
        chunk_loss, hidden_grad[rows], per_token[rows] = fused_divergence_chunk(
            student_hidden[rows], student_lm_head, teacher_hidden[rows], teacher_lm_head, weights[rows],
            divergence=divergence, beta=beta, temperature=temperature,
            sampled_ids=None if sampled_ids is None else sampled_ids[rows], lm_head_grad=lm_head_grad,
            block_v=block_v, teacher_logits_dtype=teacher_logits_dtype,
            grad_in_student_logits=grad_in_student_logits, hidden_grad_splits=hidden_grad_splits)
        loss += chunk_loss
    return loss, hidden_grad, per_token
