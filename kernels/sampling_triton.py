"""Triton body of the fused no-filter sampler: counter-based exponential race + raw log-softmax in one pass.

Only `opdgraph.kernels.sampling` imports this module (lazily, so the package imports without triton).

``race_partials_kernel``: program (k, s) streams split s of sample row k's logits once, in blocks, and keeps
  - the online log-sum-exp of the raw logits (running max + rescaled sum, fp32), for the raw log-prob;
  - the best race score and its vocab index: score_v = z_v / temperature - log E_v with E_v = -log1p(-u_v), u_v the
    counter-based uniform of ``opdgraph.rollout.counter_random`` (same 32-bit hashes, bit for bit, and the same
    float32 operations up to the uniform); greedy rows score the raw logit. Ties keep the lowest index.
``race_combine_kernel``: program k merges its row's split partials (first best split wins ties, so the lowest
  vocab index wins overall), reads the chosen token's raw logit and writes token and log-prob.

Legend: K = sample rows, V = vocabulary size, S = vocab splits per row, z = raw logits, u = uniform in (0, 1).
"""

import triton
import triton.language as tl

GOLDEN = tl.constexpr(0x9E3779B9)  # constants of counter_random (compiled Triton reads only constexpr globals)
HIGH_SALT = tl.constexpr(0x5BD1E995)
LOW_SALT = tl.constexpr(0x27D4EB2F)


@triton.jit
def _hash32(x):
    """counter_random.hash32 (triple32) on uint32: multiplications wrap modulo 2**32 natively here."""
    x = x ^ (x >> 17)
    x = x * 0xED5AD4BB
    x = x ^ (x >> 11)
    x = x * 0xAC4C1B51
    x = x ^ (x >> 15)
    x = x * 0x31848BAB
    x = x ^ (x >> 14)
    return x


@triton.jit
def _row_key(seeds_ptr, sample_indices_ptr, positions_ptr, k):
    """counter_random.row_keys for sample row k (seed split into its two 32-bit words)."""
    seed = tl.load(seeds_ptr + k)
    key = _hash32(seed.to(tl.uint32))
    key = _hash32(key ^ (seed >> 32).to(tl.uint32))
    key = _hash32(key ^ tl.load(sample_indices_ptr + k).to(tl.uint32))
    return _hash32(key ^ tl.load(positions_ptr + k).to(tl.uint32))


@triton.jit
def _log_exponential(key, vocab):
    """log E for E = -log1p(-u), u the 64-bit-resolution uniform of counter_random.exponentials.

    log1p is Goldberg's form log(w) * u / (w - 1) with w = 1 - u (w - 1 is exact): a few ulps from a true log1p,
    using only log (the interpreter has no libdevice)."""
    stream = _hash32(key ^ (vocab * GOLDEN))
    high = _hash32(stream ^ HIGH_SALT).to(tl.float32)
    low = _hash32(stream ^ LOW_SALT).to(tl.float32)
    uniform = (high + (low + 0.5) * 2.0**-32) * 2.0**-32
    uniform = tl.minimum(uniform, 1.0 - 2.0**-24)
    w = 1.0 - uniform
    safe_denominator = tl.where(w == 1.0, 1.0, w - 1.0)
    exponential = tl.where(w == 1.0, uniform, tl.log(w) * uniform / safe_denominator)
    return tl.log(exponential)


@triton.jit
def race_partials_kernel(
    logits_ptr, logits_row_stride, logit_rows_ptr,
    seeds_ptr, sample_indices_ptr, positions_ptr, temperatures_ptr, greedy_ptr,
    best_score_ptr, best_index_ptr, max_ptr, sum_ptr,
    V, split_size, num_splits,
    ALL_GREEDY: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    k = tl.program_id(0)
    split = tl.program_id(1)
    row = logits_ptr + tl.load(logit_rows_ptr + k).to(tl.int64) * logits_row_stride
    begin = split * split_size
    end = tl.minimum(begin + split_size, V)
    block = tl.arange(0, BLOCK_V)
    if ALL_GREEDY:
        sampled = False
        temperature = 1.0
        key = 0
    else:
        sampled = tl.load(greedy_ptr + k) == 0
        temperature = tl.load(temperatures_ptr + k)
        key = _row_key(seeds_ptr, sample_indices_ptr, positions_ptr, k)
    running_max = -float("inf")
    running_sum = 0.0
    best_score = -float("inf")
    best_index = begin
    for start in range(begin, end, BLOCK_V):
        offsets = start + block
        in_row = offsets < end
        z = tl.load(row + offsets, mask=in_row, other=-float("inf")).to(tl.float32)
        new_max = tl.maximum(running_max, tl.max(z, axis=0))
        running_sum = running_sum * tl.exp(running_max - new_max) + tl.sum(tl.exp(z - new_max), axis=0)
        running_max = new_max
        score = z
        if not ALL_GREEDY:
            if sampled:
                # Triton's default fp32 division is approximate; the reference's z / T is correctly rounded.
                score = tl.math.div_rn(z, temperature) - _log_exponential(key, offsets.to(tl.uint32))
                score = tl.where(in_row, score, -float("inf"))
        block_best = tl.max(score, axis=0)
        block_index = tl.argmax(score, axis=0, tie_break_left=True)
        better = block_best > best_score  # strict: an equal score later in the row keeps the earlier index
        best_index = tl.where(better, start + block_index, best_index)
        best_score = tl.where(better, block_best, best_score)
    out = k * num_splits + split
    tl.store(best_score_ptr + out, best_score)
    tl.store(best_index_ptr + out, best_index)
    tl.store(max_ptr + out, running_max)
    tl.store(sum_ptr + out, running_sum)


@triton.jit
def race_combine_kernel(
    logits_ptr, logits_row_stride, logit_rows_ptr,
    best_score_ptr, best_index_ptr, max_ptr, sum_ptr,
    tokens_ptr, logprobs_ptr,
    num_splits,
    BLOCK_S: tl.constexpr,
):
    k = tl.program_id(0)
    splits = tl.arange(0, BLOCK_S)
    valid = splits < num_splits
    base = k * num_splits
    scores = tl.load(best_score_ptr + base + splits, mask=valid, other=-float("inf"))
    winner = tl.argmax(scores, axis=0, tie_break_left=True)
    token = tl.load(best_index_ptr + base + winner)
    maxes = tl.load(max_ptr + base + splits, mask=valid, other=-float("inf"))
    sums = tl.load(sum_ptr + base + splits, mask=valid, other=0.0)
    row_max = tl.max(maxes, axis=0)
    log_normaliser = row_max + tl.log(tl.sum(sums * tl.exp(maxes - row_max), axis=0))
    row = logits_ptr + tl.load(logit_rows_ptr + k).to(tl.int64) * logits_row_stride
    raw_logit = tl.load(row + token).to(tl.float32)
    tl.store(tokens_ptr + k, token.to(tl.int64))
    tl.store(logprobs_ptr + k, raw_logit - log_normaliser)
