"""Stage kinds: each `opdgraph.stages.<kind>` module owns its typed Config and declares what it reads and writes.

The registry is lazy: `stage_kind("loss")` imports `opdgraph.stages.loss` only when asked. Stage modules import
no torch at import time (their runtime glue imports it inside functions), so the compiler stays torch-free.
A stage module defines `Config` (attrs frozen, kw_only, help on every field), `READS` and `WRITES` (value names the
stage graph is built from) and `MODEL_FIELDS` (Config fields that name a `[models.<name>]` entry; optionally
`MODEL_ROLES`, the role such a model must have: rollout samples with the student).
What one stage of the kind reads and writes may depend on its name and on the other stages (`[teacher_score.math]`
writes `teacher_hidden.math`, the loss reads every teacher's): an optional `values(stage_name, config, stages) ->
(reads, writes)` says so; `stage_nodes` builds the stage graph's nodes from it.
Its plan contribution (opdgraph.stage_plan): `plan_steps(stage_name, config, facts)`, the Drafts it adds to a
training step; optionally `plan_buffers(...)` (the Buffers it allocates), `plan_facts(...)` (entries of the plan's
facts), `MICRO_BATCH = True` (it runs once per training micro-batch: the compiler fuses such stages into one
loop, one per teacher when rows are routed), `PERIODIC = True` (it runs every n steps, outside one training step's time) and `GATHERS_TEACHER = True`
(it needs the whole teacher at once, so a sharded teacher is all-gathered for it), and `step_settings(config)`: its
settings that size the whole training step (opdgraph.counts: max_new_tokens, micro_batch_tokens, ...), looked up by
name (`named_settings`) so the generic compiler never asks which kind owns one; `run_settings(config)` likewise
for the run loop (opdgraph.runtime.run: the progress line, checkpoint retention). `BACKWARD_READS` (values) and
`backward_buffers(stage_name, facts)` (their plan buffers): what the backward reads of this stage beside the loss's
gradient (`backward_values_of`, `backward_buffers_of`; the sft stage's gold-prefix gradient). `teacher_spec(
stage_name, config, models, data_prompt_tokens)`: the stage scores the responses with a teacher (an
opdgraph.teachers.TeacherSpec); the loss reads what such stages write, and the planner and the runtime find the
teachers by this hook (`teacher_specs_of`, `teacher_values_of`), not by a kind's name.
How it runs (opdgraph.runtime.executor): `bind(stage_name, config, run)` names, once per run, the models and run
objects its calls use; `execute(step, config, inputs)` runs one of its plan steps on an
opdgraph.runtime.stage_inputs.StageInputs (those models, the plan buffers it declares, the loop iteration, a few
run services), never on the whole run context; optionally `release_hooks(stage_name, config, models)` (what drops
the memory behind a buffer it allocates, at the plan's release) and `before_training(step, config, inputs)` (eval's
evaluation before the first step).
Its config-time part (opdgraph.config): `resolve_defaults(stage_name, config, data, settings) -> config` fills
defaults that come from other sections once every table is typed (eval's files and max_new_tokens; `settings`: the
step settings by name); `check_pipeline(stage_name, config, view, problem)` checks one stage against the rest
(lengths against the models' positions, files, what another kind's settings allow) and `check_stages(configs,
view, problem)` all stages of the kind at once (`configs`: their Configs by name, in table order; called also when
there is none: teacher_score's), each returning Problems made by `problem(path, message)`. They see the rest of the
pipeline only through a `PipelineView`: the sections, the model shapes and the published settings by name
(`every_setting` for one several stages publish, every teacher's table). So no kind is tested by name outside its
own module: a new kind touches its module and KIND_NAMES.
The data source (`data`, configured by `[data]`, SOURCE_KINDS) is planned and run the same way, from stages/data.py.
"""

from __future__ import annotations

import importlib
from typing import Callable

import attrs

KIND_NAMES = ("rollout", "teacher_score", "loss", "sft", "backward", "step", "eval", "checkpoint", "log")
REQUIRED_KINDS = ("rollout", "teacher_score", "loss", "backward", "step")
SOURCE_KINDS = ("data",)  # planned and run like a kind, configured by a section of its own (no stage table)


@attrs.frozen
class StageKind:
    name: str
    config_class: type
    reads: tuple[str, ...]
    writes: tuple[str, ...]
    model_fields: tuple[str, ...]
    plan_steps: Callable  # (stage_name, config, facts) -> list[Draft]
    plan_buffers: Callable  # (stage_name, config, facts) -> list[Buffer]
    plan_facts: Callable  # (stage_name, config, facts) -> dict[str, object]
    periodic: bool
    gathers_teacher: bool
    values: Callable  # (stage_name, config, stages) -> (reads, writes) of one stage of this kind
    micro_batch: bool  # MICRO_BATCH = True: runs once per training micro-batch (the fused loop)
    model_roles: dict  # MODEL_ROLES: model field -> the role its [models.<name>] entry must have


