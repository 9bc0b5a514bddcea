"""Which linear-attention core a Qwen3.5 model runs (kernels/fla_linear_attention.py selection), without fla or CUDA,
and that the plan sizes the same core (opdgraph.planned_paths.fla_linear_core).

fla's core on CUDA, the torch core on the CPU; OPDGRAPH_LINEAR_ATTENTION = torch plans and runs the torch core, = fla
requires fla's (a CPU target is a DeviceError, in the plan and at startup), a CUDA run whose fla does not import
stops at startup, before any weights load, with a DeviceError (not another core than the plan's), anything else in
the variable is refused. The plan says which core it sized and lists the variable among the workspaces' sizing keys;
the run log names the core (engine_setup's use_packed_attention, the line after "packed attention: ..."). The
numbers of the fla core are tested in test_qwen35_fla.py (interpreted on CPU, compiled on a GPU).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from opdgraph import sizing
from opdgraph.cli import main
from opdgraph.compile import compile_plan
from opdgraph.config import load_pipeline
from opdgraph.errors import DeviceError
from opdgraph.kernels import fla_linear_attention as selection
from opdgraph.models import load_decoder
from opdgraph.models.linear_attention_backend import TorchLinearAttention
from opdgraph.models.tiny_configs import tiny_config
from opdgraph.planned_paths import LINEAR_CORE_ENVIRONMENT
from opdgraph.render import render_json, render_text
from opdgraph.runtime import startup
from opdgraph.runtime.engine_setup import use_packed_attention

PIPELINES = Path(__file__).resolve().parent.parent / "pipelines"
PIPELINE = PIPELINES / "qwen35_0b8_from_4b.toml"
# tiny.toml with Qwen3.5 models (4 layers, 3 of them gated-DeltaNet), as tests/test_qwen35_run.py builds it.
HYBRID = ('model_type = "qwen3_5_text", num_hidden_layers = 4, head_dim = 16, linear_num_key_heads = 2, '
          'linear_num_value_heads = 4, linear_key_head_dim = 16, linear_value_head_dim = 8, ')
WORKSPACES = ("rollout.workspace", "teacher_score.workspace", "eval.workspace")


def _tiny_qwen35(tmp_path: Path) -> Path:
    text = (PIPELINES / "tiny.toml").read_text().replace('model_type = "llama", ', HYBRID)
    text = text.replace("num_hidden_layers = 2, ", "").replace("num_hidden_layers = 3, ", "")
    pipeline = tmp_path / "tiny_qwen35.toml"
    pipeline.write_text(text.replace('"data/', f'"{PIPELINES}/data/'))
    return pipeline


@pytest.fixture
def fla_importable(monkeypatch):
    """Pretend fla imports (or not: set .problem), whatever is installed here."""
    state = type("FlaState", (), {"problem": None})()
    monkeypatch.setattr(selection, "fla_import_problem", lambda: state.problem)
    monkeypatch.delenv(LINEAR_CORE_ENVIRONMENT, raising=False)
    return state


def test_cuda_takes_fla_and_the_cpu_the_torch_core(fla_importable):
    """If this fails, GPU runs keep the slow torch core although fla is there, or a CPU run tries fla's kernels."""
    assert isinstance(selection.select_linear_backend("cuda"), selection.FlaLinearAttention)
    assert selection.linear_backend_problem("cuda") is None
    assert isinstance(selection.select_linear_backend("cpu"), TorchLinearAttention)
    assert selection.linear_backend_description("cpu") == "linear attention: torch core (tensors on cpu)"


def test_a_cuda_run_without_fla_stops_with_what_to_do(fla_importable):
    """If this fails, a GPU machine without a working fla runs the torch core, whose peaks the plan did not size,
    or stops with a traceback instead of saying how to go on."""
    fla_importable.problem = "flash-linear-attention does not import (No module named 'fla')"
    with pytest.raises(DeviceError, match=r"does not import.*opdgraph\[gpu\].*OPDGRAPH_LINEAR_ATTENTION=torch"):
        selection.select_linear_backend("cuda")
    assert isinstance(selection.select_linear_backend("cpu"), TorchLinearAttention)


