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
import math
from typing import Callable

import attrs

from opdgraph import work as W
from opdgraph.planned_paths import (attention_fallback, fp32_grads, linear_core, model_keys,
                                     with_linear_core_keys)
from opdgraph.config.schema import PipelineConfig
from opdgraph.counts import EvalCounts, StepCounts, eval_counts, step_settings
from opdgraph.cuda_overheads import stacked_qkv_bytes, targets_cuda, uses_flashinfer
from opdgraph.graph import build_stage_graph, stage_order
from opdgraph.model_shapes import ModelShape
from opdgraph.stages import KIND_NAMES, named_settings, stage_kind, stage_nodes
from opdgraph.teachers import TeacherSpec, TrainGroup, route_field, teacher_specs, train_groups



@attrs.frozen(kw_only=True)
class TeacherFacts:
    """One teacher stage as its plan functions and the loss's see it (opdgraph.teachers.TeacherSpec + sizes)."""

    spec: TeacherSpec
    shape: ModelShape
    dtype_bytes: int
    keys: tuple[str, ...]  # the config keys that size its weights (the student's for a self-teacher)
    attention_fallback: bool

    @property
    def weight_bytes(self) -> int:
        return self.shape.parameter_count() * self.dtype_bytes

    @property
    def weights_buffer(self) -> str:
        return f"{self.spec.weights}.weights"


@attrs.frozen(kw_only=True)
class StageFacts:
    student: str  # the [models.<name>] of the student
    teacher: str  # the first teacher stage's weights prefix (its model; `<student>.initial` for a frozen self-teacher)
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
    stage_names: dict[str, str]  # kind -> the table name of the (first) stage of that kind (a stage's own kind)
    setting_keys: dict[str, str]  # step setting -> its dotted key (`rollout.max_new_tokens`): counts.setting_key
    prefill_token_budget: int  # the rollout's; eval generates with the same engine settings
    activation_checkpointing: bool  # the backward's; it sets what the student forward saves
    fp32_grads: bool  # planned_paths.fp32_grads: the gradients are summed in fp32 accumulators of their own
    between_phases: str  # lifetime of the rollout KV pool and the gradients: "transient", or "held" (no releases)
    targets_cuda: bool
    linear_core: str | None  # planned_paths.linear_core: "fla" or "torch" for hybrid models' linear layers, else None
    uses_flashinfer: bool  # the rollout decodes with flashinfer (and captures decode graphs)
    stacked_qkv_bytes: int  # the fused GPU rollout's stacked q/k/v weights (0 otherwise)
    student_attention_fallback: bool  # buffers.attention_fallback per model
    teacher_attention_fallback: bool
    eval_counts: Callable[[str], EvalCounts]  # an eval stage's pool and batch sizes (counts.eval_counts)
    teachers: tuple[TeacherFacts, ...] = ()  # every teacher stage, in stage-graph order
    groups: tuple[TrainGroup, ...] = ()  # the fused plan's micro-batch loops (one unless rows are routed)
    group: TrainGroup = TrainGroup(name="", teachers=())  # the loop a micro-batch stage is being planned for

    @property
    def fla_linear_core(self) -> bool:
        return self.linear_core == "fla"

    @staticmethod
    def with_linear_core_keys(keys: tuple[str, ...], *shapes: ModelShape) -> tuple[str, ...]:
        """planned_paths.with_linear_core_keys, for the stage modules (which import nothing of the planner)."""
        return with_linear_core_keys(keys, *shapes)

    def in_group(self, group: TrainGroup) -> "StageFacts":
        return attrs.evolve(self, group=group)

    def local(self, name: str) -> str:
        """A group-local step or buffer name (unchanged unless a routed fused plan has several loops)."""
        return self.group.local(name) if self.fused else name

    def teacher_stage(self, stage_name: str) -> TeacherFacts:
        return next(teacher for teacher in self.teachers if teacher.spec.stage == stage_name)

    @property
    def group_teachers(self) -> tuple[TeacherFacts, ...]:
        """The teachers whose outputs the loss reads in the micro-batches being planned (all, unfused)."""
        if not self.fused or not self.group.teachers:
            return self.teachers
        return tuple(teacher for teacher in self.teachers if teacher.spec.stage in self.group.teachers)

    @property
    def group_micro_batches(self) -> int:
        """Micro-batches per step in the loop being planned; routed rows are counted as split evenly across the
        teachers (the loop's time; its buffers are sized per micro-batch, whatever the split)."""
        if len(self.groups) <= 1:
            return self.counts.num_micro_batches
        return math.ceil(self.counts.sequences / len(self.groups) / self.counts.sequences_per_micro_batch)

    def teacher_micro_batch_tokens(self, teacher: TeacherFacts) -> int:
        """Tokens of one teacher forward: the micro-batch's sequences with the teacher's own prompts (and the gold
        prefix after them, its context in a hybrid SFT pipeline)."""
        return self.counts.sequences_per_micro_batch * self.teacher_sequence_tokens(teacher)

    def teacher_sequence_tokens(self, teacher: TeacherFacts) -> int:
        return teacher.spec.prompt_tokens + self.counts.gold_prefix_tokens + self.counts.new_tokens

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
        return "a"

    @property
    def cpu_upcast_hidden(self) -> int:
        """h_student + h_teacher where the loss upcasts both lm_heads to fp32 (a CPU target), else 0 (the teacher
        of the loop being planned; a mixture's are summed by the loss itself)."""
        teacher = self.group_teachers[0].shape if self.group_teachers else self.teacher_shape
        return 0 if self.targets_cuda else self.student_shape.hidden + teacher.hidden

    @property
    def batch_keys(self) -> tuple[str, ...]:
        """The keys that size one step's batch of sequences."""
        return ("data.prompts_per_step", "data.samples_per_prompt", "data.max_prompt_tokens",
                self.setting_keys["max_new_tokens"], *self.gold_keys)

    @property
    def micro_keys(self) -> tuple[str, ...]:
        """The keys that size one training micro-batch."""
        return (self.setting_keys["micro_batch_tokens"], "data.max_prompt_tokens", self.setting_keys["max_new_tokens"],
                *self.gold_keys)

    @property
    def gold_keys(self) -> tuple[str, ...]:
        """The gold prefix's bound (hybrid SFT): part of every sequence's prompt side."""
        key = self.setting_keys.get("gold_prefix_max_tokens")
        return (key,) if key else ()

    @property
    def crossing_tokens(self) -> tuple[int, tuple[str, ...]]:
        """(tokens, sized-by keys) of a value passed from one training stage to the next: one micro-batch's when the
        stages are fused, the whole batch's when each stage runs over the batch before the next."""
        if self.fused:
            return self.counts.micro_batch_tokens, self.micro_keys
        return self.counts.train_tokens, self.batch_keys

    @property
    def scored_crossing_tokens(self) -> tuple[int, tuple[str, ...]]:
        """crossing_tokens without the gold-prefix positions (hybrid SFT): the positions the divergence and the
        teacher's kept hidden states cover (the sft stage trains the prefix, with no teacher)."""
        if self.fused:
            return self.counts.scored_micro_batch_tokens, self.micro_keys
        return self.counts.train_tokens - self.counts.sequences * self.counts.gold_prefix_tokens, self.batch_keys

    def loop(self, stage_name: str) -> tuple[str, ...]:
        """The micro-batch loop a training stage's steps run in."""
        return (self.group.loop,) if self.fused else (f"{stage_name}.micro_batch",)


