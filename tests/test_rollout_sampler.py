"""Sampler tests: the drawn tokens follow the documented distribution (chi-square against a float64 reference).

Each test draws N tokens from one fixed logits row, one draw per seed (the counters make the draws independent), and
compares the counts with the expected distribution computed by ``reference_distribution``, a plain float64
transcription of the sampler docstring. The seeds are fixed, so a passing test stays passing (no flakes).
"""

from __future__ import annotations

import pytest
import torch
from rollout_toy_model import single_row

from opdgraph.rollout.counter_random import exponentials, hash32, row_keys
from opdgraph.rollout.request import SamplingParams
from opdgraph.rollout.sampler import SamplingRows, sample_tokens

NUM_DRAWS = 40_000
LOGITS = torch.tensor([2.0, 1.5, 1.4, 0.3, 0.0, -0.5, -1.0, -3.0, 0.9, -8.0, 1.1])


def reference_distribution(logits, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0):
    """float64 probabilities of the documented filter chain (ties at the top-k / top-p boundary are kept)."""
    z = logits.double() / temperature
    keep = torch.ones_like(z, dtype=torch.bool)
    if top_k > 0:
        kth = sorted(z.tolist(), reverse=True)[min(top_k, len(z)) - 1]
        keep &= z >= kth
    if top_p < 1.0:
        probs = torch.softmax(z.masked_fill(~keep, float("-inf")), -1).tolist()
        cumulative, last_kept = 0.0, None
        for p in sorted(probs, reverse=True):
            if cumulative >= top_p:
                break
            cumulative, last_kept = cumulative + p, p
        keep &= torch.tensor(probs, dtype=torch.float64) >= last_kept
    if min_p > 0.0:
        probs = torch.softmax(z.masked_fill(~keep, float("-inf")), -1)
        keep &= probs >= min_p * probs.max()
    return torch.softmax(z.masked_fill(~keep, float("-inf")), -1)


def draw(logits, params, num_draws=NUM_DRAWS, position=0):
    rows = single_row(params, 0, 0, position)
    rows.logit_rows = torch.zeros(num_draws, dtype=torch.int64)
    rows.seeds = torch.arange(num_draws, dtype=torch.int64) * 7919 + 12345
    for name in ("sample_indices", "positions", "temperatures", "top_k", "top_p", "min_p", "greedy"):
        setattr(rows, name, getattr(rows, name).expand(num_draws).clone())
    return sample_tokens(logits[None, :], rows)


def chi_square_p_value(counts, expected_probs, num_draws):
    """Upper-tail p-value of Pearson's statistic over the support, via the regularized incomplete gamma."""
    support = expected_probs > 0
    expected = expected_probs[support] * num_draws
    statistic = ((counts[support].double() - expected) ** 2 / expected).sum()
    degrees = int(support.sum()) - 1
    if degrees == 0:
        return 1.0
    return torch.special.gammaincc(torch.tensor(degrees / 2, dtype=torch.float64), statistic / 2).item()


@pytest.mark.parametrize(
    "settings",
    [
        dict(),
        dict(temperature=0.5),
        dict(temperature=2.5),
        dict(top_k=3),
        dict(top_k=4, temperature=1.7),
        dict(top_p=0.7),
        dict(top_p=0.95, temperature=0.8),
        dict(min_p=0.2),
        dict(top_k=6, top_p=0.8, min_p=0.3, temperature=1.3),
    ],
    ids=repr,
)
def test_sampled_tokens_follow_the_documented_distribution(settings):
    """Temperature or a filter applied wrongly (or in the wrong order, or a biased race) would fail chi-square."""
    params = SamplingParams(max_new_tokens=1, **settings)
    tokens, _ = draw(LOGITS, params)
    counts = torch.bincount(tokens, minlength=len(LOGITS))
    expected = reference_distribution(LOGITS, **settings)
    assert counts[expected == 0].sum() == 0, "a token outside the filtered support was sampled"
    assert chi_square_p_value(counts, expected, NUM_DRAWS) > 1e-3


@pytest.mark.parametrize(
    "settings", [dict(top_p=1e-6), dict(top_k=1), dict(min_p=0.999), dict(greedy=True), dict(temperature=1e-3)]
)
def test_degenerate_settings_give_the_argmax(settings):
    """top_p tiny, top_k=1, min_p near 1, greedy and a tiny temperature must all reduce to the argmax."""
    tokens, _ = draw(LOGITS, SamplingParams(max_new_tokens=1, **settings), num_draws=2000)
    assert torch.all(tokens == LOGITS.argmax())


