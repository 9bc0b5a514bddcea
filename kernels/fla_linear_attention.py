"""The GPU core of Qwen3.5's gated-DeltaNet layers: flash-linear-attention's Triton kernels (fla, carried as a wheel).

Same two entry points as the plain-torch core (models/linear_attention_backend.py), same numbers up to kernel
rounding:
- ``packed`` (training, teacher scoring): fla's causal conv1d with SiLU over the packed tokens (cu_seqlens: the
  window restarts at every sequence), the q/k/v split as views, and ``chunk_gated_delta_rule`` with cu_seqlens (the
  state restarts at every sequence), L2 norms of q and k inside the kernel and grouped value heads (value head h
  reads key head h // (Hv / Hk), as repeat_interleave does in the torch core). The chunk indices of the packed
  batch are computed once per forward (every layer gets the same metadata) from a host copy of cu_seqlens, so the
  kernels add no host synchronisation per layer. With autograd it runs inside RecomputedCore, which saves only the
  core's inputs and recomputes the kernels' forward in backward: the training activations are the torch path's
  a_linear (sizing.py), whichever core runs.
- ``paged`` (rollout): prefill chunks run the same two kernels with per-sequence initial states gathered from the
  state slots (zeros for chunks that start a sequence) and write the final states back; an all-decode forward runs
  ``decode_rows`` (the conv step in torch, the delta rule by kernels/gated_delta_decode.py, which updates each
  state in place in its slot: fla's fused_recurrent_gated_delta_rule takes and returns whole state tensors, so a
  gather and a scatter around it would move every state four times per step instead of twice), with no host
  synchronisation, so CUDA graphs and decode bursts capture it.

State layouts are the torch core's (LinearLayerState): conv windows [slots, K - 1, C], states [slots, Hv, Dk, Dv]
in float32. fla's conv keeps [N, C, K] windows whose entries 1..K-1 are the last inputs; they are converted at the
prefill boundary only.

Selection (``select_linear_backend``): this core on CUDA, the torch core elsewhere, as the plan sizes them
(opdgraph.planned_paths.fla_linear_core). OPDGRAPH_LINEAR_ATTENTION = torch plans and runs the plain torch core
everywhere (the reference: its decode step gathers and rebuilds the states, which the plan then sizes); = fla
requires this core (a DeviceError on a CPU device). On CUDA without a working fla the run stops with a DeviceError
saying how to go on, rather than run a core whose peaks the plan did not size; startup (runtime/startup.py) makes the
same check before any weights load.
Import fla lazily: it imports triton and pulls in every fla op (and einops).
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from opdgraph.errors import DeviceError
from opdgraph.models.attention_metadata import PackedMetadata, PagedMetadata
from opdgraph.models.delta_rule import IndexCache
from opdgraph.models.linear_attention_backend import (
    PiecewiseRecompute,
    TorchLinearAttention,
    decode_rows,
    recomputed,
    single_token_rows,
    torch_recompute,
)
from opdgraph.planned_paths import LINEAR_CORE_ENVIRONMENT, fla_linear_core

CHUNK_TOKENS = 64  # fla's chunk size for the delta rule and the conv's varlen tiles (mirrors delta_rule.CHUNK_TOKENS)


@functools.lru_cache(maxsize=1)
def fla_import_problem() -> str | None:
    """Why fla's kernels cannot be imported here (None: they can)."""
    try:
        from fla.modules.causal_conv1d import causal_conv1d  # noqa: F401
        from fla.ops.gated_delta_rule import chunk_gated_delta_rule  # noqa: F401
    except ImportError as error:
        return f"flash-linear-attention does not import ({error})"
    return None


def _fla():
    from fla.modules.causal_conv1d import causal_conv1d
    from fla.ops.gated_delta_rule import chunk_gated_delta_rule
    from fla.ops.utils.index import prepare_chunk_indices

    return causal_conv1d, chunk_gated_delta_rule, prepare_chunk_indices


def _split_heads(convolved: torch.Tensor, dims):
    """[T, C] -> q, k [1, T, Hk, Dk] and v [1, T, Hv, Dv] (views; fla makes them contiguous)."""
    length, key_width = convolved.shape[0], dims.key_heads * dims.key_dim
    q, k, v = convolved.split((key_width, key_width, dims.value_heads * dims.value_dim), dim=-1)
    return (q.reshape(1, length, dims.key_heads, dims.key_dim), k.reshape(1, length, dims.key_heads, dims.key_dim),
            v.reshape(1, length, dims.value_heads, dims.value_dim))


