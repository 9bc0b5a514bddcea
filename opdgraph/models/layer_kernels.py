"""The elementwise kernels of the packed forward (training, teacher and eval scoring), and which implementation runs.

Between its matmuls a decoder layer runs RMSNorm (the second one after the residual add), RoPE on q and k, and the
gated activation. At hidden size 1536 (Qwen2.5-1.5B) these, as a dozen small torch kernels each, weigh a lot next
to the matmuls of the training forward and backward. ``LayerKernels`` names the four operations; DecoderLM passes
its own (``set_layer_kernels``) to every layer of ``forward_hidden``; the rollout's paged forward always gets
``TORCH`` (the GPU rollout has Triton kernels of its own: kernels/fused_decode.py).

- ``TORCH`` (models.<name>.kernels = "torch"): norms.py's and gated_activation.py's autograd Functions and
  rope.apply_rotary. The reference: every device and dtype, bit-identical to the model as it always ran.
- Liger-Kernel's fused Triton kernels, forward and backward (kernels = "liger"; kernels/liger_layers.py): CUDA,
  with the liger-kernel package (in opdgraph's gpu extra).
- "auto": liger where it can run (a CUDA device and liger_kernel imports), else torch.

Both implementations save the same tensors for backward (inputs, fp32 rstd per norm row, gate and up; RoPE only
the shared cos/sin tables), so the plan's activation sizing (sizing.py) does not depend on the choice, and "auto"
may fall back at run time without the plan going wrong (tests/test_saved_bytes.py measures both).
"""

from __future__ import annotations

from typing import Protocol, get_args

import torch

from opdgraph.config.schema import KernelChoice

from opdgraph.models.gated_activation import gated_activation
from opdgraph.models.norms import add_rms_norm, rms_norm
from opdgraph.models.rope import apply_rotary

KERNEL_CHOICES = get_args(KernelChoice)  # models.<name>.kernels


class LayerKernels(Protocol):
    name: str

    def rms_norm(self, x: torch.Tensor, weight: torch.Tensor, eps: float, one_plus: bool) -> torch.Tensor: ...

    def add_rms_norm(self, x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float,
                     one_plus: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """(RMSNorm(residual + x), residual + x)."""

    def rotary(self, q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor,
               sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """q [T, Hq, D] and k [T, Hkv, D] rotated by cos/sin [T, rotated dims] (rope.apply_rotary)."""

    def gated_activation(self, gate: torch.Tensor, up: torch.Tensor, activation: str) -> torch.Tensor: ...


class TorchLayerKernels:
    name = "torch"
    # The functions themselves, not wrappers: a wrapper's frame would keep the no-grad gate alive
    # (gated_activation drops it to keep the forward workspace at three [T, i] tensors).
    rms_norm = staticmethod(rms_norm)
    add_rms_norm = staticmethod(add_rms_norm)
    gated_activation = staticmethod(gated_activation)

    @staticmethod
    def rotary(q, k, cos, sin):
        return apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)


TORCH = TorchLayerKernels()


def liger_problem(device: torch.device) -> str | None:
    """Why Liger-Kernel's kernels cannot run on `device` (None: they can)."""
    if device.type != "cuda":
        return f"they run on CUDA, and this run is on {device.type}"
    from opdgraph.kernels.liger_layers import liger_import_error

    error = liger_import_error()
    return None if error is None else f"liger_kernel does not import ({error}; pip install liger-kernel)"


def check_layer_kernels(setting: str, device, where: str) -> None:
    """Raises DeviceError when kernels = "liger" cannot run on `device`: called at startup, before weights load."""
    from opdgraph.errors import DeviceError

    if setting != "liger":
        return
    problem = liger_problem(torch.device(device))
    if problem is not None:
        raise DeviceError(f"{where} = 'liger' but {problem}; set {where} = 'auto' or 'torch'")


def select_layer_kernels(setting: str, device) -> LayerKernels:
    """The implementation for models.<name>.kernels on `device` (check_layer_kernels has vetted "liger")."""
    if setting == "torch" or (setting == "auto" and liger_problem(torch.device(device)) is not None):
        return TORCH
    from opdgraph.kernels.liger_layers import LigerLayerKernels

    return LigerLayerKernels()
