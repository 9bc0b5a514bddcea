"""Checks that need more than one field: model roles and references, the stage graph, the model shapes and
vocabularies, the data files; then each stage kind's own checks against the rest, which live in its module
(stages/<kind>.py's `check_stages` and `check_pipeline` hooks: how the teacher stages combine, rollout's stop
tokens and lengths, teacher_score's prompt limit and micro-batch, eval's lengths and prompt files, sft's gold
prefix, the loss's estimator and kernel).

The checks here are generic: none asks which kind a stage is, only what its kind declares (the Config fields that
name a model and the role that model needs, what it reads and writes) and what its hooks return. They run after
every section is typed, so they see well-typed values; a stage's hooks see the rest of the pipeline through a
stages.PipelineView (the sections, the model shapes, every stage's published settings by name). The order they find
problems in does not matter: a ConfigError lists them in file order. Each problem names both ends (the stage and the
model it references, the reader and the missing producer, the student and the teacher vocabularies). An inline model
config is checked key by key (opdgraph.model_config_check, the check `run` makes too), each problem at the TOML line
of its key.
"""

from __future__ import annotations

from opdgraph.config.errors import did_you_mean
from opdgraph.config.fields import field_problems
from opdgraph.config.paths import missing_file_problems
from opdgraph.graph import build_stage_graph, graph_problems
from opdgraph.model_config_check import config_problems
from opdgraph.model_shapes import ModelShape, ShapeError, shape_from_hf_config, shape_from_path
from opdgraph.stages import KIND_NAMES, REQUIRED_KINDS, pipeline_view, stage_kind, stage_module, stage_nodes

value_problems = field_problems


def cross_check(pipeline, models, data, stages, base_dir, problem, problems) -> dict[str, ModelShape]:
    """Append every cross-section problem (via `problem(path, message)`) and return the resolved model shapes."""
    _check_roles(models, problem, problems)
    _check_stage_models(models, stages, problem, problems)
    _check_graph(stages, problem, problems)
    shapes = _resolve_shapes(models, base_dir, problem, problems)
    _check_vocabularies(models, shapes, problem, problems)
    _check_data_files(data, base_dir, problem, problems)
    view = pipeline_view(pipeline, models, data, shapes, base_dir, stages)
    _check_kind_hooks(view, stages, problem, problems)
    _check_stage_hooks(view, stages, problem, problems)
    _check_model_kernels(pipeline, models, problem, problems)
    return shapes


def _check_roles(models, problem, problems):
    holders = [name for name, model in models.items() if model.role == "student"]
    if len(holders) != 1:
        where = f"models.{holders[1]}.role" if len(holders) > 1 else "models"
        found = ", ".join(holders) if holders else "none"
        problems.append(problem(where, f"need exactly one model with role = \"student\" (found: {found})"))
    for name, model in models.items():
        if model.init_from is None:
            continue
        source = models.get(model.init_from)
        if source is None or model.init_from == name:
            hint = did_you_mean(model.init_from, [other for other in models if other != name])
            problems.append(problem(f"models.{name}.init_from",
                                    f"[models.{name}] starts from {model.init_from!r}, which is not another "
                                    f"[models.<name>] entry{hint}"))
        elif source.init_from is not None:
            problems.append(problem(f"models.{name}.init_from",
                                    f"[models.{name}] starts from [models.{model.init_from}], which itself uses "
                                    f"init_from; start from a model with a path or config"))


def _check_stage_models(models, stages, problem, problems):
    for name, stage in stages.items():
        kind = stage_kind(stage.kind)
        for field in kind.model_fields:
            model_name = getattr(stage.config, field)
            model = models.get(model_name)
            if model is None:
                problems.append(problem(f"{name}.{field}", f"[{name}] uses model {model_name!r} but there is no "
                                                           f"[models.{model_name}]{did_you_mean(model_name, models)}"))
            elif field in kind.model_roles and model.role != kind.model_roles[field]:
                problems.append(problem(f"{name}.{field}",
                                        f"[{name}] needs the {kind.model_roles[field]} but [models.{model_name}] "
                                        f"has role = \"{model.role}\""))


