"""What the compiler tells each stage kind's plan functions: one small StageFacts record, built once per plan.

Every `opdgraph.stages.<kind>` module plans its own part of a training step with
`plan_steps(stage_name, config, facts) -> list[Draft]` and `plan_buffers(stage_name, config, facts) -> list[Buffer]`
(opdgraph.compile and opdgraph.buffers walk the ordered stages and collect them). A stage sees its own Config and
these facts, never the whole PipelineConfig: the models' names, shapes and dtypes, the step's counts, the hardware,
the fused flag, the number of ranks, and the few cross-stage settings and target-dependent booleans that the old
single-loop compiler read from the config (computed here, once). No torch.
"""

from __future__ import annotations

import functools
from typing import Callable

import attrs

from opdgraph import work as W
from opdgraph.planned_paths import attention_fallback, fp32_grads, kv_heads_repeated, model_keys
from opdgraph.config.schema import PipelineConfig
from opdgraph.counts import EvalCounts, StepCounts, eval_counts
from opdgraph.cuda_overheads import stacked_qkv_bytes, targets_cuda, uses_flashinfer
from opdgraph.graph import StageNode, build_stage_graph, stage_order
from opdgraph.model_shapes import ModelShape
from opdgraph.stages import KIND_NAMES, stage_kind

FUSED_LOOP = "train_micro_batch"  # the one micro-batch loop of the fused stages (pipeline.fuse_training)


@attrs.frozen(kw_only=True)
class StageFacts:
    student: str  # the [models.<name>] of the student and of the teacher
    teacher: str
    student_shape: ModelShape
    teacher_shape: ModelShape
    student_dtype_bytes: int
    teacher_dtype_bytes: int
    student_fp32: bool  # the student's weights are fp32 (no separate master weights)
    student_keys: tuple[str, ...]  # the config keys that size each model (buffers.model_keys)
    teacher_keys: tuple[str, ...]
    counts: StepCounts
    hardware: W.Hardware
    fused: bool
    world_size: int
    stage_names: dict[str, str]  # kind -> the table name of the (first) stage of that kind
    prefill_token_budget: int  # the rollout's; eval generates with the same engine settings
    activation_checkpointing: bool  # the backward's; it sets what the student forward saves
    fp32_grads: bool  # planned_paths.fp32_grads: the gradients are summed in fp32 accumulators of their own
    between_phases: str  # lifetime of the rollout KV pool and the gradients: "transient", or "held" (no releases)
    targets_cuda: bool
    uses_flashinfer: bool  # the rollout decodes with flashinfer (and captures decode graphs)
    stacked_qkv_bytes: int  # the fused GPU rollout's stacked q/k/v weights (0 otherwise)
    student_kv_repeated: bool  # buffers.kv_heads_repeated for the student
    student_attention_fallback: bool  # buffers.attention_fallback per model
    teacher_attention_fallback: bool
    eval_counts: Callable[[str], EvalCounts]  # an eval stage's pool and batch sizes (counts.eval_counts)

    @property
    def student_weight_bytes(self) -> int:
        return self.student_shape.parameter_count() * self.student_dtype_bytes

    @property
    def teacher_weight_bytes(self) -> int:
        return self.teacher_shape.parameter_count() * self.teacher_dtype_bytes

    def reference_tokens(self, role: str, sequence_tokens: int) -> int:
        """S of sizing.py's reference-attention terms for the student or teacher (0: FlashAttention runs)."""
        fallback = self.student_attention_fallback if role == "student" else self.teacher_attention_fallback
        return sequence_tokens if fallback else 0

    @property
    def activation_label(self) -> str:
        """The per-layer term of the student's saved activations in buffer formulas (sizing.py)."""
        reference = self.reference_tokens("student", self.counts.sequence_tokens)
        if reference:
            return f"a_reference (torch attention's S x S scores, S = {reference})"
        return "a (K/V heads repeated)" if self.student_kv_repeated else "a"

    @property
    def cpu_upcast_hidden(self) -> int:
        """h_student + h_teacher where the loss upcasts both lm_heads to fp32 (a CPU target), else 0."""
        return 0 if self.targets_cuda else self.student_shape.hidden + self.teacher_shape.hidden

    @property
    def batch_keys(self) -> tuple[str, ...]:
        """The keys that size one step's batch of sequences."""
        return ("data.prompts_per_step", "data.samples_per_prompt", "data.max_prompt_tokens",
                f"{self.stage_names['rollout']}.max_new_tokens")

    @property
    def micro_keys(self) -> tuple[str, ...]:
        """The keys that size one training micro-batch."""
        return (f"{self.stage_names['teacher_score']}.micro_batch_tokens", "data.max_prompt_tokens",
                f"{self.stage_names['rollout']}.max_new_tokens")

    @property
    def crossing_tokens(self) -> tuple[int, tuple[str, ...]]:
        """(tokens, sized-by keys) of a value passed from one training stage to the next: one micro-batch's when the
        stages are fused, the whole batch's when each stage runs over the batch before the next."""
        if self.fused:
            return self.counts.micro_batch_tokens, self.micro_keys
        return self.counts.train_tokens, self.batch_keys

    def loop(self, stage_name: str) -> tuple[str, ...]:
        """The micro-batch loop a training stage's steps run in."""
        return (FUSED_LOOP,) if self.fused else (f"{stage_name}.micro_batch",)


def stage_facts(cfg: PipelineConfig, counts: StepCounts, hardware: W.Hardware, world_size: int) -> StageFacts:
    student, teacher = cfg.model_with_role("student"), cfg.model_with_role("teacher")
    names = {}
    for name, stage in cfg.stages.items():
        names.setdefault(stage.kind, name)
    return StageFacts(
        student=student, teacher=teacher, student_shape=cfg.shapes[student], teacher_shape=cfg.shapes[teacher],
        student_dtype_bytes=cfg.models[student].dtype_bytes, teacher_dtype_bytes=cfg.models[teacher].dtype_bytes,
        student_fp32=cfg.models[student].dtype == "float32", student_keys=model_keys(cfg, student),
        teacher_keys=model_keys(cfg, teacher), counts=counts, hardware=hardware, fused=cfg.pipeline.fuse_training,
        world_size=world_size, stage_names=names,
        prefill_token_budget=cfg.stage("rollout").config.prefill_token_budget,
        activation_checkpointing=cfg.stage("backward").config.activation_checkpointing, fp32_grads=fp32_grads(cfg),
        between_phases="transient" if cfg.pipeline.release_phase_buffers else "held",
        targets_cuda=targets_cuda(cfg), uses_flashinfer=uses_flashinfer(cfg), stacked_qkv_bytes=stacked_qkv_bytes(cfg),
        student_kv_repeated=kv_heads_repeated(cfg, student),
        student_attention_fallback=attention_fallback(cfg, student),
        teacher_attention_fallback=attention_fallback(cfg, teacher),
        eval_counts=functools.partial(eval_counts, cfg))


def ordered_stages(cfg: PipelineConfig) -> list[str]:
    """The stage table names in execution order (opdgraph.graph.stage_order)."""
    nodes = [StageNode(name, stage.kind, stage_kind(stage.kind).reads, stage_kind(stage.kind).writes)
             for name, stage in cfg.stages.items()]
    return stage_order(build_stage_graph(nodes), {kind: rank for rank, kind in enumerate(KIND_NAMES)})

