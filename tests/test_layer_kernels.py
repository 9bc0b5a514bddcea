"""The packed forward's layer kernels (opdgraph.models.layer_kernels): torch's and Liger-Kernel's, against float64.

Each operation (RMSNorm in both forms, the fused residual add, RoPE in full and partial width, SiLU and tanh-GELU
gated activations) runs forward and backward on tiny odd shapes (rows and widths that are not powers of two) and is
compared with the plain formula in float64, outputs and every input gradient. Without CUDA the Liger kernels run in
Triton's CPU interpreter (TRITON_INTERPRET=1, set here before triton is first imported); with CUDA compiled. The
torch path's gated activation must be bit-identical to autograd of the plain expression (it only changes what is
saved). Whole models (every family option: q/k norms, sandwich norms and the one-plus form, GELU, sliding layers,
partial RoPE with an output gate) must give Liger's hidden states and gradients as close to float64 as torch's.
"""

from __future__ import annotations

import copy
import math
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from opdgraph.errors import DeviceError  # noqa: E402
from opdgraph.models.attention_metadata import PackedMetadata  # noqa: E402
from opdgraph.models.gated_activation import activate, gated_activation  # noqa: E402
from opdgraph.models.layer_kernels import TORCH, check_layer_kernels, select_layer_kernels  # noqa: E402
from opdgraph.models.loading import build_random  # noqa: E402
from opdgraph.models.tiny_configs import tiny_config  # noqa: E402
from triton_interpreter import interpret_liger  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
EPS = 1e-6


def _liger_error() -> str | None:
    from opdgraph.kernels.liger_layers import liger_import_error

    return liger_import_error()


needs_liger = pytest.mark.skipif(_liger_error() is not None, reason=f"liger_kernel unavailable: {_liger_error()}")


INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"


def kernels_named(name: str, dtype: torch.dtype = torch.float32):
    if name == "torch":
        return TORCH
    if INTERPRETED and dtype == torch.bfloat16:
        # The interpreter (triton 3.9) adds a bfloat16 block into a float32 one as raw bits (garbage), which Liger's
        # bf16 weight-gradient sums do; compiled kernels do not. bf16 runs where the kernels compile (CUDA).
        pytest.skip("Triton's interpreter mis-adds bfloat16 into float32; bf16 Liger runs compiled, on CUDA")
    from opdgraph.kernels.liger_layers import LigerLayerKernels

    return LigerLayerKernels()


KERNELS = ["torch", pytest.param("liger", marks=needs_liger)]


@pytest.fixture(autouse=True)
def _interpreted_liger(monkeypatch):
    if _liger_error() is None:
        interpret_liger(monkeypatch)

DTYPES = [torch.float32, torch.bfloat16]
# Relative L2 error against float64, outputs and gradients (bf16: a few roundings of 2^-9 each).
TOLERANCE = {torch.float32: 2e-5, torch.bfloat16: 2e-2}


def relative_error(actual, expected) -> float:
    return ((actual.double() - expected).norm() / expected.norm().clamp_min(1e-30)).item()


def _random(shape, dtype, seed, scale=1.0, shift=0.0):
    generator = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=generator) * scale + shift).to(device=DEVICE, dtype=dtype)


def _check(outputs, expected_outputs, inputs, references, dtype, what):
    """Outputs vs float64 outputs, then the gradients of a random weighted sum w.r.t. every input."""
    upstream = [_random(out.shape, torch.float64, 100 + index) for index, out in enumerate(expected_outputs)]
    for out, expected in zip(outputs, expected_outputs):
        assert relative_error(out, expected) < TOLERANCE[dtype], f"{what}: output"
    grads = torch.autograd.grad(outputs, inputs, [u.to(dtype) for u in upstream])
    expected_grads = torch.autograd.grad(expected_outputs, references, upstream)
    for index, (grad, expected) in enumerate(zip(grads, expected_grads)):
        assert grad.dtype == inputs[index].dtype and grad.shape == inputs[index].shape
        assert relative_error(grad, expected) < TOLERANCE[dtype], f"{what}: gradient of input {index}"


def _leaves(*tensors):
    inputs = [t.detach().clone().requires_grad_(True) for t in tensors]
    references = [t.detach().double().requires_grad_(True) for t in tensors]
    return inputs, references


def norm64(x, weight, one_plus):
    normed = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + EPS)
    return normed * (1.0 + weight) if one_plus else normed * weight


