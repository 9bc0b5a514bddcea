"""Chunked full-vocabulary divergences between student and teacher: the OPD loss and its gradient.

The loss stage hands this module the student's and the teacher's final hidden states for N packed positions, their
lm_head weights and one weight per position. It returns the loss, dLoss/d(student hidden) for the two-stage
backward (``two_stage.py``) and accumulates dLoss/d(student lm_head) into an fp32 buffer. Full [N, V] logits never
exist: positions are processed ``chunk_tokens`` at a time, so memory is O(chunk_tokens x V) whatever N is.

Definitions. For a position i with student logits s_i = h_i W_s^T / tau and teacher logits
t_i = g_i W_t[:V]^T / tau (teacher vocab Vt >= V: drop extra teacher columns, i.e. use only the first V rows of the
teacher lm_head), p_S = softmax(s_i), p_T = softmax(t_i):
- `forward_kl` = KL(T || S) = sum_v p_T (log p_T - log p_S)
- `reverse_kl` = KL(S || T) = sum_v p_S (log p_S - log p_T)
- `jsd` with beta in (0,1): beta * KL(T || M) + (1 - beta) * KL(S || M), M = beta * p_T + (1 - beta) * p_S
  (compute log M stably via logsumexp of (log beta + log p_T, log(1-beta) + log p_S)).
- `sampled_token`: needs the sampled next token y_i; a_i = stopgrad(log p_S(y_i) - log p_T(y_i)) and the per-token
  loss is a_i * log p_S(y_i) (policy-gradient surrogate whose gradient is the reverse-KL gradient estimate); report
  its value as the loss and also report mean a_i as the divergence estimate.
Total loss = sum_i w_i * D_i where w_i is a given per-position fp32 weight (see ``weights.py``).
Temperature tau scales BOTH models' logits. Gradient is taken w.r.t. the student only (teacher detached).

Mixture of teachers. Given K teachers (hidden states g_ik, lm_heads W_k) and fixed weights w_k summing to one, the
teacher distribution is p_T = sum_k w_k softmax(t_ik), t_ik = g_ik W_k[:V]^T / tau (each teacher at the loss
temperature, then mixed), and every divergence above is taken against that p_T. The chunk's teacher "logits" are
then tau * log p_T (`mixture_teacher_logits`: a running logaddexp over the teachers), which the softmax at
temperature tau maps back to p_T exactly. With `per_teacher` the result also holds, for the log, each teacher's own
divergence against the student, sum_i w_i D(p_S, p_Tk) (sampled_token: the estimate with a_ik against teacher k),
computed chunk by chunk before the chunk's gradient: a copy of the student's logits beside one teacher's at a time.

Per chunk: logits of both models (see "Precision"), then ``losses.divergence_chunk_grad`` (loss and analytic
dlogits, the part a Triton kernel replaces on GPU), then hidden_grad[chunk] = dlogits @ W_s and
lm_head_grad += dlogits^T @ h[chunk]; the chunk's logits are then dropped.

Precision. Logits are always products of the given (possibly bf16) values accumulated and written in fp32, never
rounded to bf16 before the softmax: on CUDA a low-precision matmul with ``out_dtype=fp32``; elsewhere (CPU has no
such matmul) the lm_heads are upcast to fp32 once per call, a transient V x H fp32 copy that the small CPU runs can
afford. All softmax/divergence math is fp32. hidden_grad is ``dlogits.to(dtype) @ W_s`` in the student dtype (the
large weight is never upcast on GPU). The lm_head gradient is accumulated in fp32 from fp32 dlogits and the upcast
hidden chunk (both chunk-sized, so upcasting them is cheap), in place with addmm_.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from opdgraph.train.losses import check_divergence_args, chunk_metrics, divergence_chunk_grad


@dataclass
class DivergenceMetrics:
    """Per-position diagnostics at the loss temperature, detached fp32 (top1_agree is bool)."""

    reverse_kl: torch.Tensor  # [N]
    forward_kl: torch.Tensor  # [N]
    top1_agree: torch.Tensor  # [N] bool: student argmax == teacher argmax (over the shared V tokens)


@dataclass
class DivergenceResult:
    loss: torch.Tensor  # 0-dim fp32: sum_i w_i L_i (sampled_token: the surrogate sum_i w_i a_i log p_S(y_i))
    hidden_grad: torch.Tensor  # [N, Hs], dtype of student_hidden: dLoss/d student_hidden
    per_token: torch.Tensor  # [N] fp32 detached: D_i (sampled_token: a_i)
    estimate: torch.Tensor  # 0-dim fp32: sum_i w_i per_token_i (= loss except for sampled_token: mean of a_i)
    metrics: DivergenceMetrics | None  # only when asked for (return_metrics=True)
    per_teacher_estimates: list[torch.Tensor] | None = None  # a mixture's: sum_i w_i D(p_S, p_Tk) per teacher k


def logits_fp32(hidden: torch.Tensor, lm_head: torch.Tensor) -> torch.Tensor:
    """hidden [C, H] @ lm_head [V, H]^T with an fp32 accumulator and fp32 output (module docstring: Precision)."""
    if hidden.dtype != torch.float32 and hidden.is_cuda:
        return torch.mm(hidden, lm_head.T, out_dtype=torch.float32)
    return hidden.float() @ lm_head.float().T


def head_for_logits(lm_head: torch.Tensor) -> torch.Tensor:
    """The lm_head as ``logits_fp32`` wants it: as is on CUDA, upcast once per call elsewhere."""
    return lm_head if lm_head.is_cuda else lm_head.float()


def mixture_teacher_logits(hidden_chunks, heads, weights, temperature: float) -> torch.Tensor:
    """tau * log(sum_k w_k softmax(h_k W_k^T / tau)) for one chunk, fp32 [C, V] (see the module docstring)."""
    mixed = None
    for hidden, head, weight in zip(hidden_chunks, heads, weights):
        if weight == 0:
            continue
        log_probs = torch.log_softmax(logits_fp32(hidden, head) / temperature, dim=-1) + math.log(weight)
        mixed = log_probs if mixed is None else torch.logaddexp(mixed, log_probs, out=mixed)
        del log_probs
    return mixed.mul_(temperature)


class _Teachers:
    """One teacher (hidden [N, Ht], lm_head [Vt, Ht]) or a mixture (lists of them and weights): the chunk's
    teacher logits either way."""

    def __init__(self, hidden, lm_head, weights, vocab: int, temperature: float):
        self.mixture = isinstance(hidden, (list, tuple))
        self.hidden = list(hidden) if self.mixture else [hidden]
        self.heads = [head_for_logits(head[:vocab]) for head in (lm_head if self.mixture else [lm_head])]
        self.weights = list(weights) if self.mixture else [1.0]
        self.temperature = temperature
        if self.mixture and not (len(self.hidden) == len(self.heads) == len(self.weights)):
            raise ValueError("a mixture needs one hidden state tensor, lm_head and weight per teacher")

    def each_logits(self, index: int, start: int, stop: int) -> torch.Tensor:
        """Teacher `index`'s own raw logits of the chunk, fp32 [C, V]."""
        return logits_fp32(self.hidden[index][start:stop], self.heads[index])

    def logits(self, start: int, stop: int) -> torch.Tensor:
        if not self.mixture:
            return logits_fp32(self.hidden[0][start:stop], self.heads[0])
        return mixture_teacher_logits([hidden[start:stop] for hidden in self.hidden], self.heads, self.weights,
                                      self.temperature)