def _varlen(cu_seqlens: torch.Tensor, host: torch.Tensor | None = None):
    """(int64 cu_seqlens on the device, fla's chunk indices) with one host copy of the boundaries (`host`: given,
    so none is made)."""
    prepare_chunk_indices = _fla()[2]
    bounds = cu_seqlens.long()
    return bounds, prepare_chunk_indices(bounds, CHUNK_TOKENS, cu_seqlens_cpu=bounds.cpu() if host is None else host)


@functools.lru_cache(maxsize=None)
def fla_backward_trusted(device: torch.device) -> bool:
    """Whether fla's chunked backward may run here. fla 0.6 refuses it on Hopper with Triton >= 3.4 and < 3.7.1
    (wrong results in chunk_bwd_dqkwg, its issue #640) unless tilelang is installed; the device image has Triton
    3.6, so there the training backward differentiates the torch core (the forward stays fla's)."""
    if device.type != "cuda" or torch.cuda.get_device_capability(device)[0] != 9:
        return True
    import importlib.util

    import triton

    version = tuple(int(part) for part in triton.__version__.split("+")[0].split(".")[:3] if part.isdigit())
    return not ((3, 4, 0) <= version < (3, 7, 1)) or importlib.util.find_spec("tilelang") is not None


def packed_core(mixed, weight, decay, beta, *, dims, bounds, chunk_indices):
    """conv + SiLU + delta rule over packed sequences -> out [T, Hv, Dv] in mixed's dtype."""
    causal_conv1d, chunk_gated_delta_rule = _fla()[:2]
    convolved, _ = causal_conv1d(mixed[None], weight[:, 0], activation="silu", cu_seqlens=bounds,
                                 chunk_indices=chunk_indices)
    q, k, v = _split_heads(convolved[0], dims)
    out, _ = chunk_gated_delta_rule(q, k, v, decay[None], beta[None], scale=dims.key_dim ** -0.5,
                                    use_qk_l2norm_in_kernel=True, cu_seqlens=bounds, chunk_indices=chunk_indices)
    return out[0].to(mixed.dtype)


def _fla_cores(whole_core, dims, varlen_of):
    """PiecewiseRecompute's core_of for fla's core: the forward's own over the whole batch, else one over a piece's
    bounds, with `varlen_of(piece bounds)` -> (device bounds, chunk indices), kept per batch by the backend."""
    def core_of(piece_bounds: list[int], whole: bool):
        if whole:
            return whole_core
        bounds, chunk_indices = varlen_of(tuple(piece_bounds))
        return functools.partial(packed_core, dims=dims, bounds=bounds, chunk_indices=chunk_indices)
    return core_of


def _piece_varlen(piece_bounds: tuple[int, ...], device):
    """_varlen of a piece from its host bounds (no copy back from the device)."""
    host = torch.tensor(piece_bounds)
    return _varlen(host.to(device), host)


def inplace_recurrent_step(convolved, decay, beta, dims, state, slots, continuing):
    """decode_rows' step on CUDA: kernels/gated_delta_decode.py, the states updated in place in their slots."""
    from opdgraph.kernels.gated_delta_decode import gated_delta_decode_

    return gated_delta_decode_(convolved, decay, beta, state.recurrent, slots, continuing, dims)


