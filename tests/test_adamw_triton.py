"""MasterAdamW's fused Triton path (opdgraph.kernels.adamw) against a float64 AdamW written here, against the foreach
path, and its all-or-nothing step.

Without CUDA the kernels run in the Triton interpreter (TRITON_INTERPRET=1, set before triton is first imported),
with fused=True forced on CPU tensors; with CUDA the same tests run compiled on the GPU. Shapes below, at and above
the kernels' block of 1024 elements, so partial last blocks and several programs per tensor are covered.
"""

from __future__ import annotations

import importlib.util
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from opdgraph.kernels import adamw as fused_adamw  # noqa: E402
from opdgraph.train.optimizer import MasterAdamW  # noqa: E402
from triton_interpreter import pass_floats_as_fp32, round_bf16_to_nearest  # noqa: E402

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs triton")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
HYPER = dict(lr=1e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
SHAPES = {"embed.weight": (37, 29), "layer.weight": (1024, 2), "layer.bias": (1025,), "norm.weight": (3,)}


@pytest.fixture(autouse=True)
def _compiled_semantics(monkeypatch):
    """Where the interpreter differs from compiled kernels (python floats kept in double, bf16 truncated), it is
    made to do what they do, so these tests see the scalars' and the stores' real rounding."""
    pass_floats_as_fp32(monkeypatch)
    round_bf16_to_nearest(monkeypatch)


def make_params(dtype, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return {name: torch.nn.Parameter(torch.randn(*shape, generator=generator).to(dtype).to(DEVICE))
            for name, shape in SHAPES.items()}


def make_grads(step, dtype, skip=()):
    generator = torch.Generator().manual_seed(1000 + step)
    return {name: torch.randn(*shape, generator=generator).to(dtype).to(DEVICE)
            for name, shape in SHAPES.items() if name not in skip}


class ReferenceAdamW:
    """torch.optim.AdamW's math in float64 on copies of the starting weights; 1-D parameters do not decay."""

    def __init__(self, params, lr, betas, eps, weight_decay):
        self.weights = {name: param.detach().double().clone() for name, param in params.items()}
        self.m = {name: torch.zeros_like(weight) for name, weight in self.weights.items()}
        self.v = {name: torch.zeros_like(weight) for name, weight in self.weights.items()}
        self.steps = dict.fromkeys(params, 0)
        self.betas, self.eps, self.weight_decay = betas, eps, weight_decay

    def step(self, lr, grads):
        beta1, beta2 = self.betas
        for name, grad in grads.items():
            grad = grad.double()
            self.steps[name] += 1
            t = self.steps[name]
            if self.weights[name].ndim >= 2:
                self.weights[name] *= 1 - lr * self.weight_decay
            self.m[name] = beta1 * self.m[name] + (1 - beta1) * grad
            self.v[name] = beta2 * self.v[name] + (1 - beta2) * grad * grad
            denominator = (self.v[name] / (1 - beta2**t)).sqrt() + self.eps
            self.weights[name] -= lr / (1 - beta1**t) * self.m[name] / denominator


# Step 2 leaves two parameters without a gradient, so step counts (and bias corrections) differ between tensors.
SKIPPED = {2: ("layer.bias", "norm.weight")}


def run_steps(optimizer, reference, grad_dtype, num_steps=5):
    """Returns the last step's gradients."""
    for step in range(num_steps):
        lr = HYPER["lr"] * (step + 1) / num_steps
        grads = make_grads(step, grad_dtype, SKIPPED.get(step, ()))
        assert optimizer.step(lr, grads) is True
        if reference is not None:
            reference.step(lr, grads)
    return grads


@pytest.mark.parametrize("grad_dtype", [torch.float32, torch.bfloat16])
def test_fused_matches_float64_adamw(grad_dtype):
    """Five steps with a changing lr, decay on 2-D weights only, bias corrections of different step counts per
    tensor: the fused path's fp32 masters follow float64 AdamW to fp32 rounding. Fails on a wrong bias correction,
    decay on a no-decay tensor, a moment formula off, or a partial last block left unupdated."""
    params = make_params(torch.float32)
    optimizer = MasterAdamW(params.items(), **HYPER, fused=True)
    reference = ReferenceAdamW(params, **HYPER)
    run_steps(optimizer, reference, grad_dtype)
    assert optimizer.steps == reference.steps and optimizer.steps["norm.weight"] == 4
    for name in SHAPES:
        torch.testing.assert_close(optimizer.masters[name].double(), reference.weights[name], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(optimizer.exp_avg_sq[name].double(), reference.v[name], rtol=1e-5, atol=1e-9)


@pytest.mark.parametrize("param_dtype, grad_dtype", [(torch.float32, torch.float32), (torch.bfloat16, torch.float32),
                                                     (torch.bfloat16, torch.bfloat16)])
@pytest.mark.parametrize("betas", [(0.9, 0.95), (0.9, 0.999), (0.0, 0.99)])
def test_fused_matches_foreach(param_dtype, grad_dtype, betas):
    """The fused path equals the foreach path to float rounding (1e-6 relative) in masters and moments, and its
    low-precision parameters are the rounded masters. Fails if the kernels' op order or scalars (1 - beta2 formed in
    fp32 instead of double: 1e-5 off at beta2 0.999) drift from the foreach ops, the lerp is not exact at beta1 0, or
    the parameter is not written in the update kernel."""
    fused_params, foreach_params = make_params(param_dtype), make_params(param_dtype)
    fused = MasterAdamW(fused_params.items(), **{**HYPER, "betas": betas}, fused=True)
    foreach = MasterAdamW(foreach_params.items(), **{**HYPER, "betas": betas}, fused=False)
    last_grads = run_steps(fused, None, grad_dtype)
    run_steps(foreach, None, grad_dtype)
    for name in SHAPES:
        if betas[0] == 0.0:  # torch's lerp at weight 1 gives the gradient itself, not m + (g - m)
            assert torch.equal(fused.exp_avg[name], last_grads[name].float()), name
        for table in ("masters", "exp_avg", "exp_avg_sq"):
            got, expected = getattr(fused, table)[name], getattr(foreach, table)[name]
            torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6 * expected.abs().max().item())
        if param_dtype != torch.float32:
            assert torch.equal(fused_params[name], fused.masters[name].to(param_dtype)), name
        else:
            assert fused.masters[name].data_ptr() == fused_params[name].data_ptr()


def test_check_kernel_writes_nothing():
    """The check pass reads the state and reports, bit for bit leaving masters, moments and grads alone; a failure
    means pass 1 commits part of a step that pass 2 may refuse."""
    params = make_params(torch.bfloat16)
    optimizer = MasterAdamW(params.items(), **HYPER, fused=True)
    grads = make_grads(0, torch.float32)
    names = list(SHAPES)
    tensors = [optimizer.masters, optimizer.exp_avg, optimizer.exp_avg_sq, grads]
    before = [{name: table[name].clone() for name in names} for table in tensors]
    bad = fused_adamw.check(**optimizer._kernel_arguments(names, grads, {name: 1 for name in names}, 1e-2))
    assert bad.dtype == torch.int32 and int(bad) == 0
    for table, saved in zip(tensors, before):
        for name in names:
            assert torch.equal(table[name], saved[name]), name


def _poison_grad(value, index):
    def change(optimizer, grads):
        grads["layer.bias"].view(-1)[index] = value
    return change


def _poison_master(value, index):
    def change(optimizer, grads):
        optimizer.masters["layer.bias"].view(-1)[index] = value
    return change


# (case, lr of the bad step, change before it): each would leave one weight (or all) non-finite, or within a factor
# of 2 of overflowing. Elements in the second block of a tensor (index 1024: the partial last block) and the first.
def _decay_weights_by(factor):
    def change(optimizer, grads):
        optimizer.weight_decay = (1.0 - factor) / 1e-2  # at lr 1e-2; a factor within fp32 passes the scalar check
    return change


BAD_STEPS = [
    ("lr whose step size is beyond fp32 (no kernel runs)", 1e38, None),
    ("a decay factor within fp32 that overflows the decayed weights", 1e-2, _decay_weights_by(-2e38)),
    ("inf gradient in the partial last block", 1e-2, _poison_grad(float("inf"), 1024)),
    ("NaN gradient in the first block", 1e-2, _poison_grad(float("nan"), 5)),
    ("a weight past half the largest fp32", 1e-2, _poison_master(2e38, 1024)),
]


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the interpreter's numpy meets the inf and NaN on purpose
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("case, lr, change", BAD_STEPS, ids=[case[0] for case in BAD_STEPS])
def test_fused_step_is_all_or_nothing(dtype, case, lr, change):
    """A step whose update would overflow one element applies nothing on the fused path: weights, masters, moments
    and step counts stay bit for bit and step() returns False. Fails if the check kernel misses a bad element (a
    block not checked, the factor-2 margin lost) or the update runs anyway."""
    params = make_params(dtype)
    optimizer = MasterAdamW(params.items(), **HYPER, fused=True)
    assert optimizer.step(1e-2, make_grads(0, torch.float32))  # moments and step counts are not trivial
    grads = make_grads(1, torch.float32)
    if change is not None:
        change(optimizer, grads)
    tables = (params, optimizer.masters, optimizer.exp_avg, optimizer.exp_avg_sq)
    before = [{name: tensor.detach().clone() for name, tensor in table.items()} for table in tables]
    steps = dict(optimizer.steps)
    assert optimizer.step(lr, grads) is False
    assert optimizer.steps == steps
    for table, saved in zip(tables, before):
        for name, tensor in table.items():
            assert torch.equal(tensor.detach().nan_to_num(), saved[name].nan_to_num()), name
            assert torch.equal(tensor.detach().isnan(), saved[name].isnan()), name


def test_streamed_fused_matches_plain_fused():
    """With the state in host memory (StreamedAdamW) the fused kernels run inside the same staging contexts; fails
    if the Triton path bypasses staging (reading host tensors, or losing the update on the way back)."""
    from opdgraph.placement import Placement
    from opdgraph.runtime import offload

    models = [torch.nn.Sequential(torch.nn.Linear(40, 30), torch.nn.Linear(30, 3)).to(torch.bfloat16).to(DEVICE)
              for _ in range(2)]
    models[1].load_state_dict(models[0].state_dict())
    plain = MasterAdamW(list(models[0].named_parameters()), **HYPER, fused=True)
    streamed = offload.build_optimizer(Placement(optimizer_state="offload"), models[1], torch.device(DEVICE),
                                       **HYPER, fused=True)
    for step in range(3):
        grads = {name: torch.randn(param.shape, generator=torch.Generator().manual_seed(step)).to(DEVICE)
                 for name, param in models[0].named_parameters()}
        assert plain.step(None, grads) and streamed.step(None, grads)
    for (name, expected), got in zip(models[0].named_parameters(), models[1].parameters()):
        assert torch.equal(got, expected), name
        assert torch.equal(streamed.exp_avg_sq[name].to(DEVICE), plain.exp_avg_sq[name]), name


def test_auto_picks_foreach_on_cpu_state():
    """fused=None takes the foreach path for CPU state (the reference), so CPU runs never depend on triton."""
    optimizer = MasterAdamW([("w", torch.nn.Parameter(torch.zeros(3)))], lr=1.0)
    assert optimizer._runs_fused(["w"], {"w": torch.zeros(3)}) is False


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("grad_dtype", [torch.float32, torch.bfloat16])
def test_cuda_fused_matches_foreach_bf16(grad_dtype):
    """On CUDA, auto mode takes the Triton path, and over five steps its bf16 weights and fp32 masters match the
    foreach path (masters to 1e-6 relative, weights to one bf16 rounding). Fails if compiled kernels diverge from
    the interpreter (approximate sqrt or division, a contraction the foreach ops do not make)."""
    fused_params, foreach_params = make_params(torch.bfloat16), make_params(torch.bfloat16)
    fused = MasterAdamW(fused_params.items(), **HYPER)
    foreach = MasterAdamW(foreach_params.items(), **HYPER, fused=False)
    assert fused._runs_fused(list(SHAPES)) and not foreach._runs_fused(list(SHAPES))
    run_steps(fused, None, grad_dtype)
    run_steps(foreach, None, grad_dtype)
    for name in SHAPES:
        expected = foreach.masters[name]
        torch.testing.assert_close(fused.masters[name], expected, rtol=1e-6, atol=1e-6 * expected.abs().max().item())
        torch.testing.assert_close(fused_params[name].float(), foreach_params[name].float(), rtol=2**-7, atol=0)


def test_a_non_contiguous_parameter_takes_the_foreach_path():
    """Fails if the fused path is taken for a transposed (non-contiguous) fp32 parameter: the kernels walk flat
    storage, so it would raise (or update elements in the wrong order) where the foreach path steps fine."""
    def transposed_param():
        weight = torch.randn(48, 33, generator=torch.Generator().manual_seed(5), device=DEVICE)
        return torch.nn.Parameter(weight.T)  # a view: storage order is not the tensor's

    fused_param, foreach_param = transposed_param(), transposed_param()
    fused = MasterAdamW([("w", fused_param)], **HYPER, fused=True)
    foreach = MasterAdamW([("w", foreach_param)], **HYPER, fused=False)
    grad = torch.randn(33, 48, generator=torch.Generator().manual_seed(6), device=DEVICE)
    assert fused.step(1e-3, {"w": grad}) and foreach.step(1e-3, {"w": grad})
    assert torch.equal(fused_param, foreach_param)
