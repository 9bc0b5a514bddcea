"""The gated delta rule in plain torch: the recurrence of a gated-DeltaNet (Qwen3.5 linear-attention) layer.

Per value head, a state S (key dim x value dim) is carried along the sequence. At token t, with decay a_t = exp(g_t)
(g_t <= 0), write strength b_t in (0, 1), key k_t (L2-normalised), value v_t and query q_t (L2-normalised, times
1 / sqrt(key dim)):

    S' = a_t S_{t-1}                       (forget)
    u_t = b_t (v_t - S'^T k_t)             (delta rule: write only what S' does not already predict for k_t)
    S_t = S' + k_t u_t^T
    o_t = S_t^T q_t

``recurrent_step`` is this one token at a time (decode). ``chunked`` computes the same outputs a chunk of C tokens at
once. Within a chunk starting from state S_0, with cumulative log-decays G_i = g_1 + ... + g_i:

    u_i = b_i (v_i - e^{G_i} S_0^T k_i - sum_{j<i} e^{G_i - G_j} (k_i . k_j) u_j)

which is the unit lower-triangular system (I + A) U = b (V - e^G K S_0), A_ij = b_i e^{G_i - G_j} (k_i . k_j) for
j < i. One triangular solve per chunk for both right-hand sides gives U = U_v - W S_0 (U_v and W depend on the chunk
alone), then

    O   = (e^G Q) S_0 + (Q K^T * e^{G_i - G_j}, j <= i) U
    S_C = e^{G_C} S_0 + (K * e^{G_C - G})^T U

so only the scan over chunks is sequential. The last chunk of a sequence may be shorter; nothing is padded. All of it
runs in float32 on whatever device the tensors are on; it is the reference a GPU kernel (flash-linear-attention's
chunked gated delta rule) is tested against, and the path CPU runs take.

Shapes: one sequence, L tokens, H value heads: q, k [L, H, Dk], v [L, H, Dv], g, beta [L, H], state [H, Dk, Dv].
"""

from __future__ import annotations

import torch

CHUNK_TOKENS = 64  # as flash-linear-attention's chunked kernels; any size gives the same outputs up to rounding
L2_EPS = 1e-6  # inside the rsqrt of the q/k normalisation, as the reference implementation


def l2_normalize(x: torch.Tensor) -> torch.Tensor:
    return x * torch.rsqrt((x * x).sum(-1, keepdim=True) + L2_EPS)


def recurrent_step(q, k, v, g, beta, state):
    """One token for a batch of B sequences: q, k [B, H, Dk], v [B, H, Dv], g, beta [B, H], state [B, H, Dk, Dv]
    -> (out [B, H, Dv], new state)."""
    state = state * g.exp()[..., None, None]
    predicted = torch.einsum("bhkv,bhk->bhv", state, k)
    update = (v - predicted) * beta[..., None]
    state = state + k[..., :, None] * update[..., None, :]
    return torch.einsum("bhkv,bhk->bhv", state, q), state


def chunked(q, k, v, g, beta, state=None, chunk_tokens: int = CHUNK_TOKENS):
    """One sequence (module docstring) -> (out [L, H, Dv], final state [H, Dk, Dv]); state None means zeros."""
    length, heads, key_dim = k.shape
    if state is None:
        state = q.new_zeros(heads, key_dim, v.shape[-1])
    outputs = []
    for start in range(0, length, chunk_tokens):
        stop = min(start + chunk_tokens, length)
        out, state = _chunk(*(x[start:stop].transpose(0, 1) for x in (q, k, v, g, beta)), state)
        outputs.append(out.transpose(0, 1))
    return torch.cat(outputs), state


def _chunk(q, k, v, g, beta, state):
    """q, k [H, C, Dk], v [H, C, Dv], g, beta [H, C], state [H, Dk, Dv] -> (out [H, C, Dv], state at the end)."""
    size = q.shape[1]
    cumulative = g.cumsum(-1)  # G_i
    gaps = cumulative[..., :, None] - cumulative[..., None, :]  # G_i - G_j
    causal = torch.ones(size, size, dtype=torch.bool, device=q.device).tril()
    # Decays e^{G_i - G_j} where j <= i; the masked entries (j > i) would overflow, so they become e^{-inf} = 0.
    decay = torch.where(causal, gaps, float("-inf")).exp()
    strictly_lower = ((k @ k.transpose(-1, -2)) * decay * beta[..., None]).tril(-1)  # A (the solve reads no diagonal)
    right = torch.cat((v * beta[..., None], k * (beta * cumulative.exp())[..., None]), dim=-1)
    solved = torch.linalg.solve_triangular(strictly_lower, right, upper=False, unitriangular=True)
    own, through_state = solved.split((v.shape[-1], k.shape[-1]), dim=-1)  # U_v, W
    updates = own - through_state @ state  # U
    scores = (q @ k.transpose(-1, -2)) * decay
    out = (q * cumulative.exp()[..., None]) @ state + scores @ updates
    to_end = (cumulative[..., -1:] - cumulative).exp()  # e^{G_C - G_j}
    state = state * cumulative[..., -1].exp()[..., None, None] + (k * to_end[..., None]).transpose(-1, -2) @ updates
    return out, state
