"""Checks that need more than one field: model roles and references, the stage graph, shapes and vocabularies,
the data files, and each stage kind's own checks against the rest (the loss's: whether its estimator fits the way
rollout samples, whether its kernel runs on the device).

They run after every section is typed, so they see well-typed values. Each problem names both ends (the stage and
the model it references, the reader and the missing producer, the student and the teacher vocabularies). An inline
model config is checked key by key (opdgraph.model_config_check, the check `run` makes too), each problem at the
TOML line of its key.
"""

from __future__ import annotations

import os

from opdgraph.config.errors import did_you_mean
from opdgraph.config.fields import field_problems
from opdgraph.config.paths import data_file_path
from opdgraph.config.sft_checks import check_sft_stages
from opdgraph.config.teacher_checks import check_teacher_stages
from opdgraph.graph import build_stage_graph, graph_problems
from opdgraph.model_config_check import config_problems
from opdgraph.model_shapes import ModelShape, ShapeError, shape_from_hf_config, shape_from_path
from opdgraph.stages import KIND_NAMES, REQUIRED_KINDS, stage_kind, stage_nodes

value_problems = field_problems


def cross_check(pipeline, models, data, stages, base_dir, problem, problems) -> dict[str, ModelShape]:
    """Append every cross-section problem (via `problem(path, message)`) and return the resolved model shapes."""
    _check_roles(models, problem, problems)
    _check_stage_models(models, stages, problem, problems)
    check_teacher_stages(models, data, stages, problem, problems)
    _check_graph(stages, problem, problems)
    shapes = _resolve_shapes(models, base_dir, problem, problems)
    _check_shapes(models, shapes, data, stages, problem, problems)
    _check_eval_lengths(models, shapes, data, stages, problem, problems)
    check_sft_stages(pipeline, models, shapes, data, stages, problem, problems)
    _check_data_files(data, stages, base_dir, problem, problems)
    _check_stage_hooks(pipeline, stages, problem, problems)
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
    expected_role = {"rollout": "student"}
    for name, stage in stages.items():
        for field in stage_kind(stage.kind).model_fields:
            model_name = getattr(stage.config, field)
            model = models.get(model_name)
            if model is None:
                problems.append(problem(f"{name}.{field}", f"[{name}] uses model {model_name!r} but there is no "
                                                           f"[models.{model_name}]{did_you_mean(model_name, models)}"))
            elif stage.kind in expected_role and model.role != expected_role[stage.kind]:
                problems.append(problem(f"{name}.{field}",
                                        f"[{name}] needs the {expected_role[stage.kind]} but [models.{model_name}] "
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
        shapes[name] = source.keep(keep)
    return shapes


def _check_shapes(models, shapes, data, stages, problem, problems):
    student = next((name for name, model in models.items() if model.role == "student"), None)
    for teacher in (name for name, model in models.items() if model.role == "teacher"):
        if student in shapes and teacher in shapes and shapes[teacher].vocab < shapes[student].vocab:
            problems.append(problem(f"models.{teacher}",
                                    f"the teacher's vocabulary ({shapes[teacher].vocab}) must cover the student's "
                                    f"({shapes[student].vocab}, [models.{student}]); extra teacher columns are "
                                    f"dropped, missing ones cannot be made up"))
    for name, stage in stages.items():
        if stage.kind != "rollout" or stage.config.model not in shapes:
            continue
        vocab = shapes[stage.config.model].vocab
        outside = [token for token in stage.config.stop_token_ids if token >= vocab]
        if outside:
            problems.append(problem(f"{name}.stop_token_ids",
                                    f"token ids {outside} are outside the vocabulary of [models.{stage.config.model}] "
                                    f"(ids 0..{vocab - 1}); no sampled token can ever match them"))
        limit = shapes[stage.config.model].max_positions
        needed = data.max_prompt_tokens + stage.config.max_new_tokens
        if limit and needed > limit:
            problems.append(problem(f"{name}.max_new_tokens",
                                    f"data.max_prompt_tokens + {name}.max_new_tokens = {needed} exceeds "
                                    f"[models.{stage.config.model}] max_position_embeddings ({limit})"))

    rollout = next((stage for stage in stages.values() if stage.kind == "rollout"), None)
    for name, stage in stages.items():
        if stage.kind != "teacher_score" or rollout is None:
            continue
        needed = data.max_prompt_tokens + rollout.config.max_new_tokens
        scorer = stage.config.model
        limit = shapes[scorer].max_positions if scorer in shapes else 0
        prompt_limit = stage.config.max_prompt_tokens
        if prompt_limit and limit and prompt_limit + rollout.config.max_new_tokens > limit:
            problems.append(problem(f"{name}.max_prompt_tokens",
                                    f"{name}.max_prompt_tokens + {rollout.name}.max_new_tokens = "
                                    f"{prompt_limit + rollout.config.max_new_tokens} exceeds the scoring model's "
                                    f"positions ([models.{scorer}] max_position_embeddings {limit}); the teacher's "
                                    f"prompts may take at most {limit - rollout.config.max_new_tokens} tokens"))
        elif limit and needed > limit:  # the teacher scores every position the student may reach
            problems.append(problem(f"{rollout.name}.max_new_tokens",
                                    f"data.max_prompt_tokens + {rollout.name}.max_new_tokens = {needed} exceeds "
                                    f"the scoring model's positions ([models.{scorer}] max_position_embeddings "
                                    f"{limit}); set {rollout.name}.max_new_tokens to at most "
                                    f"{limit - data.max_prompt_tokens}"))
        if stage.config.micro_batch_tokens < needed:
            problems.append(problem(f"{name}.micro_batch_tokens",
                                    f"a micro-batch of {stage.config.micro_batch_tokens} tokens cannot hold one whole "
                                    f"sequence of data.max_prompt_tokens + {rollout.name}.max_new_tokens = {needed} "
                                    f"tokens; raise micro_batch_tokens to at least {needed}"))


def _check_eval_lengths(models, shapes, data, stages, problem, problems):
    """An eval response must fit where eval puts it: whole in one scoring micro-batch (teacher_score's), and within
    the positions of the student and the teacher (both answer the eval prompts). Eval prompts are at most
    data.max_prompt_tokens (the loader rejects longer ones) and eval's KV pools are sized from these same numbers
    (opdgraph.counts.eval_counts), so these are the limits. What rollout's own checks already cover (eval answering
    no longer than rollout) is not reported twice."""
    rollout = next((stage for stage in stages.values() if stage.kind == "rollout"), None)
    scorer = next((stage for stage in stages.values() if stage.kind == "teacher_score"), None)
    for name, stage in stages.items():
        if stage.kind != "eval" or rollout is None or stage.config.max_new_tokens is None:
            continue
        new_tokens = stage.config.max_new_tokens
        needed = data.max_prompt_tokens + new_tokens
        longer_than_rollout = new_tokens > rollout.config.max_new_tokens
        if scorer is not None and longer_than_rollout and scorer.config.micro_batch_tokens < needed:
            limit = scorer.config.micro_batch_tokens
            problems.append(problem(f"{name}.max_new_tokens", _too_long(
                name, new_tokens, data.max_prompt_tokens, f"a scoring micro-batch ({scorer.name}.micro_batch_tokens = {limit})",
                limit - data.max_prompt_tokens, f"raise {scorer.name}.micro_batch_tokens to at least {needed}")))
        for model, model_config in models.items():
            role = model_config.role
            limit = shapes[model].max_positions if model in shapes else 0
            if limit and needed > limit and (role == "teacher" or longer_than_rollout):
                problems.append(problem(f"{name}.max_new_tokens", _too_long(
                    name, new_tokens, data.max_prompt_tokens, f"the {role}'s positions ([models.{model}] max_position_embeddings "
                    f"= {limit})", limit - data.max_prompt_tokens, "lower data.max_prompt_tokens")))


def _too_long(name: str, new_tokens: int, prompt_tokens: int, container: str, most: int, alternative: str) -> str:
    fix = f"set {name}.max_new_tokens to at most {most}, or {alternative}" if most > 0 else alternative
    return (f"{name}.max_new_tokens = {new_tokens} after prompts of up to data.max_prompt_tokens = {prompt_tokens} "
            f"makes eval sequences of {prompt_tokens + new_tokens} tokens, more than {container} holds (nothing is "
            f"truncated); {fix}")


def _check_data_files(data, stages, base_dir, problem, problems):
    """Every prompt file exists before anything runs (the runtime reads them only after loading the models)."""
    listed = [(f"data.train_files[{index}]", file) for index, file in enumerate(data.train_files)]
    listed += [(f"data.eval_files[{index}]", file) for index, file in enumerate(data.eval_files)]
    for name, stage in stages.items():
        if stage.kind == "eval" and not stage.config.files:
            problems.append(problem(f"{name}.files" if stage.config.files != data.eval_files else "data.eval_files",
                                    f"[{name}] has no prompt files to evaluate on: set data.eval_files (or "
                                    f"{name}.files), or remove the [{name}] table"))
        elif stage.kind == "eval" and stage.config.files != data.eval_files:
            listed += [(f"{name}.files[{index}]", file) for index, file in enumerate(stage.config.files)]
    for path, file in listed:
        real = data_file_path(base_dir, file)
        if not os.path.isfile(real):
            what = "is a directory, not a file" if os.path.isdir(real) else "does not exist"
            problems.append(problem(path, f"prompt file {file!r} {what} (looked at {real}; relative paths start "
                                          f"at the pipeline file's directory)"))


def _check_stage_hooks(pipeline, stages, problem, problems):
    """Each stage's own checks against the rest of the pipeline (its kind's `check_pipeline(stage_name, config,
    pipeline, settings, problem)`, stages/<kind>.py), in table order; `settings`: every stage's published run
    settings by name (stages.named_settings), the way a stage sees the tables of other kinds."""
    from opdgraph.stages import named_settings, stage_module

    settings = named_settings(stages, "run_settings")
    for name, stage in stages.items():
        check = getattr(stage_module(stage.kind), "check_pipeline", None)
        if check is not None:
            problems.extend(check(name, stage.config, pipeline, settings, problem))


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
