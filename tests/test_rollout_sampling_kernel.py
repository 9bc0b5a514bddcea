"""The fused Triton sampler (opdgraph.kernels.sampling) against the torch sampler, under TRITON_INTERPRET=1 on CPU.

The torch sampler is the reference (itself checked against float64 distributions in test_rollout_sampler.py): the
kernel must pick the very same tokens for the same counters (same hashes, same uniforms) and return the raw
log-softmax of the chosen token within 1e-5. Tiny vocabularies and small blocks so that rows span several blocks
and several splits, and the vocabulary is not a multiple of the block.
"""

from __future__ import annotations

import importlib.util
import os

import pytest
import torch

from opdgraph.rollout.sampler import SamplingRows, sample_tokens

if not torch.cuda.is_available():
    # Triton reads this when a kernel is defined, so it must be set before the kernel module is first imported.
    os.environ.setdefault("TRITON_INTERPRET", "1")

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs triton")


def device():
    return "cuda" if torch.cuda.is_available() else "cpu"


def make_rows(logit_rows, greedy, temperatures, seed_offset=0):
    count = len(logit_rows)
    generator = torch.Generator().manual_seed(seed_offset)
    seeds = torch.randint(0, 2**62, (count,), generator=generator)
    seeds[0] = 2**63 - 1  # both 32-bit words of the seed in use
    return SamplingRows(
        logit_rows=torch.tensor(logit_rows), seeds=seeds,
        sample_indices=torch.randint(0, 2**31, (count,), generator=generator),
        positions=torch.randint(0, 5000, (count,), generator=generator),
        temperatures=torch.tensor(temperatures, dtype=torch.float32),
        top_k=torch.zeros(count, dtype=torch.int64), top_p=torch.ones(count), min_p=torch.zeros(count),
        greedy=torch.tensor(greedy), any_greedy=any(greedy), all_greedy=all(greedy),
        any_top_k=False, any_top_p=False, any_min_p=False)


def on(rows, target):
    return SamplingRows(**{name: value.to(target) if torch.is_tensor(value) else value
                           for name, value in vars(rows).items()})


def run_kernel(logits, rows, **options):
    from opdgraph.kernels.sampling import sample_unfiltered

    tokens, logprobs = sample_unfiltered(logits.to(device()), on(rows, device()), **options)
    return tokens.cpu(), logprobs.cpu()


@pytest.mark.parametrize("mode", ["sampled", "greedy", "mixed"])
@pytest.mark.parametrize("vocab_size, block_v, num_programs", [(1000, 128, 40), (1000, 128, 1), (77, 32, 9),
                                                               (300, 512, 8)])
def test_kernel_picks_the_torch_samplers_tokens(mode, vocab_size, block_v, num_programs):
    """A hash, uniform, temperature, split-merge or log-sum-exp difference would change tokens or log-probs."""
    generator = torch.Generator().manual_seed(vocab_size + num_programs)
    logits = torch.randn(4, vocab_size, generator=generator) * 4
    logit_rows = [0, 1, 2, 3, 3, 1, 0, 2]  # rows read twice (n samples of one prompt)
    greedy = {"sampled": [False] * 8, "greedy": [True] * 8, "mixed": [False, True] * 4}[mode]
    temperatures = [1.0, 0.7, 1.3, 2.5, 1.0, 0.31, 1.0, 4.0]
    rows = make_rows(logit_rows, greedy, temperatures)
    expected_tokens, expected_logprobs = sample_tokens(logits, rows)
    tokens, logprobs = run_kernel(logits, rows, block_v=block_v, num_programs=num_programs)
    assert tokens.tolist() == expected_tokens.tolist()
    torch.testing.assert_close(logprobs, expected_logprobs, atol=1e-5, rtol=0)


def test_kernel_draws_match_over_many_counters():
    """Over 64 draws from one row (different seeds and positions), any bias in the race would show as a mismatch."""
    logits = torch.randn(1, 500, generator=torch.Generator().manual_seed(3)) * 2
    rows = make_rows([0] * 64, [False] * 64, [1.0] * 64, seed_offset=11)
    expected_tokens, expected_logprobs = sample_tokens(logits, rows)
    tokens, logprobs = run_kernel(logits, rows, block_v=128, num_programs=16)
    assert tokens.tolist() == expected_tokens.tolist()
    assert len(set(tokens.tolist())) > 10  # really sampling, not collapsing onto the argmax
    torch.testing.assert_close(logprobs, expected_logprobs, atol=1e-5, rtol=0)


def test_greedy_ties_take_the_lowest_token_across_blocks_and_splits():
    """Equal maxima in different blocks / splits must resolve to the lowest id, like the torch sampler."""
    logits = torch.zeros(1, 300)
    logits[0, [250, 70, 130]] = 5.0
    rows = make_rows([0, 0], [True, True], [1.0, 1.0])
    for num_programs in (1, 3, 5):
        tokens, logprobs = run_kernel(logits, rows, block_v=32, num_programs=num_programs)
        assert tokens.tolist() == [70, 70]
        expected = torch.log_softmax(logits[0].double(), -1)[70].item()
        assert abs(logprobs[0].item() - expected) < 1e-5


def test_bfloat16_logits_are_read_as_float32():
    """bf16 logits (read without a float32 copy) must sample like their float32 values."""
    logits = (torch.randn(2, 200, generator=torch.Generator().manual_seed(5)) * 3).to(torch.bfloat16)
    rows = make_rows([0, 1, 1], [False, True, False], [1.0, 1.0, 0.5])
    expected_tokens, expected_logprobs = sample_tokens(logits.float(), rows)
    tokens, logprobs = run_kernel(logits, rows, block_v=64, num_programs=4)
    assert tokens.tolist() == expected_tokens.tolist()
    torch.testing.assert_close(logprobs, expected_logprobs, atol=1e-5, rtol=0)
