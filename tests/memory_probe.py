"""Measuring memory on the CPU without the planner's formulas: saved-for-backward bytes, and allocation peaks.

- ``saved_bytes``: runs a forward under ``torch.autograd.graph.saved_tensors_hooks`` and sums the storages autograd
  keeps for backward, each storage once (untyped_storage().data_ptr(), nbytes), per decoder layer (the layer that
  saved it) and outside the layers. The RoPE tables (cos/sin, inputs of every layer, computed once per forward)
  count as outside. Parameters are left out, and so are the tensors given as ``inputs`` (the micro-batch's token
  ids, which the embedding saves: they exist before the forward and are not activations).
- ``AllocationTrace``: the CPU allocator's own record (torch.profiler with profile_memory): every allocation and
  free in order, so its peak is the most bytes alive at once above what was alive when the trace began (optionally
  only while a named event runs, an autograd node's backward say). Matmuls and ``opaque()`` blocks count by what
  they leave allocated (their outputs), not by scratch inside them.
- ``cuda_torch_loss`` / ``cuda_fused_loss``: the loss's torch path and its fused Triton path as they allocate on a
  GPU, on CPU tensors: products with an fp32 output allocate only that output (torch.mm(out_dtype=...) on CUDA, where
  the CPU path upcasts its operands), and a stand-in for the Triton row kernel writes the torch reference's
  gradient into the kernel's buffers inside an ``opaque()`` block (its loss terms are the per-token values; the
  memory tests read no values).
- ``flash_backend``: the GPU's packed attention (kernels/varlen_attention.py VarlenFlashBackend, its K/V handling
  included) with torch's varlen_attn and the aten flash forward replaced by stand-ins that allocate and save what
  FlashAttention does: out [T, Hq, D] and the fp32 log-sum-exp [Hq, T], saving q, k, v, out, lse. The stand-ins
  compute the attention in float32 inside an ``opaque()`` block, whose internal temporaries the trace leaves out (a
  GPU kernel has none). Forward only: the tests count what it saves and never run its backward.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.attention.varlen
from torch.profiler import ProfilerActivity, profile, record_function

from opdgraph.kernels import divergence as kernel_divergence
from opdgraph.kernels import varlen_attention
from opdgraph.runtime import training
from opdgraph.train import divergence, losses

OPAQUE = "memory_probe.opaque"
# Matmuls count by their output: the CPU BLAS scratch inside them stands for cuBLAS's own workspace, which the plan
# holds separately (cuda.cublas_workspace).
MATMULS = ("aten::mm", "aten::addmm", "aten::addmm_", "aten::bmm")


def opaque():
    """A block standing for one GPU kernel: its net allocation counts, the temporaries inside it do not."""
    return record_function(OPAQUE)


class AllocationTrace(contextlib.AbstractContextManager):
    """CPU allocations and frees inside the block; ``peak`` is relative to the bytes alive when it began."""

    def __enter__(self):
        self._profile = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
        self._profile.__enter__()
        return self

    def __exit__(self, *exc):
        self._profile.__exit__(*exc)
        events = self._profile.profiler.kineto_results.events()
        self.allocations = sorted((event.start_ns(), event.nbytes()) for event in events
                                  if event.name() == "[memory]")
        self.ranges: dict[str, list[tuple[int, int]]] = {}
        for event in events:
            if event.name() != "[memory]":
                self.ranges.setdefault(event.name(), []).append((event.start_ns(),
                                                                 event.start_ns() + event.duration_ns()))
        self.opaque_ranges = [span for name in (OPAQUE, *MATMULS) for span in self.ranges.get(name, ())]
        return False

    def peak(self, within: str | None = None, since: str | None = None) -> int:
        """The most bytes alive at once (above the start); `within` an event name: only while such an event runs.
        `since` an event name: above the bytes alive when its first run began, counted from then on (a trace begun
        before the forward sees every activation the backward frees, so this is the backward's net peak)."""
        inside = self.ranges.get(within, []) if within else None
        begin = min(start for start, _ in self.ranges[since]) if since else None
        alive = peak = base = 0
        for time, size in self.allocations:
            if begin is not None and time < begin:
                base = alive = alive + size
                continue
            alive += size
            if inside is not None and not any(start <= time <= end for start, end in inside):
                continue
            if not any(start <= time <= end for start, end in self.opaque_ranges):
                peak = max(peak, alive - base)
        return peak


def saved_bytes(model, forward, inputs=()) -> dict:
    """{"layer0": bytes, ..., "outside": bytes, "output": what forward() returned} saved for backward by
    ``forward()`` (module docstring)."""
    excluded = {tensor.untyped_storage().data_ptr() for tensor in (*model.parameters(), *inputs)}
    shared_inputs: set[int] = set()
    region = ["outside"]
    handles = []

    def enter(index):
        def hook(module, args):
            region[0] = f"layer{index}"
            shared_inputs.update(arg.untyped_storage().data_ptr() for arg in args[1:]
                                 if isinstance(arg, torch.Tensor))
        return hook

    for index, layer in enumerate(model.layers):
        handles.append(layer.register_forward_pre_hook(enter(index)))
        handles.append(layer.register_forward_hook(lambda module, args, output: region.__setitem__(0, "outside")))
    regions_of: dict[int, set[str]] = {}
    sizes: dict[int, int] = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.nbytes() and storage.data_ptr() not in excluded:
            sizes[storage.data_ptr()] = storage.nbytes()
            regions_of.setdefault(storage.data_ptr(), set()).add(region[0])
        return tensor

    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            output = forward()
    finally:
        for handle in handles:
            handle.remove()
    totals = {f"layer{index}": 0 for index in range(len(model.layers))} | {"outside": 0}
    for pointer, regions in regions_of.items():
        owner = regions.pop() if len(regions) == 1 and pointer not in shared_inputs else "outside"
        totals[owner] += sizes[pointer]
    totals["output"] = output
    return totals


def _attend_into(out, lse, q, k, v, cu_seqlens, scale, window_left):
    """out [T, Hq, D] and lse [Hq, T] of causal (optionally sliding) attention per sequence, in float32."""
    group = q.shape[1] // k.shape[1]
    bounds = cu_seqlens.tolist()
    for start, end in zip(bounds[:-1], bounds[1:]):
        queries = q[start:end].float().transpose(0, 1)
        keys = k[start:end].float().repeat_interleave(group, 1).transpose(0, 1)
        values = v[start:end].float().repeat_interleave(group, 1).transpose(0, 1)
        scores = queries @ keys.transpose(1, 2) * scale
        positions = torch.arange(end - start)
        visible = positions[None, :] <= positions[:, None]
        if window_left >= 0:
            visible &= positions[None, :] >= positions[:, None] - window_left
        scores = scores.masked_fill(~visible, float("-inf"))
        row_lse = torch.logsumexp(scores, -1)
        lse[:, start:end] = row_lse
        out[start:end] = (torch.exp(scores - row_lse[..., None]) @ values).transpose(0, 1).to(out.dtype)


class _FlashStandIn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, cu_seqlens, scale, window_left):
        out = torch.empty_like(q)
        lse = torch.empty(q.shape[1], q.shape[0], dtype=torch.float32, device=q.device)
        with opaque():
            _attend_into(out, lse, q, k, v, cu_seqlens, scale, window_left)
        ctx.save_for_backward(q, k, v, out, lse)
        return out


