"""The batched chunked gated delta rule (delta_rule.chunked_packed) and the batched linear-attention core
(linear_attention_backend.core_packed, the paged prefill) against float64 token-by-token references.

References: ``delta_rule.recurrent_step`` one token at a time in float64, per sequence, each from its own initial
state; for the whole core also an explicit float64 causal conv (tap by tap over [window; tokens]). Fresh random
inputs with ragged lengths (1, 63, 64, 65, 200 tokens: a lone token, one partial, one whole, one whole plus one token,
several chunks). The mutation checks show that a core leaking state or conv inputs across packed sequences would fail
these comparisons.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from opdgraph.models import delta_rule
from opdgraph.models.attention_metadata import PagedMetadata
from opdgraph.models.gated_deltanet import LinearDims
from opdgraph.models.linear_attention_backend import TorchLinearAttention, core_packed
from opdgraph.models.linear_state import LinearLayerState

LENGTHS = (1, 63, 64, 65, 200)
HEADS, KEY_DIM, VALUE_DIM = 3, 6, 5


def bounds_of(lengths) -> list[int]:
    bounds = [0]
    for length in lengths:
        bounds.append(bounds[-1] + length)
    return bounds


def random_inputs(lengths, seed: int, dtype=torch.float64, with_states: bool = True):
    generator = torch.Generator().manual_seed(seed)
    tokens = sum(lengths)

    def randn(*shape):
        return torch.randn(*shape, generator=generator, dtype=torch.float64)

    q = delta_rule.l2_normalize(randn(tokens, HEADS, KEY_DIM)) * KEY_DIM ** -0.5
    k = delta_rule.l2_normalize(randn(tokens, HEADS, KEY_DIM))
    v = randn(tokens, HEADS, VALUE_DIM)
    g = -2 * torch.rand(tokens, HEADS, generator=generator, dtype=torch.float64)
    beta = torch.rand(tokens, HEADS, generator=generator, dtype=torch.float64)
    states = randn(len(lengths), HEADS, KEY_DIM, VALUE_DIM) if with_states else None
    return [x if x is None else x.to(dtype) for x in (q, k, v, g, beta, states)]


def recurrence(q, k, v, g, beta, state):
    """One sequence token by token (float64) -> (out [L, H, Dv], final state [H, Dk, Dv])."""
    state = state[None]
    outputs = []
    for t in range(q.shape[0]):
        out, state = delta_rule.recurrent_step(q[t, None], k[t, None], v[t, None], g[t, None], beta[t, None], state)
        outputs.append(out[0])
    return (torch.stack(outputs) if outputs else v.new_zeros(0, *v.shape[1:])), state[0]


def reference(q, k, v, g, beta, bounds, states=None):
    """Every sequence on its own from its own state, in float64."""
    outputs, finals = [], []
    for index, (start, end) in enumerate(zip(bounds[:-1], bounds[1:])):
        state = q.new_zeros(HEADS, KEY_DIM, VALUE_DIM, dtype=torch.float64) if states is None else states[index]
        out, final = recurrence(*(x[start:end].double() for x in (q, k, v, g, beta)), state.double())
        outputs.append(out)
        finals.append(final)
    return torch.cat(outputs), torch.stack(finals)


@pytest.mark.parametrize("with_states", [False, True])
@pytest.mark.parametrize("order", [LENGTHS, (200, 1, 65, 63, 64, 1)])
def test_batched_core_equals_the_float64_recurrence(order, with_states):
    """If this fails, the batched chunks (padding to whole chunks, the scan over the sequences having a chunk c, the
    chunk-index-first layout, the final states put back in sequence order) compute another recurrence."""
    bounds = bounds_of(order)
    inputs = random_inputs(order, seed=len(order) + with_states, with_states=with_states)
    expected, expected_final = reference(*inputs[:5], bounds, inputs[5])
    out, final = delta_rule.chunked_packed(*inputs[:5], bounds, inputs[5])
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-11)
    torch.testing.assert_close(final, expected_final, rtol=0, atol=1e-11)
    # The models run it in float32.
    as_float = [x if x is None else x.float() for x in inputs]
    out32, final32 = delta_rule.chunked_packed(*as_float[:5], bounds, as_float[5])
    torch.testing.assert_close(out32.double(), expected, rtol=0, atol=2e-5)
    torch.testing.assert_close(final32.double(), expected_final, rtol=0, atol=2e-5)


@pytest.mark.parametrize("chunk_tokens", [1, 16, 64])
def test_other_chunk_sizes_and_an_empty_sequence(chunk_tokens):
    """If this fails, a chunk size that divides some lengths but not others, or a sequence of no tokens (its state
    passes through), breaks the layout."""
    order = (5, 0, 33, 16, 1)
    bounds = bounds_of(order)
    inputs = random_inputs(order, seed=chunk_tokens)
    expected, expected_final = reference(*inputs[:5], bounds, inputs[5])
    out, final = delta_rule.chunked_packed(*inputs[:5], bounds, inputs[5], chunk_tokens=chunk_tokens)
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-11)
    torch.testing.assert_close(final, expected_final, rtol=0, atol=1e-11)
    torch.testing.assert_close(final[1], inputs[5][1], rtol=0, atol=0)


def test_gradients_equal_the_per_sequence_reference():
    """If this fails, the backward of the batched core (through the padding scatter, the scan's slices and the
    final states' reordering) differs from the float64 per-sequence recurrence's, for any of its six inputs."""
    bounds = bounds_of(LENGTHS)
    inputs = [x.requires_grad_() for x in random_inputs(LENGTHS, seed=11)]
    generator = torch.Generator().manual_seed(12)
    weights = torch.randn(bounds[-1], HEADS, VALUE_DIM, generator=generator, dtype=torch.float64)
    final_weights = torch.randn(len(LENGTHS), HEADS, KEY_DIM, VALUE_DIM, generator=generator, dtype=torch.float64)

    def gradients(function):
        out, final = function(*inputs[:5], bounds, inputs[5])
        return torch.autograd.grad((out * weights).sum() + (final * final_weights).sum(), inputs)

    expected = gradients(reference)
    names = ("q", "k", "v", "g", "beta", "states")
    for name, ours, theirs in zip(names, gradients(delta_rule.chunked_packed), expected):
        torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-10, msg=f"gradient of {name}")


def test_padding_tokens_change_nothing():
    """If this fails, the padding the batched core appends (q = k = v = 0, beta = 0, g = 0) is not inert in the
    chunk math itself: checked on the per-sequence chunked form, which pads nothing, and on the recurrence."""
    q, k, v, g, beta, states = random_inputs((37,), seed=5)
    padding = 27  # 37 + 27 = 64: the padded chunk is whole

    def padded(x):
        return torch.cat((x, x.new_zeros(padding, *x.shape[1:])))

    out, final = delta_rule.chunked(q, k, v, g, beta, states[0])
    padded_out, padded_final = delta_rule.chunked(*(padded(x) for x in (q, k, v, g, beta)), states[0])
    torch.testing.assert_close(padded_out[:37], out, rtol=0, atol=1e-13)
    torch.testing.assert_close(padded_final, final, rtol=0, atol=1e-13)
    assert padded_out[37:].abs().max() == 0
    _, recurrent_final = recurrence(*(padded(x) for x in (q, k, v, g, beta)), states[0])
    torch.testing.assert_close(recurrent_final, final, rtol=0, atol=1e-12)


def test_a_state_leaking_across_sequences_is_caught():
    """If this fails, the comparisons above could not tell the batched core from one that carries the state from
    one packed sequence into the next (one concatenated sequence), or gives a sequence another's initial state."""
    bounds = bounds_of(LENGTHS)
    inputs = random_inputs(LENGTHS, seed=3)
    expected, _ = reference(*inputs[:5], bounds, inputs[5])
    leaked, _ = delta_rule.chunked_packed(*inputs[:5], [0, bounds[-1]], inputs[5][:1])
    assert (leaked - expected).abs().max() > 1e-3
    swapped, _ = delta_rule.chunked_packed(*inputs[:5], bounds, inputs[5].flip(0))
    assert (swapped - expected).abs().max() > 1e-3


# ---------------------------------------------------------------------------------- the whole core, batched
DIMS = LinearDims(key_heads=1, value_heads=HEADS, key_dim=KEY_DIM, value_dim=VALUE_DIM, kernel=4)


def core_reference(mixed, weight, decay, beta, bounds, windows, states):
    """float64, per sequence: the causal conv tap by tap over [window; tokens], SiLU, q/k/v, the recurrence."""
    outputs, new_windows, finals = [], [], []
    kernel, key_width = weight.shape[-1], DIMS.key_heads * KEY_DIM
    for index, (start, end) in enumerate(zip(bounds[:-1], bounds[1:])):
        inputs = torch.cat((windows[index].double(), mixed[start:end].double()))
        conv = sum(inputs[tap:tap + end - start] * weight[:, 0, tap].double() for tap in range(kernel))
        q, k, v = F.silu(conv).split((key_width, key_width, HEADS * VALUE_DIM), dim=-1)
        q = delta_rule.l2_normalize(q.reshape(-1, 1, KEY_DIM).expand(-1, HEADS, -1)) * KEY_DIM ** -0.5
        k = delta_rule.l2_normalize(k.reshape(-1, 1, KEY_DIM).expand(-1, HEADS, -1))
        out, final = recurrence(q, k, v.reshape(-1, HEADS, VALUE_DIM), decay[start:end].double(),
                                beta[start:end].double(), states[index].double())
        outputs.append(out)
        new_windows.append(inputs[inputs.shape[0] - (kernel - 1):])
        finals.append(final)
    return torch.cat(outputs), torch.stack(new_windows), torch.stack(finals)


def core_inputs(lengths, seed):
    generator = torch.Generator().manual_seed(seed)
    tokens, channels = sum(lengths), DIMS.conv_channels
    mixed = torch.randn(tokens, channels, generator=generator)
    weight = torch.randn(channels, 1, DIMS.kernel, generator=generator) * 0.5
    decay = -2 * torch.rand(tokens, HEADS, generator=generator)
    beta = torch.rand(tokens, HEADS, generator=generator)
    windows = torch.randn(len(lengths), DIMS.kernel - 1, channels, generator=generator)
    states = torch.randn(len(lengths), HEADS, KEY_DIM, VALUE_DIM, generator=generator)
    return mixed, weight, decay, beta, windows, states


@pytest.mark.parametrize("carried", [False, True])
def test_batched_core_with_conv_windows_equals_the_float64_reference(carried):
    """If this fails, the one conv1d over all packed sequences reads across a boundary, loses a carried window, or
    returns the wrong last K-1 inputs; or the core's states come back wrong."""
    mixed, weight, decay, beta, windows, states = core_inputs(LENGTHS, seed=21 + carried)
    bounds = bounds_of(LENGTHS)
    if not carried:
        windows, states = torch.zeros_like(windows), torch.zeros_like(states)
    out, new_windows, finals = core_packed(mixed, weight, decay, beta, DIMS, bounds,
                                           windows if carried else None, states if carried else None)
    expected = core_reference(mixed, weight, decay, beta, bounds, windows, states)
    for name, ours, theirs in zip(("out", "windows", "states"), (out, new_windows, finals), expected):
        torch.testing.assert_close(ours.double(), theirs, rtol=0, atol=5e-5, msg=name)
    leaked = core_packed(mixed, weight, decay, beta, DIMS, [0, bounds[-1]])[0]  # the mutation: no boundaries
    assert (leaked.double() - expected[0]).abs().max() > 1e-3


def test_paged_prefill_rows_continue_from_their_slots():
    """If this fails, the paged forward's batched prefill (fresh and continuing rows together, a one-token decode
    row beside them) reads another row's slot, ignores a carried window or state, or writes a slot back wrong."""
    lengths = (5, 70, 1, 1, 64)  # fresh, continuing, decoding (continuing, one token), fresh one token, continuing
    earlier = (0, 9, 30, 0, 3)  # tokens already in the cache
    slots = (4, 0, 2, 1, 3)
    mixed, weight, decay, beta, windows, states = core_inputs(lengths, seed=31)
    bounds = bounds_of(lengths)
    state = LinearLayerState.allocate(6, DIMS, torch.float32, "cpu")
    state.conv[torch.tensor(slots)], state.recurrent[torch.tensor(slots)] = windows, states
    kv = torch.tensor([start + length for start, length in zip(earlier, lengths)], dtype=torch.int32)
    meta = PagedMetadata(query_lens=torch.tensor(lengths, dtype=torch.int32),
                         cu_query_lens=torch.tensor(bounds, dtype=torch.int32), kv_lens=kv,
                         page_table=torch.zeros(len(lengths), 1, dtype=torch.int32),
                         slot_mapping=torch.zeros(bounds[-1], dtype=torch.int64), page_size=16,
                         state_slots=torch.tensor(slots))
    out = TorchLinearAttention().paged(mixed, weight, decay, beta, DIMS, meta=meta, state=state)
    fresh = torch.tensor([start == 0 for start in earlier])
    windows = torch.where(fresh[:, None, None], 0, windows)
    states = torch.where(fresh[:, None, None, None], 0, states)
    expected, expected_windows, expected_states = core_reference(mixed, weight, decay, beta, bounds, windows, states)
    torch.testing.assert_close(out.double(), expected, rtol=0, atol=5e-5)
    torch.testing.assert_close(state.conv[torch.tensor(slots)].double(), expected_windows, rtol=0, atol=5e-5)
    torch.testing.assert_close(state.recurrent[torch.tensor(slots)].double(), expected_states, rtol=0, atol=5e-5)


def test_many_short_sequences_are_scanned_in_groups():
    """If this fails, the groups that bound the scanned states (many short sequences: more than 16 and fewer than
    C tokens each on average) drop or misplace a sequence, its state or its gradient."""
    order = (3,) * 20 + (1,) * 5 + (130,) + (7,) * 10
    bounds = bounds_of(order)
    groups = delta_rule.scan_groups(tuple(bounds), delta_rule.CHUNK_TOKENS)
    assert len(groups) > 1 and groups[0][0] == 0 and groups[-1][1] == len(order)
    assert all(a[1] == b[0] for a, b in zip(groups, groups[1:]))
    assert all(last - first <= max(16, -(-(bounds[last] - bounds[first]) // 64)) for first, last in groups)
    inputs = [x.requires_grad_() for x in random_inputs(order, seed=41)]
    expected = reference(*inputs[:5], bounds, inputs[5])
    ours = delta_rule.chunked_packed(*inputs[:5], bounds, inputs[5])
    for got, want in zip(ours, expected):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-11)
    weights = torch.randn(bounds[-1], HEADS, VALUE_DIM, generator=torch.Generator().manual_seed(42),
                          dtype=torch.float64)
    for got, want in zip(torch.autograd.grad((ours[0] * weights).sum() + ours[1].sum(), inputs),
                         torch.autograd.grad((expected[0] * weights).sum() + expected[1].sum(), inputs)):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-10)


@pytest.mark.parametrize("order", [LENGTHS, (3,) * 20 + (130,)])
def test_outputs_without_final_states_are_the_same(order):
    """If this fails, the training path (keep_states False: no zero states, none built past a sequence's end)
    computes other outputs or gradients than the path that keeps the states."""
    bounds = bounds_of(order)
    q, k, v, g, beta, _ = [x.requires_grad_() for x in random_inputs(order, seed=51)]
    expected, _ = reference(q, k, v, g, beta, bounds)
    out, final = delta_rule.chunked_packed(q, k, v, g, beta, bounds, keep_states=False)
    assert final is None
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-11)
    weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(52), dtype=torch.float64)
    for got, want in zip(torch.autograd.grad((out * weights).sum(), (q, k, v, g, beta)),
                         torch.autograd.grad((expected * weights).sum(), (q, k, v, g, beta))):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-10)


def test_indexes_cached_during_a_rollout_serve_a_training_forward():
    """Fails if the index cache keeps tensors made under the rollout's inference_mode: a training forward over the
    same bounds (fixed-length rows) then raises 'Inference tensors cannot be saved for backward'."""
    cache = delta_rule.IndexCache()
    lengths = (70, 5, 85)
    bounds = [0, 70, 75, 160]
    inputs = random_inputs(lengths, seed=9, with_states=False)[:5]
    with torch.inference_mode():
        delta_rule.chunked_packed(*inputs, bounds, keep_states=False, cache=cache)
    q = inputs[0].clone().requires_grad_()
    out, _ = delta_rule.chunked_packed(q, *inputs[1:], bounds, keep_states=False, cache=cache)
    out.sum().backward()
    assert q.grad is not None and torch.isfinite(q.grad).all()
