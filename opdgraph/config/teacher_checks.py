"""Checks across the teacher stages (opdgraph.teachers): which model each names, how several combine (routing or
a mixture), self-distillation's `frozen`, and the settings the training micro-batch shares. Each problem names the
stage table and what to do.
"""

from __future__ import annotations

import math

from opdgraph.teachers import TEACHER_KIND, route_setting, short_name, student_name

MIXTURE_TOLERANCE = 1e-6


def check_teacher_stages(models, data, stages, problem, problems) -> None:
    teachers = {name: stage for name, stage in stages.items() if stage.kind == TEACHER_KIND}
    student = student_name(models)
    _check_models(models, teachers, student, problem, problems)
    _check_combination(stages, teachers, problem, problems)
    first = next(iter(teachers), None)
    for name, stage in teachers.items():
        tokens, first_tokens = stage.config.micro_batch_tokens, teachers[first].config.micro_batch_tokens
        if tokens != first_tokens:
            problems.append(problem(f"{name}.micro_batch_tokens", (
                f"[{name}] micro_batch_tokens = {tokens} but [{first}] has {first_tokens}: every teacher scores the "
                f"same training micro-batches; give them one value")))


def _check_models(models, teachers, student, problem, problems) -> None:
    used = set()
    for name, stage in teachers.items():
        config = stage.config
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


def _check_combination(stages, teachers, problem, problems) -> None:
    """Several teachers need routing or mixture weights; routes must be disjoint; weights must sum to one."""
    owner, field = route_setting(stages)
    loss = owner or "loss"
    weighted = {name: stage.config.mixture_weight for name, stage in teachers.items()
                if stage.config.mixture_weight is not None}
    if field and weighted:
        problems.append(problem(f"{next(iter(weighted))}.mixture_weight", (
            f"{loss}.route_field = {field!r} routes each row to one teacher, so mixture weights do not apply; "
            f"remove mixture_weight or route_field")))
        return
    if field:
        owners: dict[str, str] = {}
        for name, stage in teachers.items():
            for value in stage.config.route or [short_name(name) or name]:
                if value in owners:
                    problems.append(problem(f"{name}.route", (
                        f"route value {value!r} is scored by both [{owners[value]}] and [{name}]; each value needs "
                        f"one teacher")))
                owners.setdefault(value, name)
        return
    for name, stage in teachers.items():
        if stage.config.route:
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