class FlaLinearAttention:
    """The gated-DeltaNet core through flash-linear-attention (module docstring)."""

    name = "fla"

    def __init__(self):
        self._forward: tuple[object, dict] | None = None  # (the metadata of the last forward, its host copies)
        self.index_cache = IndexCache()  # the torch core's indexes when it differentiates (fla_backward_trusted)

    def _of_forward(self, meta, key, build):
        """build() once per forward: every layer of one forward receives the same metadata object, so host copies
        made from it (fla's varlen tiles, the bounds as a list, its backward pieces' tiles) are made once, not per
        layer."""
        if self._forward is None or self._forward[0] is not meta:
            self._forward = (meta, {})
        values = self._forward[1]
        if key not in values:
            values[key] = build()
        return values[key]

    def packed(self, mixed, weight, decay, beta, dims, *, meta: PackedMetadata) -> torch.Tensor:
        bounds, chunk_indices = self._of_forward(meta, "varlen", lambda: _varlen(meta.cu_seqlens))
        core = functools.partial(packed_core, dims=dims, bounds=bounds, chunk_indices=chunk_indices)
        host_bounds = self._of_forward(meta, "bounds", meta.cu_seqlens.tolist)
        if fla_backward_trusted(mixed.device):  # fla's own backward, piece by piece like the torch core's
            # Each piece's varlen once per batch, not once per layer (each build waits on the host copy).
            device = mixed.device
            grad_core = PiecewiseRecompute(host_bounds, _fla_cores(core, dims, lambda piece: self._of_forward(
                meta, ("varlen", piece), lambda: _piece_varlen(piece, device))))
        else:  # differentiate the torch core instead (same math)
            grad_core = torch_recompute(host_bounds, dims, self.index_cache)
        return recomputed(core, mixed, weight, decay, beta, grad_core)

    @torch.no_grad()
    def paged(self, mixed, weight, decay, beta, dims, *, meta: PagedMetadata, state) -> torch.Tensor:
        continuing = meta.kv_lens > meta.query_lens
        if single_token_rows(mixed, meta):
            return decode_rows(mixed, weight, decay, beta, dims, state, meta.state_slots, continuing,
                               inplace_recurrent_step)
        causal_conv1d, chunk_gated_delta_rule = _fla()[:2]
        bounds, chunk_indices = self._of_forward(meta, "varlen", lambda: _varlen(meta.cu_query_lens))
        slots = meta.state_slots
        window = state.conv[slots].masked_fill_(~continuing[:, None, None], 0).to(mixed.dtype)  # [N, K - 1, C]
        convolved, final_window = causal_conv1d(
            mixed[None], weight[:, 0], initial_state=F.pad(window.transpose(1, 2), (1, 0)), output_final_state=True,
            activation="silu", cu_seqlens=bounds, chunk_indices=chunk_indices)
        state.conv[slots] = final_window[:, :, 1:].transpose(1, 2).to(state.conv.dtype)
        q, k, v = _split_heads(convolved[0], dims)
        # Gathered states of the N rows (in place to zero where a row starts its sequence), and the kernel's N final
        # states: 2 N x Hv x Dk x Dv x 4 bytes at once (sizing.fla_core_peak_bytes).
        recurrent = state.recurrent[slots].masked_fill_(~continuing[:, None, None, None], 0)
        out, final_state = chunk_gated_delta_rule(
            q, k, v, decay[None].float(), beta[None], scale=dims.key_dim ** -0.5, initial_state=recurrent,
            output_final_state=True, use_qk_l2norm_in_kernel=True, cu_seqlens=bounds, chunk_indices=chunk_indices)
        state.recurrent[slots] = final_state
        return out[0].to(mixed.dtype)


def linear_backend_problem(device: torch.device | str) -> str | None:
    """Why the fla core does not run for models on `device` (None: it does); a DeviceError where the plan sizes the
    fla core (planned_paths.fla_linear_core) and fla does not import."""
    kind = torch.device(device).type
    if not fla_linear_core(kind):
        return f"{LINEAR_CORE_ENVIRONMENT}=torch" if kind == "cuda" else f"tensors on {kind}"
    problem = fla_import_problem()
    if problem is not None:
        raise DeviceError(f"the plan sizes flash-linear-attention's core for the linear-attention layers on CUDA, but "
                          f"{problem}: install it (pip install 'opdgraph[gpu]', or the fla-core wheel), or set "
                          f"{LINEAR_CORE_ENVIRONMENT}=torch to plan and run the torch core")
    return None


def select_linear_backend(device: torch.device | str):
    """The gated-DeltaNet core for models on `device` (module docstring)."""
    return FlaLinearAttention() if linear_backend_problem(device) is None else TorchLinearAttention()


def linear_backend_description(device: torch.device | str) -> str:
    """One line for run logs: which linear-attention core runs, and why when it is the torch one."""
    problem = linear_backend_problem(device)
    if problem is not None:
        return f"linear attention: torch core ({problem})"
    import fla

    return f"linear attention: flash-linear-attention {fla.__version__} (chunked gated delta rule, Triton)"
