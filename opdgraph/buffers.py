"""Every buffer of a training step, sized with opdgraph.sizing and tagged with the config keys that size it.

Fusion changes three sizes: fused, the teacher hidden states, the student's saved activations and its hidden-state
gradient exist for one micro-batch at a time; unfused, for the whole batch (they cross from one stage's loop to
the next). Everything else is the same in both plans.

The student's gradients (`<student>.grads`) are summed over a step's micro-batches in fp32 accumulators when the
student is not fp32 (backward.grad_accumulation_dtype = "float32", the default: P x 4 plus one gradient being folded
in), else in param.grad (P x d) beside a full fp32 lm_head accumulator; the fp32 buffer's formula shows the size
the other choice would have.
With N ranks (FSDP2 data parallel) the student's weights, fp32 masters, AdamW moments and gradients are divided by
N; rollout adds `<student>.gathered_weights` (the full weights, all-gathered for the engine) and training adds
`<student>.fsdp_comm` (the root's gathered embedding/norm/lm_head, two layers' gathered weights for the current and
the prefetched layer, one layer's unreduced gradient, and the full fp32 lm_head gradient that is all-reduced).
On a CUDA target the library workspaces and the decode graphs' pool are planned too (opdgraph.cuda_overheads).
The student's activations, the logit chunk and the workspaces follow the path that runs on the target
(pipeline.device, loss.kernel, loss.divergence): see sizing.py, kv_heads_repeated and attention_fallback below
(the plain-torch attention's S x S scores in the activations and the no-grad forward workspaces).
The teacher is replicated (its full weights on every rank) unless the placement shards it (below). The batch
buffers are per rank (see counts.py).
With pipeline.release_phase_buffers = false the rollout KV pool and the student's gradients are held (live at every
step, never released), the plan without the releases between rollout and training.
`place_buffers` then applies a Placement (opdgraph.placement): it marks buffers offloaded or host-resident and adds
the device buffers that streaming needs (two teacher layers; one optimizer bucket). With N ranks and the student
gathered per step (placement.student_gather = "step"), `<student>.gathered_weights` stays from rollout through the
training loop, the whole gradients accumulate in `<student>.unsharded_grads` (P x d, or P x 4 with fp32 gradient
sums, from the first backward to the last, which reduce-scatters them) and `<student>.fsdp_comm` is only that
reduce-scatter's buffers; per layer, it is as described above. A sharded teacher keeps 1/N of
its weights per rank and adds what FSDP gathers: `<teacher>.gathered_layer` (the running layer and the prefetched
next one, during teacher_score), `<teacher>.gathered_root` (embedding, final norm and lm_head, from teacher_score
until the loss has read the lm_head) and, with an eval stage, `<teacher>.gathered_weights` (the whole teacher, for
eval's teacher generation).
An eval stage allocates its own KV pools (student and teacher, sized by counts.eval_counts) and a workspace, all
freed after it.
"""

from __future__ import annotations

import attrs

from opdgraph import sizing
from opdgraph.config.schema import PipelineConfig
from opdgraph.counts import EvalCounts, StepCounts, eval_counts
from opdgraph.cuda_overheads import overhead_buffers, stacked_qkv_bytes, targets_cuda
from opdgraph.placement import Placement
from opdgraph.plan import Buffer


def model_keys(cfg: PipelineConfig, name: str) -> tuple[str, ...]:
    """The config keys that decide a model's shape and dtype."""
    model = cfg.models[name]
    keys = [f"models.{name}.{key}" for key in ("path", "config", "init_from", "keep_layers")
            if getattr(model, key) is not None]
    if model.init_from is not None:
        keys += [key for key in model_keys(cfg, model.init_from) if not key.endswith(".dtype")]
    return (*keys, f"models.{name}.dtype")


