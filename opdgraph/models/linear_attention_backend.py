"""The core of a gated-DeltaNet layer in plain torch: causal conv1d, SiLU, q/k/v, L2 norms and the gated delta rule.

Two entry points, as for attention (attention_backend.py):
- ``packed``: training and teacher scoring over a packed batch (PackedMetadata), all sequences at once
  (``core_packed``: one conv1d with each sequence's window before its tokens, the batched chunked delta rule of
  delta_rule.chunked_packed). The conv window and the recurrent state start from zeros at every sequence boundary,
  so nothing leaks between packed sequences; ``core_one_sequence`` is the per-sequence reference. With autograd the
  whole core is one Function (``RecomputedCore``) that saves only its inputs (the in_proj_qkv output, g, beta) and
  recomputes the rest in backward: its saved bytes are 1 x the conv channels per token instead of every
  intermediate of the chunked scan.
- ``paged``: rollout prefill / decode (PagedMetadata with state_slots): each sequence continues from its slot of the
  layer's LinearLayerState (zeros when its chunk starts the sequence) and writes the slot back; the prefilling rows
  run together through ``core_packed`` with their windows and states. A forward whose rows
  all have one token (decode steps; ``single_token_rows``) runs as one batched recurrent step without host
  synchronisation (``decode_rows``), so CUDA graphs and decode bursts can capture it; a padding row gives a scratch
  slot and position 0 (it starts from zeros and writes only that slot).

The GPU backend (kernels/fla_linear_attention.py: flash-linear-attention's Triton kernels) implements the same two
methods with the same RecomputedCore and decode_rows, and is installed with DecoderLM.set_linear_attention_backend;
this one is the CPU path, the fallback, and the reference that kernel is tested against.
"""

from __future__ import annotations

import functools

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


def _conv_silu_packed(mixed: torch.Tensor, windows: torch.Tensor | None, weight: torch.Tensor, bounds: list[int],
                      cache: delta_rule.IndexCache | None = None):
    """The causal depthwise conv of N packed sequences in one conv1d: each sequence's K-1 window rows (zeros: a
    sequence start) go before its tokens, so no output reads another sequence's inputs -> (SiLU(conv) [T, C], each
    sequence's last K-1 inputs [N, K-1, C])."""
    kernel, channels = weight.shape[-1], mixed.shape[1]
    sequences = len(bounds) - 1
    if windows is None:
        windows = mixed.new_zeros(sequences, kernel - 1, channels)
    output_rows, last_rows = delta_rule.cached(cache, ("conv_rows", tuple(bounds), kernel, mixed.device),
                                               lambda: _conv_rows(tuple(bounds), kernel, mixed.device))
    windows = windows.to(mixed.dtype)
    pieces = [piece for index, (start, end) in enumerate(zip(bounds[:-1], bounds[1:]))
              for piece in (windows[index], mixed[start - bounds[0]:end - bounds[0]])]
    inputs = torch.cat(pieces)  # [window_0; tokens_0; window_1; tokens_1; ...]: one copy, a free backward
    out = F.conv1d(inputs.T[None], weight, groups=channels)[0]  # [C, rows]: output r reads inputs r ... r + K - 1
    return F.silu(out.index_select(1, output_rows).T), inputs[last_rows]


def _conv_rows(bounds: tuple[int, ...], kernel: int, device):
    """In [window_0; tokens_0; window_1; tokens_1; ...]: the conv output rows of the tokens [T] and the rows of each
    sequence's last K-1 inputs [N, K-1] (host-side numbers shared by the layers of one forward)."""
    sequences = len(bounds) - 1
    lengths = torch.tensor([end - start for start, end in zip(bounds[:-1], bounds[1:])])
    # Token t of sequence s sits after s + 1 windows, at input row t + (s + 1)(K - 1), which conv output row
    # t + s (K - 1) ends at.
    shift = torch.repeat_interleave(torch.arange(sequences) * (kernel - 1), lengths)
    output_rows = torch.arange(bounds[-1] - bounds[0]) + shift
    window_rows = ((torch.tensor(bounds[:-1]) - bounds[0] + torch.arange(sequences) * (kernel - 1))[:, None]
                   + torch.arange(kernel - 1))
    # The last K-1 rows of [window; tokens] of a sequence end where the next sequence's window begins.
    return output_rows.to(device), (window_rows + lengths[:, None]).to(device)


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


