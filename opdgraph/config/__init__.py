"""Pipeline configuration: TOML file + `--set` overrides -> typed, strictly checked PipelineConfig.

Public API: `load_pipeline(path, overrides) -> PipelineConfig` (raises `ConfigError`, whose str lists every problem
as `file:line  dotted.path: message`) and `render_resolved(cfg) -> str` (the `opdgraph config` output).
"""

from opdgraph.config.errors import ConfigError, Problem
from opdgraph.config.loader import load_pipeline
from opdgraph.config.schema import DataConfig, ModelConfig, PipelineConfig, PipelineSection, StageEntry

__all__ = ["ConfigError", "DataConfig", "ModelConfig", "PipelineConfig", "PipelineSection", "Problem", "StageEntry",
           "load_pipeline", "render_resolved"]


def render_resolved(cfg: PipelineConfig) -> str:
    from opdgraph.config.resolved import render_resolved as render  # the writer is only needed by `opdgraph config`
    return render(cfg)