def _check_shapes(student_hidden, student_lm_head, teacher_hidden, teacher_lm_head, chunk_tokens, weights=None):
    num_positions, vocab = student_hidden.shape[0], student_lm_head.shape[0]
    if teacher_hidden.shape[0] != num_positions:
        raise ValueError(f"student has {num_positions} positions but teacher has {teacher_hidden.shape[0]}")
    if teacher_lm_head.shape[0] < vocab:
        raise ValueError(
            f"teacher vocab {teacher_lm_head.shape[0]} is smaller than the student's {vocab}; the teacher must "
            "cover every student token id (pick a teacher from the same tokenizer family)"
        )
    if weights is not None and (weights.shape != (num_positions,) or weights.dtype != torch.float32):
        raise ValueError(f"weights must be fp32 [{num_positions}], got {weights.dtype} {list(weights.shape)}")
    if chunk_tokens < 1:
        raise ValueError(f"chunk_tokens must be >= 1, got {chunk_tokens}")


def chunked_divergence(
    student_hidden: torch.Tensor,
    student_lm_head: torch.Tensor,
    teacher_hidden: torch.Tensor,
    teacher_lm_head: torch.Tensor,
    weights: torch.Tensor,
    *,
    divergence: str,
    beta: float = 0.5,
    temperature: float = 1.0,
    chunk_tokens: int,
    sampled_ids: torch.Tensor | None = None,
    lm_head_grad: torch.Tensor | None = None,
    return_metrics: bool = False,
    mixture_weights: list[float] | None = None,
    per_teacher: bool = False,
) -> DivergenceResult:
    """Loss sum_i w_i D_i over N positions, its student-hidden gradient, and (in place) its lm_head gradient.

    Shapes: student_hidden [N, Hs], student_lm_head [V, Hs], teacher_hidden [N, Ht], teacher_lm_head [Vt >= V, Ht],
    weights [N] fp32, sampled_ids [N] int64 in [0, V) (sampled_token only; any valid id where w_i = 0),
    lm_head_grad [V, Hs] fp32 accumulator (added into; None skips the lm_head gradient). A mixture of teachers:
    teacher_hidden and teacher_lm_head are lists (one per teacher) and mixture_weights their weights; `per_teacher`
    also returns each teacher's own divergence estimate (module docstring).
    """
    check_divergence_args(divergence, beta, temperature, sampled_ids is not None)
    for hidden, head in _pairs(teacher_hidden, teacher_lm_head):
        _check_shapes(student_hidden, student_lm_head, hidden, head, chunk_tokens, weights)
    num_positions, vocab = student_hidden.shape[0], student_lm_head.shape[0]
    # The teacher's extra (padding) rows never enter the softmax; [:vocab] is a view.
    student_head = head_for_logits(student_lm_head)
    teachers = _Teachers(teacher_hidden, teacher_lm_head, mixture_weights, vocab, temperature)
    device = student_hidden.device
    loss = torch.zeros((), dtype=torch.float32, device=device)
    per_token = torch.empty(num_positions, dtype=torch.float32, device=device)
    hidden_grad = torch.empty_like(student_hidden)
    metrics = _empty_metrics(num_positions, device) if return_metrics else None
    each_teacher = [torch.zeros((), dtype=torch.float32, device=device) for _ in teachers.hidden] if per_teacher \
        else None

    with torch.no_grad():  # gradients are analytic; callers may pass hidden states that still require grad
        for start in range(0, num_positions, chunk_tokens):
            stop = min(start + chunk_tokens, num_positions)
            student_chunk = student_hidden[start:stop].detach()
            student_logits = logits_fp32(student_chunk, student_head)
            for index, total in enumerate(each_teacher or ()):
                each = divergence_chunk_grad(student_logits.clone(), teachers.each_logits(index, start, stop),
                                             weights[start:stop], divergence, beta, temperature,
                                             None if sampled_ids is None else sampled_ids[start:stop])
                total += torch.dot(weights[start:stop], each.per_token)
                del each
            teacher_logits = teachers.logits(start, stop)
            if metrics is not None:
                _fill_metrics(metrics, slice(start, stop), student_logits, teacher_logits, temperature)
            chunk = divergence_chunk_grad(
                student_logits,
                teacher_logits,
                weights[start:stop],
                divergence,
                beta,
                temperature,
                None if sampled_ids is None else sampled_ids[start:stop],
            )
            loss += chunk.loss_sum
            per_token[start:stop] = chunk.per_token
            torch.mm(chunk.dlogits.to(student_lm_head.dtype), student_lm_head, out=hidden_grad[start:stop])
            if lm_head_grad is not None:
                lm_head_grad.addmm_(chunk.dlogits.T, student_chunk.float())
            del student_logits, teacher_logits, chunk

    estimate = torch.dot(weights.float(), per_token)
    return DivergenceResult(loss=loss, hidden_grad=hidden_grad, per_token=per_token, estimate=estimate, metrics=metrics,
                            per_teacher_estimates=each_teacher)


