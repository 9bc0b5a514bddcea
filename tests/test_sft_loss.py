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


def test_chunk_peak_matches_the_plan():
    """If this fails, the cross-entropy's peak beyond its inputs and the hidden-state gradient (a planned buffer of
    its own) differs from the plan's sft.logit_chunk on the CPU path (stages/sft.py: LOGIT_BUFFERS fp32 [chunk, V]
    buffers and the fp32 copy of the lm_head)."""
    from memory_probe import AllocationTrace

    from opdgraph import sizing
    from opdgraph.stages.sft import LOGIT_BUFFERS

    positions, vocab, hidden_size, chunk = 150, 4000, 256, 64  # a vocabulary and a last chunk not a multiple
    generator = torch.Generator().manual_seed(3)
    hidden = torch.randn(positions, hidden_size, generator=generator).to(torch.bfloat16)
    lm_head = (torch.randn(vocab, hidden_size, generator=generator) * 0.05).to(torch.bfloat16)
    targets, weights = torch.randint(0, vocab, (positions,), generator=generator), torch.full((positions,), 0.01)
    lm_head_grad = torch.zeros(vocab, hidden_size)
    with AllocationTrace() as trace:
        result = chunked_cross_entropy(hidden, lm_head, targets, weights, scale=1.0, chunk_tokens=chunk,
                                       lm_head_grad=lm_head_grad)
    measured = trace.peak() - result.hidden_grad.numel() * 2
    planned = sizing.logit_chunk_bytes(chunk, vocab, LOGIT_BUFFERS, upcast_hidden=hidden_size)
    assert abs(measured - planned) <= 0.05 * planned, (measured, planned)
