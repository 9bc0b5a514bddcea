"""Per-chunk divergence math: raw logits of C positions -> (weighted loss, analytic dlogits, per-token values).

This is the middle of the chunked loss (see ``divergence.py`` for the definitions and the loop around it): given the
student's and the teacher's raw (untempered) logits for one chunk of positions, it returns the weighted loss of the
chunk and the gradient of that loss with respect to the student's raw logits, derived by hand (no autograd). A
Triton kernel implements the same contract on GPU; this plain-torch version is the reference it is tested against.

Contract of ``divergence_chunk_grad`` (what a replacement kernel must do):
    inputs   student_logits [C, V] fp32 and teacher_logits [C, V] fp32 (raw z = h W^T, temperature NOT applied),
             weights [C] fp32, sampled_ids [C] int64 (only for ``sampled_token``).
    outputs  loss_sum   0-dim fp32 = sum_i w_i * L_i   (L_i = D_i, or the surrogate a_i log p_S(y_i))
             dlogits    [C, V] fp32 = d loss_sum / d z_student, weights and the 1/tau factor included
             per_token  [C] fp32 = D_i (for ``sampled_token``: a_i, the per-token reverse-KL estimate)
    Both input buffers are consumed: dlogits is written into the student_logits storage, the teacher buffer is
    used as scratch. The torch path also allocates up to two chunk-sized temporaries, so memory stays O(C x V).

Analytic gradients with s = z / tau, p_S = softmax(s), D_i the per-position divergence; dz = w * ds / tau:
    forward_kl     dD/ds_v = p_S,v - p_T,v
    reverse_kl     dD/ds_v = p_S,v * (log p_S,v - log p_T,v - D)
    jsd            dD/ds_v = (1 - beta) * p_S,v * (log p_S,v - log M_v - KL(S || M))
                   (D = beta sum p_T log p_T + (1 - beta) sum p_S log p_S - sum M log M, and only p_S moves)
    sampled_token  dL/ds_v = a * (1[v = y] - p_S,v)   with a = log p_S(y) - log p_T(y) held constant
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

DIVERGENCES = ("forward_kl", "reverse_kl", "jsd", "sampled_token")


class ChunkGrad(NamedTuple):
    loss_sum: torch.Tensor  # 0-dim fp32
    dlogits: torch.Tensor  # [C, V] fp32, aliases the student_logits input
    per_token: torch.Tensor  # [C] fp32


def check_divergence_args(divergence: str, beta: float, temperature: float, has_sampled_ids: bool) -> None:
    """Raise a ValueError that says what to change when a divergence setting is out of its domain."""
    if divergence not in DIVERGENCES:
        raise ValueError(f"unknown divergence {divergence!r}; choose one of {', '.join(DIVERGENCES)}")
    if divergence == "jsd" and not 0.0 < beta < 1.0:
        # At beta = 0 or 1 the mixture M equals one of the two distributions and this JSD is identically 0.
        raise ValueError(f"jsd needs beta strictly between 0 and 1, got {beta}; use forward_kl or reverse_kl instead")
    if not temperature > 0.0 or not math.isfinite(temperature):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature}")
    if (divergence == "sampled_token") != has_sampled_ids:
        need = "needs" if divergence == "sampled_token" else "does not take"
        raise ValueError(f"divergence {divergence!r} {need} sampled_ids (the sampled next token of each position)")


def _log_softmax_(logits: torch.Tensor, inv_temperature: float) -> torch.Tensor:
    """In-place log_softmax(logits / tau) along the vocab: stable because logsumexp subtracts the row max."""
    if inv_temperature != 1.0:
        logits.mul_(inv_temperature)
    return logits.sub_(torch.logsumexp(logits, dim=-1, keepdim=True))


def divergence_chunk_grad(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    weights: torch.Tensor,
    divergence: str,
    beta: float = 0.5,
    temperature: float = 1.0,
    sampled_ids: torch.Tensor | None = None,
) -> ChunkGrad:
    """Weighted loss of one chunk and its gradient w.r.t. the student's raw logits (see module docstring)."""
    inv_temperature = 1.0 / temperature
    log_p_student = _log_softmax_(student_logits, inv_temperature)
    log_p_teacher = _log_softmax_(teacher_logits, inv_temperature)
    grad_scale = (weights * inv_temperature).unsqueeze(1)  # [C, 1]: chain rule through s = z / tau, then w_i

    if divergence == "reverse_kl":
        log_ratio = log_p_teacher.neg_().add_(log_p_student)  # log p_S - log p_T, in the teacher buffer
        p_student = log_p_student.exp_()
        per_token = torch.linalg.vecdot(p_student, log_ratio)
        dlogits = p_student.mul_(log_ratio.sub_(per_token.unsqueeze(1))).mul_(grad_scale)
        loss_sum = torch.dot(weights, per_token)
    elif divergence == "forward_kl":
        p_teacher = log_p_teacher.exp()
        # Subtract the log-probs before the dot product: sum p_T log p_T - sum p_T log p_S cancels catastrophically.
        per_token = torch.linalg.vecdot(p_teacher, log_p_teacher.sub_(log_p_student))
        dlogits = log_p_student.exp_().sub_(p_teacher).mul_(grad_scale)
        loss_sum = torch.dot(weights, per_token)
    elif divergence == "jsd":
        log_mixture = log_p_student + math.log1p(-beta)
        torch.logaddexp(log_mixture, log_p_teacher + math.log(beta), out=log_mixture)
        p_teacher = log_p_teacher.exp()
        kl_teacher_mixture = torch.linalg.vecdot(p_teacher, log_p_teacher.sub_(log_mixture))
        student_minus_mixture = torch.sub(log_p_student, log_mixture, out=log_p_teacher)  # reuse teacher buffer
        p_student = log_p_student.exp_()
        kl_student_mixture = torch.linalg.vecdot(p_student, student_minus_mixture)
        per_token = beta * kl_teacher_mixture + (1.0 - beta) * kl_student_mixture
        student_minus_mixture.sub_(kl_student_mixture.unsqueeze(1))
        dlogits = p_student.mul_(student_minus_mixture).mul_(grad_scale * (1.0 - beta))
        loss_sum = torch.dot(weights, per_token)
    elif divergence == "sampled_token":
        ids = sampled_ids.unsqueeze(1)
        log_p_student_sampled = log_p_student.gather(1, ids).squeeze(1)
        per_token = log_p_student_sampled - log_p_teacher.gather(1, ids).squeeze(1)  # a_i, treated as a constant
        loss_sum = torch.dot(weights, per_token * log_p_student_sampled)
        coefficient = per_token.unsqueeze(1) * grad_scale  # [C, 1]
        dlogits = log_p_student.exp_().mul_(coefficient.neg()).scatter_add_(1, ids, coefficient)
    else:
        raise ValueError(f"unknown divergence {divergence!r}; choose one of {', '.join(DIVERGENCES)}")
    return ChunkGrad(loss_sum=loss_sum, dlogits=dlogits, per_token=per_token)


def chunk_metrics(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-position (reverse KL, forward KL, top-1 agreement) of raw [C, V] logits; inputs are left untouched."""
    top1_agree = student_logits.argmax(dim=-1) == teacher_logits.argmax(dim=-1)  # tau does not move the argmax
    log_p_student = torch.log_softmax(student_logits / temperature, dim=-1)
    log_p_teacher = torch.log_softmax(teacher_logits / temperature, dim=-1)
    log_ratio = log_p_student - log_p_teacher
    reverse_kl = torch.linalg.vecdot(log_p_student.exp_(), log_ratio)
    forward_kl = -torch.linalg.vecdot(log_p_teacher.exp_(), log_ratio)
    return reverse_kl, forward_kl, top1_agree