def _standin_varlen_attn(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, scale, window_size,
                         enable_gqa=False):
    if query.shape[1] != key.shape[1] and not enable_gqa:
        raise ValueError(f"{query.shape[1]} query heads, {key.shape[1]} key heads and no enable_gqa")
    return _FlashStandIn.apply(query, key, value, cu_seq_q, scale, window_size[0])


def _standin_aten_flash_forward(q, k, v, cu_seqlens, max_seqlen, scale, window_left):
    """varlen_attention.aten_flash_forward: (out, lse, seed, offset) as the aten kernel allocates them."""
    out = torch.empty_like(q)
    lse = torch.empty(q.shape[1], q.shape[0], dtype=torch.float32, device=q.device)
    with opaque():
        _attend_into(out, lse, q, k, v, cu_seqlens, scale, window_left)
    return out, lse, torch.zeros((), dtype=torch.int64), torch.zeros((), dtype=torch.int64)


# How the GPU's packed attention takes grouped-query K/V: varlen_attn's enable_gqa (torch >= 2.12), the aten kernels
# through FlashVarlenFunction (older torch), or heads repeated first (the benchmarks' former path).
FLASH_PATHS = ("enable_gqa", "aten", "repeat_kv")


def flash_backend(monkeypatch, path: str = "aten"):
    """VarlenFlashBackend as it runs on a GPU along `path` (FLASH_PATHS), on CPU tensors."""
    monkeypatch.setattr(torch.nn.attention.varlen, "varlen_attn", _standin_varlen_attn)
    monkeypatch.setattr(varlen_attention, "aten_flash_forward", _standin_aten_flash_forward)
    monkeypatch.setattr(varlen_attention, "unsupported_reason", lambda q, sliding_window, support: None)
    backend = varlen_attention.VarlenFlashBackend(repeat_kv=path == "repeat_kv")
    backend.support = varlen_attention.VarlenSupport(True, enable_gqa=path == "enable_gqa")
    return backend


