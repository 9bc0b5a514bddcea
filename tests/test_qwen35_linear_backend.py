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
import math
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
from opdgraph.planned_paths import LINEAR_CORE_ENVIRONMENT, fla_linear_core
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


# The pipeline's numbers the plan is sized by, pinned by overrides (the formulas below are written from them, not
# read off the plan): bf16 models, 64 prompts x 2 samples of at most 512 + 1024 tokens, teacher_score's
# micro_batch_tokens 16384, rollout's max_num_seqs 128 and prefill_token_budget 2048.
DTYPE_BYTES, SEQUENCES, SEQUENCE_TOKENS, MAX_NUM_SEQS, PREFILL_TOKEN_BUDGET = 2, 64 * 2, 512 + 1024, 128, 2048
TEACHER_TOKENS = 16384 // SEQUENCE_TOKENS * SEQUENCE_TOKENS  # whole sequences of a scoring micro-batch: 10 x 1536
PINNED = ['models.student.dtype="bfloat16"', 'models.teacher.dtype="bfloat16"', "data.prompts_per_step=64",
          "data.samples_per_prompt=2", "data.max_prompt_tokens=512", "rollout.max_new_tokens=1024",
          "teacher_score.micro_batch_tokens=16384", f"rollout.max_num_seqs={MAX_NUM_SEQS}",
          f"rollout.prefill_token_budget={PREFILL_TOKEN_BUDGET}"]
MODEL_CONFIGS = Path(__file__).resolve().parent.parent / "opdgraph" / "model_configs"
CHUNK = 64  # the delta rule's chunk, fla's and the torch core's


def _widths(config_file: str) -> dict:
    """The widths of a shipped Qwen3.5 text config, read from its .json (not through opdgraph.model_shapes)."""
    raw = json.loads((MODEL_CONFIGS / config_file).read_text())
    key_heads, value_heads = raw["linear_num_key_heads"], raw["linear_num_value_heads"]
    key_dim, value_dim = raw["linear_key_head_dim"], raw["linear_value_head_dim"]
    rotary = int(raw["head_dim"] * raw["rope_parameters"].get("partial_rotary_factor", 1.0))
    return dict(h=raw["hidden_size"], i=raw["intermediate_size"], t=2 * rotary * DTYPE_BYTES, V=raw["vocab_size"],
                Hk=key_heads, Hv=value_heads, kd=key_dim, vd=value_dim, K=raw["linear_conv_kernel_dim"],
                k=key_heads * key_dim, c=2 * key_heads * key_dim + value_heads * value_dim)


def _mlp_peak(w: dict, tokens: int) -> int:
    """An MLP's inputs, output and gate/up products, and the one RoPE table pair (t) the forward holds."""
    return tokens * ((4 * w["h"] + 3 * w["i"]) * DTYPE_BYTES + w["t"])


def _fla_peak(w: dict, tokens: int, sequences: int, paged: bool) -> int:
    """fla's no-grad core peak, written from sizing.py's module docstring (the layer's input, norm, in_proj_qkv
    output, beta and decay; the conv output, q/k/v copies, normalised q/k, A, w, u, new values, output, fp32 decays;
    the per-chunk states; a prefill's gathered and final states and conv windows)."""
    d, hv, state = DTYPE_BYTES, w["Hv"], w["Hv"] * w["kd"] * w["vd"]
    held = tokens * ((2 * w["h"] + w["c"] + hv) * d + hv * 4 + w["t"])
    kernels = tokens * ((2 * w["c"] + 2 * w["k"] + hv * (CHUNK + w["kd"] + 3 * w["vd"])) * d + (2 * w["Hk"] + hv) * 4)
    states = (tokens + (CHUNK - 1) * sequences) // CHUNK * state * d  # each sequence pads under one chunk
    states += state * 4 if sequences > 1 else 0  # a pack of several: one fp32 state more
    rows = sequences * (2 * state * 4 + (3 * w["K"] - 1) * w["c"] * d) if paged else 0
    return held + kernels + states + rows