def build_buffers(cfg: PipelineConfig, counts: StepCounts, fused: bool, world_size: int = 1) -> dict[str, Buffer]:
    student, teacher = cfg.model_with_role("student"), cfg.model_with_role("teacher")
    student_shape, teacher_shape = cfg.shapes[student], cfg.shapes[teacher]
    student_dtype, teacher_dtype = cfg.models[student].dtype_bytes, cfg.models[teacher].dtype_bytes
    rollout, scorer = cfg.stage("rollout"), cfg.stage("teacher_score")
    loss, backward = cfg.stage("loss"), cfg.stage("backward")
    student_keys, teacher_keys = model_keys(cfg, student), model_keys(cfg, teacher)
    batch_keys = ("data.prompts_per_step", "data.samples_per_prompt", "data.max_prompt_tokens",
                  f"{rollout.name}.max_new_tokens")
    micro_keys = (f"{scorer.name}.micro_batch_tokens", "data.max_prompt_tokens", f"{rollout.name}.max_new_tokens")
    pool_keys = (f"{rollout.name}.max_num_seqs", "data.max_prompt_tokens", f"{rollout.name}.max_new_tokens",
                 f"{rollout.name}.page_size", f"{rollout.name}.kv_pool_tokens")
    batch_tokens = counts.train_tokens
    micro_tokens = counts.micro_batch_tokens
    checkpointing = backward.config.activation_checkpointing
    between_phases = "transient" if cfg.pipeline.release_phase_buffers else "held"  # KV pool and gradients
    buffers = []

    def add(name, category, size, sized_by, lifetime="transient", formula="", offload=False):
        buffers.append(Buffer(name=name, category=category, bytes=int(size), sized_by=tuple(sized_by),
                              lifetime=lifetime, offload_when_idle=offload, formula=formula))

    shards, per_rank = world_size, (" / N" if world_size > 1 else "")
    add(f"{student}.weights", "weights", _ceil_div(sizing.parameter_bytes(student_shape, student_dtype), shards),
        student_keys, "held", "P x d" + per_rank, cfg.models[student].offload_when_idle)
    if cfg.models[student].dtype != "float32":
        add(f"{student}.master_weights", "master_weights", _ceil_div(sizing.master_weight_bytes(student_shape),
                                                                     shards), student_keys, "held", "P x 4" + per_rank)
    add(f"{student}.optimizer_state", "optimizer_state", _ceil_div(sizing.adamw_state_bytes(student_shape), shards),
        student_keys, "held", "P x 2 x 4" + per_rank)
    add(f"{teacher}.weights", "weights", sizing.parameter_bytes(teacher_shape, teacher_dtype), teacher_keys, "held",
        "P x d", cfg.models[teacher].offload_when_idle)
    add("prompts", "io", sizing.token_bytes(counts.sequences, counts.prompt_tokens), batch_keys[:3],
        formula="sequences x max_prompt_tokens x 4")
    stacked_qkv = stacked_qkv_bytes(cfg)
    add(f"{rollout.name}.kv_cache", "kv_cache",
        sizing.kv_cache_bytes(student_shape, counts.num_pages, counts.page_size, student_dtype) + stacked_qkv,
        (*pool_keys, *student_keys), between_phases, "num_pages x page_size x L x 2 x kv x d" + (
            " + L x (q + 2 kv) x (h + bias) x d (stacked q/k/v of the fused GPU rollout)" if stacked_qkv else ""))
    add(f"{rollout.name}.workspace", "workspace",
        sizing.forward_workspace_bytes(student_shape, rollout.config.prefill_token_budget, student_dtype)
        + sizing.decode_logits_bytes(counts.concurrent_seqs, student_shape.vocab),
        (f"{rollout.name}.prefill_token_budget", f"{rollout.name}.max_num_seqs", *student_keys),
        formula="prefill_token_budget x ((4 h + 3 i) x d + 4 x head_dim x d) (no-grad forward) + running seqs x V x 4")
    add("responses", "io", sizing.token_bytes(counts.sequences, counts.sequence_tokens, 2 * sizing.TOKEN_ID_BYTES),
        batch_keys, formula="sequences x (prompt + new tokens) x (4 id + 4 logprob)")
    hidden_tokens, hidden_keys = (micro_tokens, micro_keys) if fused else (batch_tokens, batch_keys)
    add("teacher_hidden", "teacher_hidden", sizing.hidden_state_bytes(teacher_shape, hidden_tokens, teacher_dtype),
        (*hidden_keys, *teacher_keys), formula="tokens x h_teacher x d")
    teacher_reference = reference_sequence_tokens(cfg, teacher, counts.sequence_tokens)
    add(f"{scorer.name}.workspace", "workspace",
        sizing.forward_workspace_bytes(teacher_shape, micro_tokens, teacher_dtype, teacher_reference),
        (*micro_keys, "pipeline.device", *teacher_keys),
        formula=_workspace_formula("micro-batch tokens", teacher_reference))
    add("student_hidden", "activations", sizing.hidden_state_bytes(student_shape, micro_tokens, student_dtype),
        (*micro_keys, *student_keys), formula="micro-batch tokens x h x d")
    kv_repeated = kv_heads_repeated(cfg, student)
    student_reference = reference_sequence_tokens(cfg, student, counts.sequence_tokens)
    per_layer = (f"a_reference (torch attention's S x S scores, S = {student_reference})" if student_reference
                 else "a (K/V heads repeated)" if kv_repeated else "a")
    add("student_activations", "activations",
        sizing.activation_bytes(student_shape, hidden_tokens, student_dtype, checkpointing, kv_repeated,
                                student_reference),
        (*hidden_keys, f"{backward.name}.activation_checkpointing", "pipeline.device", *student_keys),
        formula=f"tokens x (L x h x d + {per_layer} + o)" if checkpointing else f"tokens x (L x {per_layer} + o)")
    add("hidden_grad", "activations", sizing.hidden_state_bytes(student_shape, hidden_tokens, student_dtype),
        (*hidden_keys, *student_keys), formula="tokens x h x d")
    logit_bytes, logit_formula = _loss_logit_chunk(cfg, counts.chunk_tokens)
    add("logit_chunk", "logit_chunk", logit_bytes,
        (f"{loss.name}.chunk_tokens", f"{loss.name}.kernel", f"{loss.name}.divergence", "pipeline.device",
         *student_keys, *teacher_keys), formula=logit_formula)
    add(f"{backward.name}.workspace", "workspace",
        micro_tokens * sizing.activation_bytes_per_token_per_layer(student_shape, student_dtype, kv_repeated,
                                                                   student_reference),
        (*micro_keys, *student_keys), formula=f"micro-batch tokens x {per_layer} (one layer's activation grads)")
    buffers.append(_grads_buffer(cfg, world_size, between_phases))
    if world_size > 1:
        add(f"{student}.gathered_weights", "weights", sizing.parameter_bytes(student_shape, student_dtype),
            student_keys, formula="P x d (all-gathered for rollout)")
        layer = student_shape.layer_parameters() * student_dtype
        root = (student_shape.parameter_count() - student_shape.layers * student_shape.layer_parameters()) \
            * student_dtype
        add(f"{student}.fsdp_comm", "workspace", root + 3 * layer, student_keys,
            formula="root params x d + 3 x layer params x d (2 gathered + 1 unreduced grad)")
    buffers += overhead_buffers(cfg, student_keys)  # cuBLAS / flashinfer workspaces, CUDA-graph pool (CUDA only)
    for stage in cfg.stages_of_kind("eval"):
        buffers += _eval_buffers(cfg, eval_counts(cfg, stage.name), world_size)
    return {buffer.name: buffer for buffer in buffers}


