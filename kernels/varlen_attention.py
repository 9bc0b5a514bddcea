"""Packed variable-length attention on CUDA for training and teacher scoring (forward and backward).

The decoder's ``packed`` attention entry point (see ``opdgraph.models.attention_backend``) receives T tokens of S
sequences laid end to end with ``cu_seqlens``. ``VarlenFlashBackend`` runs it as one FlashAttention-2 call through
``torch.nn.attention.varlen.varlen_attn``: causal inside each sequence, nothing across sequences, no padding, no
host synchronisation (``max_seqlen`` is a python int of the metadata), and a registered backward, so the student's
graph differentiates through it. The no-grad teacher uses the same call.

Why this candidate (the others considered):
- ``varlen_attn`` is torch's public wrapper of ``aten._flash_attention_forward`` with cu_seqlens and the matching
  backward; the aten ops are called directly (our own autograd Function) only for what varlen_attn cannot take:
  grouped-query attention before torch 2.12.
- flex attention with a document mask needs ``torch.compile`` (tens of seconds per new shape) and a block mask
  rebuilt for every micro-batch; it wins only for masks FlashAttention cannot express.
- flashinfer's ragged prefill is forward-only (no backward) and plans on the host per forward.

Version differences handled by feature detection on the installed signature (torch 2.9 has ``is_causal`` only and
is not used; 2.10 adds ``scale``/``window_size``; 2.12 adds ``enable_gqa``):
- causal: ``window_size=(-1, 0)``; Gemma 3 sliding layers: ``(sliding_window - 1, 0)`` (a query sees itself and the
  ``sliding_window - 1`` keys before it, as the reference backend defines it);
- grouped-query attention is native (K/V heads never repeated: (2 q - 2 kv) x d bytes per token per layer less
  saved for backward, and no repeat or its gradient's sum): ``enable_gqa`` where varlen_attn has it, else
  ``FlashVarlenFunction``, an autograd Function over the same aten kernels varlen_attn calls
  (``aten._flash_attention_forward`` / ``_backward``, FlashAttention-2, which takes fewer K/V heads than query heads
  as they are). ``VarlenFlashBackend(repeat_kv=True)`` repeats the heads first instead, as torch < 2.12 runs did
  before (kept for benchmarks/train_variants.py's "before" variant; the plan sizes the native path).
Anything the kernel cannot take (float32 models, head_dim over 256 or not a multiple of 8, a torch without a
usable varlen_attn) falls back to the plain-torch reference for that call, with a one-time warning naming why.
``paged`` (rollout) is the reference's: the rollout engine swaps in its own flashinfer backend while it generates.
"""

from __future__ import annotations

import functools
import inspect
import warnings
from dataclasses import dataclass

import torch

from opdgraph.models.attention_backend import AttentionBackend, TorchReferenceBackend
from opdgraph.models.attention_metadata import PackedMetadata

FLASH_DTYPES = (torch.bfloat16, torch.float16)
MAX_HEAD_DIM = 256


@dataclass(frozen=True)
class VarlenSupport:
    """What the installed torch's ``varlen_attn`` accepts; ``reason`` says why it is unusable when it is."""

    available: bool
    enable_gqa: bool = False  # varlen_attn takes fewer K/V heads than query heads itself (torch >= 2.12)
    reason: str = ""


@functools.lru_cache(maxsize=1)
def varlen_support() -> VarlenSupport:
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError as error:
        return VarlenSupport(False, reason=f"torch {torch.__version__} has no torch.nn.attention.varlen ({error})")
    parameters = inspect.signature(varlen_attn).parameters
    missing = [name for name in ("scale", "window_size") if name not in parameters]
    if missing:
        return VarlenSupport(False, reason=f"torch {torch.__version__}'s varlen_attn has no {' or '.join(missing)} "
                                           "(causal masks, sliding windows and model attention scales need them)")
    return VarlenSupport(True, enable_gqa="enable_gqa" in parameters)


def unsupported_reason(q: torch.Tensor, sliding_window: int | None, support: VarlenSupport) -> str | None:
    """Why this call must use the reference instead of the flash kernel (None: it need not)."""
    if not support.available:
        return support.reason
    if not q.is_cuda:
        return f"tensors on {q.device.type}, not CUDA"
    if q.dtype not in FLASH_DTYPES:
        return f"{q.dtype} model (FlashAttention takes bfloat16/float16)"
    if q.shape[-1] > MAX_HEAD_DIM or q.shape[-1] % 8:
        return f"head_dim {q.shape[-1]} (FlashAttention takes multiples of 8 up to {MAX_HEAD_DIM})"
    return None


