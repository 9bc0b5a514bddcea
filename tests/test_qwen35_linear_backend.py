"""Which linear-attention core a Qwen3.5 model runs (kernels/fla_linear_attention.py selection), without fla or CUDA,
and that the plan sizes the same core (opdgraph.planned_paths.fla_linear_core).

fla's core on CUDA, the torch core on the CPU; OPDGRAPH_LINEAR_ATTENTION = torch plans and runs the torch core, a
CUDA run whose fla does not import stops with a DeviceError (not another core than the plan's), anything else in the
variable is refused. The run log names the core (engine_setup's use_packed_attention, the line after "packed
attention: ..."). The numbers of the fla core are tested in test_qwen35_fla.py (interpreted on CPU, compiled on a GPU).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from opdgraph import sizing
from opdgraph.compile import compile_plan
from opdgraph.config import load_pipeline
from opdgraph.errors import DeviceError
from opdgraph.kernels import fla_linear_attention as selection
from opdgraph.models import load_decoder
from opdgraph.models.linear_attention_backend import TorchLinearAttention
from opdgraph.models.tiny_configs import tiny_config
from opdgraph.planned_paths import LINEAR_CORE_ENVIRONMENT
from opdgraph.runtime.engine_setup import use_packed_attention

PIPELINE = Path(__file__).resolve().parent.parent / "pipelines" / "qwen35_0b8_from_4b.toml"


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