def test_ties_at_the_boundary_are_all_kept():
    """Ties at the top-k / top-p boundary must be kept and sampled evenly; greedy takes the lowest tied id."""
    tied = torch.tensor([1.0, 3.0, -2.0, 3.0, 0.5, 3.0 - 1e-3])
    for settings in (dict(top_k=1), dict(top_k=2), dict(top_p=0.2)):
        tokens, _ = draw(tied, SamplingParams(max_new_tokens=1, **settings))
        counts = torch.bincount(tokens, minlength=len(tied))
        expected = reference_distribution(tied, **settings)
        assert counts[expected == 0].sum() == 0
        assert chi_square_p_value(counts, expected, NUM_DRAWS) > 1e-3
    assert reference_distribution(tied, top_k=1)[[1, 3]].tolist() == [0.5, 0.5]
    greedy_tokens, _ = draw(tied, SamplingParams(max_new_tokens=1, greedy=True), num_draws=10)
    assert torch.all(greedy_tokens == 1)


def test_logprobs_are_raw_whatever_the_filters():
    """The returned log-prob must be log_softmax of the unmodified logits, not of the filtered distribution."""
    params = SamplingParams(max_new_tokens=1, temperature=0.3, top_k=2, top_p=0.9, min_p=0.1)
    tokens, logprobs = draw(LOGITS, params, num_draws=500)
    expected = torch.log_softmax(LOGITS.double(), -1)[tokens]
    torch.testing.assert_close(logprobs.double(), expected, atol=1e-6, rtol=0)


def test_mixed_rows_use_their_own_settings_and_do_not_depend_on_the_batch():
    """A row's token must depend only on its logits, settings and counters, not on its neighbours or order."""
    logits = torch.randn(5, 40, generator=torch.Generator().manual_seed(1)) * 2
    settings = [dict(greedy=True), dict(top_k=3), dict(top_p=0.5, temperature=0.7), dict(min_p=0.1), dict()]
    singles = [
        sample_tokens(logits[i : i + 1], single_row(SamplingParams(max_new_tokens=1, **s), 9, i, 4))
        for i, s in enumerate(settings)
    ]
    order = [3, 0, 4, 1, 2]
    params = [SamplingParams(max_new_tokens=1, **settings[i]) for i in order]
    rows = [single_row(p, 9, i, 4) for p, i in zip(params, order)]
    batched = SamplingRows(
        logit_rows=torch.tensor(order),
        **{name: torch.cat([getattr(r, name) for r in rows]) for name in
           ("seeds", "sample_indices", "positions", "temperatures", "top_k", "top_p", "min_p", "greedy")},
        any_greedy=True, all_greedy=False, any_top_k=True, any_top_p=True, any_min_p=True,
    )
    tokens, logprobs = sample_tokens(logits, batched)
    for slot, i in enumerate(order):
        assert tokens[slot] == singles[i][0][0]
        torch.testing.assert_close(logprobs[slot], singles[i][1][0])


def test_counter_random_is_a_pure_function_of_its_counters():
    """Randomness must be reproducible per (seed, sample, position) and differ when any counter changes."""
    seeds = torch.tensor([0, 0, 0, 1, 2**62 + 5, 2**62 + 5])
    samples = torch.tensor([0, 1, 0, 0, 3, 3])
    positions = torch.tensor([0, 0, 1, 0, 7, 7])
    keys = row_keys(seeds, samples, positions)
    assert len(set(keys[:5].tolist())) == 5 and keys[4] == keys[5]
    draws = exponentials(keys, 10_007)
    torch.testing.assert_close(draws, exponentials(keys.flip(0), 10_007).flip(0))
    assert torch.all(draws > 0) and torch.all(torch.isfinite(draws))
    # Exp(1): mean 1 and P(E < 0.1) = 1 - exp(-0.1), over 6 x 10007 draws.
    assert abs(draws.mean().item() - 1.0) < 0.03
    assert abs((draws < 0.1).double().mean().item() - (1 - torch.exp(torch.tensor(-0.1)).item())) < 0.01


def test_hash32_is_a_bijection_on_a_sample_and_stays_32_bit():
    """The integer hash must stay in [0, 2**32) without int64 overflow and not collide on distinct inputs."""
    values = torch.cat([torch.arange(200_000), torch.tensor([2**32 - 1, 2**31, 2**31 - 1])])
    hashed = hash32(values)
    assert hashed.min() >= 0 and hashed.max() < 2**32
    assert hashed.unique().numel() == values.numel()
