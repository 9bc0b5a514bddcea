"""The linear-attention core's backward in pieces (linear_attention_backend.PiecewiseRecompute): RecomputedCore
recomputes and differentiates the plain-torch core (float32 inside, whatever its inputs) over runs of whole sequences
of a bounded padded size, one run at a time. Checked against the float64 per-sequence reference of
tests/test_delta_rule_batched.py and against the whole batch differentiated at once, on fresh random inputs with
ragged lengths."""

from __future__ import annotations

import random

import pytest
import torch

from opdgraph import sizing
from opdgraph.models import delta_rule, linear_attention_backend
from opdgraph.models.linear_attention_backend import TorchLinearAttention, recompute_pieces
from opdgraph.models.packing import pack
from test_delta_rule_batched import DIMS, bounds_of, core_inputs, core_reference

LENGTHS = (100, 37, 3, 200, 64, 65, 1, 90)


def test_the_budget_is_the_one_the_plan_sizes():
    """If this fails, the plan sizes recomputed pieces of another padded size than the backward builds."""
    assert sizing.LINEAR_RECOMPUTE_PADDED_TOKENS == linear_attention_backend.RECOMPUTE_PADDED_TOKENS


EMPTY_FIRST = ((0, 300), (0, 0, 0, 100, 120), (300, 0, 0, 5))


@pytest.mark.parametrize("seed", range(10))
def test_pieces_are_maximal_runs_within_the_budget(seed):
    """If this fails, a piece splits a sequence, skips or repeats one, holds more padded tokens than the budget
    (other than one long sequence alone), stops before the next sequence would overflow it, or is left with no
    tokens (an empty sequence after a long one: its conv would have no input)."""
    rng = random.Random(seed)
    lengths = [rng.choice((0, 1, 5, 63, 64, 65, 130, 300)) for _ in range(rng.randint(1, 30))]
    budget, chunk = rng.choice((64, 128, 256)), delta_rule.CHUNK_TOKENS
    if seed < len(EMPTY_FIRST):  # empty sequences before a long one
        lengths, budget = list(EMPTY_FIRST[seed]), 64
    padded = [-(-length // chunk) * chunk for length in lengths]
    pieces = recompute_pieces(tuple(bounds_of(lengths)), budget, chunk)
    assert [first for first, _ in pieces] == [0] + [last for _, last in pieces[:-1]]
    assert pieces[-1][1] == len(lengths)
    for index, (first, last) in enumerate(pieces):
        assert last > first and (sum(lengths[first:last]) > 0 or len(pieces) == 1)
        assert sum(padded[first:last]) <= budget or sum(1 for n in lengths[first:last] if n) == 1
        if index + 1 < len(pieces):
            assert sum(padded[first:last + 1]) > budget


def core_gradients(lengths, budget, monkeypatch):
    """The core's output and its inputs' gradients in float64, the backward recomputing in pieces of `budget`."""
    monkeypatch.setattr(linear_attention_backend, "RECOMPUTE_PADDED_TOKENS", budget)
    mixed, weight, decay, beta, _, _ = (tensor.double() for tensor in core_inputs(lengths, seed=len(lengths)))
    inputs = [tensor.requires_grad_() for tensor in (mixed, weight, decay, beta)]
    _, _, meta = pack([[0] * length for length in lengths], "cpu")
    out = TorchLinearAttention().packed(*inputs, DIMS, meta=meta)
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    return out, torch.autograd.grad(out, inputs, grad_out), inputs, grad_out


def test_gradients_in_pieces_equal_the_float64_reference_and_the_whole(monkeypatch):
    """If this fails, differentiating the core piece by piece loses or misplaces a piece's input gradients, or
    sums the conv weight's wrongly, against the per-sequence float64 reference and the one-piece backward."""
    assert len(recompute_pieces(tuple(bounds_of(LENGTHS)), 128, delta_rule.CHUNK_TOKENS)) > 3
    out, pieces, inputs, grad_out = core_gradients(LENGTHS, 128, monkeypatch)
    _, whole, _, _ = core_gradients(LENGTHS, 1 << 30, monkeypatch)
    bounds = bounds_of(LENGTHS)
    zeros = (torch.zeros(len(LENGTHS), DIMS.kernel - 1, DIMS.conv_channels, dtype=torch.float64),
             torch.zeros(len(LENGTHS), DIMS.value_heads, DIMS.key_dim, DIMS.value_dim, dtype=torch.float64))
    expected_out = core_reference(*inputs, bounds, *zeros)[0]
    torch.testing.assert_close(out, expected_out.reshape(out.shape), rtol=0, atol=5e-5)
    expected = torch.autograd.grad(expected_out.reshape(out.shape), inputs, grad_out)
    for name, ours, one_piece, reference in zip(("mixed", "conv weight", "decay", "beta"), pieces, whole, expected):
        torch.testing.assert_close(ours, reference, rtol=0, atol=5e-5, msg=f"grad of {name} vs the reference")
        # The conv weight's is a sum over the pieces, in float64 here: summed in float32 it would be 5e-7 off.
        atol = 1e-7 if name == "conv weight" else 1e-6
        torch.testing.assert_close(ours, one_piece, rtol=0, atol=atol, msg=f"grad of {name} vs one piece")


def test_the_pieces_indexes_do_not_pile_up_across_batches(monkeypatch):
    """If this fails, the index cache keeps the pieces of earlier batches: where no forward starts it for its batch
    (fla's forward on Hopper, whose backward differentiates the torch core; the unfused loop's backward after every
    forward) each micro-batch's pieces would add device memory the plan does not hold, step after step."""
    from opdgraph.models.linear_attention_backend import torch_recompute

    monkeypatch.setattr(linear_attention_backend, "RECOMPUTE_PADDED_TOKENS", 128)
    cache = delta_rule.IndexCache()
    sizes = []
    for batch in range(6):
        lengths = (100 + batch, 37, 64, 90)  # another batch every time
        mixed, weight, decay, beta, _, _ = core_inputs(lengths, seed=batch)
        for start, end, core in torch_recompute(bounds_of(lengths), DIMS, cache).pieces():
            core(mixed[start:end], weight, decay[start:end], beta[start:end])
        sizes.append(len(cache._entries))
    assert max(sizes) == sizes[0] > 0, sizes
