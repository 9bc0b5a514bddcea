"""DecoderLM.pack_gate_up: gate_proj and up_proj parameters moved back to back into one storage, so the fused
rollout forward can run them as one matmul without a stacked copy (GatedMLP.packed_gate_up is a view).

Packing must be invisible to everything else: same parameter objects, same values, same training forward and
gradients; and the view must be offered only while the two really are adjacent.
"""

from __future__ import annotations

import copy

import torch

from opdgraph.models import load_decoder
from opdgraph.models.attention_metadata import PackedMetadata
from opdgraph.models.tiny_configs import tiny_config


def _model(**overrides):
    config = tiny_config("llama")
    config.update(overrides)
    return load_decoder(config, dtype=torch.float32, device="cpu", init_seed=6)


def test_packing_keeps_parameters_values_and_gradients():
    """Packing that replaced parameter objects (optimizers hold them), changed a value, or broke autograd through
    the halves would change training."""
    model = _model(mlp_bias=True)
    reference = copy.deepcopy(model)
    before = {name: parameter for name, parameter in model.named_parameters()}
    model.pack_gate_up()
    assert {name: parameter for name, parameter in model.named_parameters()} == before
    for (name, packed), (_, plain) in zip(model.named_parameters(), reference.named_parameters(), strict=True):
        assert torch.equal(packed, plain), name
    ids = torch.tensor([3, 17, 5, 99, 2, 41, 8])
    meta = PackedMetadata(cu_seqlens=torch.tensor([0, 5, 7], dtype=torch.int32), max_seqlen=5)
    positions = torch.tensor([0, 1, 2, 3, 4, 0, 1])
    for m in (model, reference):
        m.logits(m.forward_hidden(ids, positions, meta)).square().mean().backward()
    for (name, packed), (_, plain) in zip(model.named_parameters(), reference.named_parameters(), strict=True):
        torch.testing.assert_close(packed.grad, plain.grad, rtol=0, atol=0, msg=name)


def test_packed_view_covers_both_projections_and_follows_updates():
    """The view is [gate; up] over the parameters' own storage (no copy): it must hold both weights in order and
    see an in-place update of either."""
    model = _model(mlp_bias=True)
    model.pack_gate_up()
    mlp = model.layers[1].mlp
    weight, bias = mlp.packed_gate_up()
    assert weight.data_ptr() == mlp.gate_proj.weight.data_ptr()
    assert torch.equal(weight, torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight]))
    assert torch.equal(bias, torch.cat([mlp.gate_proj.bias, mlp.up_proj.bias]))
    with torch.no_grad():
        mlp.up_proj.weight.add_(1.0)
    assert torch.equal(weight[mlp.gate_proj.weight.shape[0]:], mlp.up_proj.weight)


def test_no_view_unless_the_parameters_are_adjacent():
    """Unpacked weights, or packed ones given storage of their own again (a device or dtype move, a load that
    assigns new tensors, FSDP), must fall back to two projections, never to a view of unrelated memory."""
    model = _model()
    assert model.layers[0].mlp.packed_gate_up() is None
    assert model.install_fused_gate_up(True) == 0
    model.pack_gate_up()
    assert model.install_fused_gate_up(True) == len(model.layers)
    model.install_fused_gate_up(False)
    mlp = model.layers[0].mlp
    mlp.up_proj.weight.data = mlp.up_proj.weight.data.clone()
    assert mlp.packed_gate_up() is None
    assert model.install_fused_gate_up(True) == len(model.layers) - 1