def _pairs(teacher_hidden, teacher_lm_head):
    if isinstance(teacher_hidden, (list, tuple)):
        return list(zip(teacher_hidden, teacher_lm_head))
    return [(teacher_hidden, teacher_lm_head)]


def divergence_metrics(
    student_hidden: torch.Tensor,
    student_lm_head: torch.Tensor,
    teacher_hidden: torch.Tensor,
    teacher_lm_head: torch.Tensor,
    *,
    temperature: float = 1.0,
    chunk_tokens: int,
    mixture_weights: list[float] | None = None,
) -> DivergenceMetrics:
    """Per-position reverse KL, forward KL and top-1 agreement (for eval), chunked like ``chunked_divergence``."""
    check_divergence_args("forward_kl", 0.5, temperature, False)
    for hidden, head in _pairs(teacher_hidden, teacher_lm_head):
        _check_shapes(student_hidden, student_lm_head, hidden, head, chunk_tokens)
    num_positions, vocab = student_hidden.shape[0], student_lm_head.shape[0]
    metrics = _empty_metrics(num_positions, student_hidden.device)
    student_head = head_for_logits(student_lm_head)
    teachers = _Teachers(teacher_hidden, teacher_lm_head, mixture_weights, vocab, temperature)
    with torch.no_grad():
        for start in range(0, num_positions, chunk_tokens):
            stop = min(start + chunk_tokens, num_positions)
            student_logits = logits_fp32(student_hidden[start:stop], student_head)
            teacher_logits = teachers.logits(start, stop)
            _fill_metrics(metrics, slice(start, stop), student_logits, teacher_logits, temperature)
    return metrics


def _empty_metrics(num_positions: int, device: torch.device) -> DivergenceMetrics:
    return DivergenceMetrics(
        reverse_kl=torch.empty(num_positions, dtype=torch.float32, device=device),
        forward_kl=torch.empty(num_positions, dtype=torch.float32, device=device),
        top1_agree=torch.empty(num_positions, dtype=torch.bool, device=device),
    )


def _fill_metrics(metrics, rows, student_logits, teacher_logits, temperature) -> None:
    reverse_kl, forward_kl, top1_agree = chunk_metrics(student_logits, teacher_logits, temperature)
    metrics.reverse_kl[rows] = reverse_kl
    metrics.forward_kl[rows] = forward_kl
    metrics.top1_agree[rows] = top1_agree
