"""Counter-based randomness in plain torch integer ops: the same numbers on any device, batch or schedule.

Each sampled token draws one exponential variate per vocabulary entry from a pure function of
(seed, sample_index, token position, vocab index): no generator state, so a sample's tokens do not depend on which
other sequences share its forward, on preemption, or on the device, and nothing needs a host sync (the counters can
live on the device, e.g. inside a CUDA graph).

The hash is Chris Wellons' "triple32" 32-bit integer permutation (public-domain constants), applied to values held
in int64 tensors. Products are reduced modulo 2**32 in 16-bit halves so no intermediate exceeds 2**63 (torch has no
uint32 multiply on every device, and signed overflow is not something to lean on).
"""

from __future__ import annotations

import torch

MASK32 = 0xFFFFFFFF
_GOLDEN = 0x9E3779B9  # odd constant that separates the counter streams


def _mul32(values: torch.Tensor, constant: int) -> torch.Tensor:
    """(values * constant) mod 2**32 for values in [0, 2**32), without exceeding int64."""
    low = values * (constant & 0xFFFF)
    high = ((values * (constant >> 16)) & 0xFFFF) << 16
    return (low + high) & MASK32


def hash32(values: torch.Tensor) -> torch.Tensor:
    """A bijection of [0, 2**32) with full avalanche (triple32)."""
    x = values & MASK32
    x = x ^ (x >> 17)
    x = _mul32(x, 0xED5AD4BB)
    x = x ^ (x >> 11)
    x = _mul32(x, 0xAC4C1B51)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x31848BAB)
    x = x ^ (x >> 14)
    return x


def row_keys(seeds: torch.Tensor, sample_indices: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """One 32-bit key per sampled token from int64 [K] counters (seed < 2**63, index and position < 2**32)."""
    key = hash32(seeds & MASK32)
    key = hash32(key ^ (seeds >> 32))
    key = hash32(key ^ sample_indices)
    return hash32(key ^ positions)


def exponentials(keys: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """float32 [K, V] of independent Exp(1) variates, one per (row key, vocab index).

    Two 32-bit hashes make a 64-bit uniform t in (0, 1); E = -log1p(-t) keeps the small-E tail (which decides
    whether a very unlikely token can ever win the race) resolved down to about 2**-64 instead of float32's 2**-24.
    """
    vocab = torch.arange(vocab_size, device=keys.device, dtype=torch.int64)
    stream = hash32(keys[:, None] ^ _mul32(vocab, _GOLDEN)[None, :])
    high = hash32(stream ^ 0x5BD1E995).to(torch.float32)
    low = hash32(stream ^ 0x27D4EB2F).to(torch.float32)
    uniform = (high + (low + 0.5) * 2.0**-32) * 2.0**-32
    # float32 rounds values within 2**-25 of 1 to exactly 1; clamp below 1 so E stays finite (bias ~1e-8).
    uniform = uniform.clamp(max=1.0 - 2.0**-24)
    return -torch.log1p(-uniform)