@attrs.frozen(kw_only=True)
class PipelineView:
    """What a stage's config checks see of the rest of the pipeline (opdgraph.config.checks), never the other
    stage tables themselves: settings of other kinds are read by name, as the compiler reads them."""

    pipeline: object  # opdgraph.config.schema.PipelineConfig
    models: dict  # name -> ModelConfig
    data: object  # opdgraph.config.schema.DataConfig
    shapes: dict  # name -> opdgraph.model_shapes.ModelShape (the models whose shape resolved)
    base_dir: str  # the pipeline file's directory: relative prompt files start there
    run_settings: dict  # name -> (owning stage, value): named_settings(stages, "run_settings")
    step_settings: dict  # name -> (owning stage, value): named_settings(stages, "step_settings")
    every_setting: dict  # name -> ((stage, value), ...): every stage's run and step settings, in table order

    def max_positions(self, model: str) -> int:
        """The positions of `model` (0 when unknown: its shape did not resolve, or it sets none)."""
        return self.shapes[model].max_positions if model in self.shapes else 0


def stage_module(name: str):
    """The module of the stage kind (or source) `name` (KeyError when there is none)."""
    if name not in KIND_NAMES and name not in SOURCE_KINDS:
        raise KeyError(name)
    return importlib.import_module(f"opdgraph.stages.{name}")


def stage_kind(name: str) -> StageKind:
    """The registered stage kind `name` (KeyError when there is none)."""
    if name not in KIND_NAMES:
        raise KeyError(name)
    module = stage_module(name)
    return StageKind(name, module.Config, tuple(module.READS), tuple(module.WRITES),
                     tuple(getattr(module, "MODEL_FIELDS", ())), module.plan_steps,
                     getattr(module, "plan_buffers", _nothing(list)), getattr(module, "plan_facts", _nothing(dict)),
                     getattr(module, "PERIODIC", False), getattr(module, "GATHERS_TEACHER", False),
                     getattr(module, "values", lambda stage_name, config, stages: (module.READS, module.WRITES)),
                     getattr(module, "MICRO_BATCH", False), dict(getattr(module, "MODEL_ROLES", {})))


def named_settings(stages: dict, hook: str) -> dict[str, tuple[str, object]]:
    """setting name -> (the stage that owns it, its value), over every stage's `hook(config)` ("step_settings" or
    "run_settings"), the first stage in table order winning: settings other modules read by name, never by kind."""
    settings: dict[str, tuple[str, object]] = {}
    for name, stage in stages.items():
        for key, value in published_settings(stage, hook).items():
            settings.setdefault(key, (name, value))
    return settings


def pipeline_view(pipeline, models, data, shapes, base_dir: str, stages: dict) -> PipelineView:
    """The view of a typed pipeline its stages' config checks get (stage entries by name, in table order)."""
    every: dict[str, list] = {}
    for name, stage in stages.items():
        for hook in ("run_settings", "step_settings"):
            for key, value in published_settings(stage, hook).items():
                every.setdefault(key, []).append((name, value))
    return PipelineView(pipeline=pipeline, models=models, data=data, shapes=shapes, base_dir=base_dir,
                        run_settings=named_settings(stages, "run_settings"),
                        step_settings=named_settings(stages, "step_settings"),
                        every_setting={key: tuple(values) for key, values in every.items()})


def published_settings(stage, hook: str = "step_settings") -> dict[str, object]:
    """What one stage entry publishes through its kind's `hook(config)` (nothing when its kind has no such hook)."""
    published = getattr(stage_module(stage.kind), hook, None)
    return published(stage.config) if published else {}


def stage_nodes(stages: dict) -> list:
    """The stage graph's nodes (opdgraph.graph.StageNode) of a pipeline's stage entries."""
    from opdgraph.graph import StageNode

    nodes = []
    for name, stage in stages.items():
        reads, writes = stage_kind(stage.kind).values(name, stage.config, stages)
        nodes.append(StageNode(name, stage.kind, tuple(reads), tuple(writes)))
    return nodes


def backward_values_of(stages: dict) -> tuple[str, ...]:
    """The values the backward reads beside the loss's gradient: each stage kind's BACKWARD_READS (the sft stage's
    gold-prefix gradient), so the backward names no other kind."""
    return tuple(value for stage in stages.values()
                 for value in getattr(stage_module(stage.kind), "BACKWARD_READS", ()))


def backward_buffers_of(facts) -> tuple[str, ...]:
    """The buffers behind backward_values_of in the plan: each such stage's `backward_buffers(stage_name, facts)`."""
    return tuple(buffer for kind, name in facts.stage_names.items()
                 for buffer in getattr(stage_module(kind), "backward_buffers", lambda stage, facts: ())(name, facts))


def teacher_specs_of(stages: dict, models: dict, data_prompt_tokens: int) -> list:
    """Every stage that scores with a teacher, in table order, as opdgraph.teachers.TeacherSpecs: the stages whose
    kind module has `teacher_spec(stage_name, config, models, data_prompt_tokens)`."""
    return [stage_module(stage.kind).teacher_spec(name, stage.config, models, data_prompt_tokens)
            for name, stage in _teacher_stages(stages)]


def teacher_values_of(stages: dict) -> tuple[str, ...]:
    """What the teacher stages (teacher_specs_of) write: the values the loss reads, named by their own kind."""
    return tuple(value for name, stage in _teacher_stages(stages)
                 for value in stage_kind(stage.kind).values(name, stage.config, stages)[1])


def _teacher_stages(stages: dict) -> list:
    """(name, entry) of the stages whose kind module has the `teacher_spec` hook, in table order."""
    return [(name, stage) for name, stage in stages.items() if hasattr(stage_module(stage.kind), "teacher_spec")]


def _nothing(empty: type) -> Callable:
    """A plan function of a kind that contributes nothing of that sort."""
    return lambda stage_name, config, facts: empty()
