"""The core of a gated-DeltaNet layer in plain torch: causal conv1d, SiLU, q/k/v, L2 norms and the gated delta rule.

Two entry points, as for attention (attention_backend.py):
- ``packed``: training and teacher scoring over a packed batch (PackedMetadata). The conv window and the recurrent
  state start from zeros at every sequence boundary, so nothing leaks between packed sequences. With autograd the
  whole core is one Function that saves only its inputs (the in_proj_qkv output, g, beta) and recomputes the rest in
  backward: its saved bytes are 1 x the conv channels per token instead of every intermediate of the chunked scan.
- ``paged``: rollout prefill / decode (PagedMetadata with state_slots): each sequence continues from its slot of the
  layer's LinearLayerState (zeros when its chunk starts the sequence) and writes the slot back. Decode rows (one token
  each) run as one batched recurrent step.

A GPU backend (flash-linear-attention's chunked gated delta rule with cu_seqlens, and a causal-conv1d kernel) would
implement the same two methods and be installed with DecoderLM.set_linear_attention_backend; this one is the CPU
path and the reference such a kernel is tested against.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from opdgraph.models import delta_rule
from opdgraph.models.attention_metadata import PackedMetadata, PagedMetadata


def _conv_silu(mixed: torch.Tensor, window: torch.Tensor | None, weight: torch.Tensor):
    """Causal depthwise conv over [window; mixed] -> (SiLU(conv) [L, C], the last kernel - 1 inputs [K-1, C])."""
    kernel = weight.shape[-1]
    if window is None:
        window = mixed.new_zeros(kernel - 1, mixed.shape[1])
    inputs = torch.cat((window.to(mixed.dtype), mixed))
    out = F.conv1d(inputs.T[None], weight, groups=mixed.shape[1])[0].T
    return F.silu(out), inputs[inputs.shape[0] - (kernel - 1):]


def _heads(convolved: torch.Tensor, dims):
    """q, k repeated to the value heads and normalised (q also scaled), v: float32 [L, Hv, D]."""
    length = convolved.shape[0]
    key_width = dims.key_heads * dims.key_dim
    q, k, v = convolved.float().split((key_width, key_width, dims.value_heads * dims.value_dim), dim=-1)
    group = dims.value_heads // dims.key_heads
    q = q.view(length, dims.key_heads, dims.key_dim).repeat_interleave(group, dim=1)
    k = k.view(length, dims.key_heads, dims.key_dim).repeat_interleave(group, dim=1)
    q = delta_rule.l2_normalize(q) * dims.key_dim ** -0.5
    return q, delta_rule.l2_normalize(k), v.view(length, dims.value_heads, dims.value_dim)


def core_one_sequence(mixed, weight, decay, beta, dims, window=None, state=None):
    """(out [L, Hv, Dv] in mixed's dtype, conv window after it, delta-rule state after it) of one sequence."""
    convolved, window = _conv_silu(mixed, window, weight)
    q, k, v = _heads(convolved, dims)
    out, state = delta_rule.chunked(q, k, v, decay.float(), beta.float(), state)
    return out.to(mixed.dtype), window, state


def packed_forward(mixed, weight, decay, beta, bounds: list[int], dims) -> torch.Tensor:
    outputs = [core_one_sequence(mixed[start:end], weight, decay[start:end], beta[start:end], dims)[0]
               for start, end in zip(bounds[:-1], bounds[1:])]
    return torch.cat(outputs)


class PackedCoreFunction(torch.autograd.Function):
    """packed_forward, saving its inputs only; backward recomputes the forward with autograd and differentiates it."""

    @staticmethod
    def forward(ctx, mixed, weight, decay, beta, bounds, dims):
        ctx.save_for_backward(mixed, weight, decay, beta)
        ctx.bounds, ctx.dims = bounds, dims
        return packed_forward(mixed, weight, decay, beta, bounds, dims)

    @staticmethod
    def backward(ctx, grad_out):
        inputs = [tensor.detach().requires_grad_(needs) for tensor, needs in
                  zip(ctx.saved_tensors, ctx.needs_input_grad[:4])]
        with torch.enable_grad():
            out = packed_forward(*inputs, ctx.bounds, ctx.dims)
        wanted = [tensor for tensor in inputs if tensor.requires_grad]
        grads = iter(torch.autograd.grad(out, wanted, grad_out))
        return (*(next(grads) if tensor.requires_grad else None for tensor in inputs), None, None)


class TorchLinearAttention:
    """The plain-torch core for any device: the default of every model and the reference of faster ones."""

    def packed(self, mixed, weight, decay, beta, dims, *, meta: PackedMetadata) -> torch.Tensor:
        bounds = meta.cu_seqlens.tolist()
        if torch.is_grad_enabled() and any(t.requires_grad for t in (mixed, weight, decay, beta)):
            return PackedCoreFunction.apply(mixed, weight, decay, beta, bounds, dims)
        return packed_forward(mixed, weight, decay, beta, bounds, dims)

    @torch.no_grad()
    def paged(self, mixed, weight, decay, beta, dims, *, meta: PagedMetadata, state) -> torch.Tensor:
        starts = (meta.kv_lens - meta.query_lens).tolist()
        lengths = meta.query_lens.tolist()
        slots = meta.state_slots.tolist()
        bounds = meta.cu_query_lens.tolist()
        out = mixed.new_empty(mixed.shape[0], dims.value_heads, dims.value_dim)
        decoding = [row for row, (start, length) in enumerate(zip(starts, lengths)) if length == 1 and start > 0]
        if decoding:
            self._decode(mixed, weight, decay, beta, dims, state, out,
                         rows=[bounds[row] for row in decoding], slots=[slots[row] for row in decoding])
        chosen = set(decoding)
        for row, (start, length) in enumerate(zip(starts, lengths)):
            if row in chosen or length == 0:
                continue
            first, slot = bounds[row], slots[row]
            window, recurrent = (None, None) if start == 0 else (state.conv[slot], state.recurrent[slot])
            span = slice(first, first + length)
            out[span], state.conv[slot], state.recurrent[slot] = core_one_sequence(
                mixed[span], weight, decay[span], beta[span], dims, window, recurrent)
        return out

    @staticmethod
    def _decode(mixed, weight, decay, beta, dims, state, out, *, rows, slots):
        """One token of each of B running sequences at once: conv over [window; token], one recurrent step."""
        rows_t = torch.tensor(rows, device=mixed.device)
        slots_t = torch.tensor(slots, device=mixed.device)
        inputs = torch.cat((state.conv[slots_t].to(mixed.dtype), mixed[rows_t, None]), dim=1)  # [B, K, C]
        convolved = F.silu((inputs * weight[:, 0].T[None]).sum(1))  # the conv's last output, [B, C]
        state.conv[slots_t] = inputs[:, 1:].to(state.conv.dtype)
        q, k, v = _heads(convolved, dims)
        result, state.recurrent[slots_t] = delta_rule.recurrent_step(
            q, k, v, decay[rows_t].float(), beta[rows_t].float(), state.recurrent[slots_t])
        out[rows_t] = result.to(out.dtype)
