"""Sampler: logits of the rows that choose a token -> token ids and raw log-probs (tensors in, tensors out).

Per row, in this order (each row may carry different settings):

1. greedy: the argmax of the raw logits (lowest token id among exact ties); nothing else applies.
2. otherwise divide the logits by the temperature, then
3. top-k (k > 0): keep the tokens whose logit is >= the k-th largest one. Tokens tied with the k-th value are ALL
   kept, so the result never depends on vocabulary order (top_k=1 with two equal maxima keeps both).
4. top-p (< 1): over the distribution renormalised on the kept tokens, keep the smallest set of most probable tokens
   whose cumulative probability is >= top_p (always at least the most probable one); again every token tied with
   the last one kept is kept too.
5. min-p (> 0): drop kept tokens whose probability is < min_p * (probability of the most probable token).
6. renormalise over the kept tokens and sample exactly, with the exponential race
   argmax_v (logit_v / temperature - log E_v), E_v ~ Exp(1) from ``counter_random`` (equivalent to Gumbel-max).

The returned log-prob is always ``log_softmax(raw logits)[token]``: temperature 1, no filtering (the student's own
distribution, which distillation needs), whatever settings chose the token.

On CUDA, batches where no row filters (steps 3-5 off) go to the fused Triton kernel ``opdgraph.kernels.sampling``
(one pass over the logits, same counters, same tokens up to float32 rounding of the logarithms); this torch code is
the CPU path, the filtered path and the reference the kernel is tested against.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from opdgraph.rollout.counter_random import exponentials, row_keys

RACE_BLOCK_ELEMENTS = 2**24  # int64 hash temporaries of 128 MiB each at most (about 110 rows of a 152k vocab)


@dataclass
class SamplingRows:
    """K sample rows. Several rows may read the same logits row (the n samples of a just-prefilled prompt)."""

    logit_rows: torch.Tensor  # int64 [K], row of the logits each sample reads
    seeds: torch.Tensor  # int64 [K]
    sample_indices: torch.Tensor  # int64 [K]
    positions: torch.Tensor  # int64 [K], index of the token being sampled within its response
    temperatures: torch.Tensor  # float32 [K] (1 for greedy rows)
    top_k: torch.Tensor  # int64 [K], 0 = off
    top_p: torch.Tensor  # float32 [K], 1 = off
    min_p: torch.Tensor  # float32 [K], 0 = off
    greedy: torch.Tensor  # bool [K]
    # Host-side facts, known when the batch is built, that let whole phases be skipped without a device sync.
    any_greedy: bool
    all_greedy: bool
    any_top_k: bool
    any_top_p: bool
    any_min_p: bool


def sample_tokens(logits: torch.Tensor, rows: SamplingRows) -> tuple[torch.Tensor, torch.Tensor]:
    """float32 logits [R, V] -> (token ids int64 [K], raw log-probs float32 [K])."""
    if logits.is_cuda and not (rows.any_top_k or rows.any_top_p or rows.any_min_p):
        from opdgraph.kernels.sampling import sample_unfiltered

        return sample_unfiltered(logits, rows)
    logits = logits.float().index_select(0, rows.logit_rows)
    raw_logprobs = torch.log_softmax(logits, dim=-1)
    if rows.all_greedy:
        tokens = logits.argmax(dim=-1)
    else:
        scaled = logits / rows.temperatures[:, None]
        keep = filter_mask(scaled, rows)
        scores = torch.where(keep, scaled - _log_race(rows, logits.shape[-1]), float("-inf"))
        tokens = scores.argmax(dim=-1)
        if rows.any_greedy:
            tokens = torch.where(rows.greedy, logits.argmax(dim=-1), tokens)
    return tokens, raw_logprobs.gather(1, tokens[:, None]).squeeze(1)


def filter_mask(scaled: torch.Tensor, rows: SamplingRows) -> torch.Tensor:
    """bool [K, V]: the tokens that survive top-k, then top-p, then min-p (steps 3-5 of the module docstring)."""
    keep = torch.ones_like(scaled, dtype=torch.bool)
    if not (rows.any_top_k or rows.any_top_p):
        sorted_scaled = order = None
    else:
        sorted_scaled, order = scaled.sort(dim=-1, descending=True, stable=True)
    if rows.any_top_k:
        vocab_size = scaled.shape[-1]
        kth_index = (rows.top_k.clamp(min=1, max=vocab_size) - 1)[:, None]
        kth_value = sorted_scaled.gather(1, kth_index)
        keep &= (scaled >= kth_value) | (rows.top_k == 0)[:, None]
    if rows.any_top_p:
        probs = _masked_softmax(scaled, keep)
        sorted_probs = probs.gather(1, order)  # still descending: softmax preserves the order of the logits
        mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs
        num_kept = (mass_before < rows.top_p[:, None]).sum(dim=-1, keepdim=True).clamp(min=1)
        threshold = sorted_probs.gather(1, num_kept - 1)
        # top_p == 1 is "off": float32 cumulative sums may exceed 1 early and would drop the tail otherwise.
        keep &= (probs >= threshold) | (rows.top_p >= 1.0)[:, None]
    if rows.any_min_p:
        probs = _masked_softmax(scaled, keep)
        floor = rows.min_p[:, None] * probs.max(dim=-1, keepdim=True).values
        keep &= probs >= floor
    return keep


def _log_race(rows: SamplingRows, vocab_size: int) -> torch.Tensor:
    """float32 [K, V] log of the Exp(1) race variates, built in row blocks to bound the int64 hash temporaries."""
    keys = row_keys(rows.seeds, rows.sample_indices, rows.positions)
    rows_per_block = max(1, RACE_BLOCK_ELEMENTS // vocab_size)
    log_race = torch.empty(keys.shape[0], vocab_size, dtype=torch.float32, device=keys.device)
    for start in range(0, keys.shape[0], rows_per_block):
        block = keys[start : start + rows_per_block]
        log_race[start : start + rows_per_block] = torch.log(exponentials(block, vocab_size))
    return log_race


def _masked_softmax(scaled: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    return torch.softmax(torch.where(keep, scaled, float("-inf")), dim=-1)
