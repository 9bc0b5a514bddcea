"""The flash-linear-attention core of Qwen3.5's gated-DeltaNet layers against the plain-torch core (the reference).

With CUDA fla's Triton kernels run compiled, in float32 and bfloat16. Without CUDA they run in the CPU interpreter
(TRITON_INTERPRET=1, set before triton is first imported; autotuning picks the first config, as the interpreter
cannot time kernels) at tiny sizes: fla's causal conv1d (forward, backward, states) and our in-place decode step
(kernels/gated_delta_decode.py) do; fla's chunked delta rule does not (its kernels call .to() on a loop counter,
a Python int in the interpreter), so on CPU a stand-in with that function's interface (varlen cu_seqlens,
initial and final states, grouped value heads, in-kernel L2 norms) computes it with our float64-tested torch
scan: the CPU run checks the backend's wiring (layouts, state gather and write-back, the recomputing Function)
and fla's other kernels; the chunked kernel itself is compared on the GPU. Skipped when fla does not import.
What is compared, on fresh random inputs: the packed core's output and its gradients (every input) over several
packed sequences that cross fla's 64-token chunks; a paged prefill split into chunks, a prefill continuing from a
carried state and decode steps (outputs, conv windows and delta-rule states); a whole tiny Qwen3.5 model's packed
forward and parameter gradients; and that the training core saves only its inputs.
"""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from opdgraph.kernels import fla_linear_attention  # noqa: E402
from opdgraph.kernels.fla_linear_attention import FlaLinearAttention, fla_import_problem  # noqa: E402
from opdgraph.models import delta_rule, linear_attention_backend, load_decoder  # noqa: E402
from opdgraph.models.attention_metadata import PackedMetadata, PagedMetadata  # noqa: E402
from opdgraph.models.gated_deltanet import LinearDims  # noqa: E402
from opdgraph.models.linear_attention_backend import TorchLinearAttention  # noqa: E402
from opdgraph.models.linear_state import LinearLayerState  # noqa: E402
from opdgraph.models.packing import pack  # noqa: E402
from opdgraph.models.tiny_configs import tiny_config  # noqa: E402

pytestmark = [pytest.mark.skipif(fla_import_problem() is not None, reason=str(fla_import_problem())),
              pytest.mark.filterwarnings("ignore::UserWarning")]
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# Widths fla's kernels take (multiples of 16), 2 value heads per key head as in the tiny config.
DIMS = LinearDims(key_heads=2, value_heads=4, key_dim=16, value_dim=32, kernel=4)
DTYPES = [torch.float32, torch.bfloat16] if DEVICE == "cuda" else [torch.float32]
# The GPU's float32 dots may round through TF32; bfloat16 inputs round q, k, v before the kernels.
TOLERANCE = {torch.float32: 2e-3 if DEVICE == "cuda" else 1e-4, torch.bfloat16: 4e-2}


def chunk_stand_in(q, k, v, g, beta, scale, initial_state=None, output_final_state=False,
                   use_qk_l2norm_in_kernel=False, cu_seqlens=None, chunk_indices=None):
    """fla's chunk_gated_delta_rule interface over our torch scan (CPU only: see the module docstring)."""
    assert use_qk_l2norm_in_kernel and cu_seqlens is not None and q.shape[0] == 1
    group = v.shape[2] // q.shape[2]
    q = (delta_rule.l2_normalize(q[0].float()) * scale).repeat_interleave(group, dim=1)
    k = delta_rule.l2_normalize(k[0].float()).repeat_interleave(group, dim=1)
    bounds = cu_seqlens.tolist()
    outputs, finals = [], []
    for index, (start, end) in enumerate(zip(bounds[:-1], bounds[1:])):
        span = slice(start, end)
        state = None if initial_state is None else initial_state[index].float()
        out, state = delta_rule.chunked(q[span], k[span], v[0, span].float(), g[0, span].float(),
                                        beta[0, span].float(), state)
        outputs.append(out)
        finals.append(state)
    return torch.cat(outputs).to(v.dtype)[None], torch.stack(finals) if output_final_state else None


