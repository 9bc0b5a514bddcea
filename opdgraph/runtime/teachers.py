"""The teacher stages at run time: the model each scores with, the prompts it sees, and how rows are routed.

`teacher_prompt_rules` and `routing` tell the prompt loader what each teacher sees (opdgraph.data.teacher_prompts);
`build_teachers` gives every teacher stage its model: a teacher-role model as loaded, a frozen copy of the
initial student (made before a resume loads the trained weights, so it is the same copy in every run of the
pipeline; stages that name it share one copy), or the live student itself (scored under no_grad before the
student's own forward). The executor's offloader moves each teacher's weights where the plan says.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

from opdgraph.teachers import TeacherSpec, route_field, route_setting, teacher_specs, train_groups


@dataclass
class TeacherRuntime:
    spec: TeacherSpec
    model: Any

    @property
    def weights_buffer(self) -> str:
        return f"{self.spec.weights}.weights"


def specs(cfg) -> list[TeacherSpec]:
    """The teacher stages in plan (stage-graph) order, as the compiler sees them."""
    from opdgraph.stage_plan import ordered_stages

    by_stage = {spec.stage: spec for spec in teacher_specs(cfg.models, cfg.stages, cfg.data.max_prompt_tokens)}
    return [by_stage[name] for name in ordered_stages(cfg) if name in by_stage]


def teacher_prompt_rules(cfg, tokenizers: dict) -> list:
    """One rule per teacher stage that sees another prompt than the student."""
    from opdgraph.data.teacher_prompts import TeacherPrompt

    rules = []
    for spec in specs(cfg):
        if not spec.has_context:
            continue
        config = cfg.stages[spec.stage].config
        rules.append(TeacherPrompt(stage=spec.stage, tokenizer=tokenizers[spec.model],
                                   system_prompt=config.system_prompt, context_field=config.context_field,
                                   context_template=config.context_template, max_tokens=spec.prompt_tokens,
                                   where=setting_location(cfg, f"{spec.stage}.context_field"),
                                   limit_where=setting_location(cfg, f"{spec.stage}.max_prompt_tokens"
                                                      if config.max_prompt_tokens else "data.max_prompt_tokens")))
    return rules


def routing(cfg):
    """The loader's routing rule, or None when rows are not routed."""
    from opdgraph.data.teacher_prompts import Routing

    field = route_field(cfg.stages)
    if not field:
        return None
    owner, _ = route_setting(cfg.stages)
    return Routing(field=field, values=tuple(value for spec in specs(cfg) for value in spec.routes),
                   where=setting_location(cfg, f"{owner}.route_field"))


def setting_location(cfg, path: str) -> str:
    """The pipeline file and line a setting came from (or --set), for row messages that depend on it."""
    import os

    source = cfg.provenance.get(path, "default")
    return f"set at {source}" if source not in ("default", "--set") else (
        f"set by --set {path}" if source == "--set" else f"the default in {os.path.basename(cfg.source_file)}")


def route_facts(cfg) -> dict[str, Any]:
    """The run facts micro-batching needs: route value -> group, and the groups in the plan's loop order."""
    ordered = specs(cfg)
    if not route_field(cfg.stages):
        return {}
    groups = train_groups(ordered, routed=len(ordered) > 1)
    if len(groups) == 1:  # one teacher: every row is its own, one loop
        return {"route_groups": {value: "" for spec in ordered for value in spec.routes}, "group_order": ("",)}
    group_of_stage = {group.teachers[0]: group.name for group in groups}
    return {"route_groups": {value: group_of_stage[spec.stage] for spec in ordered for value in spec.routes},
            "group_order": tuple(group.name for group in groups)}


def build_teachers(cfg, models: dict, student) -> dict[str, TeacherRuntime]:
    """Every teacher stage's model (`models`: name -> (model, tokenizer), as loaded; call before a resume loads the
    student's trained weights)."""
    built: dict[str, Any] = {}
    teachers = {}
    for spec in specs(cfg):
        if spec.weights not in built:
            if not spec.self_teacher:
                model = models[spec.model][0]
            elif spec.own_weights:  # frozen: the initial student's weights, never trained
                model = copy.deepcopy(student)
            else:
                model = student
            if model is not student:
                model.requires_grad_(False)
            built[spec.weights] = model
        teachers[spec.stage] = TeacherRuntime(spec=spec, model=built[spec.weights])
    return teachers


def distinct_models(teachers: dict[str, TeacherRuntime], student) -> list:
    """The teachers' models other than the student, each once."""
    seen, models = set(), []
    for teacher in teachers.values():
        if teacher.model is not student and id(teacher.model) not in seen:
            seen.add(id(teacher.model))
            models.append(teacher.model)
    return models


def offloaded_models(teachers: dict[str, TeacherRuntime]) -> dict[str, Any]:
    """weights buffer -> model for the teachers with weights of their own (what the offloader may move)."""
    return {teacher.weights_buffer: teacher.model for teacher in teachers.values() if teacher.spec.own_weights}