def kv_heads_repeated(cfg: PipelineConfig, name: str) -> bool:
    """Whether the training forward of model `name` repeats its K/V heads before attention. The GPU's packed
    attention (kernels/varlen_attention.py) does so when FlashAttention varlen runs (a CUDA target, a 16-bit model,
    head_dim a multiple of 8 up to 256, fewer K/V heads than query heads) on a torch whose varlen_attn has no
    enable_gqa (before 2.12; the GPU machines run 2.11). The planner imports no torch and cannot know the run's
    torch: it plans the repeat, the larger of the two."""
    shape = cfg.shapes[name]
    return (targets_cuda(cfg) and cfg.models[name].dtype != "float32" and shape.kv_heads < shape.heads
            and shape.head_dim <= sizing.FLASH_MAX_HEAD_DIM and shape.head_dim % 8 == 0)


def attention_fallback(cfg: PipelineConfig, name: str) -> bool:
    """Whether model `name`'s packed attention (training, teacher scoring, eval scoring) runs as the plain-torch
    reference rather than FlashAttention varlen (kernels/varlen_attention.py unsupported_reason): a CPU target, an
    fp32 model, or head_dim over 256 or not a multiple of 8. A CUDA torch without a usable varlen_attn falls back
    too; the planner imports no torch and cannot see that (it plans the GPU machines' torch, which has one)."""
    head_dim = cfg.shapes[name].head_dim
    return (not targets_cuda(cfg) or cfg.models[name].dtype == "float32" or head_dim > sizing.FLASH_MAX_HEAD_DIM
            or head_dim % 8 != 0)