def teacher_facts(cfg: PipelineConfig) -> tuple[TeacherFacts, ...]:
    """Every teacher stage with its model's shape, dtype and sizing keys, in stage-graph order."""
    specs = {spec.stage: spec for spec in teacher_specs(cfg.models, cfg.stages, cfg.data.max_prompt_tokens)}
    facts = []
    for name in ordered_stages(cfg):
        if name not in specs:
            continue
        spec = specs[name]
        keys = model_keys(cfg, spec.model)
        if spec.self_teacher:
            keys = (*keys, f"{name}.model", f"{name}.frozen")
        facts.append(TeacherFacts(spec=spec, shape=cfg.shapes[spec.model], dtype_bytes=cfg.models[spec.model].dtype_bytes,
                                  keys=keys, attention_fallback=attention_fallback(cfg, spec.model)))
    return tuple(facts)


def stage_facts(cfg: PipelineConfig, counts: StepCounts, hardware: W.Hardware, world_size: int) -> StageFacts:
    teachers = teacher_facts(cfg)
    groups = tuple(train_groups([t.spec for t in teachers], bool(route_field(cfg.stages)) and len(teachers) > 1))
    student, teacher = cfg.model_with_role("student"), teachers[0].spec.weights
    teacher_model = teachers[0].spec.model
    names, settings = {}, step_settings(cfg)
    for name, stage in cfg.stages.items():
        names.setdefault(stage.kind, name)
    return StageFacts(
        student=student, teacher=teacher, student_shape=cfg.shapes[student], teacher_shape=teachers[0].shape,
        student_dtype_bytes=cfg.models[student].dtype_bytes, teacher_dtype_bytes=teachers[0].dtype_bytes,
        student_fp32=cfg.models[student].dtype == "float32", student_keys=model_keys(cfg, student),
        teacher_keys=teachers[0].keys, counts=counts, hardware=hardware, fused=cfg.pipeline.fuse_training,
        world_size=world_size, stage_names=names,
        setting_keys={name: f"{owner}.{name}"
                      for name, (owner, _) in named_settings(cfg.stages, "step_settings").items()},
        prefill_token_budget=settings["prefill_token_budget"],
        activation_checkpointing=settings["activation_checkpointing"], fp32_grads=fp32_grads(cfg),
        between_phases="transient" if cfg.pipeline.release_phase_buffers else "held",
        targets_cuda=targets_cuda(cfg), linear_core=linear_core(cfg),
        uses_flashinfer=uses_flashinfer(cfg), stacked_qkv_bytes=stacked_qkv_bytes(cfg),
        student_attention_fallback=attention_fallback(cfg, student),
        teacher_attention_fallback=attention_fallback(cfg, teacher_model),
        eval_counts=functools.partial(eval_counts, cfg), teachers=teachers, groups=groups, group=groups[0])


def ordered_stages(cfg: PipelineConfig) -> list[str]:
    """The stage table names in execution order (opdgraph.graph.stage_order)."""
    return stage_order(build_stage_graph(stage_nodes(cfg.stages)), {kind: rank for rank, kind in enumerate(KIND_NAMES)})



def planned_stages(cfg: PipelineConfig, facts: StageFacts):
    """(stage name, facts to plan it with) in execution order. Fused with routed rows, the micro-batch stages are
    planned once per teacher loop (TrainGroup), each loop holding only its own teacher's stage; otherwise once."""
    names = ordered_stages(cfg)
    micro = [name for name in names if stage_kind(cfg.stages[name].kind).micro_batch]
    teachers = {teacher.spec.stage for teacher in facts.teachers}
    for name in names:
        if name not in micro or not facts.fused or len(facts.groups) <= 1:
            yield name, facts
        elif name == micro[0]:
            for group in facts.groups:
                for member in micro:
                    if member not in teachers or member in group.teachers:
                        yield member, facts.in_group(group)
