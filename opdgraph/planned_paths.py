"""Which code path the planner assumes runs on the target, and which config keys size a model: the booleans that
opdgraph.stage_plan turns into StageFacts and opdgraph.buffers uses for the model state. No torch.

The student's activations, the logit chunk and the workspaces follow the path that runs on the target
(pipeline.device, loss.kernel, loss.divergence): see sizing.py and attention_fallback below (the plain-torch
attention's S x S scores in the activations and the no-grad forward workspaces). FlashAttention takes grouped-query
K/V natively and both layer-kernel choices (models.<name>.kernels) save the same tensors: neither changes a plan.
A hybrid model's linear-attention core (fla_linear_core below) does change it, so the planner and the runtime take
it from one function here.
"""

from __future__ import annotations

import os

from opdgraph import sizing
from opdgraph.config.schema import PipelineConfig
from opdgraph.cuda_overheads import targets_cuda
from opdgraph.errors import DeviceError

LINEAR_CORE_ENVIRONMENT = "OPDGRAPH_LINEAR_ATTENTION"
LINEAR_CORE_CHOICES = ("auto", "fla", "torch")


def model_keys(cfg: PipelineConfig, name: str) -> tuple[str, ...]:
    """The config keys that decide a model's shape and dtype."""
    model = cfg.models[name]
    keys = [f"models.{name}.{key}" for key in ("path", "config", "init_from", "keep_layers")
            if getattr(model, key) is not None]
    if model.init_from is not None:
        keys += [key for key in model_keys(cfg, model.init_from) if not key.endswith(".dtype")]
    return (*keys, f"models.{name}.dtype")


def attention_fallback(cfg: PipelineConfig, name: str) -> bool:
    """Whether model `name`'s packed attention (training, teacher scoring, eval scoring) runs as the plain-torch
    reference rather than FlashAttention varlen (kernels/varlen_attention.py unsupported_reason): a CPU target, an
    fp32 model, or head_dim over 256 or not a multiple of 8. A CUDA torch without a usable varlen_attn falls back
    too; the planner imports no torch and cannot see that (it plans the GPU machines' torch, which has one)."""
    head_dim = cfg.shapes[name].head_dim
    return (not targets_cuda(cfg) or cfg.models[name].dtype == "float32" or head_dim > sizing.FLASH_MAX_HEAD_DIM
            or head_dim % 8 != 0)


def fp32_grads(cfg: PipelineConfig) -> bool:
    """Whether the student's gradients are summed in fp32 accumulators of their own (opdgraph.runtime.gradients):
    backward.grad_accumulation_dtype = "float32" and a student that is not fp32 already."""
    from opdgraph.counts import step_settings  # counts -> stages -> nothing of ours: imported when called

    student = cfg.model_with_role("student")
    return step_settings(cfg)["grad_accumulation_dtype"] == "float32" and cfg.models[student].dtype != "float32"


def linear_core_setting() -> str:
    """OPDGRAPH_LINEAR_ATTENTION: auto (unset), fla or torch; anything else is a DeviceError naming the choices."""
    setting = os.environ.get(LINEAR_CORE_ENVIRONMENT, "auto").strip().lower() or "auto"
    if setting not in LINEAR_CORE_CHOICES:
        raise DeviceError(f"{LINEAR_CORE_ENVIRONMENT}={setting!r}: choose one of {', '.join(LINEAR_CORE_CHOICES)}")
    return setting


def fla_linear_core(device: str) -> bool:
    """Whether the linear-attention layers (Qwen3.5) run flash-linear-attention's core on `device` (a
    pipeline.device value or a torch device's str). OPDGRAPH_LINEAR_ATTENTION chooses:
    - auto (unset): fla's core on CUDA, the plain torch core elsewhere;
    - fla: fla's core, required: on CUDA as auto, on a CPU device a DeviceError (fla runs on CUDA only; the torch core
      in its place would be a core the user did not ask for);
    - torch: the plain torch core everywhere (the reference).
    The plan sizes that core's forward peaks and its in-place decode step, the torch core's elsewhere; the runtime
    selects the same core (kernels/fla_linear_attention.py select_linear_backend, checked at startup before any
    weights load) and stops with a DeviceError, rather than run another core than the plan's, when fla does not
    import there. fla-core is in the `gpu` extra, as flashinfer is."""
    setting = linear_core_setting()
    if not str(device).startswith("cpu"):
        return setting != "torch"
    if setting == "fla":
        raise DeviceError(f"{LINEAR_CORE_ENVIRONMENT}=fla requires flash-linear-attention's core for the "
                          f"linear-attention layers, which needs a CUDA device, but they run on {str(device)!r}: "
                          f"unset {LINEAR_CORE_ENVIRONMENT} (auto: fla on CUDA, the torch core elsewhere) or set it "
                          f"to torch")
    return False


def has_linear_layers(cfg: PipelineConfig) -> bool:
    """Whether a model of the pipeline has linear-attention layers, whose core OPDGRAPH_LINEAR_ATTENTION picks."""
    return any(shape.linear_layers for shape in cfg.shapes.values())


def linear_core(cfg: PipelineConfig) -> str | None:
    """The linear-attention core the plan sizes, "fla" or "torch" (fla_linear_core on pipeline.device), or None
    when no model of the pipeline has linear-attention layers: then the variable decides nothing and is not read."""
    if not has_linear_layers(cfg):
        return None
    return "fla" if fla_linear_core(cfg.pipeline.device) else "torch"


def with_linear_core_keys(keys: tuple[str, ...], *shapes) -> tuple[str, ...]:
    """`keys` and, where one of `shapes` has linear-attention layers, what picks their core and so the peaks sized
    for it (linear_core): pipeline.device and the OPDGRAPH_LINEAR_ATTENTION variable."""
    if not any(shape.linear_layers for shape in shapes):
        return tuple(keys)
    return (*keys, *(key for key in ("pipeline.device", LINEAR_CORE_ENVIRONMENT) if key not in keys))
