"""The teacher stages of a pipeline as the planner, the config checks and the runtime all see them. No torch.

A pipeline has one or more `teacher_score` stages (`[teacher_score]`, or `[teacher_score.<name>]` tables). Each
names the model that scores (`model`): a teacher-role model, or the student itself (self-distillation): with
`frozen = true` (the default) a copy of the initial student, with weights of its own (`<student>.initial.weights`
in the plan); with `frozen = false` the live student under no_grad, before the student's forward (no weights of its
own). A teacher may see another prompt than the student (`system_prompt`, `context_field` + `context_template`).

Several teachers combine in one of two ways, chosen by the loss:
- routing (`loss.route_field`): each prompt row names its teacher by the value of that field; a teacher stage
  scores the rows whose value is in its `route` (default: its short name, `math` for `[teacher_score.math]`).
  Training micro-batches group rows by teacher, so a fused plan has one micro-batch loop per teacher
  (`TrainGroup`), and a teacher's weights are needed only during its own loop.
- mixture (`mixture_weight` on every teacher, summing to one): every row is scored by every teacher and the loss
  takes the divergence against p_T = sum_k w_k p_Tk.

Value and buffer names derive from the stage's name, so two stages of one kind never collide: the stage named
after its kind keeps the plain names (`teacher_hidden`), `[teacher_score.math]` writes `teacher_hidden.math`.
Group-local buffers and steps of a routed fused plan are prefixed with the group's name (`math/loss`).
"""

from __future__ import annotations

import attrs

HIDDEN = "teacher_hidden"
FUSED_LOOP = "train_micro_batch"  # the one micro-batch loop of the fused stages (pipeline.fuse_training)


def short_name(stage_name: str, kind: str) -> str:
    """'' for the stage named after its kind, 'math' for 'teacher_score.math', else the stage's own name."""
    if stage_name == kind:
        return ""
    return stage_name[len(kind) + 1:] if stage_name.startswith(kind + ".") else stage_name


def derived_value(base: str, stage_name: str, kind: str) -> str:
    """The value a stage writes: `base` for the stage named after its kind, `base.<short name>` otherwise."""
    short = short_name(stage_name, kind)
    return f"{base}.{short}" if short else base


@attrs.frozen(kw_only=True)
class TeacherSpec:
    stage: str  # the stage's table name
    short: str  # its short name ('' for the stage named after its kind, 'math' for [teacher_score.math])
    model: str  # the [models.<name>] it names
    weights: str  # the model prefix of its weights buffer (`<weights>.weights`)
    self_teacher: bool  # it names the student
    own_weights: bool  # False for a live self-teacher: it scores with the student's weights
    hidden: str  # the value it writes
    routes: tuple[str, ...]  # route values it scores (routing only)
    mixture_weight: float | None
    prompt_tokens: int  # the teacher-side prompt limit
    has_context: bool  # it sees another prompt than the student

    @property
    def group(self) -> str:
        return self.short or self.stage


@attrs.frozen(kw_only=True)
class TrainGroup:
    """One micro-batch loop of a fused plan: its name ('' when there is one loop), the teachers that score its
    micro-batches, and the prefix of its group-local steps and buffers."""

    name: str
    teachers: tuple[str, ...]

    @property
    def prefix(self) -> str:
        return f"{self.name}/" if self.name else ""

    @property
    def loop(self) -> str:
        return f"{self.prefix}{FUSED_LOOP}"

    def local(self, name: str) -> str:
        return f"{self.prefix}{name}"


def student_name(models: dict) -> str | None:
    return next((name for name, model in models.items() if model.role == "student"), None)


def teacher_specs(models: dict, stages: dict, data_prompt_tokens: int) -> list[TeacherSpec]:
    """The teacher stages in table order (the compiler orders them by the stage graph, ties by name): every stage
    whose kind scores with a teacher (its module's `teacher_spec` hook: opdgraph.stages.teacher_specs_of)."""
    from opdgraph.stages import teacher_specs_of  # the stage modules import this module: imported when called

    return teacher_specs_of(stages, models, data_prompt_tokens)


def route_field(stages: dict) -> str:
    """The loss's route field ('' when rows are not routed)."""
    return route_setting(stages)[1]


def route_setting(stages: dict) -> tuple[str, str]:
    """(the stage that publishes route_field, its value): the loss's, found by name (stages.named_settings);
    ("", "") without one."""
    from opdgraph.stages import named_settings  # the stage modules import this package's neighbours

    return named_settings(stages, "step_settings").get("route_field", ("", ""))


def train_groups(specs: list[TeacherSpec], routed: bool) -> list[TrainGroup]:
    """One group per teacher when routed, else one group of every teacher."""
    if routed:
        return [TrainGroup(name=spec.group, teachers=(spec.stage,)) for spec in specs]
    return [TrainGroup(name="", teachers=tuple(spec.stage for spec in specs))]


def teacher_weights(cfg) -> dict[str, str]:
    """weights prefix -> the model whose shape and dtype it has, for every teacher with weights of its own (a
    teacher model named by several stages is held once)."""
    specs = teacher_specs(cfg.models, cfg.stages, cfg.data.max_prompt_tokens)
    return {spec.weights: spec.model for spec in specs if spec.own_weights}
