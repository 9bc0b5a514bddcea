"""MasterAdamW (fp32 masters, torch AdamW parity, exact resume) and global-norm gradient clipping."""

from __future__ import annotations

import copy

import pytest
import torch

from opdgraph.train import optimizer as optimizer_module
from opdgraph.train import optimizer_layout
from opdgraph.train.grad_clipping import clip_grad_norm
from opdgraph.train.optimizer import MasterAdamW

HYPER = dict(lr=1e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)


def make_params(dtype=torch.float32, seed=0):
    generator = torch.Generator().manual_seed(seed)
    shapes = {"embed.weight": (7, 5), "layer.weight": (5, 5), "layer.bias": (5,), "norm.weight": (5,)}
    return {
        name: torch.nn.Parameter(torch.randn(*shape, generator=generator).to(dtype))
        for name, shape in shapes.items()
    }


def set_grads(params, step, dtype=None):
    generator = torch.Generator().manual_seed(1000 + step)
    for param in params.values():
        param.grad = torch.randn(param.shape, generator=generator).to(dtype or param.dtype)


def test_matches_torch_adamw_on_fp32_params():
    """Same lr/betas/eps/decay groups as torch.optim.AdamW gives the same weights over several steps; a failure means
    a wrong bias correction, weight decay coupled to the gradient, or decay applied to norms and biases."""
    ours, theirs = make_params(), make_params()
    optimizer = MasterAdamW(ours.items(), **HYPER)
    decay = [p for name, p in theirs.items() if p.ndim >= 2]
    no_decay = [p for name, p in theirs.items() if p.ndim < 2]
    reference = torch.optim.AdamW(
        [{"params": decay}, {"params": no_decay, "weight_decay": 0.0}], **HYPER, foreach=False
    )
    for step in range(6):
        lr = HYPER["lr"] * (step + 1) / 6
        set_grads(ours, step)
        set_grads(theirs, step)
        for group in reference.param_groups:
            group["lr"] = lr
        optimizer.step(lr)
        reference.step()
    for name in ours:
        assert torch.allclose(ours[name], theirs[name], rtol=1e-6, atol=1e-7), name


def test_fp32_master_keeps_updates_bf16_would_drop():
    """A 1e-7 relative update per step accumulates in the fp32 master until the bf16 weight moves, while plain bf16
    AdamW rounds every update away and never moves; a failure means the master is missing or not written back."""
    ours = torch.nn.Parameter(torch.ones(4, dtype=torch.bfloat16))
    plain = torch.nn.Parameter(torch.ones(4, dtype=torch.bfloat16))
    optimizer = MasterAdamW([("w", ours)], lr=1e-7)
    reference = torch.optim.AdamW([plain], lr=1e-7, weight_decay=0.0, foreach=False)
    # Adam's step is ~lr per step here; half a bf16 ulp below 1.0 is 2^-9, reached after ~2^-9 / 1e-7 steps.
    for _ in range(17000):
        ours.grad = torch.ones_like(ours)
        plain.grad = torch.ones_like(plain)
        optimizer.step()
        reference.step()
    assert (plain == 1.0).all()
    assert (ours < 1.0).all() and ours.dtype == torch.bfloat16
    # The fp32 master itself rounds each ~1e-7 step to a multiple of its ulp (2^-24 just below 1.0).
    assert ((optimizer.masters["w"].double() - (1.0 - 17000e-7)).abs() <= 17000 * 2**-24).all()


def test_bf16_grads_are_read_in_fp32_and_grads_are_left_alone():
    """bf16 params with bf16 grads follow the fp32 computation on the same values; step does not clear grads."""
    low = make_params(torch.bfloat16)
    high = {name: torch.nn.Parameter(param.detach().float()) for name, param in low.items()}
    low_opt, high_opt = MasterAdamW(low.items(), **HYPER), MasterAdamW(high.items(), **HYPER)
    for step in range(3):
        set_grads(low, step)
        for name in high:
            high[name].grad = low[name].grad.float()
        low_opt.step()
        high_opt.step()
    assert all(param.grad is not None for param in low.values())
    for name in low:
        assert torch.equal(low_opt.masters[name], high_opt.masters[name])
        assert torch.equal(low[name], high[name].to(torch.bfloat16))


def test_state_dict_round_trip_continues_identically():
    """Saving after 3 steps and resuming in a fresh optimizer gives bit-identical weights for 3 more steps; a failure
    means the step count, a moment or a master was not saved or restored."""
    params = make_params(torch.bfloat16)
    params["norm.weight"] = torch.nn.Parameter(params["norm.weight"].detach().float())  # mixed dtypes
    optimizer = MasterAdamW(params.items(), **HYPER)
    for step in range(3):
        set_grads(params, step)
        optimizer.step()
    saved_state = copy.deepcopy(optimizer.state_dict())
    saved_params = {name: param.detach().clone() for name, param in params.items()}
    for step in range(3, 6):
        set_grads(params, step)
        optimizer.step()

    resumed = {name: torch.nn.Parameter(value.clone()) for name, value in saved_params.items()}
    resumed_optimizer = MasterAdamW(resumed.items(), **HYPER)
    resumed_optimizer.load_state_dict(saved_state)
    for step in range(3, 6):
        set_grads(resumed, step)
        resumed_optimizer.step()
    for name in params:
        assert torch.equal(params[name], resumed[name]), name
        assert torch.equal(optimizer.masters[name], resumed_optimizer.masters[name]), name