@pytest.fixture(autouse=True)
def fla_kernels(monkeypatch):
    """On CPU: the interpreter's autotuning takes the first config, and the chunked kernel is the stand-in."""
    if DEVICE == "cuda":
        return
    import triton.runtime.autotuner as autotuner

    monkeypatch.setattr(autotuner.Autotuner, "_bench", lambda self, *args, config, **kwargs: [0.0, 0.0, 0.0])
    conv, _, chunk_indices = fla_linear_attention._fla()
    monkeypatch.setattr(fla_linear_attention, "_fla", lambda: (conv, chunk_stand_in, chunk_indices))


def core_inputs(num_tokens: int, dtype: torch.dtype, seed: int, requires_grad: bool = False):
    generator = torch.Generator().manual_seed(seed)
    mixed = torch.randn(num_tokens, DIMS.conv_channels, generator=generator)
    weight = torch.randn(DIMS.conv_channels, 1, DIMS.kernel, generator=generator) * 0.5
    decay = -torch.rand(num_tokens, DIMS.value_heads, generator=generator) * 2  # log decays g <= 0, fp32
    beta = torch.rand(num_tokens, DIMS.value_heads, generator=generator)
    tensors = [mixed.to(dtype), weight.to(dtype), decay, beta.to(dtype)]
    return [tensor.to(DEVICE).requires_grad_(requires_grad) for tensor in tensors]


def packed_meta(lengths) -> PackedMetadata:
    bounds = torch.tensor([0, *lengths], dtype=torch.int32).cumsum(0, dtype=torch.int32)
    return PackedMetadata(cu_seqlens=bounds.to(DEVICE), max_seqlen=max(lengths))


def assert_close(actual, expected, dtype, what):
    scale = expected.detach().float().abs().max().clamp_min(1.0)
    error = (actual.detach().float() - expected.detach().float()).abs().max()
    assert error <= TOLERANCE[dtype] * scale, f"{what}: max error {error:.3g} (scale {scale:.3g})"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("lengths", [(70,), (5, 64, 1, 33), (130, 3)])
@pytest.mark.parametrize("fla_backward", [True, False], ids=["fla backward", "torch backward (fla #640 guard)"])
@pytest.mark.parametrize("budget", [None, 64], ids=["one piece", "in pieces"])
def test_packed_core_and_gradients_match_the_torch_core(lengths, dtype, fla_backward, budget, monkeypatch):
    """If this fails, fla's conv or chunked delta rule computes another core than ours (GVA head mapping, q scale,
    L2 norms, the conv's causal window), or lets state or the conv window leak across packed sequences, or its
    gradients (through the recomputing Function) differ, also where fla's backward is not trusted (Hopper with
    Triton 3.4-3.7.0) and the torch core is differentiated instead, or where either backward runs in pieces of
    whole sequences (a 64-token budget: one piece per sequence; the torch core beside it as one piece)."""
    if fla_backward and not fla_linear_attention.fla_backward_trusted(torch.device(DEVICE)):
        pytest.skip("fla refuses its chunked backward on this GPU and Triton (its issue #640)")
    monkeypatch.setattr(fla_linear_attention, "fla_backward_trusted", lambda device: fla_backward)
    meta = packed_meta(lengths)
    outputs, grads = {}, {}
    for name, backend in (("torch", TorchLinearAttention()), ("fla", FlaLinearAttention())):
        if budget is not None and name == "fla":
            monkeypatch.setattr(linear_attention_backend, "RECOMPUTE_PADDED_TOKENS", budget)
        inputs = core_inputs(sum(lengths), dtype, seed=len(lengths), requires_grad=True)
        out = backend.packed(*inputs, DIMS, meta=meta)
        grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(7)).to(out)
        out.backward(grad_out)
        outputs[name], grads[name] = out, [tensor.grad for tensor in inputs]
    assert outputs["fla"].dtype == dtype and outputs["fla"].shape == outputs["torch"].shape
    assert_close(outputs["fla"], outputs["torch"], dtype, "output")
    for what, fla_grad, torch_grad in zip(("mixed", "conv weight", "decay", "beta"), grads["fla"], grads["torch"]):
        assert_close(fla_grad, torch_grad, dtype, f"grad of {what}")


