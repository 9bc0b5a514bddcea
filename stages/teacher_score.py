"""Teacher-score stage: the teacher runs over prompt + response and keeps its final hidden states.

Reads `responses`, writes `teacher_hidden` (final-norm hidden states; the loss applies the teacher's lm_head chunk by
chunk, so full teacher logits never exist). micro_batch_tokens also sets the fused training micro-batch.
Its config checks (opdgraph.config.checks) cover the teacher stages together (`check_stages`: the models they name,
routing or a mixture, `frozen`) and each one's lengths (`check_pipeline`).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import attrs

from opdgraph import sizing
from opdgraph import work as W
from opdgraph.config.fields import non_negative, positive, setting, unit_interval
from opdgraph.drafts import TEACHER_FORWARD, Draft, buffer
from opdgraph.plan import Buffer
from opdgraph.teachers import HIDDEN, TeacherSpec, derived_value, short_name, student_name

if TYPE_CHECKING:  # the compiler's facts and the runtime's inputs; types only, so importing a stage stays light
    from opdgraph.runtime.stage_inputs import StageInputs
    from opdgraph.stage_plan import StageFacts

KIND = "teacher_score"  # this module's kind: the short names of [teacher_score.<name>] tables derive from it
READS = ("responses",)
MICRO_BATCH = True  # runs once per training micro-batch (fused with the other such stages into one loop)
WRITES = ("teacher_hidden",)
MODEL_FIELDS = ("model",)
MIXTURE_TOLERANCE = 1e-6


def _template(value) -> str | None:
    if "{context}" not in value:
        return "must contain {context} (where the row's context_field goes); {prompt} places the student's prompt"
    try:
        value.format(context="", prompt="")
    except (KeyError, IndexError, ValueError) as error:
        return (f"only {{context}} and {{prompt}} may appear in braces (write {{{{ and }}}} for literal braces): "
                f"{error!r}")
    return None


@attrs.frozen(kw_only=True)
class Config:
    model: str = setting("teacher", help="the [models.<name>] entry that scores; the student's name scores with the "
                                         "student itself (self-distillation, see frozen)")
    micro_batch_tokens: int = setting(4096, help="packed tokens per teacher forward (and per training micro-batch)",
                                      check=positive)
    frozen: bool | None = setting(None, help="model = the student only: true (default) scores with a frozen copy of "
                                             "the initial student (weights of its own); false with the live student "
                                             "under no_grad, before its forward (no extra weights)")
    system_prompt: str = setting("", help="the teacher sees this system message instead of the student's (the "
                                          "student's prompt is otherwise the same); '' = the student's")
    context_field: str = setting("", help="a prompt-row field placed into the teacher's last user message with "
                                          "context_template (e.g. a reference solution the student does not see)")
    context_template: str = setting("{prompt}\n\n{context}", help="how the teacher's last user message is built: "
                                    "{prompt} = the student's message, {context} = the row's context_field",
                                    check=_template)
    max_prompt_tokens: int = setting(0, help="most tokens of the teacher's prompt (0 = data.max_prompt_tokens); a "
                                             "longer teacher prompt is an error naming the row", check=non_negative)
    route: list[str] = setting([], help="with loss.route_field: the route values whose rows this teacher scores "
                                        "(default: the table's short name, math for [teacher_score.math])")
    mixture_weight: float | None = setting(None, help="with several teachers and no routing: this teacher's weight "
                                                      "w_k in p_T = sum_k w_k p_Tk (the weights sum to 1)",
                                           check=unit_interval)

    def cross_problems(self):
        if self.context_field == "" and self.context_template != "{prompt}\n\n{context}":
            yield "context_template", "context_template needs context_field (the row field it places)"
        if len(set(self.route)) != len(self.route):
            yield "route", f"route lists a value twice: {self.route}"


def values(stage_name: str, config: Config, stages: dict) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """Writes `teacher_hidden` (the stage named after its kind) or `teacher_hidden.<short name>`."""
    return READS, (derived_value(HIDDEN, stage_name, KIND),)


def teacher_spec(stage_name: str, config: Config, models: dict, data_prompt_tokens: int) -> TeacherSpec:
    """This stage as the planner, the config checks and the runtime see a teacher (opdgraph.teachers): the model it
    names, whose weights it scores with (a frozen self-teacher: a copy of the initial student's), the value it
    writes, its routes, mixture weight and prompt limit."""
    student = student_name(models)
    self_teacher = config.model == student
    frozen = config.frozen is not False
    short = short_name(stage_name, KIND)
    return TeacherSpec(
        stage=stage_name, short=short, model=config.model,
        weights=(f"{student}.initial" if frozen else student) if self_teacher else config.model,
        self_teacher=self_teacher, own_weights=not self_teacher or frozen,
        hidden=derived_value(HIDDEN, stage_name, KIND),
        routes=tuple(config.route) or (short or stage_name,), mixture_weight=config.mixture_weight,
        prompt_tokens=config.max_prompt_tokens or data_prompt_tokens,
        has_context=bool(config.system_prompt or config.context_field))


def step_settings(config: Config) -> dict[str, int]:
    """micro_batch_tokens also sizes the training micro-batch of every stage (opdgraph.counts)."""
    return {"micro_batch_tokens": config.micro_batch_tokens}


def check_stages(teachers: dict[str, Config], view, problem) -> list:
    """Config-time checks across the teacher stages (opdgraph.config.checks; opdgraph.teachers): which model each
    names, how several combine (routing or a mixture), self-distillation's `frozen`, and the settings the training
    micro-batch shares. Each problem names the stage table and what to do."""
    problems = []
    _check_models(view.models, teachers, student_name(view.models), problem, problems)
    _check_combination(view.step_settings.get("route_field", ("", "")), teachers, problem, problems)
    first = next(iter(teachers), None)
    for name, config in teachers.items():
        tokens, first_tokens = config.micro_batch_tokens, teachers[first].micro_batch_tokens
        if tokens != first_tokens:
            problems.append(problem(f"{name}.micro_batch_tokens", (
                f"[{name}] micro_batch_tokens = {tokens} but [{first}] has {first_tokens}: every teacher scores the "
                f"same training micro-batches; give them one value")))
    return problems


def _check_models(models, teachers, student, problem, problems) -> None:
    used = set()
    for name, config in teachers.items():
        model = models.get(config.model)
        used.add(config.model)
        if model is None:
            continue  # reported by the stage-model check, with a did-you-mean
        if model.role != "teacher" and config.model != student:
            problems.append(problem(f"{name}.model", f"[{name}] scores with [models.{config.model}], which has role "
                                                     f"= \"{model.role}\"; name a teacher or the student"))
        if config.frozen is not None and config.model != student:
            problems.append(problem(f"{name}.frozen", (
                f"frozen applies to a teacher stage that scores with the student ([models.{student}]); "
                f"[models.{config.model}] is a teacher and never trained: remove frozen")))
        context = config.system_prompt or config.context_field
        if config.model == student and config.frozen is False and not context:
            problems.append(problem(f"{name}.frozen", (
                f"[{name}] scores with the live student on the student's own prompt: its distribution is the "
                f"student's, so the divergence is zero; give the teacher context (system_prompt or "
                f"context_field) or set frozen = true")))
    offload = {name: model.offload_when_idle for name, model in models.items() if model.role == "teacher"}
    if len(set(offload.values())) > 1:  # the placement moves every teacher's weights alike (opdgraph.placement)
        kept = next(name for name, value in offload.items() if not value)
        problems.append(problem(f"models.{kept}.offload_when_idle", (
            f"the teachers disagree on offload_when_idle ({', '.join(f'{n} = {str(v).lower()}' for n, v in offload.items())});"
            f" every teacher's weights are kept or offloaded alike: give them one value")))
    for model_name, model in models.items():
        if model.role == "teacher" and model_name not in used:
            stages = ", ".join(f"[{name}]" for name in teachers) or "none"
            problems.append(problem(f"models.{model_name}", (
                f"[models.{model_name}] has role = \"teacher\" but no teacher_score stage scores with it (stages: "
                f"{stages}); name it in a stage's model, or remove it (it would be loaded for nothing)")))


def _check_combination(route, teachers, problem, problems) -> None:
    """Several teachers need routing or mixture weights; routes must be disjoint; weights must sum to one. `route`:
    (the stage that publishes route_field, its value), the loss's step setting ("" when rows are not routed)."""
    owner, field = route
    loss = owner or "loss"
    weighted = {name: config.mixture_weight for name, config in teachers.items()
                if config.mixture_weight is not None}
    if field and weighted:
        problems.append(problem(f"{next(iter(weighted))}.mixture_weight", (
            f"{loss}.route_field = {field!r} routes each row to one teacher, so mixture weights do not apply; "
            f"remove mixture_weight or route_field")))
        return
    if field:
        owners: dict[str, str] = {}
        for name, config in teachers.items():
            for value in config.route or [short_name(name, KIND) or name]:
                if value in owners:
                    problems.append(problem(f"{name}.route", (
                        f"route value {value!r} is scored by both [{owners[value]}] and [{name}]; each value needs "
                        f"one teacher")))
                owners.setdefault(value, name)
        return
    for name, config in teachers.items():
        if config.route:
            problems.append(problem(f"{name}.route", (
                f"[{name}] lists route values but {loss}.route_field is not set; set {loss}.route_field to the "
                f"prompt-row field that holds them")))
    if len(teachers) > 1 and len(weighted) != len(teachers):
        missing = [f"[{name}]" for name in teachers if name not in weighted]
        problems.append(problem(next(iter(teachers)), (
            f"{len(teachers)} teacher stages need a way to combine: set {loss}.route_field (each row scored by one "
            f"teacher) or mixture_weight on every teacher stage (missing on {', '.join(missing)})")))
    elif weighted and not math.isclose(sum(weighted.values()), 1.0, abs_tol=MIXTURE_TOLERANCE):
        listed = " + ".join(f"{weight:g}" for weight in weighted.values())
        problems.append(problem(f"{next(iter(weighted))}.mixture_weight", (
            f"mixture weights must sum to 1 (p_T = sum_k w_k p_Tk is a distribution), got {listed} = "
            f"{sum(weighted.values()):g}")))


def check_pipeline(stage_name: str, config: Config, view, problem) -> list:
    """Config-time checks against the rollout's responses (opdgraph.config.checks), read by name from its step
    settings: the teacher scores every position the student may reach, within the scoring model's positions (after
    the teacher's own prompt, when it has one), and a micro-batch holds at least one whole sequence."""
    if "max_new_tokens" not in view.step_settings:  # no rollout: reported by the graph check
        return []
    problems = []
    rollout, new_tokens = view.step_settings["max_new_tokens"]
    prompt_tokens = view.data.max_prompt_tokens
    needed = prompt_tokens + new_tokens
    scorer = config.model
    limit = view.max_positions(scorer)
    prompt_limit = config.max_prompt_tokens
    if prompt_limit and limit and prompt_limit + new_tokens > limit:
        problems.append(problem(f"{stage_name}.max_prompt_tokens",
                                f"{stage_name}.max_prompt_tokens + {rollout}.max_new_tokens = "
                                f"{prompt_limit + new_tokens} exceeds the scoring model's "
                                f"positions ([models.{scorer}] max_position_embeddings {limit}); the teacher's "
                                f"prompts may take at most {limit - new_tokens} tokens"))
    elif limit and needed > limit:  # the teacher scores every position the student may reach
        problems.append(problem(f"{rollout}.max_new_tokens",
                                f"data.max_prompt_tokens + {rollout}.max_new_tokens = {needed} exceeds "
                                f"the scoring model's positions ([models.{scorer}] max_position_embeddings "
                                f"{limit}); set {rollout}.max_new_tokens to at most "
                                f"{limit - prompt_tokens}"))
    if config.micro_batch_tokens < needed:
        problems.append(problem(f"{stage_name}.micro_batch_tokens",
                                f"a micro-batch of {config.micro_batch_tokens} tokens cannot hold one whole "
                                f"sequence of data.max_prompt_tokens + {rollout}.max_new_tokens = {needed} "
                                f"tokens; raise micro_batch_tokens to at least {needed}"))
    return problems


def run_settings(config: Config) -> dict[str, object]:
    """The whole table, for other kinds' config checks that need every teacher's (sft's gold prefix room)."""
    return {"teacher_score_config": config}


def plan_facts(stage_name: str, config: Config, facts: StageFacts) -> dict[str, int]:
    """The tokens of one of this teacher's forwards: a budget the micro-batch packer keeps (runtime/batches.py)."""
    return {f"{stage_name}.forward_tokens": facts.teacher_micro_batch_tokens(facts.teacher_stage(stage_name))}


def plan_steps(stage_name: str, config: Config, facts: StageFacts) -> list[Draft]:
    """One teacher forward per micro-batch of its loop (a routed teacher: only its own rows' micro-batches)."""
    teacher = facts.teacher_stage(stage_name)
    tokens = facts.teacher_micro_batch_tokens(teacher)
    sequence_tokens = facts.teacher_sequence_tokens(teacher)
    repeats = facts.group_micro_batches if facts.fused else _unfused_micro_batches(facts)
    flops = W.forward_flops(teacher.shape, tokens, sequence_tokens)
    moved = teacher.weight_bytes + tokens * teacher.shape.hidden * teacher.dtype_bytes
    return [Draft(stage_name, stage_name, "teacher_score", (teacher.weights_buffer, "responses"),
                  (teacher.spec.hidden, f"{stage_name}.workspace"), facts.loop(stage_name), repeats,
                  W.roofline(flops, moved, 0, facts.hardware, repeats), frozenset({TEACHER_FORWARD}))]


def _unfused_micro_batches(facts: StageFacts) -> int:
    """Unfused, a routed teacher's loop runs over its share of the micro-batches."""
    return facts.in_group(facts.groups[0]).group_micro_batches if len(facts.groups) > 1 else \
        facts.counts.num_micro_batches


def plan_buffers(stage_name: str, config: Config, facts: StageFacts) -> list[Buffer]:
    """The teacher's hidden states (a micro-batch's fused, the batch's unfused) and its forward's workspace."""
    teacher, counts = facts.teacher_stage(stage_name), facts.counts
    shape, dtype_bytes = teacher.shape, teacher.dtype_bytes
    # Kept at the positions the loss scores: not at a gold prefix's (hybrid SFT), which it only reads as context.
    tokens, keys = facts.scored_crossing_tokens
    reference = facts.teacher_sequence_tokens(teacher) if teacher.attention_fallback else 0
    prompt_keys = (f"{stage_name}.max_prompt_tokens",) if config.max_prompt_tokens else ()
    gold = " (gold prefix positions not kept)" if counts.gold_prefix_tokens else ""
    return [
        buffer(teacher.spec.hidden, "teacher_hidden", sizing.hidden_state_bytes(shape, tokens, dtype_bytes),
               (*keys, *teacher.keys), formula="tokens x h_teacher x d" + gold),
        buffer(f"{stage_name}.workspace", "workspace",
               sizing.forward_workspace_bytes(shape, facts.teacher_micro_batch_tokens(teacher), dtype_bytes,
                                              reference, fla_sequences=counts.sequences if facts.fla_linear_core else 0,
                                              sequences=counts.sequences),
               facts.with_linear_core_keys((*facts.micro_keys, *prompt_keys, "pipeline.device", *teacher.keys),
                                           shape),
               formula=sizing.forward_workspace_formula(
                   shape, "micro-batch tokens" if not prompt_keys else
                   "micro-batch sequences x (teacher prompt + new tokens)", facts.fla_linear_core, reference)
               + " (no-grad forward)"),
    ]


def bind(stage_name: str, config: Config, run) -> dict:
    """This stage's TeacherRuntime (its model: a teacher, a frozen copy of the student, or the live student)."""
    return {"teacher": run.teachers[stage_name]}


def execute(step, config: Config, inputs: StageInputs) -> None:
    from opdgraph.runtime import training

    training.teacher_score(inputs)
