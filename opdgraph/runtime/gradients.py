"""The student's gradients of one optimizer step: what `<student>.grads` holds, how each micro-batch's gradient joins
it, and what the optimizer step reads.

Two modes (backward.grad_accumulation_dtype; an fp32 student always takes the second, its grads being fp32 already):
- fp32 accumulation (bf16 student, the default): one fp32 accumulator per parameter (this rank's shard when
  sharded). A post-accumulate-grad hook on every parameter adds the bf16 gradient into its accumulator the moment
  autograd (unsharded) or FSDP's reduce-scatter (sharded: FSDP2 runs these hooks on the sharded parameters) has
  written it, and drops it: a bf16 gradient exists for one parameter (one FSDP unit) at a time, never a whole
  model's worth. Unsharded, the chunked loss adds the analytic lm_head gradient straight into the lm_head's (tied:
  the embedding's) fp32 accumulator, so there is no separate [V, h] buffer; sharded, the loss fills a full [V, h]
  fp32 accumulator of this rank's contribution, which `finish` all-reduces and adds, in fp32, to this rank's rows.
- model dtype: autograd sums into `param.grad` in the parameter dtype; the lm_head gradient is its own fp32 [V, h]
  accumulator, added into `param.grad` before the optimizer step (summed in fp32, rounded once).

FSDP2 schedules (opdgraph.runtime.fsdp): per layer, every micro-batch's backward reduce-scatters its bf16 gradient
and the hook folds this rank's shard; per step, FSDP itself sums the whole gradients over the micro-batches in fp32
(`shard_student(reduce_dtype=float32)`), reduce-scatters them once in fp32, and casts this rank's shard to bf16 once
(FSDP2 always hands the parameter dtype back), which the hook folds: one rounding per step, not one per micro-batch.

The buffer table holds the accumulators (a flat dict: parameter name -> fp32 tensor, plus LM_HEAD for a separate
lm_head accumulator), created at the first use of a step (the loss of its first micro-batch), so the plan's
release of `<student>.grads` frees them; nothing here keeps a reference.
"""

from __future__ import annotations

import functools

import torch

LM_HEAD = "lm_head (full fp32 accumulator)"  # not a parameter name: those have no spaces


def _local(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.to_local() if hasattr(tensor, "device_mesh") else tensor


class StudentGradients:
    """The accumulators of `<student>.grads` in `buffers` and the hooks that fill them (see module docstring)."""

    def __init__(self, student, buffers, buffer_name: str, *, fp32: bool):
        self.student, self.buffers, self.buffer_name, self.fp32 = student, buffers, buffer_name, fp32
        self.params = {name: param for name, param in student.named_parameters() if param.requires_grad}
        self.lm_head_name = next(name for name, param in self.params.items() if param is student.lm_head_weight)
        sharded = any(hasattr(param, "device_mesh") for param in self.params.values())
        self.separate_lm_head = sharded or not fp32
        self.touched: set[str] = set()  # parameters that got a gradient this step (the others get no update)
        self._hooks = []  # removed by close(): a model that outlives this run must not fold into its buffers
        if fp32:
            for name, param in self.params.items():
                self._hooks.append(param.register_post_accumulate_grad_hook(functools.partial(self._fold, name)))

    def close(self) -> None:
        """Remove the fold hooks (a benchmark reuses the model for another run; a stale hook would take the next
        run's gradients into this run's released buffer)."""
        for hook in self._hooks:
            hook.remove()
        self._hooks = []

    def accumulators(self) -> dict[str, torch.Tensor]:
        """The buffer's tensors, created as zeros at the step's first use."""
        if not self.buffers.has(self.buffer_name):
            self.buffers.put(self.buffer_name, self._zeros())
            self.touched = set()
        return self.buffers.get(self.buffer_name)

    def _zeros(self) -> dict[str, torch.Tensor]:
        tensors = {}
        if self.fp32:
            for name, param in self.params.items():
                local = _local(param.detach())
                tensors[name] = torch.zeros(local.shape, dtype=torch.float32, device=local.device)
        if self.separate_lm_head:
            weight = self.params[self.lm_head_name]
            tensors[LM_HEAD] = torch.zeros(weight.shape, dtype=torch.float32, device=_local(weight.detach()).device)
        return tensors

    def lm_head(self) -> torch.Tensor:
        """The [V, h] fp32 tensor the chunked loss adds this micro-batch's lm_head gradient into."""
        tensors = self.accumulators()
        if self.separate_lm_head:
            return tensors[LM_HEAD]
        self.touched.add(self.lm_head_name)
        return tensors[self.lm_head_name]

    @torch.no_grad()
    def _fold(self, name: str, param: torch.Tensor) -> None:
        """Post-accumulate-grad hook: the bf16 gradient joins its fp32 accumulator and is dropped at once."""
        self.buffers.get(self.buffer_name)[name].add_(_local(param.grad))
        self.touched.add(name)
        param.grad = None

    @torch.no_grad()
    def finish(self) -> dict[str, torch.Tensor]:
        """Before the optimizer step (once per step): add the separate lm_head accumulator in, and return the
        gradients the optimizer reads, by parameter name (fp32 accumulators, or `param.grad` in the model dtype),
        each shaped like `param.grad` (a DTensor of this rank's shard when sharded, so the clipping norm is summed
        over ranks)."""
        from opdgraph.runtime.fsdp import add_full_grad

        tensors = self.accumulators()
        if self.separate_lm_head:
            into = tensors[self.lm_head_name] if self.fp32 else None
            add_full_grad(self.params[self.lm_head_name], tensors[LM_HEAD], into=into)
            self.touched.add(self.lm_head_name)
        if self.fp32:
            return {name: self._like_grad(name, tensors[name]) for name in self.params if name in self.touched}
        return {name: param.grad for name, param in self.params.items() if param.grad is not None}

    def _like_grad(self, name: str, local: torch.Tensor) -> torch.Tensor:
        """This rank's fp32 accumulator as the parameter's gradient would be: a DTensor view when sharded."""
        param = self.params[name]
        if not hasattr(param, "device_mesh"):
            return local
        from torch.distributed.tensor import DTensor

        return DTensor.from_local(local, param.device_mesh, param.placements, shape=param.shape,
                                  stride=param.stride(), run_check=False)

    @torch.no_grad()
    def zero(self) -> None:
        """For a plan that holds the gradients for the whole run: the next step accumulates into zeros."""
        for tensor in self.accumulators().values():
            tensor.zero_()
        for param in self.params.values():
            if param.grad is not None:
                param.grad.zero_()
        self.touched = set()
