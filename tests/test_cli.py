"""The `opdgraph` command line: plan/config subcommands, formats, exit codes, and the torch-free guarantee."""

from __future__ import annotations

import json
import pathlib
import subprocess
import sys

import pytest

from opdgraph.cli import EXIT_CONFIG_ERROR, EXIT_OVER_BUDGET, SUBCOMMANDS, main

ROOT = pathlib.Path(__file__).parent.parent
TINY = str(ROOT / "pipelines" / "tiny.toml")


def test_plan_text(capsys):
    """If this fails, `opdgraph plan` no longer prints the schedule or exits 0 for a plan within budget."""
    assert main(["plan", TINY]) == 0
    out = capsys.readouterr().out
    assert "Peak" in out and "Buffer lifetimes" in out and "rollout.kv_cache" in out


def test_plan_json_and_html_to_files(tmp_path):
    """If this fails, --format json/html with --out stopped writing a complete, parseable file."""
    json_path, html_path = tmp_path / "plan.json", tmp_path / "plan.html"
    assert main(["plan", TINY, "--format", "json", "--out", str(json_path)]) == 0
    data = json.loads(json_path.read_text())
    assert data["peak_bytes"] == max(step["live_bytes"] for step in data["steps"])
    assert main(["plan", TINY, "--format", "html", "--out", str(html_path)]) == 0
    assert html_path.read_text().startswith("<!DOCTYPE html>")


def test_over_budget_exits_2_and_names_the_peak(capsys):
    """If this fails, a plan over pipeline.memory_budget_gib no longer fails with the peak step, the largest
    buffers there and the config keys that size them."""
    assert main(["plan", TINY, "--set", "pipeline.memory_budget_gib=0.001"]) == EXIT_OVER_BUDGET
    err = capsys.readouterr().err
    assert "exceeds pipeline.memory_budget_gib" in err and "at step '" in err and "sized by" in err


def test_config_error_exits_2_listing_every_problem(capsys):
    """If this fails, config mistakes stop being reported together on stderr with exit code 2."""
    code = main(["plan", TINY, "--set", "rollout.max_new_tokns=3", "--set", "pipeline.seed=1.5"])
    err = capsys.readouterr().err
    assert code == EXIT_CONFIG_ERROR
    assert "did you mean 'max_new_tokens'" in err and "pipeline.seed: expected an integer" in err


def test_config_subcommand_shows_provenance(capsys):
    """If this fails, `opdgraph config` no longer marks where each value came from."""
    assert main(["config", TINY, "--set", "loss.chunk_tokens=64"]) == 0
    out = capsys.readouterr().out
    assert "chunk_tokens = 64  # --set" in out and "max_new_tokens = 24  # tiny.toml:" in out
    assert "top_p = 1.0  # default" in out


def test_subcommands_are_a_table():
    """If this fails, adding a subcommand is no longer a one-entry change to SUBCOMMANDS."""
    assert set(SUBCOMMANDS) >= {"plan", "config"}
    for help_text, add_arguments, run in SUBCOMMANDS.values():
        assert isinstance(help_text, str) and callable(add_arguments) and callable(run)


def test_python_dash_m_runs():
    """If this fails, `python -m opdgraph` is broken."""
    result = subprocess.run([sys.executable, "-m", "opdgraph", "plan", TINY, "--format", "json"],
                            capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["name"] == "tiny"


BLOCKED_TORCH = """
import sys
sys.modules["torch"] = None  # any `import torch` now raises ImportError
import opdgraph.config, opdgraph.graph, opdgraph.plan, opdgraph.lifetime, opdgraph.render, opdgraph.cli
import opdgraph.compile, opdgraph.sizing, opdgraph.work, opdgraph.model_shapes
from opdgraph.stages import KIND_NAMES, stage_kind
for kind in KIND_NAMES:
    stage_kind(kind)
from opdgraph.cli import main
assert main(["plan", sys.argv[1], "--format", "json", "--out", sys.argv[2]]) == 0
assert main(["plan", sys.argv[1], "--format", "torch-snapshot", "--out", sys.argv[2] + ".pickle"]) == 0
assert main(["config", sys.argv[1]]) == 0
"""


def test_compiler_core_imports_without_torch(tmp_path):
    """If this fails, the compiler core (config, graph, plan, lifetime, render, cli, stages) imports torch."""
    result = subprocess.run([sys.executable, "-c", BLOCKED_TORCH, TINY, str(tmp_path / "plan.json")],
                            capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, result.stderr


def test_a_batch_that_does_not_split_over_the_ranks_exits_2(capsys, monkeypatch):
    """If this fails, a world size that does not divide data.prompts_per_step (plan --nproc-per-node, or torchrun's
    WORLD_SIZE for run) ends in a traceback, or its message no longer names the key, its line and the rank count."""
    fragment = "data.prompts_per_step = 8 (tiny.toml:24) is not divisible by 3 ranks"
    assert main(["plan", TINY, "--nproc-per-node", "3"]) == EXIT_CONFIG_ERROR
    assert fragment in capsys.readouterr().err
    monkeypatch.setenv("WORLD_SIZE", "3")
    assert main(["run", TINY]) == EXIT_CONFIG_ERROR  # refused before anything is loaded or written
    assert fragment in capsys.readouterr().err
    assert main(["plan", TINY, "--nproc-per-node", "0"]) == EXIT_CONFIG_ERROR
    assert "--nproc-per-node must be at least 1, got 0" in capsys.readouterr().err


def test_an_internal_error_while_compiling_keeps_its_traceback(monkeypatch):
    """If this fails, a bug inside fit or compile (a plain ValueError) is printed as if the user had made a mistake,
    and its traceback is lost."""
    import opdgraph.fit

    def broken(cfg, world_size=1):
        raise ValueError("internal bug")

    monkeypatch.setattr(opdgraph.fit, "fit_plan", broken)
    with pytest.raises(ValueError, match="internal bug"):
        main(["plan", TINY])


def test_run_plans_for_the_device_it_runs_on(monkeypatch, capsys):
    """If this fails, `opdgraph run` of a pipeline with device = "auto" on a machine without CUDA executes the CUDA
    plan (FlashAttention's activations, the fused loss's chunk, CUDA's overheads) instead of the CPU's."""
    import torch

    import opdgraph.cli as cli

    compiled = []
    original = cli._compile
    monkeypatch.setattr(cli, "_compile", lambda cfg, world: compiled.append(cfg) or original(cfg, world))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert main(["run", TINY, "--check"]) == 0
    (cfg,) = compiled
    assert cfg.pipeline.device == "cpu"
    plan = original(cfg, 1).plan
    assert not any(name.startswith("cuda.") for name in plan.buffers)