@pytest.mark.parametrize("name", KERNELS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("one_plus", [False, True])
@pytest.mark.parametrize("shape", [(7, 40), (5, 3, 24)])  # hidden-size rows; q/k norm over [T, heads, head_dim]
def test_rms_norm_matches_float64(name, dtype, one_plus, shape):
    """If this fails, a norm form (standard: scaled after the cast; one-plus: in fp32) or its backward (dx through
    rstd, dw summed over every row) is wrong in this kernel implementation."""
    kernels = kernels_named(name, dtype)
    x = _random(shape, dtype, 1, scale=3.0)
    weight = _random(shape[-1:], dtype, 2, scale=0.5, shift=0.0 if one_plus else 1.0)
    (x_in, w_in), (x64, w64) = _leaves(x, weight)
    out = kernels.rms_norm(x_in, w_in, EPS, one_plus)
    assert out.dtype == dtype and out.shape == x.shape
    _check([out], [norm64(x64, w64, one_plus)], [x_in, w_in], [x64, w64], dtype, f"{name} rms_norm")


@pytest.mark.parametrize("name", KERNELS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("one_plus", [False, True])
def test_add_rms_norm_matches_float64(name, dtype, one_plus):
    """If this fails, the residual add fused into the norm returns a wrong sum or normed value, or drops one of the
    two gradients that meet at the sum (the norm's and the residual stream's)."""
    kernels = kernels_named(name, dtype)
    x, residual = _random((9, 72), dtype, 3, scale=2.0), _random((9, 72), dtype, 4)
    weight = _random((72,), dtype, 5, scale=0.5, shift=0.0 if one_plus else 1.0)
    (x_in, r_in, w_in), (x64, r64, w64) = _leaves(x, residual, weight)
    normed, total = kernels.add_rms_norm(x_in, r_in, w_in, EPS, one_plus)
    total64 = r64 + x64
    assert torch.equal(total, residual + x), "the sum is one rounding of residual + x"
    _check([normed, total], [norm64(total64, w64, one_plus), total64], [x_in, r_in, w_in], [x64, r64, w64], dtype,
           f"{name} add_rms_norm")


def rotate64(x, cos, sin):
    rotated = cos.shape[-1]
    half = rotated // 2
    x1, x2, rest = x[..., :half], x[..., half:rotated], x[..., rotated:]
    c, s = cos[:, None, :half], sin[:, None, :half]
    return torch.cat((x1 * c - x2 * s, x2 * c + x1 * s, rest), dim=-1)


@pytest.mark.parametrize("name", KERNELS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("head_dim,rotated", [(16, 16), (24, 12)])  # full RoPE; Qwen3.5's partial one
def test_rotary_matches_float64(name, dtype, head_dim, rotated):
    """If this fails, RoPE rotates the wrong halves, the wrong width (partial RoPE), the wrong heads of q or k
    (5 query heads, 3 K/V heads: not powers of two), or its backward (the inverse rotation) is wrong."""
    kernels = kernels_named(name, dtype)
    tokens = 11
    angles = torch.arange(tokens, dtype=torch.float32)[:, None] * (0.3 ** torch.arange(rotated // 2))[None, :]
    angles = torch.cat((angles, angles), dim=-1).to(DEVICE)
    cos, sin = angles.cos().to(dtype), angles.sin().to(dtype)
    q, k = _random((tokens, 5, head_dim), dtype, 6), _random((tokens, 3, head_dim), dtype, 7)
    (q_in, k_in), (q64, k64) = _leaves(q, k)
    # The kernel may rotate its inputs in place (Liger does): pass views of fresh tensors, as the layer does.
    q_out, k_out = kernels.rotary(q_in * 1, k_in * 1, cos, sin)
    assert q_out.shape == q.shape and k_out.shape == k.shape
    _check([q_out, k_out], [rotate64(q64, cos.double(), sin.double()), rotate64(k64, cos.double(), sin.double())],
           [q_in, k_in], [q64, k64], dtype, f"{name} rotary")


def activate64(gate, activation):
    if activation == "silu":
        return gate * torch.sigmoid(gate)
    return 0.5 * gate * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (gate + 0.044715 * gate**3)))


@pytest.mark.parametrize("name", KERNELS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("activation", ["silu", "gelu_tanh"])
def test_gated_activation_matches_float64(name, dtype, activation):
    """If this fails, act(gate) * up or its backward (act recomputed from the saved gate) is wrong."""
    kernels = kernels_named(name, dtype)
    gate, up = _random((6, 3, 37), dtype, 8, scale=2.0), _random((6, 3, 37), dtype, 9)
    (gate_in, up_in), (gate64, up64) = _leaves(gate, up)
    out = kernels.gated_activation(gate_in * 1, up_in * 1, activation)
    _check([out], [activate64(gate64, activation) * up64], [gate_in, up_in], [gate64, up64], dtype,
           f"{name} {activation}")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("activation", ["silu", "gelu_tanh"])
def test_torch_gated_activation_is_bit_identical_to_autograd(dtype, activation):
    """If this fails, the torch path's Function (which saves gate and up instead of act(gate) too) changed the
    numbers of training: forward or gradients differ from autograd of the plain expression."""
    gate, up = _random((13, 29), dtype, 10, scale=2.0), _random((13, 29), dtype, 11)
    upstream = _random((13, 29), dtype, 12)
    (gate_a, up_a), _ = _leaves(gate, up)
    (gate_b, up_b), _ = _leaves(gate, up)
    plain = activate(gate_a, activation) * up_a
    fused = gated_activation(gate_b, up_b, activation)
    assert torch.equal(plain, fused)
    assert all(torch.equal(a, b) for a, b in zip(torch.autograd.grad(plain, (gate_a, up_a), upstream),
                                                 torch.autograd.grad(fused, (gate_b, up_b), upstream)))
    with torch.no_grad():
        assert torch.equal(gated_activation(gate, up, activation), plain)


# ---------------------------------------------------------------------------------------------------- whole models
MODEL_FAMILIES = ["qwen2", "qwen3", "llama", "gemma3", "qwen3_5"]
LENGTHS = (9, 1, 14)


def _packed(config):
    generator = torch.Generator().manual_seed(3)
    ids = torch.randint(0, config["vocab_size"], (sum(LENGTHS),), generator=generator).to(DEVICE)
    positions = torch.cat([torch.arange(length) for length in LENGTHS]).to(DEVICE)
    bounds = torch.tensor([0, *torch.tensor(LENGTHS).cumsum(0).tolist()], dtype=torch.int32, device=DEVICE)
    return ids, positions, PackedMetadata(cu_seqlens=bounds, max_seqlen=max(LENGTHS))


def _hidden_and_grads(model, config, kernels):
    model.set_layer_kernels(kernels)
    model.zero_grad(set_to_none=True)
    ids, positions, meta = _packed(config)
    hidden = model.forward_hidden(ids, positions, meta)
    upstream = _random(hidden.shape, torch.float64, 13).to(hidden.dtype)
    (hidden * upstream).sum().backward()
    return hidden.detach(), {name: p.grad.detach() for name, p in model.named_parameters() if p.grad is not None}


@needs_liger
@pytest.mark.parametrize("family", MODEL_FAMILIES)
def test_liger_model_is_as_close_to_float64_as_torch(family):
    """If this fails, a layer wires a Liger kernel in wrongly (a norm form, the residual the fused add returns, RoPE
    on a strided q, the in-place rotation clobbering a tensor autograd still needs): the float32 model's hidden states
    or some parameter's gradient move away from the float64 model's, beyond what torch's own float32 path shows."""
    config = tiny_config(family)
    model = build_random(config, dtype=torch.float32).to(DEVICE)
    reference = copy.deepcopy(model).double()
    expected_hidden, expected_grads = _hidden_and_grads(reference, config, TORCH)
    for name in ("torch", "liger"):
        hidden, grads = _hidden_and_grads(model, config, kernels_named(name))
        assert relative_error(hidden, expected_hidden) < 1e-5, f"{family} {name} hidden"
        assert grads.keys() == expected_grads.keys()
        for parameter, grad in grads.items():
            assert relative_error(grad, expected_grads[parameter]) < 1e-4, f"{family} {name} {parameter}"


def test_auto_falls_back_to_torch_on_cpu_and_liger_is_refused_there():
    """If this fails, "auto" picks Liger's kernels where they cannot run, or an explicit "liger" on the CPU gets
    past startup instead of a DeviceError naming the key."""
    assert select_layer_kernels("auto", "cpu") is TORCH
    assert select_layer_kernels("torch", "cuda") is TORCH
    with pytest.raises(DeviceError, match="models.student.kernels = 'liger'.*cpu"):
        check_layer_kernels("liger", "cpu", "models.student.kernels")
    check_layer_kernels("auto", "cpu", "models.student.kernels")


def test_each_model_gets_the_kernels_its_own_table_names(monkeypatch):
    """If this fails, the run gives a model another model's models.<name>.kernels (the teacher the student's, or a
    teacher none), so a setting silently does nothing."""
    import pathlib
    import types

    from opdgraph.config import load_pipeline
    from opdgraph.models import layer_kernels
    from opdgraph.runtime.engine_setup import use_layer_kernels

    tiny = pathlib.Path(__file__).parent.parent / "pipelines" / "tiny.toml"
    cfg = load_pipeline(str(tiny), ["models.student.kernels=torch", "models.teacher.kernels=liger"])
    fake_liger = types.SimpleNamespace(name="liger")
    monkeypatch.setattr(layer_kernels, "select_layer_kernels",
                        lambda setting, device: fake_liger if setting == "liger" else TORCH)
    class Model:
        def __init__(self):
            self.given = []

        def set_layer_kernels(self, kernels):
            self.given.append(kernels)

    student, teacher = Model(), Model()
    spec = types.SimpleNamespace(model="teacher")
    line = use_layer_kernels(cfg, student, {"teacher_score": types.SimpleNamespace(spec=spec, model=teacher)}, "cuda")
    assert student.given == [TORCH] and teacher.given == [fake_liger]
    assert line == "layer kernels: student torch, teacher liger"