def reference_sequence_tokens(cfg: PipelineConfig, name: str, sequence_tokens: int) -> int:
    """S for sizing.py's reference-attention terms when model `name` falls back to it (the longest sequence a
    micro-batch can hold: max_prompt_tokens + max_new_tokens), else 0 (FlashAttention)."""
    return sequence_tokens if attention_fallback(cfg, name) else 0


def _workspace_formula(tokens: str, reference: int) -> str:
    mlp = f"{tokens} x ((4 h + 3 i) x d + 4 x head_dim x d) (no-grad forward, inside an MLP)"
    if not reference:
        return mlp
    return (f"max({mlp}, {tokens} x (2 h + 2 q + 2 kv + 4 head_dim) x d + S x q x d + S^2 x (heads x w + 1) "
            f"(torch attention's scores, S = {reference}; w = d + 8, fp32: 8))")


def _loss_logit_chunk(cfg: PipelineConfig, chunk_tokens: int) -> tuple[int, str]:
    """(bytes, formula) of the loss's per-chunk peak for the path that runs (sizing.py: Logit chunk). On a CUDA target
    loss.kernel "auto" is planned as the fused Triton kernel: the GPU install has triton (the gpu extra)."""
    vocab, loss = cfg.shapes[cfg.model_with_role("student")].vocab, cfg.stage("loss").config
    if targets_cuda(cfg) and loss.kernel != "torch":
        return (sizing.logit_chunk_bytes(chunk_tokens, vocab, sizing.FUSED_LOSS_LOGIT_BUFFERS, fused=True),
                "chunk x (2 V_student + 2) x 4 (fused kernel: student and teacher fp32 logits)")
    buffers = sizing.TORCH_LOSS_LOGIT_BUFFERS[loss.divergence]
    upcast = _cpu_upcast_hidden(cfg)
    formula = f"chunk x V_student x {buffers} x 4 (torch {loss.divergence}: fp32 logits and temporaries)"
    return (sizing.logit_chunk_bytes(chunk_tokens, vocab, buffers, upcast_hidden=upcast),
            formula + (" + V_student x (h_student + h_teacher) x 4 (fp32 lm_heads on CPU)" if upcast else ""))


def _cpu_upcast_hidden(cfg: PipelineConfig) -> int:
    """h_student + h_teacher where the loss upcasts both lm_heads to fp32 (a CPU target), else 0."""
    if targets_cuda(cfg):
        return 0
    return sum(cfg.shapes[cfg.model_with_role(role)].hidden for role in ("student", "teacher"))


def fp32_grads(cfg: PipelineConfig) -> bool:
    """Whether the student's gradients are summed in fp32 accumulators of their own (opdgraph.runtime.gradients):
    backward.grad_accumulation_dtype = "float32" and a student that is not fp32 already."""
    student = cfg.model_with_role("student")
    return (cfg.stage("backward").config.grad_accumulation_dtype == "float32"
            and cfg.models[student].dtype != "float32")


def _gib(size: int) -> str:
    return f"{size / 2**30:.2f} GiB"


