"""The rollout engine and the models' attention backends for the device the run is on.

On CUDA the run takes the fast paths: the rollout engine samples through flashinfer with CUDA-graph decode
(`build_engine`, when rollout.backend allows it and flashinfer imports), both models run packed attention
through FlashAttention varlen (`use_packed_attention`), Qwen3.5's linear-attention layers through
flash-linear-attention, and their norms, RoPE and gated activations through the kernels of
models.<name>.kernels (`use_layer_kernels`: Liger-Kernel's where it runs on "auto"). CPU runs keep the
plain-torch paths.
"""

from __future__ import annotations

import torch

from opdgraph.errors import DeviceError

FLASHINFER_HEAD_DIMS = (64, 128, 256)  # head sizes flashinfer's FA2 paged kernels are built for

def _flashinfer_problem(device: torch.device, model_dtype: torch.dtype, head_dim: int | None) -> str | None:
    """Why the flashinfer rollout path cannot run here (None: it can)."""
    if device.type != "cuda":
        return f"the run is on {device.type}"
    if model_dtype not in (torch.bfloat16, torch.float16):
        return f"the student is {model_dtype} (flashinfer takes bfloat16/float16)"
    if head_dim is not None and head_dim not in FLASHINFER_HEAD_DIMS:
        # Measured: flashinfer 0.6 rejects head_dim 16 at run time ("Invalid configuration ... NUM_MMA_D_QK=1").
        return f"the student's head_dim is {head_dim} (flashinfer's kernels take {FLASHINFER_HEAD_DIMS})"
    try:
        import flashinfer  # noqa: F401
    except ImportError as error:
        return f"flashinfer does not import ({error})"
    return None

def rollout_attention(setting: str, device: torch.device, model_dtype: torch.dtype,
                      head_dim: int | None = None) -> str:
    """The engine's attention for rollout.backend: 'auto' takes flashinfer wherever it can run."""
    if setting == "torch":
        return "torch"
    problem = _flashinfer_problem(device, model_dtype, head_dim)
    if setting == "flashinfer" and problem is not None:
        raise DeviceError(f"rollout.backend = 'flashinfer' but {problem}; set rollout.backend = 'auto' or 'torch'")
    return "torch" if problem is not None else "flashinfer"

def build_engine(student, rollout, *, num_pages: int, device: torch.device, kv_dtype: torch.dtype):
    """The rollout engine; on the flashinfer path decode steps replay CUDA graphs."""
    from opdgraph.rollout import RolloutEngine

    attention = rollout_attention(rollout.backend, device, student.dtype, student.config.head_dim)
    return RolloutEngine(student, page_size=rollout.page_size, num_pages=num_pages, max_num_seqs=rollout.max_num_seqs,
                         prefill_token_budget=rollout.prefill_token_budget, device=device, kv_dtype=kv_dtype,
                         attention=attention, cuda_graphs=attention == "flashinfer",
                         decode_burst_steps=decode_burst_steps(rollout.decode_burst_steps, attention, student.config,
                                                               device),
                         fused_kernels=attention == "flashinfer" and rollout.fused_kernels)

AUTO_DECODE_BURST_STEPS = 16  # host round trips every 16 tokens: host time per token falls below the GPU's

def decode_burst_steps(setting: int, attention: str, config, device: torch.device) -> int:
    """rollout.decode_burst_steps resolved: 0 (auto) bursts on the GPU path when the Triton decode kernel supports
    the model's heads; an explicit value > 1 on CUDA needs that support too (CUDA bursts always use the kernel)."""
    from opdgraph.kernels.paged_decode_attention import supports

    supported = supports(config.num_heads, config.num_kv_heads, config.head_dim)
    if setting == 0:
        return AUTO_DECODE_BURST_STEPS if attention == "flashinfer" and supported else 1
    if setting > 1 and device.type == "cuda" and not supported:
        raise DeviceError(f"rollout.decode_burst_steps = {setting} needs the Triton decode kernel, which takes a "
                         f"power-of-two head_dim >= 16 (this model has {config.head_dim}); set it to 0 or 1")
    return setting

def use_packed_attention(models, device: torch.device) -> str:
    """Give each model the packed-attention backend for `device`, and models with linear-attention layers (Qwen3.5)
    the linear-attention core for it (kernels/fla_linear_attention.py); returns the description for the log (a
    second line for the linear core when a model has such layers).

    On CUDA the RoPE inverse frequencies also move to the device (same float32 values): the decoder keeps them on
    the host, and a pageable host-to-device copy at every forward waits for the GPU to drain.
    """
    from opdgraph.kernels.fla_linear_attention import linear_backend_description, select_linear_backend
    from opdgraph.kernels.varlen_attention import (
        packed_backend_description,
        select_packed_backend,
    )

    for model in models:
        model.set_attention_backend(select_packed_backend(device))
        if getattr(model, "recurrent", False):
            model.set_linear_attention_backend(select_linear_backend(device))
        if device.type == "cuda":
            model._inv_freq = {kind: inv_freq.to(device) for kind, inv_freq in model._inv_freq.items()}
    lines = [packed_backend_description(device)]
    if any(getattr(model, "recurrent", False) for model in models):
        lines.append(linear_backend_description(device))
    return "\n".join(lines)


def use_layer_kernels(cfg, student, teachers: dict, device: torch.device) -> str:
    """Give the student and each teacher's model the layer kernels of its models.<name>.kernels (startup has
    checked an explicit "liger"); returns the one-line description for the log."""
    from opdgraph.models.layer_kernels import select_layer_kernels

    chosen = {}
    for name, model in [(cfg.model_with_role("student"), student),
                        *((teacher.spec.model, teacher.model) for teacher in teachers.values())]:
        kernels = select_layer_kernels(cfg.models[name].kernels, device)
        model.set_layer_kernels(kernels)
        chosen[name] = kernels.name
    return "layer kernels: " + ", ".join(f"{name} {kind}" for name, kind in chosen.items())