def core_packed(mixed, weight, decay, beta, dims, bounds: list[int], windows=None, states=None,
                keep_states: bool = True, cache: delta_rule.IndexCache | None = None):
    """(out [T, Hv, Dv] in mixed's dtype, conv windows [N, K-1, C] and delta-rule states [N, Hv, Dk, Dv] after
    them) of N packed sequences, each from its own window and state (None: zeros, a sequence start); without
    keep_states (training, scoring) the states come back None. cache: the backend's IndexCache (None: none)."""
    cache = cache.start(tuple(bounds)) if cache is not None else None
    convolved, windows = _conv_silu_packed(mixed, windows, weight, bounds, cache)
    q, k, v = _heads(convolved, dims)
    del convolved
    out, states = delta_rule.chunked_packed(q, k, v, decay.float(), beta.float(), bounds, states,
                                            keep_states=keep_states, cache=cache)
    return out.to(mixed.dtype), windows, states


def core_one_sequence(mixed, weight, decay, beta, dims, window=None, state=None):
    """The per-sequence reference of core_packed (one conv1d and ``delta_rule.chunked``): (out, window, state)."""
    convolved, window = _conv_silu(mixed, window, weight)
    q, k, v = _heads(convolved, dims)
    out, state = delta_rule.chunked(q, k, v, decay.float(), beta.float(), state)
    return out.to(mixed.dtype), window, state


def packed_forward(mixed, weight, decay, beta, bounds: list[int], dims, cache=None) -> torch.Tensor:
    return core_packed(mixed, weight, decay, beta, dims, bounds, keep_states=False, cache=cache)[0]


def packed_forward_per_sequence(mixed, weight, decay, beta, bounds: list[int], dims) -> torch.Tensor:
    """packed_forward one sequence after another (the former path: the reference and the benchmarks' baseline)."""
    outputs = [core_one_sequence(mixed[start:end], weight, decay[start:end], beta[start:end], dims)[0]
               for start, end in zip(bounds[:-1], bounds[1:])]
    return torch.cat(outputs)


CONV_WEIGHT = 1  # among the core's inputs (mixed, conv weight, decay, beta): the one not indexed by token


class RecomputedCore(torch.autograd.Function):
    """core(mixed, weight, decay, beta) saving its inputs only; backward recomputes with autograd and differentiates
    ``grad_core`` (the same function by default; the GPU core passes the torch core where its own backward kernels
    are known to be wrong: kernels/fla_linear_attention.py). Shared by every backend, so the plan's a_linear holds
    whichever core runs. A ``PiecewiseRecompute`` grad_core is recomputed and differentiated one piece of whole
    sequences at a time, so only one piece's graph is alive."""

    @staticmethod
    def forward(ctx, core, grad_core, mixed, weight, decay, beta):
        ctx.save_for_backward(mixed, weight, decay, beta)
        ctx.core = grad_core or core
        return core(mixed, weight, decay, beta)

    @staticmethod
    def backward(ctx, grad_out):
        saved, needs = ctx.saved_tensors, ctx.needs_input_grad[2:6]
        pieces = ctx.core.pieces() if isinstance(ctx.core, PiecewiseRecompute) else [(0, grad_out.shape[0], ctx.core)]
        if len(pieces) == 1:
            return (None, None, *_differentiate(pieces[0][2], saved, needs, grad_out))
        # Each piece's input gradients go to their rows (the pieces cover every row); the conv weight's, a sum over
        # the pieces, adds in at least fp32.
        assert sum(end - start for start, end, _ in pieces) == grad_out.shape[0], "the pieces miss rows"
        grads = [None if not wanted else
                 torch.zeros(tensor.shape, dtype=torch.promote_types(tensor.dtype, torch.float32), device=tensor.device)
                 if index == CONV_WEIGHT else torch.empty_like(tensor)
                 for index, (tensor, wanted) in enumerate(zip(saved, needs))]
        for start, end, core in pieces:
            rows = [tensor if index == CONV_WEIGHT else tensor[start:end] for index, tensor in enumerate(saved)]
            for index, grad in enumerate(_differentiate(core, rows, needs, grad_out[start:end])):
                if grad is None:
                    continue
                if index == CONV_WEIGHT:
                    grads[index] += grad
                else:
                    grads[index][start:end] = grad
        if grads[CONV_WEIGHT] is not None:
            grads[CONV_WEIGHT] = grads[CONV_WEIGHT].to(saved[CONV_WEIGHT].dtype)
        return (None, None, *grads)