def _grads_buffer(cfg: PipelineConfig, world_size: int, lifetime: str) -> Buffer:
    """`<student>.grads`, per rank: what the gradients of a step's micro-batches are summed in.

    fp32 (see fp32_grads): an fp32 accumulator per parameter (its shard with N ranks) plus the one bf16 gradient
    being folded in (unsharded: one parameter's; sharded: one FSDP unit's reduced shard). Unsharded, the lm_head's
    analytic gradient adds into its own accumulator; sharded, it has a full [V, h] fp32 one (each rank's
    contribution, summed over ranks at the optimizer step). Model dtype: param.grad (P x d) and the full fp32 lm_head accumulator. The
    formula of the fp32 buffer also gives the size in the model dtype: what grad_accumulation_dtype = "model" saves.
    """
    student, backward = cfg.model_with_role("student"), cfg.stage("backward").name
    shape, dtype_bytes = cfg.shapes[student], cfg.models[student].dtype_bytes
    keys = model_keys(cfg, student)
    if cfg.models[student].dtype != "float32":
        keys = (*keys, f"{backward}.grad_accumulation_dtype")
    lm_head = shape.vocab * shape.hidden * sizing.FP32_BYTES
    model_size = _ceil_div(sizing.gradient_bytes(shape, dtype_bytes), world_size) + lm_head
    if world_size == 1:
        model_formula = "P x d + V x h x 4 (fp32 lm_head grad accumulator)"
        fp32_size = sizing.fp32_gradient_bytes(shape, dtype_bytes)
        fp32_formula = ("P x 4 (fp32 accumulators; the lm_head grad adds into its own) + largest param x d (one "
                        "gradient being folded in)")
    else:
        model_formula = "P x d / N + V x h x 4 (full fp32 lm_head grad)"
        layer = shape.layer_parameters()
        unit = max(shape.parameter_count() - shape.layers * layer, layer)
        fp32_size = (_ceil_div(shape.parameter_count() * sizing.FP32_BYTES, world_size) + lm_head
                     + _ceil_div(unit * dtype_bytes, world_size))
        fp32_formula = ("P x 4 / N (fp32 accumulators of the shards) + V x h x 4 (full fp32 lm_head grad) + "
                        "max(root, layer) params x d / N (one unit's reduced gradient being folded in)")
    name = f"{student}.grads"
    if not fp32_grads(cfg):
        return Buffer(name=name, category="grads", bytes=model_size, sized_by=keys, lifetime=lifetime,
                      formula=model_formula)
    return Buffer(name=name, category="grads", bytes=fp32_size, sized_by=keys, lifetime=lifetime,
                  formula=f"{fp32_formula}; {backward}.grad_accumulation_dtype = \"model\" would hold "
                          f"{model_formula} = {_gib(model_size)}")


def _eval_buffers(cfg: PipelineConfig, counts: EvalCounts, world_size: int) -> list[Buffer]:
    """What an eval allocates (opdgraph.runtime.evaluation), all freed after the eval step: a KV pool for the
    student's answers and one for the teacher's (each engine's, sized by eval_counts), and one workspace for the
    larger of its two phases: generating, and scoring both models' answers in micro-batches."""
    student, teacher = cfg.model_with_role("student"), cfg.model_with_role("teacher")
    names = {"student": student, "teacher": teacher}
    shapes = {role: cfg.shapes[name] for role, name in names.items()}
    dtypes = {role: cfg.models[name].dtype_bytes for role, name in names.items()}
    rollout, stage = cfg.stage("rollout").name, counts.stage
    pool_keys = (f"{stage}.num_prompts", f"{rollout}.max_num_seqs", "data.max_prompt_tokens",
                 f"{stage}.max_new_tokens", f"{rollout}.page_size")
    budget = cfg.stage("rollout").config.prefill_token_budget
    generate = max(sizing.forward_workspace_bytes(shapes[role], budget, dtypes[role])
                   + sizing.decode_logits_bytes(counts.concurrent_seqs, shapes[role].vocab) for role in shapes)
    upcast = _cpu_upcast_hidden(cfg)
    metrics = sizing.logit_chunk_bytes(counts.chunk_tokens, shapes["student"].vocab,
                                       sizing.EVAL_METRICS_LOGIT_BUFFERS, upcast_hidden=upcast)
    metrics_formula = f"chunk x V_student x {sizing.EVAL_METRICS_LOGIT_BUFFERS} x 4 (metrics)" + (
        " + V_student x (h_s + h_t) x 4 (fp32 lm_heads on CPU)" if upcast else "")
    score = (sum(sizing.hidden_state_bytes(shapes[role], counts.micro_batch_tokens, dtypes[role]) for role in shapes)
             + max(sizing.forward_workspace_bytes(shapes[role], counts.micro_batch_tokens, dtypes[role],
                                                  reference_sequence_tokens(cfg, names[role], counts.sequence_tokens))
                   for role in shapes) + metrics)
    all_keys = (*pool_keys, f"{rollout}.prefill_token_budget", f"{cfg.stage('teacher_score').name}.micro_batch_tokens",
                f"{cfg.stage('loss').name}.chunk_tokens", "pipeline.device", *model_keys(cfg, student),
                *model_keys(cfg, teacher))
    eval_buffers = [
        Buffer(name=f"{stage}.kv_cache", category="kv_cache", lifetime="transient",
               bytes=sizing.kv_cache_bytes(shapes["student"], counts.num_pages, counts.page_size, dtypes["student"]),
               sized_by=(*pool_keys, *model_keys(cfg, student)),
               formula="eval pages x page_size x L x 2 x kv x d; eval pages = min(num_prompts, max_num_seqs) x "
                       "ceil((max_prompt_tokens + max_new_tokens) / page_size)"),
        Buffer(name=f"{stage}.teacher_kv_cache", category="kv_cache", lifetime="transient",
               bytes=sizing.kv_cache_bytes(shapes["teacher"], counts.num_pages, counts.page_size, dtypes["teacher"]),
               sized_by=(*pool_keys, *model_keys(cfg, teacher)),
               formula="eval pages x page_size x L_teacher x 2 x kv_teacher x d_teacher (the teacher's answers)"),
        Buffer(name=f"{stage}.workspace", category="workspace", lifetime="transient", bytes=max(generate, score),
               sized_by=all_keys,
               formula="max(prefill forward workspace + eval seqs x V x 4 of either model, "
                       "eval micro-batch tokens x (h_s d_s + h_t d_t) + larger forward workspace + "
                       f"{metrics_formula})"),
    ]
    if world_size > 1:  # the sharded student generates on gathered weights (scoring gathers one layer at a time)
        eval_buffers.append(Buffer(
            name=f"{stage}.gathered_weights", category="weights", lifetime="transient",
            bytes=sizing.parameter_bytes(shapes["student"], dtypes["student"]), sized_by=model_keys(cfg, student),
            formula="P x d (all-gathered for eval generation)"))
    return eval_buffers