def _check_graph(stages, problem, problems):
    nodes = stage_nodes(stages)
    writers = {kind: stage_kind(kind).writes for kind in KIND_NAMES}
    for name, message in graph_problems(build_stage_graph(nodes), writers):
        problems.append(problem(name, message))
    # A missing required stage whose output some stage reads is already reported above, naming the reader.
    kinds_present = {stage.kind for stage in stages.values()}
    values_read = {value for node in nodes for value in node.reads}
    for kind in REQUIRED_KINDS:
        if kind not in kinds_present and not values_read & set(writers[kind]):
            problems.append(problem(kind, f"missing stage table [{kind}] (every pipeline needs "
                                          f"{', '.join(REQUIRED_KINDS)})"))


def _resolve_shapes(models, base_dir, problem, problems) -> dict[str, ModelShape]:
    shapes = {}
    for name, model in models.items():
        try:
            if model.config is not None:
                _, found = config_problems(model.config)
                problems += [problem(f"models.{name}.config" + (f".{key}" if key else ""), message)
                             for key, message in found]
                if not found:
                    shapes[name] = shape_from_hf_config(model.config, f"[models.{name}].config")
            elif model.path is not None:
                shapes[name] = shape_from_path(model.path, base_dir, model.revision)
        except ShapeError as error:
            problems.append(problem(f"models.{name}.{'config' if model.config is not None else 'path'}", str(error)))
    for name, model in models.items():
        source = shapes.get(model.init_from) if model.init_from else None
        if source is None:
            continue
        keep = model.keep_layers if model.keep_layers is not None else list(range(source.layers))
        bad = [index for index in keep if not 0 <= index < source.layers]
        if bad or len(set(keep)) != len(keep):
            what = f"indices {bad} are out of range" if bad else "indices repeat"
            problems.append(problem(f"models.{name}.keep_layers",
                                    f"{what}; [models.{model.init_from}] has layers 0..{source.layers - 1}"))
        # The reported config fails to load anyway; the later checks still see a shape, of the layers that exist.
        shapes[name] = source.keep([index for index in keep if 0 <= index < source.layers])
    return shapes


def _check_vocabularies(models, shapes, problem, problems):
    student = next((name for name, model in models.items() if model.role == "student"), None)
    for teacher in (name for name, model in models.items() if model.role == "teacher"):
        if student in shapes and teacher in shapes and shapes[teacher].vocab < shapes[student].vocab:
            problems.append(problem(f"models.{teacher}",
                                    f"the teacher's vocabulary ({shapes[teacher].vocab}) must cover the student's "
                                    f"({shapes[student].vocab}, [models.{student}]); extra teacher columns are "
                                    f"dropped, missing ones cannot be made up"))


def _check_kind_hooks(view, stages, problem, problems):
    """Each kind's checks across all of its stages: its `check_stages(configs, view, problem)` (stages/<kind>.py,
    configs: its stages' Configs by name in table order), called for every kind in registry order, also one with no
    stage (teacher_score: a teacher model no teacher stage scores with)."""
    for kind in KIND_NAMES:
        check = getattr(stage_module(kind), "check_stages", None)
        if check is not None:
            configs = {name: stage.config for name, stage in stages.items() if stage.kind == kind}
            problems.extend(check(configs, view, problem))


def _check_stage_hooks(view, stages, problem, problems):
    """Each stage's own checks against the rest of the pipeline: its kind's `check_pipeline(stage_name, config, view,
    problem)` (stages/<kind>.py), in table order."""
    for name, stage in stages.items():
        check = getattr(stage_module(stage.kind), "check_pipeline", None)
        if check is not None:
            problems.extend(check(name, stage.config, view, problem))


def _check_data_files(data, base_dir, problem, problems):
    """Every prompt file [data] names exists before anything runs (the runtime reads them only after loading the
    models); a stage's own files are its kind's check (eval's)."""
    listed = [(f"data.train_files[{index}]", file) for index, file in enumerate(data.train_files)]
    listed += [(f"data.eval_files[{index}]", file) for index, file in enumerate(data.eval_files)]
    problems += missing_file_problems(listed, base_dir, problem)


def _check_model_kernels(pipeline, models, problem, problems):
    """Liger-Kernel's kernels run on CUDA only (as the loss kernel above; "auto" devices are checked at startup by
    opdgraph.models.layer_kernels.check_layer_kernels, which also needs liger_kernel to import)."""
    if pipeline.device != "cpu":
        return
    for name, model in models.items():
        if model.kernels == "liger":
            problems.append(problem(f"models.{name}.kernels",
                                    f"models.{name}.kernels = \"liger\" runs on CUDA only, but pipeline.device = "
                                    f"\"cpu\"; set models.{name}.kernels = \"auto\" or \"torch\" (or "
                                    f"pipeline.device = \"cuda\")"))
