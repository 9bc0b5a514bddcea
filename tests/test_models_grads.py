"""Backward of the packed training forward: packing and activation checkpointing must not change gradients.

The scalar is a fixed random projection of the final hidden states (what a loss sees). References are our own
per-sequence forwards, checked against transformers in test_models_parity.py.
"""

from __future__ import annotations

import pytest
import torch

from opdgraph.models import load_model
from opdgraph.models.packing import pack
from opdgraph.models.tiny_configs import TINY_CONFIGS, tiny_config

SEQUENCE_LENGTHS = (10, 4, 7)


def sequences_and_weights(hidden_size: int):
    generator = torch.Generator().manual_seed(7)
    sequences = [torch.randint(0, 300, (n,), generator=generator).tolist() for n in SEQUENCE_LENGTHS]
    weights = [torch.randn(n, hidden_size, generator=generator) for n in SEQUENCE_LENGTHS]
    return sequences, weights


def gradients(model, sequences, weights, packed: bool, checkpointing: bool = False) -> dict[str, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    groups = [sequences] if packed else [[sequence] for sequence in sequences]
    weight_groups = [weights] if packed else [[weight] for weight in weights]
    for group, group_weights in zip(groups, weight_groups):
        input_ids, positions, meta = pack(group)
        hidden = model.forward_hidden(input_ids, positions, meta, activation_checkpointing=checkpointing)
        (hidden * torch.cat(group_weights)).sum().backward()
    # lm_head (when untied) is not on the hidden-state path and gets no gradient here.
    return {name: parameter.grad.clone() for name, parameter in model.named_parameters() if parameter.grad is not None}


def assert_same_gradients(actual: dict, expected: dict, tolerance: float) -> None:
    assert actual.keys() == expected.keys()
    for name in expected:
        scale = expected[name].abs().max().clamp_min(1e-12)
        error = ((actual[name] - expected[name]).abs().max() / scale).item()
        assert error < tolerance, f"{name}: relative gradient error {error:.3g}"


@pytest.mark.parametrize("family", sorted(TINY_CONFIGS))
def test_packed_gradients_match_per_sequence_gradients(family):
    """Packed-batch gradients differ from summed per-sequence gradients: sequences interact in forward or backward."""
    model, _ = load_model(tiny_config(family), dtype=torch.float32, init_seed=1)
    sequences, weights = sequences_and_weights(model.config.hidden_size)
    per_sequence = gradients(model, sequences, weights, packed=False)
    assert any(gradient.abs().max() > 0 for gradient in per_sequence.values())
    assert_same_gradients(gradients(model, sequences, weights, packed=True), per_sequence, tolerance=1e-5)


@pytest.mark.parametrize("family", ["qwen2", "gemma3"])
def test_activation_checkpointing_gives_same_gradients(family):
    """Checkpointed layers recompute differently (e.g. lose RoPE/backend arguments) and gradients change."""
    model, _ = load_model(tiny_config(family), dtype=torch.float32, init_seed=2)
    sequences, weights = sequences_and_weights(model.config.hidden_size)
    plain = gradients(model, sequences, weights, packed=True)
    checkpointed = gradients(model, sequences, weights, packed=True, checkpointing=True)
    assert_same_gradients(checkpointed, plain, tolerance=1e-6)


def test_tied_embedding_receives_gradient_from_both_uses():
    """With tied embeddings, lm_head_weight must be the embedding parameter itself (one tensor, shared gradient)."""
    model, _ = load_model(tiny_config("qwen2"), dtype=torch.float32)
    assert model.lm_head_weight is model.embed_tokens.weight
    untied, _ = load_model(tiny_config("qwen2_untied"), dtype=torch.float32)
    assert untied.lm_head_weight is not untied.embed_tokens.weight
