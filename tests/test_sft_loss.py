"""The sft stage's chunked cross-entropy (opdgraph.train.sft_loss) against plain float64 autograd.

Reference: loss = scale x sum_j w_j (-log_softmax(h W^T)[g_j]) in float64, gradients by autograd. Fresh random
inputs over chunk sizes (one position per chunk, a chunk larger than the input, a vocabulary that is no multiple of
the chunk), weights with zeros, scale 0 and != 1, bf16 inputs, and no positions at all.
"""

from __future__ import annotations

import pytest
import torch

from opdgraph.train.sft_loss import chunked_cross_entropy

TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 2e-2}


def _reference(hidden, lm_head, targets, weights, scale):
    hidden64 = hidden.double().requires_grad_(True)
    head64 = lm_head.double().requires_grad_(True)
    log_probs = torch.log_softmax(hidden64 @ head64.T, dim=-1)
    loss = scale * (weights.double() * -log_probs.gather(1, targets.unsqueeze(1)).squeeze(1)).sum()
    loss.backward()
    return loss.detach(), hidden64.grad, head64.grad


def _relative(got, want):
    return float((got.double() - want).norm() / want.norm().clamp_min(1e-30))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("positions, vocab, chunk", [(1, 7, 1), (13, 37, 4), (13, 37, 64), (40, 101, 13)])
@pytest.mark.parametrize("scale", [1.0, 0.3])
def test_matches_float64_autograd(dtype, positions, vocab, chunk, scale):
    """Fails if the loss, the hidden-state gradient or the lm_head gradient differs from autograd in float64: a
    wrong softmax / one-hot sign, a chunk boundary dropped or counted twice, or the weights or scale applied wrongly."""
    generator = torch.Generator().manual_seed(positions * vocab + chunk)
    hidden = torch.randn(positions, 16, generator=generator).to(dtype)
    lm_head = (torch.randn(vocab, 16, generator=generator) * 0.5).to(dtype)
    targets = torch.randint(0, vocab, (positions,), generator=generator)
    weights = torch.rand(positions, generator=generator)
    weights[::3] = 0.0
    lm_head_grad = torch.zeros(vocab, 16)
    result = chunked_cross_entropy(hidden, lm_head, targets, weights, scale=scale, chunk_tokens=chunk,
                                   lm_head_grad=lm_head_grad)
    loss, hidden_grad, head_grad = _reference(hidden, lm_head, targets, weights, scale)
    tolerance = TOLERANCE[dtype]
    assert abs(float(result.loss) - float(loss)) <= tolerance * max(1.0, abs(float(loss)))
    assert result.hidden_grad.dtype == dtype
    assert _relative(result.hidden_grad, hidden_grad) < tolerance
    assert _relative(lm_head_grad, head_grad) < tolerance
    per_token = -torch.log_softmax(hidden.double() @ lm_head.double().T, -1).gather(1, targets.unsqueeze(1))
    assert _relative(result.per_token, per_token.squeeze(1)) < tolerance


def test_scale_zero_and_no_positions():
    """weight = 0 must give a zero term and zero gradients (not NaN); a micro-batch without prefix positions an
    empty gradient and a zero loss."""
    hidden, lm_head = torch.randn(5, 8), torch.randn(11, 8)
    targets, weights = torch.randint(0, 11, (5,)), torch.rand(5)
    result = chunked_cross_entropy(hidden, lm_head, targets, weights, scale=0.0, chunk_tokens=2)
    assert float(result.loss) == 0.0 and torch.count_nonzero(result.hidden_grad) == 0
    assert torch.isfinite(result.per_token).all() and (result.per_token > 0).all()
    empty = chunked_cross_entropy(hidden[:0], lm_head, targets[:0], weights[:0], scale=1.0, chunk_tokens=2)
    assert float(empty.loss) == 0.0 and empty.hidden_grad.shape == (0, 8)
