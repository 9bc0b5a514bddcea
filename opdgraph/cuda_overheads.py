"""Device memory of a CUDA run that no stage's tensors account for, as planned buffers (build_buffers adds them).

Measured on an H200, the tiny pipeline held ~70 MB at every plan step beyond its planned tensors: library
workspaces allocated through PyTorch's caching allocator (so `torch.cuda.max_memory_allocated` sees them). They are:

- cuBLAS workspaces (`cuda.cublas_workspace`, held): PyTorch gives every (cuBLAS handle, stream) pair its own
  workspace, 32 MiB on Hopper and Blackwell when CUBLAS_WORKSPACE_CONFIG is unset (cuBLASLt shares it), and keeps it
  for the life of the process. Handles are per thread, so a training run holds two: the main thread's and the
  autograd engine's backward thread's. CUDA-graph decode adds two streams with matmuls: the graph capture stream and
  the side stream of the eager warmup before each capture.
- flashinfer workspaces (`<rollout>.flashinfer`, held: the engine keeps its attention backend for the
  run): one 128 MiB float workspace shared by every wrapper, plus an 8 MiB int workspace per wrapper; a wrapper is
  created per attention window (Gemma 3: sliding and global) for prefill, for eager decode, and for every captured
  decode batch size.
- the CUDA-graph memory pool of the decode graphs (`<rollout>.decode_graph_pool`, live during decode: the graphs
  are dropped with the KV pool): the activations of one decode step at the largest captured batch (graphs are
  captured largest first and the smaller ones reuse its pool; a hybrid model's step: the larger of an MLP's and a
  linear-attention layer's in the core the plan sizes). The pool's blocks are reserved for the graphs while
  they exist; the allocator counts them as free (memory_reserved, not memory_allocated), so this buffer is device
  memory a run needs that an allocated-bytes measurement does not show.

Which apply: all need a CUDA target, i.e. pipeline.device other than "cpu" (the planner imports no torch and cannot
probe; "auto" runs on CUDA wherever there is a GPU, and a plan is a worst case). The flashinfer and graph buffers
need the flashinfer rollout path: a bfloat16 student and rollout.backend other than "torch" (the runtime also falls
back to torch when flashinfer does not import; the plan then over-predicts by these buffers).
"""

from __future__ import annotations

import math

from opdgraph import sizing
from opdgraph.config.schema import PipelineConfig
from opdgraph.plan import Buffer

MIB = 1024 * 1024
CUBLAS_WORKSPACE_BYTES = 32 * MIB  # PyTorch's default per (handle, stream) on sm90 / sm100 / sm120
FLASHINFER_FLOAT_WORKSPACE_BYTES = 128 * MIB  # mirrors opdgraph.kernels.flashinfer_attention.WORKSPACE_BYTES
FLASHINFER_INT_WORKSPACE_BYTES = 8 * MIB  # flashinfer allocates one per prefill / decode wrapper
FLASHINFER_HEAD_DIMS = (64, 128, 256)  # mirrors opdgraph.runtime.engine_setup.FLASHINFER_HEAD_DIMS
MAX_GRAPH_BATCH_SIZE = 256  # mirrors opdgraph.rollout.cuda_graphs.MAX_GRAPH_BATCH_SIZE (a test checks both)


def targets_cuda(cfg: PipelineConfig) -> bool:
    return cfg.pipeline.device != "cpu"


def _engine_setting(cfg: PipelineConfig, name: str) -> tuple[str, object]:
    """(the stage that publishes it, its value) of a rollout engine setting, found by name (stages/rollout.py's
    step_settings), so this module never looks the rollout up by its kind."""
    from opdgraph.stages import named_settings  # the stage modules import the compiler: imported when called

    return named_settings(cfg.stages, "step_settings")[name]


def uses_flashinfer(cfg: PipelineConfig) -> bool:
    """The rollout engine samples through flashinfer with CUDA-graph decode (opdgraph.runtime.context); a student with
    linear-attention layers (Qwen3.5) too, its attention layers through flashinfer (rollout/engine.py)."""
    student = cfg.models[cfg.model_with_role("student")]
    shape = cfg.shapes[cfg.model_with_role("student")]
    return (targets_cuda(cfg) and student.dtype != "float32" and _engine_setting(cfg, "backend")[1] != "torch"
            and shape.head_dim in FLASHINFER_HEAD_DIMS)


def uses_decode_bursts(cfg: PipelineConfig) -> bool:
    """Decode runs as bursts (rollout.decode_burst_steps, auto on the flashinfer path when the Triton decode kernel
    takes the student's heads: opdgraph.runtime.engine_setup.decode_burst_steps). Bursts replay their own graphs, so the
    per-batch-size flashinfer graph wrappers are never created."""
    _, setting = _engine_setting(cfg, "decode_burst_steps")
    if not uses_flashinfer(cfg) or setting == 1:
        return False
    shape = cfg.shapes[cfg.model_with_role("student")]
    supported = shape.head_dim >= 16 and shape.head_dim & (shape.head_dim - 1) == 0
    return setting > 1 or supported


