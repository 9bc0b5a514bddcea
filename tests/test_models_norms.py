"""The training RMSNorm Functions (opdgraph/models/norms.py) against the plain formula.

Forward: bit-identical to the formula the model ran before the Functions existed (written out below), with and
without grad, for the standard, one-plus (Gemma) and q/k (head_dim over [T, heads, D]) forms and the fused residual
add. Backward: close to float64 autograd of that formula, input and weight gradients, on fresh random inputs.
"""

from __future__ import annotations

import pytest
import torch

from opdgraph.models.norms import add_rms_norm, rms_norm

EPS = 1e-6
SHAPES = [(7, 96), (5, 3, 24), (1, 256)]  # hidden norm rows, q/k norm [T, heads, head_dim], a single row
DTYPES = [torch.float32, torch.bfloat16]
# Relative L2 error of a gradient against float64 (bf16: plain bf16 autograd of the formula measures ~2.5e-3).
GRAD_TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 5e-3}


def reference_norm(x, weight, eps, one_plus):
    """The model's RMSNorm formula before norms.py (autograd through every op)."""
    x32 = x.float()
    normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    if one_plus:
        return (normed * (1.0 + weight.float())).to(x.dtype)
    return weight * normed.to(x.dtype)


def reference_norm64(x, weight, eps, one_plus):
    normed = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    return normed * (1.0 + weight) if one_plus else weight * normed


def _inputs(shape, dtype, one_plus, seed):
    generator = torch.Generator().manual_seed(seed)
    x = (torch.randn(shape, generator=generator) * 3.0).to(dtype)
    residual = torch.randn(shape, generator=generator).to(dtype)
    weight = (torch.randn(shape[-1], generator=generator) * 0.5 + (0.0 if one_plus else 1.0)).to(dtype)
    grad_out = torch.randn(shape, generator=generator).to(dtype)
    grad_total = torch.randn(shape, generator=generator).to(dtype)
    return x, residual, weight, grad_out, grad_total


def _relative_error(actual, expected):
    return float((actual.double() - expected).norm() / expected.norm())


@pytest.mark.parametrize("one_plus", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_forward_bit_identical_to_the_formula(shape, dtype, one_plus):
    """If this fails, training or scoring numerics drifted from the formula the parity tests pin to transformers."""
    x, residual, weight, _, _ = _inputs(shape, dtype, one_plus, seed=1)
    expected = reference_norm(x, weight, EPS, one_plus)
    expected_added = reference_norm(residual + x, weight, EPS, one_plus)
    for grad in (True, False):
        leaf_x, leaf_residual = x.clone().requires_grad_(grad), residual.clone().requires_grad_(grad)
        leaf_weight = weight.clone().requires_grad_(grad)
        out = rms_norm(leaf_x, leaf_weight, EPS, one_plus)
        normed, total = add_rms_norm(leaf_x, leaf_residual, leaf_weight, EPS, one_plus)
        assert out.dtype == dtype and torch.equal(out, expected)
        assert torch.equal(normed, expected_added) and torch.equal(total, residual + x)
        assert out.requires_grad == grad and normed.requires_grad == grad and total.requires_grad == grad


@pytest.mark.parametrize("one_plus", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_backward_matches_float64_autograd(shape, dtype, one_plus):
    """If this fails, the hand-written norm backward (input or weight gradient) is wrong."""
    x, _, weight, grad_out, _ = _inputs(shape, dtype, one_plus, seed=2)
    leaf_x, leaf_weight = x.clone().requires_grad_(), weight.clone().requires_grad_()
    rms_norm(leaf_x, leaf_weight, EPS, one_plus).backward(grad_out)
    x64, weight64 = x.double().requires_grad_(), weight.double().requires_grad_()
    reference_norm64(x64, weight64, EPS, one_plus).backward(grad_out.double())
    assert leaf_x.grad.dtype == dtype and leaf_weight.grad.dtype == dtype
    assert _relative_error(leaf_x.grad, x64.grad) < GRAD_TOLERANCE[dtype]
    assert _relative_error(leaf_weight.grad, weight64.grad) < GRAD_TOLERANCE[dtype]


@pytest.mark.parametrize("one_plus", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
def test_residual_backward_matches_float64_autograd(dtype, one_plus):
    """If this fails, the fused add + norm loses the residual stream's own gradient or the norm's."""
    x, residual, weight, grad_out, grad_total = _inputs((6, 80), dtype, one_plus, seed=3)
    leaves = [tensor.clone().requires_grad_() for tensor in (x, residual, weight)]
    normed, total = add_rms_norm(*leaves, EPS, one_plus)
    torch.autograd.backward([normed, total], [grad_out, grad_total])
    leaves64 = [tensor.double().requires_grad_() for tensor in (x, residual, weight)]
    total64 = leaves64[1] + leaves64[0]
    normed64 = reference_norm64(total64, leaves64[2], EPS, one_plus)
    torch.autograd.backward([normed64, total64], [grad_out.double(), grad_total.double()])
    for leaf, leaf64 in zip(leaves, leaves64):
        assert leaf.grad.dtype == dtype
        assert _relative_error(leaf.grad, leaf64.grad) < GRAD_TOLERANCE[dtype]


def test_saves_only_input_and_rstd():
    """If this fails, the norm saves more than its input and the fp32 rstd again (sizing.py's formula assumes it)."""
    x, residual, weight, _, _ = _inputs((4, 3, 32), torch.bfloat16, False, seed=4)
    x, residual, weight = x.requires_grad_(), residual.requires_grad_(), weight.requires_grad_()
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        rms_norm(x, weight, EPS, one_plus=True)
        _, total = add_rms_norm(x, residual, weight, EPS, one_plus=False)
    kinds = sorted((tuple(t.shape), t.dtype) for t in saved if t is not weight)
    assert kinds == sorted([((4, 3, 32), torch.bfloat16), ((4, 3, 1), torch.float32)] * 2)
    assert any(t is x for t in saved) and any(t.data_ptr() == total.data_ptr() for t in saved)