def aten_flash_forward(q, k, v, cu_seqlens, max_seqlen: int, scale: float, window_left: int):
    """(out [T, Hq, D], fp32 log-sum-exp [Hq, T], philox seed, philox offset) of causal FlashAttention-2 over packed
    sequences (no dropout: the seed and offset are placeholders the backward takes back)."""
    out, lse, seed, offset, _ = torch.ops.aten._flash_attention_forward(
        q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, 0.0, window_left == -1, False, scale=scale,
        window_size_left=window_left, window_size_right=0)
    return out, lse, seed, offset


def aten_flash_backward(grad_out, q, k, v, out, lse, cu_seqlens, max_seqlen: int, scale: float, window_left: int,
                        seed, offset):
    """(dq, dk, dv) of aten_flash_forward; dk and dv have the K/V heads' shape (the kernel sums each group)."""
    return torch.ops.aten._flash_attention_backward(
        grad_out, q, k, v, out, lse, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, 0.0, window_left == -1,
        seed, offset, scale=scale, window_size_left=window_left, window_size_right=0)


class FlashVarlenFunction(torch.autograd.Function):
    """Causal FlashAttention-2 over packed sequences, K/V with their own (fewer) heads; saves q, k, v, out and the
    log-sum-exp, as varlen_attn does."""

    @staticmethod
    def forward(ctx, q, k, v, cu_seqlens, max_seqlen: int, scale: float, window_left: int):
        out, lse, seed, offset = aten_flash_forward(q, k, v, cu_seqlens, max_seqlen, scale, window_left)
        ctx.save_for_backward(q, k, v, out, lse, cu_seqlens, seed, offset)
        ctx.max_seqlen, ctx.scale, ctx.window_left = max_seqlen, scale, window_left
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, out, lse, cu_seqlens, seed, offset = ctx.saved_tensors
        dq, dk, dv = aten_flash_backward(grad_out.contiguous(), q, k, v, out, lse, cu_seqlens, ctx.max_seqlen,
                                         ctx.scale, ctx.window_left, seed, offset)
        return dq, dk, dv, None, None, None, None


class VarlenFlashBackend:
    """``packed`` through FlashAttention varlen (forward + backward); ``paged`` through the reference.
    repeat_kv: repeat K/V heads to the query heads before the kernel (the former path; benchmarks only)."""

    name = "varlen_flash"

    def __init__(self, repeat_kv: bool = False):
        self.support = varlen_support()
        self.repeat_kv = repeat_kv
        self._reference = TorchReferenceBackend()
        self._warned: set[str] = set()

    def packed(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta: PackedMetadata, *, scale: float,
               sliding_window: int | None) -> torch.Tensor:
        reason = unsupported_reason(q, sliding_window, self.support)
        if reason is not None:
            self._warn_once(reason)
            return self._reference.packed(q, k, v, meta, scale=scale, sliding_window=sliding_window)
        from torch.nn.attention.varlen import varlen_attn

        # (left, right) = (-1, 0) is causal; (W - 1, 0) also hides keys W or more positions back.
        window_left = -1 if sliding_window is None else sliding_window - 1
        options: dict = {"scale": scale, "window_size": (window_left, 0)}
        group = q.shape[1] // k.shape[1]
        cu_seqlens = meta.cu_seqlens
        if group > 1 and self.repeat_kv:
            k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
        elif group > 1 and self.support.enable_gqa:
            options["enable_gqa"] = True
        elif group > 1:
            return FlashVarlenFunction.apply(q, k, v, cu_seqlens, meta.max_seqlen, scale, window_left)
        return varlen_attn(q, k, v, cu_seqlens, cu_seqlens, meta.max_seqlen, meta.max_seqlen, **options)

    def paged(self, q, k, v, meta, kv_cache, *, scale, sliding_window, kv_written=False):
        return self._reference.paged(q, k, v, meta, kv_cache, scale=scale, sliding_window=sliding_window,
                                     kv_written=kv_written)

    def _warn_once(self, reason: str) -> None:
        if reason not in self._warned:
            self._warned.add(reason)
            warnings.warn(f"packed attention falls back to the plain-torch reference: {reason}", stacklevel=3)


def select_packed_backend(device: torch.device | str) -> AttentionBackend:
    """The packed-attention backend for models on `device`: FlashAttention varlen on CUDA when the installed torch
    has it, the plain-torch reference otherwise (CPU, or an older torch)."""
    if torch.device(device).type == "cuda" and varlen_support().available:
        return VarlenFlashBackend()
    return TorchReferenceBackend()


def packed_backend_description(device: torch.device | str) -> str:
    """One line for run logs: which packed attention runs on `device`, and why when it is the reference."""
    if torch.device(device).type != "cuda":
        return f"packed attention: torch reference ({torch.device(device).type})"
    support = varlen_support()
    if not support.available:
        return f"packed attention: torch reference ({support.reason})"
    gqa = "varlen_attn's enable_gqa" if support.enable_gqa else "aten flash kernels: varlen_attn has no enable_gqa"
    return f"packed attention: FlashAttention varlen (native GQA, {gqa})"