def _torch_core_peak(w: dict, tokens: int, sequences: int, paged: bool) -> int:
    """The torch core's no-grad peak, from the same docstring: scan groups of n = min(N, max(16, ceil(T / 64)))
    sequences (N = 0: unknown, the bound), P = T + n x 63 padded tokens, the larger of the solve's and the scan's
    moment, and a prefill's 5 N + 3 n states."""
    d, hv, kd, vd, state = DTYPE_BYTES, w["Hv"], w["kd"], w["vd"], w["Hv"] * w["kd"] * w["vd"] * 4
    group = max(16, math.ceil(tokens / CHUNK))
    group = min(sequences, group) if sequences else group
    padded = tokens + group * (CHUNK - 1)
    held = (tokens * ((2 * w["h"] + w["c"]) * d + hv * (d + 4) + w["t"])
            + tokens * (4 * w["c"] + 4 * hv * (2 * kd + vd + 1)))
    solve = padded * hv * (4 * kd + 3 * vd + 2 * CHUNK + 35) * 4
    carried = group if paged else min(group, tokens // (CHUNK + 1))
    scan = padded * hv * (3 * kd + 2 * vd + CHUNK + 1) * 4 + 3 * carried * state
    return held + max(solve, scan) + (5 * (sequences or group) * state if paged else 0)


def _decode_peak(w: dict, rows: int, in_place: bool) -> int:
    """A decode step's linear core: the in-place kernel's conv step, or the torch core's gathered, decayed and
    updated states with fp32 copies of the conv output and the repeated q and k."""
    if in_place:
        return rows * 4 * w["K"] * w["c"] * DTYPE_BYTES
    return rows * (4 * w["Hv"] * w["kd"] * w["vd"] * 4 + 16 * (w["c"] + 2 * w["Hv"] * w["kd"]))


def _expected_workspaces(fla: bool, device: str = "cuda") -> dict[str, int]:
    """teacher_score.workspace, rollout.workspace and (CUDA: the flashinfer rollout's decode graphs) the
    rollout.decode_graph_pool of this pipeline with the fla core (fla) or the torch core."""
    teacher, student = _widths("qwen3.5-4b-text.json"), _widths("qwen3.5-0.8b-text.json")
    if fla:
        teacher_core = _fla_peak(teacher, TEACHER_TOKENS, SEQUENCES, paged=False)
        prefill_core = _fla_peak(student, PREFILL_TOKEN_BUDGET, MAX_NUM_SEQS, paged=True)
    else:  # the teacher's torch core scans the batch's sequences at most; a prefill holds every running sequence.
        # On a CPU target the teacher's reference attention (S = 1536) peaks below this core: the same workspace.
        teacher_core = _torch_core_peak(teacher, TEACHER_TOKENS, SEQUENCES, paged=False)
        prefill_core = _torch_core_peak(student, PREFILL_TOKEN_BUDGET, MAX_NUM_SEQS, paged=True)
    prefill = max(_mlp_peak(student, PREFILL_TOKEN_BUDGET), prefill_core)
    decode, logits = _decode_peak(student, MAX_NUM_SEQS, in_place=fla), MAX_NUM_SEQS * student["V"] * 4
    workspaces = {"teacher_score.workspace": max(_mlp_peak(teacher, TEACHER_TOKENS), teacher_core),
                  "rollout.workspace": max(prefill, decode) + logits}
    if device == "cuda":  # the graphs' pool holds one decode step of the largest graph batch (128: max_num_seqs)
        workspaces["rollout.decode_graph_pool"] = max(_mlp_peak(student, MAX_NUM_SEQS), decode) + logits
    return workspaces


def _plan_workspaces(monkeypatch, device: str, setting: str | None) -> dict[str, int]:
    if setting is None:
        monkeypatch.delenv(LINEAR_CORE_ENVIRONMENT, raising=False)
    else:
        monkeypatch.setenv(LINEAR_CORE_ENVIRONMENT, setting)
    cfg = load_pipeline(str(PIPELINE), overrides=[f'pipeline.device="{device}"', *PINNED])
    buffers = compile_plan(cfg).buffers
    return {name: buffers[name].bytes for name in ("teacher_score.workspace", "rollout.workspace",
                                                   "rollout.decode_graph_pool") if name in buffers}


def test_the_workspaces_hold_the_planned_cores_peaks():
    """If this fails, the formulas above no longer describe the case the plan tests below are about: the linear
    cores' peaks, not an MLP's, decide both workspaces, and the torch core's are the larger (fla's decode step runs
    in place)."""
    teacher, student = _widths("qwen3.5-4b-text.json"), _widths("qwen3.5-0.8b-text.json")
    teacher_mlp = _mlp_peak(teacher, TEACHER_TOKENS)
    assert (_torch_core_peak(teacher, TEACHER_TOKENS, SEQUENCES, False) > _fla_peak(teacher, TEACHER_TOKENS, SEQUENCES, False)
            > teacher_mlp)
    assert (_torch_core_peak(student, PREFILL_TOKEN_BUDGET, MAX_NUM_SEQS, True)
            > _fla_peak(student, PREFILL_TOKEN_BUDGET, MAX_NUM_SEQS, True) > _mlp_peak(student, PREFILL_TOKEN_BUDGET))
    assert (_decode_peak(student, MAX_NUM_SEQS, in_place=False) > _decode_peak(student, MAX_NUM_SEQS, in_place=True)
            > _mlp_peak(student, MAX_NUM_SEQS))
    fla, torch_core = _expected_workspaces(fla=True), _expected_workspaces(fla=False)
    assert all(fla[name] < torch_core[name] for name in fla)


@pytest.mark.parametrize("device, setting, fla_core", [
    ("cuda", None, True), ("cuda", "auto", True), ("cuda", "", True), ("cuda", "fla", True), ("cuda", " FLA ", True),
    ("cuda", "torch", False), ("cuda", "Torch", False), ("cpu", None, False), ("cpu", "torch", False)])
def test_the_plan_sizes_the_core_the_runtime_selects(fla_importable, monkeypatch, device, setting, fla_core):
    """If this fails, a plan of a Qwen3.5 pair sizes another linear core than the one that runs: the planner's
    choice (planned_paths.fla_linear_core) and the runtime's (select_linear_backend, fla importable) differ for the
    same device and OPDGRAPH_LINEAR_ATTENTION, either is not fla's exactly on CUDA without =torch, or the plan's
    teacher and rollout workspaces and the decode graphs' pool are not that core's peaks (fla's under the torch
    core's: a plan 15% over the measured teacher_score peak on an H200 with fla)."""
    workspaces = _plan_workspaces(monkeypatch, device, setting)  # sets or clears the variable for the calls below
    assert fla_linear_core(device) is fla_core
    runtime = selection.select_linear_backend(device)
    assert isinstance(runtime, selection.FlaLinearAttention) is fla_core
    assert isinstance(runtime, TorchLinearAttention) is not fla_core
    assert workspaces == _expected_workspaces(fla_core, device)


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
