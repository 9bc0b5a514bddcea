"""Packed variable-length attention (kernels/varlen_attention.py) against the plain-torch reference backend.

GPU tests (marked `gpu`, skipped without CUDA): the FlashAttention varlen path in bfloat16, forward and gradients
w.r.t. q, k, v, against the reference computed in float32 on the same values, over grouped-query shapes, head
dims, sliding windows and ragged lengths (a 1-token sequence, sequences longer than the window), along each way
of taking grouped-query K/V: the installed torch's choice, the aten kernels directly (FlashVarlenFunction, torch
< 2.12), and K/V heads repeated first. CPU tests: the
selection and fallback rules, which must keep CPU runs on the reference.
"""

from __future__ import annotations

import pytest
import torch

from opdgraph.kernels.varlen_attention import (VarlenFlashBackend, VarlenSupport, packed_backend_description,
                                               select_packed_backend, unsupported_reason, varlen_support)
from opdgraph.models.attention_backend import TorchReferenceBackend
from opdgraph.models.attention_metadata import PackedMetadata

def packed_inputs(lengths, heads, kv_heads, head_dim, *, dtype, device, seed=0):
    generator = torch.Generator().manual_seed(seed)
    total = sum(lengths)

    def tensor(num_heads):
        values = torch.randn(total, num_heads, head_dim, generator=generator)
        return values.to(device=device, dtype=dtype).requires_grad_(True)

    cu_seqlens = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device=device)
    return tensor(heads), tensor(kv_heads), tensor(kv_heads), PackedMetadata(cu_seqlens, max(lengths))


def forward_and_grads(backend, q, k, v, meta, *, scale, window, upstream):
    out = backend.packed(q, k, v, meta, scale=scale, sliding_window=window)
    grads = torch.autograd.grad(out, (q, k, v), upstream.to(out.dtype))
    return out, grads


def relative_error(actual, expected):
    return ((actual.float() - expected.float()).norm() / expected.float().norm().clamp_min(1e-12)).item()


def gqa_backend(path: str) -> VarlenFlashBackend:
    backend = VarlenFlashBackend(repeat_kv=path == "repeat_kv")
    if path == "aten":
        backend.support = VarlenSupport(True, enable_gqa=False)
    return backend


@pytest.mark.parametrize("heads,kv_heads,head_dim", [(4, 4, 64), (12, 2, 128), (8, 4, 256)])
@pytest.mark.parametrize("window", [None, 7])
@pytest.mark.parametrize("lengths", [[1, 33, 130], [64, 64], [300]])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("path", ["installed", "aten", "repeat_kv"])
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_flash_varlen_matches_reference_forward_and_grads(heads, kv_heads, head_dim, window, lengths, dtype, path):
    """Training differentiates through this kernel: a wrong mask (cross-sequence, window off by one, not causal),
    a wrong GQA head mapping, arguments of the aten kernels in the wrong order, or a wrong backward (dk, dv summed
    over each group of query heads) would show up as a large relative error against the reference."""
    if not varlen_support().available:
        pytest.skip(varlen_support().reason)
    q, k, v, meta = packed_inputs(lengths, heads, kv_heads, head_dim, dtype=dtype, device="cuda")
    upstream = torch.randn(q.shape, generator=torch.Generator().manual_seed(1)).cuda()
    scale = head_dim ** -0.5 * 1.3  # not the default 1/sqrt(d): the scale must be passed through
    out, grads = forward_and_grads(gqa_backend(path), q, k, v, meta, scale=scale, window=window,
                                   upstream=upstream)
    q32, k32, v32 = (t.detach().float().requires_grad_(True) for t in (q, k, v))
    ref_out, ref_grads = forward_and_grads(TorchReferenceBackend(), q32, k32, v32, meta, scale=scale,
                                           window=window, upstream=upstream)
    tolerance = 2e-2 if dtype == torch.bfloat16 else 5e-3
    assert out.dtype == dtype and out.shape == q.shape
    assert relative_error(out, ref_out) < tolerance
    for name, grad, ref_grad in zip("qkv", grads, ref_grads):
        assert relative_error(grad, ref_grad) < tolerance, name


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_selects_flash_and_float32_falls_back():
    """On CUDA the runtime must get the flash backend; a float32 model must still run (on the reference) with a
    warning rather than fail inside the kernel."""
    backend = select_packed_backend("cuda")
    if not varlen_support().available:
        assert isinstance(backend, TorchReferenceBackend)
        return
    assert isinstance(backend, VarlenFlashBackend)
    q, k, v, meta = packed_inputs([5, 9], 4, 2, 64, dtype=torch.float32, device="cuda")
    with pytest.warns(UserWarning, match="float32"):
        out = backend.packed(q, k, v, meta, scale=0.125, sliding_window=None)
    expected = TorchReferenceBackend().packed(q, k, v, meta, scale=0.125, sliding_window=None)
    assert torch.equal(out, expected)


def test_cpu_selects_reference():
    """CPU runs (tests, CI, laptops) must keep the plain-torch reference: flash kernels do not exist there."""
    assert isinstance(select_packed_backend("cpu"), TorchReferenceBackend)
    assert "reference" in packed_backend_description("cpu")


def test_flash_backend_on_cpu_tensors_falls_back_to_reference():
    """A flash backend handed CPU tensors (a model moved after selection) must give the reference's exact result,
    gradients included, and say why once."""
    q, k, v, meta = packed_inputs([3, 1, 6], 4, 2, 16, dtype=torch.float32, device="cpu")
    backend = VarlenFlashBackend()
    with pytest.warns(UserWarning, match="reference"):
        out, grads = forward_and_grads(backend, q, k, v, meta, scale=0.25, window=2, upstream=torch.ones(q.shape))
    expected, expected_grads = forward_and_grads(TorchReferenceBackend(), q, k, v, meta, scale=0.25, window=2,
                                                 upstream=torch.ones(q.shape))
    assert torch.equal(out, expected)
    assert all(torch.equal(a, b) for a, b in zip(grads, expected_grads))


@pytest.mark.parametrize("dtype,head_dim,expected", [
    (torch.float32, 64, "float32"), (torch.bfloat16, 512, "head_dim 512"), (torch.bfloat16, 60, "head_dim 60"),
])
def test_unsupported_inputs_name_the_reason(dtype, head_dim, expected):
    """Each input the kernel cannot take must be caught before the kernel, with a reason a user can act on."""
    support = VarlenSupport(True)
    q = torch.empty(4, 2, head_dim, dtype=dtype, device="meta")
    reason = unsupported_reason(_FakeCuda(q), None, support)
    assert reason is not None and expected in reason
    assert unsupported_reason(_FakeCuda(torch.empty(4, 2, 128, dtype=torch.bfloat16, device="meta")), 16,
                              support) is None


class _FakeCuda:
    """A tensor stand-in that reports CUDA, so the shape/dtype rules can be checked without a GPU."""

    def __init__(self, tensor):
        self.dtype, self.shape, self.is_cuda, self.device = tensor.dtype, tensor.shape, True, torch.device("cuda")
