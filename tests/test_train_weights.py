"""Per-position loss weights (token vs sequence normalisation) on hand-built packed batches."""

from __future__ import annotations

import pytest
import torch

from opdgraph.train.weights import local_counts, position_weights

# Three packed sequences of lengths 3, 4, 2; the last has no trained (response) position.
CU_SEQLENS = torch.tensor([0, 3, 7, 9], dtype=torch.int32)
MASK = torch.tensor([0, 1, 1, 0, 1, 1, 1, 0, 0], dtype=torch.bool)


def test_token_normalisation():
    """Every trained token weighs 1 / (trained tokens); untrained positions weigh 0."""
    weights = position_weights(MASK, CU_SEQLENS, normalize="token")
    expected = torch.tensor([0, 1, 1, 0, 1, 1, 1, 0, 0]) / 5
    assert weights.dtype == torch.float32 and torch.allclose(weights, expected)


def test_sequence_normalisation():
    """Each sequence with trained tokens weighs 1 / num_seqs in total, spread evenly over its trained tokens."""
    weights = position_weights(MASK, CU_SEQLENS, normalize="sequence")
    expected = torch.tensor([0, 1 / 4, 1 / 4, 0, 1 / 6, 1 / 6, 1 / 6, 0, 0])
    assert torch.allclose(weights, expected)


def test_global_counts_from_caller():
    """Global counts (all ranks and micro-batches) replace the local ones so data-parallel ranks agree."""
    assert local_counts(MASK, CU_SEQLENS) == (5, 2)
    token = position_weights(MASK, CU_SEQLENS, normalize="token", global_token_count=20)
    sequence = position_weights(MASK, CU_SEQLENS, normalize="sequence", global_seq_count=8)
    assert torch.allclose(token, MASK.float() / 20)
    assert torch.allclose(sequence, torch.tensor([0, 1 / 16, 1 / 16, 0, 1 / 24, 1 / 24, 1 / 24, 0, 0]))


def test_nothing_trained_gives_zero_weights():
    """A micro-batch with no response token gives all-zero weights, not NaN from 0 / 0."""
    mask = torch.zeros(9, dtype=torch.bool)
    for normalize in ("token", "sequence"):
        assert (position_weights(mask, CU_SEQLENS, normalize=normalize) == 0).all()


@pytest.mark.parametrize(
    "mask, kwargs, message",
    [
        (MASK, dict(normalize="mean"), "unknown normalize"),
        (MASK, dict(normalize="token", global_token_count=3), "smaller than this micro-batch"),
        (MASK[:5], dict(normalize="token"), "cu_seqlens covers 9"),
    ],
)
def test_bad_arguments(mask, kwargs, message):
    """Inconsistent inputs raise a message saying what is wrong instead of producing skewed weights."""
    with pytest.raises(ValueError, match=message):
        position_weights(mask, CU_SEQLENS, **kwargs)
