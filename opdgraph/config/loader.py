"""`load_pipeline(path, overrides)`: TOML file + `--set` overrides -> typed, cross-checked PipelineConfig.

Steps: parse the TOML, apply overrides, type each section strictly (opdgraph.config.strict), resolve derived
defaults (each stage kind's `resolve_defaults` hook), then run the cross-section checks (opdgraph.config.checks).
Every problem found on the way is kept, with its `file:line` (or `--set ...`) location, and all are raised together
in one ConfigError.
"""

from __future__ import annotations

import os
import re

try:
    import tomllib
except ImportError:  # Python 3.10
    import tomli as tomllib

import attrs

from opdgraph.config import checks
from opdgraph.config.errors import ConfigError, Problem, did_you_mean
from opdgraph.config.lines import key_lines
from opdgraph.config.overrides import Override, apply_override, parse_override
from opdgraph.config.schema import DataConfig, ModelConfig, PipelineConfig, PipelineSection, StageEntry
from opdgraph.config.strict import describe, structure
from opdgraph.stages import KIND_NAMES, named_settings, stage_kind, stage_module

SECTIONS = ("pipeline", "models", "data")


@attrs.define
class Locator:
    """Where each dotted path came from: a file line or a --set override."""

    file_name: str
    lines: dict[str, int]
    overrides: dict[str, Override]

    def _find(self, path: str):
        parts = path.replace("[", ".[").split(".")
        for end in range(len(parts), 0, -1):
            prefix = ".".join(parts[:end]).replace(".[", "[")
            if prefix in self.overrides:
                return self.overrides[prefix].location, 0
            if prefix in self.lines:
                return f"{self.file_name}:{self.lines[prefix]}", self.lines[prefix]
        return self.file_name, 0

    def problem(self, path: str, message: str) -> Problem:
        location, line = self._find(path)
        return Problem(location, path, message, line)

    def provenance(self, path: str) -> str:
        """'--set', 'file.toml:LINE' or 'default' for a leaf path (only exact matches count)."""
        if path in self.overrides:
            return "--set"
        if path in self.lines:
            return f"{self.file_name}:{self.lines[path]}"
        return "default"


def load_pipeline(path: str, overrides: list[str] | tuple[str, ...] = ()) -> PipelineConfig:
    """Load and check a pipeline; raises ConfigError listing every problem."""
    file_name = os.path.basename(path)
    try:
        with open(path, "rb") as handle:
            data = handle.read()
    except OSError as error:
        raise ConfigError([Problem(file_name, "<file>", f"cannot read pipeline file: {error.strerror}")]) from None
    try:
        text = data.decode("utf-8").replace("\r\n", "\n").replace("\r", "\n")  # as text mode reads it
    except UnicodeDecodeError as error:
        line = data[:error.start].count(b"\n") + 1
        raise ConfigError([Problem(f"{file_name}:{line}", "<file>", f"not UTF-8 text (byte {data[error.start]:#04x} "
                                                                    f"at offset {error.start}); TOML files are UTF-8: "
                                                                    f"save the file as UTF-8", line)]) from None
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as error:
        line = re.search(r"at line (\d+)", str(error))
        location = f"{file_name}:{line.group(1)}" if line else file_name
        raise ConfigError([Problem(location, "<file>", f"TOML syntax error: {error}")]) from None

    locator = Locator(file_name, key_lines(text), {})
    problems: list[Problem] = []
    for override_text in overrides:
        try:
            override = parse_override(override_text)
        except ValueError as error:
            problems.append(Problem(f"--set {override_text}", override_text, str(error)))
            continue
        if override.parts[0] == "models" and len(override.parts) > 2 and override.parts[1] not in raw.get("models", {}):
            name = override.parts[1]
            problems.append(Problem(override.location, override.path,
                                    f"no model named {name!r}{did_you_mean(name, raw.get('models', {}))}"))
            continue
        message = apply_override(raw, override)
        if message:
            problems.append(Problem(override.location, override.path, message))
        else:
            locator.overrides[override.path] = override

    typed = _type_sections(raw, locator, problems)
    if problems:
        raise ConfigError(problems)
    pipeline, models, data, stages = typed
    stages = _resolve_stage_defaults(stages, data)
    if pipeline.output_dir is None:
        pipeline = attrs.evolve(pipeline, output_dir=f"runs/{pipeline.name}")
    base_dir = os.path.dirname(os.path.abspath(path))
    shapes = checks.cross_check(pipeline, models, data, stages, base_dir, locator.problem, problems)
    if problems:
        raise ConfigError(problems)
    return PipelineConfig(pipeline=pipeline, models=models, data=data, stages=stages,
                          source_file=os.path.abspath(path), base_dir=base_dir, shapes=shapes,
                          provenance=_provenance(locator, pipeline, models, data, stages))


def _type_section(table, cls, path, locator, problems):
    value, found = structure(table, cls, path)
    problems += [locator.problem(where, message) for where, message in found]
    if value is not None:
        problems += [locator.problem(f"{path}.{field}", message) for field, message in checks.value_problems(value)]
    return value