def _product(left, right, dtype):
    out = torch.empty(left.shape[0], right.shape[1], dtype=dtype, device=left.device)
    with opaque():
        out.copy_(left.float() @ right.float())
    return out


def _addmm_in_place(accumulator, left, right):
    with opaque():
        accumulator.addmm_(left.float(), right.float())


def cuda_torch_loss(monkeypatch) -> None:
    """opdgraph.train.divergence as on CUDA: the lm_heads as they are, logits from an fp32-output product."""
    monkeypatch.setattr(divergence, "head_for_logits", lambda lm_head: lm_head)
    monkeypatch.setattr(divergence, "logits_fp32", lambda hidden, lm_head: _product(hidden, lm_head.T, torch.float32))


class _RowsKernelStandIn:
    """``divergence_rows_kernel[grid](...)`` of kernels/divergence_triton.py, computed by the torch reference."""

    def __getitem__(self, grid):
        return self._launch

    @staticmethod
    def _launch(student_logits, student_stride, teacher_logits, teacher_stride, grad_out, grad_stride, weights,
                sampled, per_token, loss_terms, vocab, inv_temperature, beta, log_beta, log_one_minus_beta, *,
                DIVERGENCE, **meta):
        from opdgraph.kernels import divergence_triton as body

        names = {body.FORWARD_KL.value: "forward_kl", body.REVERSE_KL.value: "reverse_kl", body.JSD.value: "jsd",
                 body.SAMPLED_TOKEN.value: "sampled_token"}
        with opaque():
            _reference_rows(names[DIVERGENCE], student_logits, teacher_logits, grad_out, weights, sampled, per_token,
                            loss_terms, beta, 1.0 / inv_temperature)


def _reference_rows(name, student_logits, teacher_logits, grad_out, weights, sampled, per_token, loss_terms, beta,
                    temperature):
    chunk = losses.divergence_chunk_grad(student_logits.clone(), teacher_logits.float().clone(), weights, name, beta,
                                         temperature, sampled if name == "sampled_token" else None)
    grad_out.copy_(chunk.dlogits)
    per_token.copy_(chunk.per_token)
    loss_terms.copy_(chunk.per_token)


def cuda_fused_loss(monkeypatch) -> None:
    """runtime.training.chunked_loss through kernels/divergence.py as on CUDA (module docstring)."""
    from opdgraph.kernels import divergence_triton

    monkeypatch.setattr(training, "_use_triton", lambda kernel, device: True)
    monkeypatch.setattr(kernel_divergence, "_matmul_logits", _product)
    monkeypatch.setattr(kernel_divergence, "_addmm_fp32_", _addmm_in_place)
    monkeypatch.setattr(divergence_triton, "divergence_rows_kernel", _RowsKernelStandIn())
