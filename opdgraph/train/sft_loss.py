"""Chunked token cross-entropy with its analytic gradient: the sft stage's term (hybrid SFT + OPD, stages/sft.py).

For M positions with student hidden states h_j, lm_head W [V, H], targets g_j and fp32 weights w_j:

    loss = scale x sum_j w_j CE_j,   CE_j = logsumexp(z_j) - z_j[g_j],   z_j = h_j W^T (temperature 1)
    dloss/dz_j = scale x w_j (softmax(z_j) - onehot(g_j))

returned with hidden_grad = dz @ W (the student dtype) and added, in fp32, into lm_head_grad (dz^T @ h), like the
divergence (opdgraph.train.divergence, whose logits_fp32 and precision rules this shares). Positions are walked
`chunk_tokens` at a time: [chunk, V] fp32 logits exist for one chunk; the gradient is written into their storage.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from opdgraph.train.divergence import head_for_logits, logits_fp32


@dataclass
class CrossEntropyResult:
    loss: torch.Tensor  # 0-dim fp32: scale x sum_j w_j CE_j
    hidden_grad: torch.Tensor  # [M, H], the hidden states' dtype
    per_token: torch.Tensor  # [M] fp32 detached: CE_j


def chunked_cross_entropy(hidden: torch.Tensor, lm_head: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor,
                          *, scale: float, chunk_tokens: int, lm_head_grad: torch.Tensor | None = None
                          ) -> CrossEntropyResult:
    """See the module docstring. hidden [M, H], lm_head [V, H], targets [M] int64 in [0, V), weights [M] fp32,
    lm_head_grad [V, H] fp32 (added into; None skips it)."""
    if chunk_tokens < 1:
        raise ValueError(f"chunk_tokens must be >= 1, got {chunk_tokens}")
    if weights.shape != targets.shape or targets.shape != hidden.shape[:1]:
        raise ValueError(f"hidden {list(hidden.shape)}, targets {list(targets.shape)} and weights "
                         f"{list(weights.shape)} must have one entry per position")
    head = head_for_logits(lm_head)
    loss = torch.zeros((), dtype=torch.float32, device=hidden.device)
    per_token = torch.empty(hidden.shape[0], dtype=torch.float32, device=hidden.device)
    hidden_grad = torch.empty_like(hidden)
    with torch.no_grad():
        for start in range(0, hidden.shape[0], chunk_tokens):
            stop = min(start + chunk_tokens, hidden.shape[0])
            chunk, ids = hidden[start:stop].detach(), targets[start:stop].unsqueeze(1)
            logits = logits_fp32(chunk, head)
            log_probs = logits.sub_(torch.logsumexp(logits, dim=-1, keepdim=True))
            per_token[start:stop] = log_probs.gather(1, ids).squeeze(1).neg()
            grad_scale = (weights[start:stop] * scale).unsqueeze(1)
            dlogits = log_probs.exp_().scatter_add_(1, ids, torch.full_like(ids, -1, dtype=torch.float32))
            dlogits.mul_(grad_scale)
            torch.mm(dlogits.to(lm_head.dtype), lm_head, out=hidden_grad[start:stop])
            if lm_head_grad is not None:
                lm_head_grad.addmm_(dlogits.T, chunk.float())
            del logits, log_probs, dlogits
    loss += scale * torch.dot(weights.float(), per_token)
    return CrossEntropyResult(loss=loss, hidden_grad=hidden_grad, per_token=per_token)
