"""Loading shipped pipelines, --set precedence and parsing, provenance, the line finder, and the config round trip
(`opdgraph config` output loads back to the same config)."""

from __future__ import annotations

import pathlib
import shutil

import pytest

from opdgraph.config import load_pipeline, render_resolved
from opdgraph.config.lines import key_lines
from opdgraph.config.overrides import parse_override
from opdgraph.stages import KIND_NAMES, stage_kind

PIPELINES = pathlib.Path(__file__).parent.parent / "pipelines"
SHIPPED = sorted(path.name for path in PIPELINES.glob("*.toml"))
SMOLLM_JSON = "models.teacher.path=pkg:opdgraph/model_configs/smollm2-135m-instruct.json"
SMOLLM_STUDENT_JSON = "models.student.path=pkg:opdgraph/model_configs/smollm2-135m-instruct.json"


def overrides_for(name):
    """The SmolLM2 pipelines' model is a GGUF in an optional wheel; use the shipped config json so tests never
    need it (the demo distils the model into itself: its only model is the student)."""
    return {"demo.toml": [SMOLLM_STUDENT_JSON], "prune_distill.toml": [SMOLLM_JSON]}.get(name, [])


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_pipelines_load(name):
    """If this fails, a shipped pipeline no longer passes its own config checks."""
    cfg = load_pipeline(str(PIPELINES / name), overrides_for(name))
    assert cfg.model_with_role("student") in cfg.shapes
    assert all(cfg.stages[name].config.model in cfg.shapes for name in cfg.stages if name.startswith("teacher_score"))


def test_pruned_student_keeps_the_chosen_layers():
    """If this fails, init_from + keep_layers no longer shapes the student from the teacher."""
    cfg = load_pipeline(str(PIPELINES / "prune_distill.toml"), [SMOLLM_JSON])
    assert cfg.shapes["teacher"].layers == 30 and cfg.shapes["student"].layers == 15
    assert cfg.shapes["student"].hidden == cfg.shapes["teacher"].hidden


def test_set_wins_over_file_and_parses_toml_literals():
    """If this fails, --set no longer overrides the file, or its value parsing changed."""
    cfg = load_pipeline(str(PIPELINES / "tiny.toml"), [
        "rollout.max_new_tokens=48", "rollout.backend=torch", "data.train_files=[\"data/tiny_train.jsonl\", \"data/tiny_eval.jsonl\"]",
        "pipeline.memory_budget_gib=2", "rollout.max_new_tokens=40"])
    rollout = cfg.stages["rollout"].config
    assert rollout.max_new_tokens == 40  # the last --set wins
    assert rollout.backend == "torch"  # a bare word is a string
    assert cfg.data.train_files == ["data/tiny_train.jsonl", "data/tiny_eval.jsonl"]
    assert cfg.pipeline.memory_budget_gib == 2.0
    assert cfg.provenance["rollout.max_new_tokens"] == "--set"
    assert cfg.provenance["rollout.page_size"] == "tiny.toml:30"
    assert cfg.provenance["rollout.top_p"] == "default"


def test_parse_override_literals():
    """If this fails, --set values stop being read as TOML literals first."""
    assert parse_override("a.b=3").value == 3
    assert parse_override("a.b=3.5").value == 3.5
    assert parse_override("a.b=true").value is True
    assert parse_override('a.b="true"').value == "true"
    assert parse_override("a.b=[1, 2]").value == [1, 2]
    assert parse_override("a.b=hello world").value == "hello world"
    with pytest.raises(ValueError):
        parse_override("a.b")
    with pytest.raises(ValueError):
        parse_override("a..b=1")


@pytest.mark.parametrize("name", SHIPPED)
def test_resolved_config_round_trips(name, tmp_path):
    """If this fails, `opdgraph config` output does not load back to the same config (writer or provenance bug)."""
    overrides = [*overrides_for(name), "rollout.top_k=5", "loss.temperature=2"]
    cfg = load_pipeline(str(PIPELINES / name), overrides)
    resolved = tmp_path / name
    resolved.write_text(render_resolved(cfg), encoding="utf-8")
    shutil.copytree(PIPELINES / "data", tmp_path / "data", dirs_exist_ok=True)
    reloaded = load_pipeline(str(resolved))
    for attribute in ("pipeline", "models", "data", "stages", "shapes"):
        assert getattr(reloaded, attribute) == getattr(cfg, attribute), attribute
    assert "# --set" in resolved.read_text() and "# default" in resolved.read_text()


def test_line_finder():
    """If this fails, error locations and provenance comments point at the wrong lines."""
    text = '\n'.join([
        "[pipeline]", "name = \"x\"  # comment", "", "[models.student]", "config = { a = 1 }",
        "list = [", "  \"not = a key\",", "]", "desc = \"\"\"", "fake = 1", "\"\"\"", "[pipeline.hardware]",
        "\"quoted key\" = 2", "dotted.key = 3"])
    lines = key_lines(text)
    assert lines["pipeline"] == 1 and lines["pipeline.name"] == 2
    assert lines["models.student"] == 4 and lines["models.student.config"] == 5
    assert lines["models.student.list"] == 6 and "models.student.fake" not in lines
    assert lines["pipeline.hardware"] == 12 and lines["pipeline.hardware.quoted key"] == 13
    assert lines["pipeline.hardware.dotted.key"] == 14


@pytest.mark.parametrize("kind", KIND_NAMES)
def test_every_stage_field_has_help(kind):
    """If this fails, a stage Config field lacks the help string `opdgraph config` and docs rely on."""
    import attrs
    config_class = stage_kind(kind).config_class
    assert attrs.has(config_class)
    for field in attrs.fields(config_class):
        assert field.metadata.get("help"), f"{kind}.{field.name} has no help"


def test_every_section_field_has_help():
    """If this fails, a [pipeline]/[models]/[data] field lacks its help string."""
    import attrs
    from opdgraph.config.schema import DataConfig, HardwareConfig, ModelConfig, PipelineSection
    for config_class in (PipelineSection, HardwareConfig, ModelConfig, DataConfig):
        for field in attrs.fields(config_class):
            assert field.metadata.get("help"), f"{config_class.__name__}.{field.name} has no help"
