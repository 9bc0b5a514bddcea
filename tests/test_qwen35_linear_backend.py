"""Which linear-attention core a Qwen3.5 model runs (kernels/fla_linear_attention.py selection), without fla or CUDA.

fla's core on CUDA when fla imports, the torch core otherwise; OPDGRAPH_LINEAR_ATTENTION = torch forces the torch
core, = fla makes a missing fla an error, anything else is refused. The run log names the core (engine_setup's
use_packed_attention, the line after "packed attention: ..."). The numbers of the fla core are tested in
test_qwen35_fla.py (interpreted on CPU, compiled on a GPU).
"""

from __future__ import annotations

import pytest
import torch

from opdgraph.kernels import fla_linear_attention as selection
from opdgraph.models import load_decoder
from opdgraph.models.linear_attention_backend import TorchLinearAttention
from opdgraph.models.tiny_configs import tiny_config
from opdgraph.runtime.engine_setup import use_packed_attention


@pytest.fixture
def fla_importable(monkeypatch):
    """Pretend fla imports (or not: set .problem), whatever is installed here."""
    state = type("FlaState", (), {"problem": None})()
    monkeypatch.setattr(selection, "fla_import_problem", lambda: state.problem)
    monkeypatch.delenv(selection.ENVIRONMENT, raising=False)
    return state


def test_cuda_takes_fla_when_it_imports(fla_importable):
    """If this fails, GPU runs keep the slow torch core although fla is there."""
    assert isinstance(selection.select_linear_backend("cuda"), selection.FlaLinearAttention)
    assert selection.linear_backend_problem("cuda") is None


def test_cpu_and_a_missing_fla_fall_back_to_the_torch_core(fla_importable):
    """If this fails, a CPU run (or a GPU machine without the wheel) tries fla's kernels instead of falling back."""
    assert isinstance(selection.select_linear_backend("cpu"), TorchLinearAttention)
    assert selection.linear_backend_description("cpu") == "linear attention: torch core (tensors on cpu)"
    fla_importable.problem = "flash-linear-attention does not import (No module named 'fla')"
    # The torch core prefills; decode steps take the in-place kernel, the decode step a CUDA target's plan sizes.
    assert isinstance(selection.select_linear_backend("cuda"), selection.TorchCoreInPlaceDecode)
    assert "does not import" in selection.linear_backend_description("cuda")


def test_environment_forces_either_core_and_rejects_typos(fla_importable, monkeypatch):
    """If this fails, OPDGRAPH_LINEAR_ATTENTION=torch does not force the fallback, =fla lets a missing fla pass
    silently, or a typo is taken as auto."""
    monkeypatch.setenv(selection.ENVIRONMENT, "torch")
    assert type(selection.select_linear_backend("cuda")) is TorchLinearAttention  # the reference, decode included
    described = selection.linear_backend_description("cuda")
    assert f"torch core ({selection.ENVIRONMENT}=torch)" in described and "the plan of a CUDA target" in described
    monkeypatch.setenv(selection.ENVIRONMENT, "fla")
    assert isinstance(selection.select_linear_backend("cuda"), selection.FlaLinearAttention)
    fla_importable.problem = "flash-linear-attention does not import (x)"
    with pytest.raises(RuntimeError, match="OPDGRAPH_LINEAR_ATTENTION=fla but flash-linear-attention"):
        selection.select_linear_backend("cuda")
    monkeypatch.setenv(selection.ENVIRONMENT, "triton")
    with pytest.raises(ValueError, match="choose one of auto, fla, torch"):
        selection.select_linear_backend("cuda")


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