def _differentiate(core, tensors, needs, grad_out) -> list:
    """The gradients of core(*tensors) against grad_out for the tensors that need one (None for the others)."""
    inputs = [tensor.detach().requires_grad_(wanted) for tensor, wanted in zip(tensors, needs)]
    with torch.enable_grad():
        out = core(*inputs)
    wanted = [tensor for tensor in inputs if tensor.requires_grad]
    grads = iter(torch.autograd.grad(out, wanted, grad_out))
    return [next(grads) if tensor.requires_grad else None for tensor in inputs]


RECOMPUTE_PADDED_TOKENS = 8192  # a recomputed piece's chunk-padded tokens (sizing.LINEAR_RECOMPUTE_PADDED_TOKENS)


def recompute_pieces(bounds: tuple[int, ...], budget: int, chunk_tokens: int) -> list[tuple[int, int]]:
    """Consecutive sequences [first, last) recomputed together: a piece takes the next sequence while its tokens,
    each sequence padded to whole chunks, stay within `budget` (a longer sequence is a piece of its own)."""
    pieces, first, padded = [], 0, 0
    for sequence in range(len(bounds) - 1):
        length = -(-(bounds[sequence + 1] - bounds[sequence]) // chunk_tokens) * chunk_tokens
        if padded and length and padded + length > budget:  # an empty sequence joins any piece
            pieces.append((first, sequence))
            first, padded = sequence, 0
        padded += length
    pieces.append((first, len(bounds) - 1))
    return pieces


class PiecewiseRecompute:
    """A packed batch's core as RecomputedCore's backward recomputes it: over pieces of whole sequences of at most
    RECOMPUTE_PADDED_TOKENS padded tokens (recompute_pieces), each differentiated before the next is built. The
    torch core's graph holds ~66 KB per padded token at 0.8B's widths, so the whole batch at once would hold it for
    every token and every sequence's padding: the pieces bound the backward's peak by the budget, not by the
    micro-batch (sizing.linear_recompute_workspace_bytes). No state crosses a sequence boundary, so the pieces'
    gradients are the whole batch's. ``core_of(bounds, whole)`` builds the core over sequences with these bounds
    (from 0; whole: the batch itself, one piece)."""

    def __init__(self, bounds: list[int], core_of):
        self.bounds, self.core_of = bounds, core_of

    def pieces(self) -> list[tuple[int, int, object]]:
        """(first token, end token, core over those rows) per piece."""
        bounds = self.bounds
        spans = recompute_pieces(tuple(bounds), RECOMPUTE_PADDED_TOKENS, delta_rule.CHUNK_TOKENS)
        if len(spans) == 1:
            return [(0, bounds[-1] - bounds[0], self.core_of(bounds, True))]
        out = []
        for first, last in spans:
            start, end = bounds[first], bounds[last]
            local = [bound - start for bound in bounds[first:last + 1]]
            out.append((start - bounds[0], end - bounds[0], self.core_of(local, False)))
        return out


def torch_recompute(bounds: list[int], dims, cache: delta_rule.IndexCache | None) -> PiecewiseRecompute:
    """The plain-torch core recomputed in pieces, each piece's indexes kept beside the batch's in `cache`."""
    def core_of(piece_bounds: list[int], whole: bool):
        # The batch's own entries first: a cache still holding another batch's (the unfused loop's backward comes
        # after every forward; fla's forward never uses it) drops them, pieces included, so nothing accumulates.
        piece_cache = cache if whole or cache is None else cache.start(tuple(bounds)).piece(tuple(piece_bounds))
        return functools.partial(packed_forward, bounds=piece_bounds, dims=dims, cache=piece_cache)
    return PiecewiseRecompute(bounds, core_of)


def recomputed(core, mixed, weight, decay, beta, grad_core=None) -> torch.Tensor:
    """The core through RecomputedCore when autograd records, plainly otherwise (teacher scoring, eval)."""
    if torch.is_grad_enabled() and any(t.requires_grad for t in (mixed, weight, decay, beta)):
        return RecomputedCore.apply(core, grad_core, mixed, weight, decay, beta)
    return core(mixed, weight, decay, beta)


def decode_rows(mixed, weight, decay, beta, dims, state, slots, continuing, step) -> torch.Tensor:
    """One token of each of B sequences at once, without host synchronisation (CUDA-graph capturable): the conv
    over [window; token], then ``step(convolved [B, C], decay, beta, dims, state, slots, continuing) -> out``, the
    backend's recurrent step, which reads and writes ``state.recurrent`` at ``slots``. ``continuing`` [B] bool: rows
    whose sequence has earlier tokens; the others start from zeros whatever their slot holds (a fresh one-token
    prompt, a padding row). None: every row continues."""
    window = state.conv[slots]
    if continuing is not None:
        window = torch.where(continuing[:, None, None], window, 0)
    inputs = torch.cat((window.to(mixed.dtype), mixed[:, None]), dim=1)  # [B, K, C]
    convolved = F.silu((inputs * weight[:, 0].T[None]).sum(1))  # the conv's last output, [B, C]
    state.conv[slots] = inputs[:, 1:].to(state.conv.dtype)
    return step(convolved, decay, beta, dims, state, slots, continuing).to(mixed.dtype)


def torch_recurrent_step(convolved, decay, beta, dims, state, slots, continuing):
    recurrent = state.recurrent[slots]
    if continuing is not None:
        recurrent = torch.where(continuing[:, None, None, None], recurrent, 0)
    q, k, v = _heads(convolved, dims)
    out, state.recurrent[slots] = delta_rule.recurrent_step(q, k, v, decay.float(), beta.float(), recurrent)
    return out


def single_token_rows(mixed: torch.Tensor, meta: PagedMetadata) -> bool:
    """Every row of this paged forward has one token (a decode step, graphed or in a burst): T == S, since the
    scheduler gives every chunk at least one token. Read from shapes, so no host synchronisation."""
    return mixed.shape[0] == meta.query_lens.shape[0]


class TorchLinearAttention:
    """The plain-torch core for any device: the default of every model and the reference of faster ones."""

    def __init__(self):
        self.index_cache = delta_rule.IndexCache()  # the latest packed batch's index tensors, for its layers

    def packed(self, mixed, weight, decay, beta, dims, *, meta: PackedMetadata) -> torch.Tensor:
        bounds = meta.cu_seqlens.tolist()
        core = functools.partial(packed_forward, bounds=bounds, dims=dims, cache=self.index_cache)
        return recomputed(core, mixed, weight, decay, beta, torch_recompute(bounds, dims, self.index_cache))

    @torch.no_grad()
    def paged(self, mixed, weight, decay, beta, dims, *, meta: PagedMetadata, state) -> torch.Tensor:
        if single_token_rows(mixed, meta):
            return decode_rows(mixed, weight, decay, beta, dims, state, meta.state_slots,
                               meta.kv_lens > meta.query_lens, torch_recurrent_step)
        starts = (meta.kv_lens - meta.query_lens).tolist()
        lengths = meta.query_lens.tolist()
        bounds = meta.cu_query_lens.tolist()
        out = mixed.new_empty(mixed.shape[0], dims.value_heads, dims.value_dim)
        decoding = [row for row, (start, length) in enumerate(zip(starts, lengths)) if length == 1 and start > 0]
        if decoding:
            rows = torch.tensor([bounds[row] for row in decoding], device=mixed.device)
            out[rows] = decode_rows(mixed[rows], weight, decay[rows], beta[rows], dims, state,
                                    meta.state_slots[torch.tensor(decoding, device=mixed.device)], None,
                                    torch_recurrent_step)
        chosen = set(decoding)
        rows = [row for row, length in enumerate(lengths) if row not in chosen and length > 0]
        if not rows:
            return out
        # The prefilling rows in one batched core, each from its slot (zeros where its chunk starts the sequence).
        spans = [torch.arange(bounds[row], bounds[row] + lengths[row]) for row in rows]
        tokens = torch.cat(spans).to(mixed.device)
        row_slots = meta.state_slots[torch.tensor(rows, device=mixed.device)]
        fresh = torch.tensor([starts[row] == 0 for row in rows], device=mixed.device)
        windows = torch.where(fresh[:, None, None], 0, state.conv[row_slots])
        recurrent = torch.where(fresh[:, None, None, None], 0, state.recurrent[row_slots])
        packed_bounds = [0]
        for row in rows:
            packed_bounds.append(packed_bounds[-1] + lengths[row])
        out[tokens], windows, recurrent = core_packed(mixed[tokens], weight, decay[tokens], beta[tokens], dims,
                                                      packed_bounds, windows, recurrent, cache=self.index_cache)
        state.conv[row_slots] = windows.to(state.conv.dtype)
        state.recurrent[row_slots] = recurrent.to(state.recurrent.dtype)
        return out