def paged_meta(query_lens, starts, slots) -> PagedMetadata:
    query = torch.tensor(query_lens, dtype=torch.int32)
    kv_lens = query + torch.tensor(starts, dtype=torch.int32)
    return PagedMetadata(query_lens=query.to(DEVICE), cu_query_lens=torch.cat([query.new_zeros(1), query.cumsum(0)])
                         .to(torch.int32).to(DEVICE), kv_lens=kv_lens.to(DEVICE),
                         page_table=torch.zeros(len(query_lens), 1, dtype=torch.int32, device=DEVICE),
                         slot_mapping=torch.zeros(sum(query_lens), dtype=torch.int64, device=DEVICE), page_size=16,
                         state_slots=torch.tensor(slots, dtype=torch.int64, device=DEVICE))


# (query lengths, start positions, slots) per forward: a prefill in two chunks beside a fresh one, a mixed forward
# (a chunk continuing, a decode row, a one-token prompt), then decode steps of all of them.
PAGED_FORWARDS = [
    ([40, 9], [0, 0], [2, 0]),
    ([30, 1, 1], [40, 9, 0], [2, 0, 3]),
    ([1, 1, 1], [70, 10, 1], [2, 0, 3]),
    ([1, 1, 1], [71, 11, 2], [2, 0, 3]),
]


@pytest.mark.parametrize("dtype", DTYPES)
def test_paged_prefill_and_decode_carry_the_state_like_the_torch_core(dtype):
    """If this fails, a prefill chunk does not continue from its slot's conv window and state, a fresh sequence does
    not start from zeros, the state written back is another than the torch core's, or decode steps (the in-place
    kernel) diverge."""
    backend = FlaLinearAttention()
    states = {name: LinearLayerState.allocate(5, DIMS, dtype, DEVICE) for name in ("torch", "fla")}
    for state in states.values():  # stale contents: a fresh sequence must ignore them
        state.conv.normal_(generator=torch.Generator(DEVICE).manual_seed(1))
        state.recurrent.normal_(generator=torch.Generator(DEVICE).manual_seed(2))
    for index, (query_lens, starts, slots) in enumerate(PAGED_FORWARDS):
        meta = paged_meta(query_lens, starts, slots)
        inputs = core_inputs(sum(query_lens), dtype, seed=20 + index)
        outputs = {name: backend.paged(*inputs, DIMS, meta=meta, state=states[name])
                   for name, backend in (("torch", TorchLinearAttention()), ("fla", backend))}
        assert_close(outputs["fla"], outputs["torch"], dtype, f"forward {index} output")
        for slot in slots:
            assert_close(states["fla"].recurrent[slot], states["torch"].recurrent[slot], dtype, f"state {slot}")
            assert_close(states["fla"].conv[slot], states["torch"].conv[slot], dtype, f"conv window {slot}")


def fla_sized_config() -> dict:
    config = tiny_config("qwen3_5")
    config.update(linear_key_head_dim=16, linear_value_head_dim=32, hidden_size=64, head_dim=32)
    return config


@pytest.mark.parametrize("dtype", DTYPES)
def test_model_forward_and_gradients_match_with_either_core(dtype):
    """If this fails, a whole Qwen3.5 model trains on other numbers with the fla core than with the torch core."""
    ids, positions, meta = pack([list(range(3, 73)), [9, 4, 1], list(range(40, 7, -1))], DEVICE)
    results = {}
    for name, backend in (("torch", TorchLinearAttention()), ("fla", FlaLinearAttention())):
        model = load_decoder(fla_sized_config(), dtype=dtype, init_seed=5).to(DEVICE)
        model.set_linear_attention_backend(backend)
        logits = model.logits(model.forward_hidden(ids, positions, meta))
        logits.logsumexp(-1).mean().backward()
        results[name] = logits, {key: p.grad for key, p in model.named_parameters()}
    assert_close(results["fla"][0], results["torch"][0], dtype, "logits")
    for key, grad in results["torch"][1].items():
        assert_close(results["fla"][1][key], grad, dtype, f"grad of {key}")