def stacked_qkv_bytes(cfg: PipelineConfig) -> int:
    """The fused GPU rollout's stacked q/k/v projection copy (allocated with the KV pool, dropped with it); none for
    a student with linear-attention layers, whose rollout runs unfused (rollout/engine.py)."""
    student = cfg.model_with_role("student")
    shape = cfg.shapes[student]
    if not (uses_flashinfer(cfg) and _engine_setting(cfg, "fused_kernels")[1]) or shape.linear_layers:
        return 0
    width = shape.q_dim + 2 * shape.kv_dim
    return shape.layers * width * (shape.hidden + int(shape.qkv_bias)) * cfg.models[student].dtype_bytes


def decode_graph_batch_sizes(max_num_seqs: int) -> int:
    """How many decode batch sizes get a graph: powers of two below the cap, then the cap itself."""
    cap = min(max_num_seqs, MAX_GRAPH_BATCH_SIZE)
    return math.ceil(math.log2(cap)) + 1


def attention_windows(shape) -> int:
    """Distinct attention windows of a model's layers (kernels/flashinfer_attention.py plans one wrapper per
    window): its full and sliding kinds (a Qwen2 with use_sliding_window has both, as Gemma 3); at least one."""
    return max(len(shape.attention_kinds), 1)


def overhead_buffers(cfg: PipelineConfig, student_keys: tuple[str, ...]) -> list[Buffer]:
    if not targets_cuda(cfg):
        return []
    rollout, max_num_seqs = _engine_setting(cfg, "max_num_seqs")
    graphs = uses_flashinfer(cfg)
    handles = ("main thread", "autograd backward thread", *(("graph capture", "graph warmup") if graphs else ()))
    buffers = [Buffer(name="cuda.cublas_workspace", category="workspace", bytes=CUBLAS_WORKSPACE_BYTES * len(handles),
                      sized_by=("pipeline.device",), lifetime="held",
                      formula=f"32 MiB x {len(handles)} cuBLAS (handle, stream) pairs: {', '.join(handles)}")]
    if not graphs:
        return buffers
    student = cfg.model_with_role("student")
    shape, dtype_bytes = cfg.shapes[student], cfg.models[student].dtype_bytes
    windows, sizes = attention_windows(shape), decode_graph_batch_sizes(max_num_seqs)
    graph_wrappers = 0 if uses_decode_bursts(cfg) else sizes
    wrappers = windows * (2 + graph_wrappers)
    backend_keys = ("pipeline.device", f"{rollout}.backend", f"models.{student}.dtype")
    buffers.append(Buffer(
        name=f"{rollout}.flashinfer", category="workspace",
        bytes=FLASHINFER_FLOAT_WORKSPACE_BYTES + wrappers * FLASHINFER_INT_WORKSPACE_BYTES,
        sized_by=(*backend_keys, f"{rollout}.max_num_seqs", *student_keys), lifetime="held",
        formula=f"128 MiB float + 8 MiB int x {wrappers} wrappers ({windows} window(s) x (prefill + decode + "
                f"{graph_wrappers} graph batch sizes))"))
    largest = min(max_num_seqs, MAX_GRAPH_BATCH_SIZE)
    # planned_paths imports this module: imported when called
    from opdgraph.planned_paths import linear_core, with_linear_core_keys

    in_place = linear_core(cfg) == "fla"
    buffers.append(Buffer(
        name=f"{rollout}.decode_graph_pool", category="workspace",
        bytes=sizing.decode_step_workspace_bytes(shape, largest, dtype_bytes, in_place)
        + sizing.decode_logits_bytes(largest, shape.vocab),
        sized_by=with_linear_core_keys((*backend_keys, f"{rollout}.max_num_seqs", *student_keys), shape),
        lifetime="transient",
        formula=f"largest graph batch ({largest}) x ({_decode_step_formula(shape, in_place)} + V x 4): one decode "
                "step's activations and fp32 logits, reserved by the graphs' private pool"))
    return buffers


def _decode_step_formula(shape, in_place: bool) -> str:
    """Per row, the decode step's activation peak of sizing.decode_step_workspace_bytes: an MLP's, or for a model
    with linear-attention layers the larger of that and one such layer's step (linear_decode_peak_bytes)."""
    mlp = "(4 h + 3 i) x d + t (t = 2 x rotary_dim x RoPE kinds x d)"
    if not shape.linear_layers:
        return mlp
    if in_place:  # fla's core: kernels/gated_delta_decode.py updates each state in its slot
        return (f"max({mlp}, 4 K x c x d (a linear-attention layer's conv step, K = conv kernel, c = conv channels; "
                "the delta rule updates the states in place))")
    return (f"max({mlp}, 4 Hv x k_d x v_d x 4 + 16 x (c + 2 Hv x k_d) (a linear-attention layer's step in the torch "
            "core: gathered, decayed and updated fp32 states, fp32 copies of the conv output, c channels, and of the "
            "repeated q and k))")