def _ceil_div(size: int, parts: int) -> int:
    """Bytes per rank of a tensor set sharded `parts` ways (FSDP2 pads the last shard up to the others)."""
    return -(-size // parts)


def place_buffers(buffers: dict[str, Buffer], cfg: PipelineConfig, placement: Placement,
                  world_size: int = 1) -> dict[str, Buffer]:
    """The buffers with the placement applied (the input is not changed)."""
    student, teacher = cfg.model_with_role("student"), cfg.model_with_role("teacher")
    placed = dict(buffers)
    teacher_weights = placed[f"{teacher}.weights"]
    placed[teacher_weights.name] = attrs.evolve(
        teacher_weights, offload_when_idle=placement.teacher_weights in ("offload", "stream"))
    if placement.teacher_weights == "shard":
        placed.update(_sharded_teacher_buffers(teacher_weights, cfg, world_size))
    if world_size > 1 and placement.student_gather == "step":
        placed.update(_gathered_student_buffers(placed[f"{student}.fsdp_comm"], cfg, world_size))
    if placement.teacher_weights == "stream":
        shape, dtype_bytes = cfg.shapes[teacher], cfg.models[teacher].dtype_bytes
        placed[teacher_weights.name] = attrs.evolve(
            placed[teacher_weights.name], bytes=sizing.teacher_resident_bytes(shape, dtype_bytes),
            formula="(P - L x layer) x d: embedding, final norm, lm_head; layers streamed")
        placed[f"{teacher}.layer_stream"] = Buffer(
            name=f"{teacher}.layer_stream", category="weights", bytes=sizing.layer_stream_bytes(shape, dtype_bytes),
            sized_by=teacher_weights.sized_by, lifetime="transient", formula="2 x layer params x d (running + next)")
    if placement.optimizer_state == "offload":
        state_names = [name for name in (f"{student}.master_weights", f"{student}.optimizer_state") if name in placed]
        for name in state_names:
            placed[name] = attrs.evolve(placed[name], device="host")
        shape = cfg.shapes[student]
        placed[f"{student}.optimizer_stream"] = Buffer(
            name=f"{student}.optimizer_stream", category="optimizer_state",
            bytes=sizing.optimizer_stream_bytes(shape, separate_masters=len(state_names) == 2),
            sized_by=placed[f"{student}.optimizer_state"].sized_by, lifetime="transient",
            formula="largest bucket x (state + fp32 grad + denominator) bytes per element")
    return placed


def _gathered_student_buffers(comm: Buffer, cfg: PipelineConfig, world_size: int) -> dict[str, Buffer]:
    """The student gathered for the whole step: whole gradients, and only the last backward's reduce-scatter.

    With fp32 gradient sums (fp32_grads) FSDP keeps the whole gradients in fp32 (P x 4, plus one unit's gradient
    in the model dtype before FSDP adds it in) and reduce-scatters them in fp32 (its inputs x 4, and a shard-sized
    fp32 output that becomes the d-byte gradient `<student>.grads` folds in)."""
    student = cfg.model_with_role("student")
    shape, dtype_bytes = cfg.shapes[student], cfg.models[student].dtype_bytes
    grads = f"{student}.unsharded_grads"
    layer = shape.layer_parameters()
    root = shape.parameter_count() - shape.layers * layer
    unit = max(root, layer)
    # The root (embedding, final norm, lm_head) is reduce-scattered last: its copy for the exchange beside the
    # previous layer's (a big vocabulary's root can be larger than several layers).
    if fp32_grads(cfg):
        whole = Buffer(name=grads, category="grads",
                       bytes=shape.parameter_count() * sizing.FP32_BYTES + unit * dtype_bytes,
                       sized_by=comm.sized_by + (f"{cfg.stage('backward').name}.grad_accumulation_dtype",),
                       lifetime="transient", spans_loops=True,
                       formula="P x 4 + max(root, layer) params x d (whole gradients summed in fp32 and one unit's "
                               "being added; reduce-scattered by the last micro-batch's backward)")
        exchange = attrs.evolve(comm, bytes=(unit + layer) * sizing.FP32_BYTES
                                + _ceil_div(unit * sizing.FP32_BYTES, world_size),
                                formula="(max(root, layer) + layer) params x 4 + max(root, layer) params x 4 / N (the "
                                        "fp32 gradients being reduce-scattered, and a unit's fp32 output)")
        return {grads: whole, comm.name: exchange}
    return {grads: Buffer(name=grads, category="grads", bytes=sizing.gradient_bytes(shape, dtype_bytes),
                          sized_by=comm.sized_by, lifetime="transient", spans_loops=True,
                          formula="P x d (whole gradients, reduce-scattered by the last micro-batch's backward)"),
            comm.name: attrs.evolve(comm, bytes=(unit + layer) * dtype_bytes,
                                    formula="(max(root, layer) + layer) params x d (the gradients being "
                                            "reduce-scattered)")}


def _sharded_teacher_buffers(weights: Buffer, cfg: PipelineConfig, world_size: int) -> dict[str, Buffer]:
    """The teacher's FSDP2 shard and what its forwards gather (see the module docstring)."""
    if world_size == 1:
        raise ValueError("teacher_weights = 'shard' needs several ranks (world_size > 1); this plan is for one process")
    teacher = cfg.model_with_role("teacher")
    shape, dtype_bytes = cfg.shapes[teacher], cfg.models[teacher].dtype_bytes
    full = sizing.parameter_bytes(shape, dtype_bytes)
    sharded = {weights.name: attrs.evolve(weights, bytes=_ceil_div(full, world_size),
                                          formula="P x d / N (FSDP2 shard)")}
    gathered = [("gathered_layer", sizing.layer_stream_bytes(shape, dtype_bytes),
                 "2 x layer params x d (the running layer + the prefetched next one)"),
                ("gathered_root", sizing.teacher_resident_bytes(shape, dtype_bytes),
                 "(P - L x layer) x d: embedding, final norm, lm_head, gathered until the loss is done")]
    if cfg.stages_of_kind("eval"):
        gathered.append(("gathered_weights", full, "P x d (all-gathered for eval's teacher generation)"))
    for suffix, size, formula in gathered:
        name = f"{teacher}.{suffix}"
        sharded[name] = Buffer(name=name, category="weights", bytes=size, sized_by=weights.sized_by,
                               lifetime="transient", formula=formula)
    return sharded