def recorded(monkeypatch, owner, name, what) -> list:
    """owner.name, patched to append what(*args, result) of each call to the list returned."""
    calls, original = [], getattr(owner, name)

    def recording(*args):
        result = original(*args)
        calls.append(what(*args, result))
        return result

    monkeypatch.setattr(owner, name, recording)
    return calls


def test_a_model_backward_in_pieces_builds_each_piece_once(monkeypatch):
    """If this fails, fla's own backward in pieces (where it is trusted) gives a whole Qwen3.5 model other gradients
    than the torch core run as one piece, or builds a piece's varlen tiles once per layer (each build waits on a host
    copy) instead of once per batch, or keeps an earlier batch's pieces. Budget 64: each sequence is a piece; the
    model has three linear layers; two batches of other lengths."""
    if not fla_linear_attention.fla_backward_trusted(torch.device(DEVICE)):
        pytest.skip("fla refuses its chunked backward on this GPU and Triton (its issue #640)")
    built = recorded(monkeypatch, fla_linear_attention, "_piece_varlen", lambda piece, device, result: piece)
    spans = recorded(monkeypatch, linear_attention_backend, "recompute_pieces", lambda *call: call[-1])
    models = {}
    for name, backend in (("torch", TorchLinearAttention()), ("fla", FlaLinearAttention())):
        models[name] = load_decoder(fla_sized_config(), dtype=torch.float32, init_seed=5).to(DEVICE)
        models[name].set_linear_attention_backend(backend)
    batches = ([list(range(3, 73)), [9, 4, 1], list(range(40, 7, -1))], [[5] * 20, list(range(50, 2, -1))])
    for sequences, pieces in zip(batches, ([(0, 3), (0, 33), (0, 70)], [(0, 20), (0, 48)])):
        built.clear()
        ids, positions, meta = pack(sequences, DEVICE)
        grads = {}
        spans.clear()
        for name, model in models.items():  # the torch core as one piece: the reference does not reassemble pieces
            model.zero_grad(set_to_none=True)
            with monkeypatch.context() as patch:
                if name == "fla":
                    patch.setattr(linear_attention_backend, "RECOMPUTE_PADDED_TOKENS", 64)
                model.logits(model.forward_hidden(ids, positions, meta)).logsumexp(-1).mean().backward()
            grads[name] = {key: parameter.grad for key, parameter in model.named_parameters()}
            if name == "torch":  # each of its three linear layers recomputed its core as one piece
                assert [len(layer_spans) for layer_spans in spans] == [1, 1, 1], spans
        assert sorted(built) == pieces, built
        kept = [key for key in models["fla"].linear_backend._forward[1] if isinstance(key, tuple)]
        assert sorted(piece for _, piece in kept) == pieces, kept
        for key, grad in grads["torch"].items():
            assert_close(grads["fla"][key], grad, torch.float32, f"grad of {key}")


def test_training_core_saves_only_its_inputs():
    """If this fails, fla's backward state (q, k, v, the chunk matrices) is kept from the forward to the backward:
    the training activations would exceed the plan's a_linear, which counts the core's inputs only."""
    inputs = core_inputs(70, torch.float32, seed=3, requires_grad=True)
    saved = []

    def pack_hook(tensor):
        saved.append(tensor)
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack_hook, lambda tensor: tensor):
        FlaLinearAttention().packed(*inputs, DIMS, meta=packed_meta((50, 20)))
    assert sorted(tensor.data_ptr() for tensor in saved) == sorted(tensor.data_ptr() for tensor in inputs)