def test_load_state_dict_rejects_other_model():
    """Resuming onto different parameters names what is missing instead of silently skipping it."""
    optimizer = MasterAdamW(make_params().items(), **HYPER)
    state = optimizer.state_dict()
    del state["exp_avg"]["layer.bias"]
    with pytest.raises(ValueError, match="missing \\['layer.bias'\\]"):
        MasterAdamW(make_params().items(), **HYPER).load_state_dict(state)


def test_state_bytes_and_zero_grad():
    """bf16 params cost 12 bytes/element (master + 2 moments), fp32 params 8 (no copy); zero_grad sets None."""
    params = {
        "a": torch.nn.Parameter(torch.zeros(10, 3, dtype=torch.bfloat16)),
        "b": torch.nn.Parameter(torch.zeros(7)),
    }
    optimizer = MasterAdamW(params.items(), lr=1.0)
    assert optimizer.state_bytes() == 30 * 12 + 7 * 8
    set_grads(params, 0)
    optimizer.zero_grad()
    assert all(param.grad is None for param in params.values())


def test_buckets_split_large_models(monkeypatch):
    """Bucketed updates equal a single-bucket update (bucketing only bounds the fp32 grad copies)."""
    one, many = make_params(torch.bfloat16), make_params(torch.bfloat16)
    one_opt, many_opt = MasterAdamW(one.items(), **HYPER), MasterAdamW(many.items(), **HYPER)
    set_grads(one, 0)
    set_grads(many, 0)
    one_opt.step()
    monkeypatch.setattr(optimizer_layout, "_BUCKET_ELEMENTS", 20)
    many_opt.step()
    for name in one:
        assert torch.equal(one[name], many[name])


@pytest.mark.parametrize("max_norm", [0.5, 1e6, 0.0])
def test_clip_matches_torch(max_norm):
    """Norm and clipped grads equal torch.nn.utils.clip_grad_norm_ (max_norm 0 only measures)."""
    ours, theirs = make_params(), make_params()
    set_grads(ours, 0)
    set_grads(theirs, 0)
    norm, finite = clip_grad_norm([param.grad for param in ours.values()], max_norm)
    expected = torch.nn.utils.clip_grad_norm_(list(theirs.values()), max_norm if max_norm > 0 else float("inf"))
    assert finite and norm.dtype == torch.float32
    assert torch.allclose(norm, expected, rtol=1e-6)
    for name in ours:
        assert torch.allclose(ours[name].grad, theirs[name].grad, rtol=1e-6, atol=1e-8), name


def test_clip_bf16_grads_norm_in_fp32():
    """The norm of bf16 grads is accumulated in fp32 (a bf16 sum of squares would be off by ~1%)."""
    params = make_params(torch.bfloat16)
    set_grads(params, 0)
    expected = torch.cat([param.grad.double().flatten() for param in params.values()]).norm()
    norm, _ = clip_grad_norm([param.grad for param in params.values()], 0.0)
    assert abs(norm.double() - expected) <= 1e-6 * expected


@pytest.mark.parametrize("bad", [float("inf"), float("nan")])
def test_clip_non_finite_leaves_grads_untouched(bad):
    """A non-finite norm is reported so the step is skipped, and no grad is scaled (NaN would poison them all)."""
    params = make_params()
    set_grads(params, 0)
    params["layer.weight"].grad[1, 2] = bad
    before = {name: param.grad.clone() for name, param in params.items()}
    norm, finite = clip_grad_norm([param.grad for param in params.values()], 1.0)
    assert not finite and not torch.isfinite(norm)
    for name, param in params.items():
        assert torch.equal(param.grad.nan_to_num(), before[name].nan_to_num()), name


def _state(optimizer, params):
    """Everything a step may change, copied: weights, masters, both moments, step counts."""
    return ({name: param.detach().clone() for name, param in params.items()},
            *({name: tensor.clone() for name, tensor in table.items()}
              for table in (optimizer.masters, optimizer.exp_avg, optimizer.exp_avg_sq)),
            dict(optimizer.steps))


def _bits(tensor):
    return tensor.view(torch.int16 if tensor.element_size() == 2 else torch.int32)


def _assert_same_state(before, after):
    for table_before, table_after in zip(before[:4], after[:4]):
        for name, tensor in table_before.items():
            assert torch.equal(_bits(tensor), _bits(table_after[name])), name  # bit for bit, NaN included
    assert before[4] == after[4]