def _type_sections(raw: dict, locator: Locator, problems: list[Problem]):
    pipeline = _type_section(raw.get("pipeline", {}), PipelineSection, "pipeline", locator, problems)
    data = _type_section(raw.get("data", {}), DataConfig, "data", locator, problems)
    models = {}
    raw_models = raw.get("models", {})
    if not isinstance(raw_models, dict):
        problems.append(locator.problem("models", f"expected tables [models.<name>], got {describe(raw_models)}"))
        raw_models = {}
    for name, table in raw_models.items():
        models[name] = _type_section(table, ModelConfig, f"models.{name}", locator, problems)
    stages = {}
    for name, table in raw.items():
        if name in SECTIONS:
            continue
        if not isinstance(table, dict):
            hint = did_you_mean(name, [*SECTIONS, *KIND_NAMES])
            problems.append(locator.problem(name, f"unknown top-level key{hint} (top-level keys are tables)"))
            continue
        table = dict(table)
        nested = _nested_stage_tables(name, table, locator, problems)
        if nested is not None:
            for sub, sub_table in nested.items():
                config = _type_section(sub_table, stage_kind(name).config_class, f"{name}.{sub}", locator, problems)
                stages[f"{name}.{sub}"] = StageEntry(name=f"{name}.{sub}", kind=name, config=config)
            continue
        kind = table.pop("kind", name)
        if not isinstance(kind, str) or kind not in KIND_NAMES:
            where = f"{name}.kind" if "kind" in raw[name] else name
            what = (f"unknown stage kind {kind!r}" if isinstance(kind, str)
                    else f"kind must be a string, got {describe(kind)}")
            hint = did_you_mean(kind, KIND_NAMES) if isinstance(kind, str) else ""
            problems.append(locator.problem(where, f"{what}{hint} (a stage table's kind defaults to its name; "
                                                   f"kinds: {', '.join(KIND_NAMES)})"))
            continue
        config = _type_section(table, stage_kind(kind).config_class, name, locator, problems)
        stages[name] = StageEntry(name=name, kind=kind, config=config)
    return pipeline, models, data, stages


def _nested_stage_tables(name: str, table: dict, locator: Locator, problems: list[Problem]) -> dict | None:
    """`[teacher_score.math]` tables: several stages of the kind `name`, each named `<kind>.<sub>`; None when the
    table is one stage. A sub-table is a stage when its key is not a field of the kind's Config."""
    if name not in KIND_NAMES or "kind" in table:
        return None
    fields = attrs.fields_dict(stage_kind(name).config_class)
    subs = {key: value for key, value in table.items() if isinstance(value, dict) and key not in fields}
    if not subs:
        return None
    settings = [key for key in table if key not in subs]
    if settings:
        problems.append(locator.problem(f"{name}.{settings[0]}", (
            f"[{name}] holds settings ({', '.join(settings)}) beside stage tables "
            f"({', '.join(f'[{name}.{sub}]' for sub in subs)}); put each setting into the stage tables")))
        return {}
    for sub, sub_table in subs.items():
        if "/" in sub or "." in sub:  # group-local step and buffer names are "<sub>/..."; names are dotted paths
            problems.append(locator.problem(f"{name}.{sub}", (
                f"[{name}.{sub}]: a stage name may not contain '/' or '.'; rename the table")))
            return {}
        if "kind" in sub_table and sub_table["kind"] != name:
            problems.append(locator.problem(f"{name}.{sub}.kind", (
                f"[{name}.{sub}] is a stage of kind {name!r} (its table's parent); remove kind = "
                f"{sub_table['kind']!r} or move the table out of [{name}]")))
            return {}
    return {sub: {key: value for key, value in sub_table.items() if key != "kind"} for sub, sub_table in subs.items()}


def _resolve_stage_defaults(stages: dict[str, StageEntry], data: DataConfig) -> dict[str, StageEntry]:
    """Fill defaults that come from other sections: each kind's `resolve_defaults(stage_name, config, data,
    settings)` (stages/<kind>.py; eval: files <- data.eval_files, max_new_tokens <- rollout's), in table order, on the
    step settings the typed tables publish (by name, stages.named_settings)."""
    settings = named_settings(stages, "step_settings")
    resolved = {}
    for name, stage in stages.items():
        resolve = getattr(stage_module(stage.kind), "resolve_defaults", None)
        if resolve is not None:
            stage = attrs.evolve(stage, config=resolve(name, stage.config, data, settings))
        resolved[name] = stage
    return resolved


def _provenance(locator, pipeline, models, data, stages) -> dict[str, str]:
    """Leaf path -> where its value came from ('default', 'file.toml:LINE', '--set')."""
    sections = {"pipeline": pipeline, "data": data, **{f"models.{name}": model for name, model in models.items()},
                **{name: stage.config for name, stage in stages.items()}}
    provenance = {}
    for prefix, config in sections.items():
        for path in _leaf_paths(config, prefix):
            provenance[path] = locator.provenance(path)
    for name in stages:
        provenance[f"{name}.kind"] = locator.provenance(f"{name}.kind")
    return provenance


def _leaf_paths(config, prefix: str):
    for field in attrs.fields(type(config)):
        value = getattr(config, field.name)
        if attrs.has(type(value)):
            yield from _leaf_paths(value, f"{prefix}.{field.name}")
        else:
            yield f"{prefix}.{field.name}"