def test_environment_forces_the_torch_core_and_rejects_typos(fla_importable, monkeypatch):
    """If this fails, OPDGRAPH_LINEAR_ATTENTION=torch does not force the reference core, or a typo is taken as auto."""
    monkeypatch.setenv(LINEAR_CORE_ENVIRONMENT, "torch")
    assert type(selection.select_linear_backend("cuda")) is TorchLinearAttention  # the reference, decode included
    assert selection.linear_backend_description("cuda") == (
        f"linear attention: torch core ({LINEAR_CORE_ENVIRONMENT}=torch)")
    monkeypatch.setenv(LINEAR_CORE_ENVIRONMENT, "fla")
    assert isinstance(selection.select_linear_backend("cuda"), selection.FlaLinearAttention)
    monkeypatch.setenv(LINEAR_CORE_ENVIRONMENT, "triton")
    with pytest.raises(DeviceError, match="choose one of auto, fla, torch"):
        selection.select_linear_backend("cuda")


def _qwen35_workspaces(monkeypatch, setting: str | None) -> tuple[dict, object]:
    if setting is None:
        monkeypatch.delenv(LINEAR_CORE_ENVIRONMENT, raising=False)
    else:
        monkeypatch.setenv(LINEAR_CORE_ENVIRONMENT, setting)
    cfg = load_pipeline(str(PIPELINE), overrides=["pipeline.device=\"cuda\""])
    plan = compile_plan(cfg)
    return {name: buffer.bytes for name, buffer in plan.buffers.items()}, cfg


def test_the_plan_sizes_the_core_the_runtime_selects(monkeypatch):
    """If this fails, a CUDA plan of a Qwen3.5 pair sizes another linear core than the one that runs: the teacher's
    forward workspace and the rollout's must follow fla's peaks with fla (the torch core's are larger: a plan 15%
    over the measured teacher_score peak on an H200) and the torch core's under OPDGRAPH_LINEAR_ATTENTION=torch."""
    fla, cfg = _qwen35_workspaces(monkeypatch, None)
    torch_core, _ = _qwen35_workspaces(monkeypatch, "torch")
    teacher, shape = "teacher_score.workspace", cfg.shapes["teacher"]
    tokens, sequences = 16384, 64 * 2  # teacher_score.micro_batch_tokens; prompts x samples share it at most
    mlp = sizing.mlp_workspace_bytes(shape, tokens, 2)
    fla_peak = sizing.fla_core_peak_bytes(shape, tokens, sequences, 2, paged=False)
    torch_peak = sizing.linear_core_peak_bytes(shape, tokens, 2)
    assert torch_peak > fla_peak > mlp  # the case this test is about: the cores' peaks decide the workspace
    assert fla[teacher] <= max(mlp, fla_peak) and fla[teacher] < torch_core[teacher]
    assert torch_core[teacher] <= max(mlp, torch_peak)
    assert fla["rollout.workspace"] < torch_core["rollout.workspace"]


def test_run_log_names_the_linear_core_of_hybrid_models_only():
    """If this fails, the run log does not say which linear-attention core a Qwen3.5 run uses (or says it for
    models that have none)."""
    hybrid = load_decoder(tiny_config("qwen3_5"), dtype=torch.float32)
    plain = load_decoder(tiny_config("qwen3"), dtype=torch.float32)
    assert use_packed_attention([plain], torch.device("cpu")).splitlines() == [
        "packed attention: torch reference (cpu)"]
    lines = use_packed_attention([plain, hybrid], torch.device("cpu")).splitlines()
    assert lines[1].startswith("linear attention: torch core") and isinstance(hybrid.linear_backend,
                                                                              TorchLinearAttention)


def test_fla_required_on_a_cpu_target_is_an_error_in_plan_and_runtime(fla_importable, monkeypatch, tmp_path, capsys):
    """If this fails, OPDGRAPH_LINEAR_ATTENTION=fla on a CPU target silently plans or runs the torch core (a core
    the user did not ask for), or says so with a traceback; or the variable stops plans without linear layers."""
    monkeypatch.setenv(LINEAR_CORE_ENVIRONMENT, "fla")
    with pytest.raises(DeviceError, match=r"=fla requires flash-linear-attention.*CUDA.*'cpu'.*unset.*torch"):
        selection.select_linear_backend("cpu")
    pipeline = _tiny_qwen35(tmp_path)
    with pytest.raises(DeviceError, match=r"=fla requires flash-linear-attention.*CUDA"):
        compile_plan(load_pipeline(str(pipeline), ["pipeline.device=\"cpu\""]))
    assert main(["plan", str(pipeline), "--set", "pipeline.device=cpu"]) == 2
    err = capsys.readouterr().err
    assert "=fla requires flash-linear-attention" in err and "Traceback" not in err, err
    plain = compile_plan(load_pipeline(str(PIPELINES / "tiny.toml"), ["pipeline.device=\"cpu\""]))
    assert "linear_attention_core" not in plain.facts