def _blow_up_master(name, value):
    def change(optimizer, params):
        optimizer.masters[name].view(-1)[-1] = value  # the last element: the last piece of the check
    return change


# (case, hyperparameters, state change before the step): each step's update would make some weight non-finite.
NON_FINITE_UPDATES = [
    ("lr inf", dict(lr=float("inf")), None),
    ("lr so large the step size overflows fp32", dict(lr=1e38), None),
    ("weight decay factor overflows", dict(lr=1e-3, weight_decay=1e36), None),
    ("a weight beyond half the largest fp32 in the last bucket", dict(lr=1e-3), _blow_up_master("norm.weight", 2e38)),
    ("a NaN master", dict(lr=1e-3), _blow_up_master("embed.weight", float("nan"))),
]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("case, hyper, change", NON_FINITE_UPDATES, ids=[case[0] for case in NON_FINITE_UPDATES])
def test_non_finite_update_is_rolled_back_bit_for_bit(monkeypatch, dtype, case, hyper, change):
    """A step whose update would leave any weight non-finite applies nothing (one bucket per parameter and pieces of
    a few elements, so the bad value is in the last bucket and piece): weights, fp32 masters, moments and step counts
    stay bit for bit, and step() says so. Fails if buckets before the bad one are committed, or a check misses it."""
    monkeypatch.setattr(optimizer_layout, "_BUCKET_ELEMENTS", 8)
    monkeypatch.setattr(optimizer_module, "_CHECK_ELEMENTS", 3)
    params = make_params(dtype)
    optimizer = MasterAdamW(params.items(), **{**HYPER, **hyper})
    set_grads(params, 0)
    assert optimizer.step(HYPER["lr"]) is True  # one good step first: moments and step counts are not trivial
    if change is not None:
        change(optimizer, params)
    set_grads(params, 1)
    before = _state(optimizer, params)
    assert optimizer.step(hyper["lr"]) is False
    _assert_same_state(before, _state(optimizer, params))


def test_check_pass_does_not_change_a_good_update(monkeypatch):
    """The finiteness check runs the update on copies in small pieces: a step it accepts must equal, bit for bit,
    the update applied without any check pieces (pass 2 alone). Fails if pass 1 writes into the state."""
    reference, checked = make_params(torch.bfloat16), make_params(torch.bfloat16)
    reference_opt, checked_opt = MasterAdamW(reference.items(), **HYPER), MasterAdamW(checked.items(), **HYPER)
    monkeypatch.setattr(reference_opt, "_update_is_finite", lambda buckets, grads, lr: True)
    monkeypatch.setattr(optimizer_module, "_CHECK_ELEMENTS", 4)
    for step in range(3):
        set_grads(reference, step)
        set_grads(checked, step)
        assert reference_opt.step() and checked_opt.step()
    _assert_same_state(_state(reference_opt, reference), _state(checked_opt, checked))


def test_gradients_given_by_name_are_read_like_param_grads():
    """step(lr, grads) with fp32 gradients (the accumulators of opdgraph.runtime.gradients) updates exactly as the
    same values in param.grad, and leaves param.grad alone. Fails if the mapping is ignored or misread."""
    from_grads, from_mapping = make_params(torch.bfloat16), make_params(torch.bfloat16)
    grad_opt, mapping_opt = MasterAdamW(from_grads.items(), **HYPER), MasterAdamW(from_mapping.items(), **HYPER)
    for step in range(3):
        set_grads(from_grads, step)
        set_grads(from_mapping, step)
        mapping = {name: param.grad.float() for name, param in from_mapping.items()}
        for param in from_mapping.values():
            param.grad = None
        assert grad_opt.step() and mapping_opt.step(None, mapping)
    assert all(param.grad is None for param in from_mapping.values())
    _assert_same_state(_state(grad_opt, from_grads), _state(mapping_opt, from_mapping))


def test_streamed_optimizer_rolls_back_its_host_state(monkeypatch):
    """With the state in host memory (the offload placement) both passes stream each bucket through the device; a
    rejected update must leave the host masters and moments bit for bit. Fails if the check pass writes back."""
    from opdgraph.placement import Placement
    from opdgraph.runtime import offload

    monkeypatch.setattr(optimizer_layout, "_BUCKET_ELEMENTS", 8)
    model = torch.nn.Sequential(torch.nn.Linear(5, 4), torch.nn.Linear(4, 3)).to(torch.bfloat16)
    optimizer = offload.build_optimizer(Placement(optimizer_state="offload"), model, torch.device("cpu"), lr=1e-3)
    params = dict(model.named_parameters())
    for step, lr in enumerate((1e-3, 1e38)):
        for param in params.values():
            param.grad = torch.randn(param.shape, generator=torch.Generator().manual_seed(step)).to(param.dtype)
        before = _state(optimizer, params)
        assert optimizer.step(lr) is (lr == 1e-3)
    _assert_same_state(before, _state(optimizer, params))
