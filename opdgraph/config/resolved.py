"""The `opdgraph config` output: the fully resolved pipeline as TOML, each value commented with where it came from.

Comments read `# default`, `# file.toml:12` or `# --set`. Unset optional values appear as comments, so the output
loads back (with no overrides) to the same config. Tables keep the file's layout: [pipeline], [pipeline.hardware],
[models.<name>], [data], then the stage tables in file order.
"""

from __future__ import annotations

import os

import attrs

from opdgraph.config.schema import PipelineConfig
from opdgraph.config.strict import unstructure
from opdgraph.config.toml_writer import format_key, format_value


def _table_lines(header: str, config, provenance: dict[str, str], extra: dict | None = None) -> list[str]:
    lines, subtables = [f"[{header}]"], []
    values = unstructure(config)
    for key, value in (extra or {}).items():
        lines.append(f"{format_key(key)} = {format_value(value)}  # {provenance.get(f'{header}.{key}', 'default')}")
    for field in attrs.fields(type(config)):
        path = f"{header}.{field.name}"
        value = getattr(config, field.name)
        if attrs.has(type(value)):
            subtables += ["", *_table_lines(path, value, provenance)]
        elif value is None:
            lines.append(f"# {field.name} is unset  # {provenance.get(path, 'default')}")
        else:
            lines.append(f"{format_key(field.name)} = {format_value(values[field.name])}  "
                         f"# {provenance.get(path, 'default')}")
    return lines + subtables


def render_resolved(cfg: PipelineConfig) -> str:
    out = [f"# Resolved config of {os.path.basename(cfg.source_file)}: every value, with where it came from.", ""]
    out += _table_lines("pipeline", cfg.pipeline, cfg.provenance)
    for name, model in cfg.models.items():
        out += ["", *_table_lines(f"models.{format_key(name)}", model, cfg.provenance)]
    out += ["", *_table_lines("data", cfg.data, cfg.provenance)]
    for name, stage in cfg.stages.items():
        extra = {"kind": stage.kind} if stage.kind != name else None
        out += ["", *_table_lines(format_key(name), stage.config, cfg.provenance, extra)]
    return "\n".join(out) + "\n"
