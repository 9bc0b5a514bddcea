"""What a checkpoint records of its run's config, and which changes a resume may make without saying so.

`config_record(cfg)` is the resolved config as flat dotted keys (`step.lr`, `models.student.config.hidden_size`),
plus what a key alone does not show: each model's resolved shape (a model file changed under the same path) and a
checksum of every prompt file's content (`data.file_checksum["data/train.jsonl"]`), the commit a Hub-id model
resolved to (`models.<name>.resolved_revision`: `main` moved on) and a chat template file's checksum. Model weight
files are not hashed (they can be many GB); their path and resolved architecture are compared. Each checkpoint
stores the record (opdgraph.runtime.checkpoint, `config.json`); `--resume` compares it with the new run's
(`differences`).

A difference is fine when its key is in CADENCE: settings that change when things are logged, evaluated or saved,
what is shown, or where and in how much memory it runs, but not what is computed nor the order of the data:
- pipeline: name, device (a resume on another device differs from the uninterrupted run at rounding level),
  debug_memory, memory_budget_gib, release_phase_buffers, hardware.* (roofline estimates), fit.* (the search's
  limits; a micro-batch or chunk size it picks differently is compared as such); output_dir is not recorded (the
  resumed run writes into the directory it resumes, opdgraph.runtime.run_directory);
- models.<name>.offload_when_idle, kernels (torch's ops or Liger's fused kernels: the same math, rounding apart);
- stages of kind log: every key; eval: every_n_steps, num_samples_to_show, behaviour (what is measured besides);
  checkpoint: every_n_steps, keep_last, on_signal.
Every other difference (models, data and file contents, seed, lr and its schedule, num_steps, divergence, batch
and micro-batch shapes, rollout sampling, eval prompts, ...) stops the resume unless --allow-config-change.
Torch-free.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import attrs

from opdgraph.config.paths import data_file_path
from opdgraph.config.strict import unstructure
from opdgraph.model_shapes import hub_commit
from opdgraph.runtime.durable import DIGEST_NAME, file_digest
from opdgraph.stages import published_settings

PIPELINE_CADENCE = ("name", "device", "debug_memory", "memory_budget_gib", "release_phase_buffers",
                    "hardware.", "fit.")
MODEL_CADENCE = ("offload_when_idle", "kernels")
STAGE_CADENCE = {"log": None,  # None: every key of that kind
                 "eval": ("every_n_steps", "num_samples_to_show", "behaviour"),
                 "checkpoint": ("every_n_steps", "keep_last", "on_signal")}
ABSENT = "(absent)"


def _recorded_shape(shape) -> dict[str, Any]:
    """The shape as checkpoints record it: the layer kinds only for hybrid models, as records have held them since
    before every family's shape had its kinds (a full/sliding mix follows from config keys recorded beside it);
    recording them for every family would refuse the resume of every older run."""
    recorded = attrs.asdict(shape)
    if not shape.linear_layers:
        recorded["layer_types"] = []
    return recorded


def config_record(cfg) -> dict[str, Any]:
    """{"values": flat dotted key -> JSON value, "stage_kinds": table -> kind} of a loaded pipeline."""
    values: dict[str, Any] = {}
    _flatten("pipeline", unstructure(cfg.pipeline), values)
    del values["pipeline.output_dir"]  # where a run writes is the run directory's business, not the config's
    for name, model in cfg.models.items():
        _flatten(f"models.{name}", unstructure(model), values)
        _flatten(f"models.{name}.resolved_shape", _recorded_shape(cfg.shapes[name]), values)
        commit = hub_commit(model.path, cfg.base_dir, model.revision)
        if commit is not None:
            values[f"models.{name}.resolved_revision"] = commit
        if model.chat_template is not None:
            template = Path(data_file_path(cfg.base_dir, model.chat_template))
            values[f"models.{name}.chat_template_checksum"] = file_digest(template) if template.is_file() else "missing"
    _flatten("data", unstructure(cfg.data), values)
    for name, stage in cfg.stages.items():
        values[f"{name}.kind"] = stage.kind
        _flatten(name, unstructure(stage.config), values)
    for file in _prompt_files(cfg):
        path = Path(data_file_path(cfg.base_dir, file))
        values[f'data.file_checksum["{file}"]'] = file_digest(path) if path.is_file() else "missing"
    defaults = sorted(key for key in values if cfg.provenance.get(key) == "default")
    return {"format": DIGEST_NAME, "values": values, "defaults": defaults,
            "stage_kinds": {name: stage.kind for name, stage in cfg.stages.items()}}


def _prompt_files(cfg) -> list[str]:
    files = list(cfg.data.train_files) + list(cfg.data.eval_files)
    for stage in cfg.stages.values():  # every eval stage's own files (stages/eval.py publishes them)
        files += list(published_settings(stage, "run_settings").get("eval_files") or [])
    return sorted(set(files))


def _flatten(prefix: str, value: Any, out: dict[str, Any]) -> None:
    if isinstance(value, dict):
        for key, item in value.items():
            _flatten(f"{prefix}.{key}", item, out)
    else:
        out[prefix] = json.loads(json.dumps(value))  # tuples -> lists, as the JSON file will hold them


def differences(old: dict[str, Any], new: dict[str, Any]) -> list[tuple[str, Any, Any]]:
    """(key, old value, new value) for every key whose value differs; a key on one side only pairs with ABSENT."""
    before, after = old["values"], new["values"]
    return [(key, before.get(key, ABSENT), after.get(key, ABSENT)) for key in sorted(set(before) | set(after))
            if before.get(key, ABSENT) != after.get(key, ABSENT)]


def is_newer_default(difference: tuple[str, Any, Any], new: dict[str, Any]) -> bool:
    """A setting the checkpoint's record does not have (it was added to opdgraph after the checkpoint was written)
    left at its default: accepted without --allow-config-change (and listed), or every new setting would stop the
    resume of every older run. A new setting's default keeps the old behaviour unless its release notes say not."""
    key, old, _ = difference
    return old == ABSENT and key in new.get("defaults", ())


def is_cadence(key: str, stage_kinds: dict[str, str]) -> bool:
    table, _, rest = key.partition(".")
    if table == "pipeline":
        return any(rest == name or (name.endswith(".") and rest.startswith(name)) for name in PIPELINE_CADENCE)
    if table == "models":
        return rest.partition(".")[2] in MODEL_CADENCE
    kind = stage_kinds.get(table)
    if kind not in STAGE_CADENCE or rest == "kind":
        return False
    allowed = STAGE_CADENCE[kind]
    return allowed is None or rest in allowed


def describe(difference: tuple[str, Any, Any]) -> str:
    key, old, new = difference
    show = lambda value: value if value == ABSENT else json.dumps(value)  # noqa: E731
    return f"{key}: {show(old)} -> {show(new)}"