def _run_check(pipeline: Path, tmp_path: Path, monkeypatch, device: str) -> int:
    """`opdgraph run --check` of `pipeline`, the runtime seeing `device`; fails the test if weights load."""
    monkeypatch.setattr(startup, "pick_device", lambda setting: torch.device(device))
    monkeypatch.setattr("opdgraph.models.load_decoder", lambda *a, **k: pytest.fail("weights loaded"))
    return main(["run", str(pipeline), "--check", "--set", f"pipeline.output_dir={json.dumps(str(tmp_path / 'run'))}"])


def test_startup_stops_a_cuda_run_without_fla_before_loading(fla_importable, monkeypatch, tmp_path, capsys):
    """If this fails, a CUDA run of a Qwen3.5 pipeline whose fla does not import learns it only after the weights
    loaded (minutes on a real job), or a pipeline without linear layers is stopped for it."""
    fla_importable.problem = "flash-linear-attention does not import (No module named 'fla')"
    monkeypatch.setattr(startup, "load_tokenizers", lambda *a, **k: pytest.fail("tokenizers loaded before the check"))
    assert _run_check(_tiny_qwen35(tmp_path), tmp_path, monkeypatch, "cuda") == 2
    err = capsys.readouterr().err
    assert "does not import" in err and "opdgraph[gpu]" in err and f"{LINEAR_CORE_ENVIRONMENT}=torch" in err, err
    assert "Traceback" not in err


def test_startup_asks_nothing_of_fla_without_linear_layers(fla_importable, monkeypatch, tmp_path):
    """If this fails, a CUDA run of models without linear-attention layers is stopped by fla's absence."""
    monkeypatch.setattr(selection, "fla_import_problem", lambda: pytest.fail("fla checked for a plain pipeline"))
    assert _run_check(PIPELINES / "tiny.toml", tmp_path, monkeypatch, "cuda") == 0


def test_startup_refuses_fla_when_auto_runs_on_the_cpu(fla_importable, monkeypatch, tmp_path, capsys):
    """If this fails, OPDGRAPH_LINEAR_ATTENTION=fla with pipeline.device = "auto" (planned for CUDA) on a machine
    without CUDA runs the torch core silently, or fails only once the weights loaded."""
    monkeypatch.setenv(LINEAR_CORE_ENVIRONMENT, "fla")
    assert _run_check(_tiny_qwen35(tmp_path), tmp_path, monkeypatch, "cpu") == 2
    err = capsys.readouterr().err
    assert "=fla requires flash-linear-attention" in err and "Traceback" not in err, err


@pytest.mark.parametrize("setting, core", [(None, "fla"), ("fla", "fla"), ("torch", "torch")])
def test_the_plan_shows_the_core_it_sized(monkeypatch, tmp_path, setting, core):
    """If this fails, the plan of a Qwen3.5 pipeline does not say which linear-attention core it sized, or its
    workspaces do not list OPDGRAPH_LINEAR_ATTENTION (and the device) among what sized them."""
    if setting is None:
        monkeypatch.delenv(LINEAR_CORE_ENVIRONMENT, raising=False)
    else:
        monkeypatch.setenv(LINEAR_CORE_ENVIRONMENT, setting)
    plan = compile_plan(load_pipeline(str(_tiny_qwen35(tmp_path)), ["pipeline.device=\"cuda\""]))
    assert plan.facts["linear_attention_core"] == core
    assert f'"linear_attention_core": "{core}"' in render_json(plan)
    assert f"  linear attention: {core} core (chosen by pipeline.device and {LINEAR_CORE_ENVIRONMENT}" in \
        render_text(plan)
    for name in WORKSPACES:
        assert {"pipeline.device", LINEAR_CORE_ENVIRONMENT} <= set(plan.buffers[name].sized_by), name
        assert len(set(plan.buffers[name].sized_by)) == len(plan.buffers[name].sized_by), name


def test_plans_without_linear_layers_keep_their_facts_and_keys():
    """If this fails, plans of models without linear-attention layers name a linear core or the variable."""
    plan = compile_plan(load_pipeline(str(PIPELINES / "tiny.toml"), ["pipeline.device=\"cuda\""]))
    assert "linear_attention_core" not in plan.facts and "linear attention:" not in render_text(plan)
    assert not any(LINEAR_CORE_ENVIRONMENT in buffer.sized_by for buffer in plan.buffers.values())
