"""Triton bodies of the paged decode attention (see paged_decode_attention.py for the contract and the numerics).

Legend: S = sequences, Hq / Hkv = query / kv heads, D = head_dim, GROUP = Hq / Hkv, HPP = kv heads per program.
A program holds its HPP kv heads side by side as one [tokens, HPP * D] tile (adjacent in the cache, so with HPP =
Hkv a token's keys are one contiguous row) and its GROUP * HPP query heads block-diagonally: query head h keeps its
D values in the columns of its own kv head and zeros elsewhere, so one dot gives every head its scores against its
own kv head only (the zeros add nothing), and the output of head h is read from its own columns.
"""

import triton
import triton.language as tl


@triton.jit
def split_kernel(
    Q, K, V, PageTable, KvLens, PartialOut, PartialLse, Out, Arrivals,
    stride_q_seq, stride_q_head, stride_k_page, stride_k_token, stride_k_head, stride_table,
    stride_po_seq, stride_po_head, stride_po_split, stride_lse_seq, stride_out_seq, stride_out_head,
    scale, window, num_splits, num_head_blocks,
    PAGE_SIZE: tl.constexpr, GROUP: tl.constexpr, HPP: tl.constexpr, BLOCK_H: tl.constexpr,
    HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, SINGLE_SPLIT: tl.constexpr, HEAD_MAJOR: tl.constexpr,
    MERGE_IN_KERNEL: tl.constexpr, BLOCK_S: tl.constexpr, IEEE: tl.constexpr,
):
    """One (sequence, block of HPP kv heads, split): online softmax over its share of the visible keys -> partial
    out + lse (with one split: the normalised output itself). HEAD_MAJOR puts the head block on grid axis 0, so
    the programs of one sequence's kv heads run next to each other. MERGE_IN_KERNEL: the split program that
    arrives last at its (sequence, head block) counter merges all splits and resets the counter to 0 (the
    counters must be 0 at launch), so no merge kernel is launched."""
    if HEAD_MAJOR:
        head_block = tl.program_id(0)
        seq = tl.program_id(1)
    else:
        seq = tl.program_id(0)
        head_block = tl.program_id(1)
    split = tl.program_id(2)
    kv_len = tl.load(KvLens + seq)
    low = 0
    if window > 0:  # sliding layers see the window - 1 keys before the query, and the query itself
        low = tl.maximum(kv_len - window, 0)
    per_split = tl.cdiv(kv_len - low, num_splits)
    start = low + split * per_split
    end = tl.minimum(start + per_split, kv_len)

    rows = tl.arange(0, BLOCK_H)
    heads = head_block * (GROUP * HPP) + rows
    head_mask = rows < GROUP * HPP
    columns = tl.arange(0, HPP * HEAD_DIM)
    dims = columns % HEAD_DIM
    own = head_mask[:, None] & ((rows // GROUP)[:, None] == (columns // HEAD_DIM)[None, :])
    kv_columns = (head_block * HPP + columns // HEAD_DIM) * stride_k_head + dims
    q = tl.load(Q + seq * stride_q_seq + heads[:, None] * stride_q_head + dims[None, :], mask=own, other=0.0)
    running_max = tl.full([BLOCK_H], float("-inf"), dtype=tl.float32)
    running_sum = tl.zeros([BLOCK_H], dtype=tl.float32)
    acc = tl.zeros([BLOCK_H, HPP * HEAD_DIM], dtype=tl.float32)
    table = PageTable + seq * stride_table
    for tile_start in range(start, end, BLOCK_N):
        tokens = tile_start + tl.arange(0, BLOCK_N)
        token_mask = tokens < end
        pages = tl.load(table + tokens // PAGE_SIZE, mask=token_mask, other=0).to(tl.int64)
        offsets = pages * stride_k_page + (tokens % PAGE_SIZE) * stride_k_token
        keys = tl.load(K + offsets[:, None] + kv_columns[None, :], mask=token_mask[:, None], other=0.0).to(q.dtype)
        if IEEE:
            scores = tl.dot(q, tl.trans(keys), input_precision="ieee")
        else:
            scores = tl.dot(q, tl.trans(keys))
        scores = tl.where(token_mask[None, :], scores * scale, float("-inf"))
        new_max = tl.maximum(running_max, tl.max(scores, 1))
        correction = tl.exp(running_max - new_max)
        probabilities = tl.exp(scores - new_max[:, None])
        running_sum = running_sum * correction + tl.sum(probabilities, 1)
        values = tl.load(V + offsets[:, None] + kv_columns[None, :], mask=token_mask[:, None],
                         other=0.0).to(q.dtype)
        if IEEE:
            acc = acc * correction[:, None] + tl.dot(probabilities.to(q.dtype), values, input_precision="ieee")
        else:
            acc = acc * correction[:, None] + tl.dot(probabilities.to(q.dtype), values)
        running_max = new_max
    nonempty = running_sum > 0  # a split past the end of a short context saw no keys: lse -inf, weight 0
    out = tl.where(nonempty[:, None], acc / tl.where(nonempty, running_sum, 1.0)[:, None], 0.0)
    if SINGLE_SPLIT:  # the whole context in one program: this is the final output, no merge kernel
        tl.store(Out + seq * stride_out_seq + heads[:, None] * stride_out_head + dims[None, :],
                 out.to(Out.dtype.element_ty), mask=own)
    else:
        lse = tl.where(nonempty, running_max + tl.log(tl.where(nonempty, running_sum, 1.0)), float("-inf"))
        base = seq * stride_po_seq + heads * stride_po_head + split * stride_po_split
        tl.store(PartialOut + base[:, None] + dims[None, :], out, mask=own)
        tl.store(PartialLse + seq * stride_lse_seq + heads * num_splits + split, lse, mask=head_mask)
        if MERGE_IN_KERNEL:
            # Every thread's partial stores precede the counter's release (the split-K "last block" pattern).
            tl.debug_barrier()
            counter = Arrivals + seq * num_head_blocks + head_block
            if tl.atomic_add(counter, 1, sem="acq_rel", scope="gpu") == num_splits - 1:
                tl.debug_barrier()
                _merge_splits(PartialOut, PartialLse, Out, seq, heads, head_mask, own, dims, num_splits,
                              stride_po_seq, stride_po_head, stride_po_split, stride_lse_seq, stride_out_seq,
                              stride_out_head, BLOCK_H, BLOCK_S, HPP * HEAD_DIM)
                tl.atomic_xchg(counter, 0, sem="relaxed", scope="gpu")


@triton.jit
def _merge_splits(PartialOut, PartialLse, Out, seq, heads, head_mask, own, dims, num_splits,
                  stride_po_seq, stride_po_head, stride_po_split, stride_lse_seq, stride_out_seq, stride_out_head,
                  BLOCK_H: tl.constexpr, BLOCK_S: tl.constexpr, COLUMNS: tl.constexpr):
    """merge_kernel's weighting for a program's heads, the splits summed in order; other programs' partials are
    read from L2 (.cg), never from a stale L1 line."""
    splits = tl.arange(0, BLOCK_S)
    present = head_mask[:, None] & (splits < num_splits)[None, :]
    lse = tl.load(PartialLse + seq * stride_lse_seq + heads[:, None] * num_splits + splits[None, :], mask=present,
                  other=float("-inf"), cache_modifier=".cg")
    top = tl.where(head_mask, tl.max(lse, 1), 0.0)
    weights = tl.where(present, tl.exp(lse - top[:, None]), 0.0)
    acc = tl.zeros([BLOCK_H, COLUMNS], dtype=tl.float32)
    for split in range(0, num_splits):
        weight = tl.sum(tl.where(splits[None, :] == split, weights, 0.0), 1)
        partial = tl.load(PartialOut + seq * stride_po_seq + heads[:, None] * stride_po_head
                          + split * stride_po_split + dims[None, :], mask=own, other=0.0, cache_modifier=".cg")
        acc += partial * weight[:, None]
    total = tl.where(head_mask, tl.sum(weights, 1), 1.0)
    tl.store(Out + seq * stride_out_seq + heads[:, None] * stride_out_head + dims[None, :],
             (acc / total[:, None]).to(Out.dtype.element_ty), mask=own)


@triton.jit
def merge_kernel(
    PartialOut, PartialLse, Out,
    stride_po_seq, stride_po_head, stride_po_split, stride_lse_seq, stride_out_seq, stride_out_head,
    NUM_SPLITS: tl.constexpr, BLOCK_S: tl.constexpr, HEAD_DIM: tl.constexpr,
):
    """One (sequence, query head): weight each split's output by exp(lse - max lse) and normalise."""
    seq = tl.program_id(0)
    head = tl.program_id(1)
    splits = tl.arange(0, BLOCK_S)
    split_mask = splits < NUM_SPLITS
    dims = tl.arange(0, HEAD_DIM)
    lse = tl.load(PartialLse + seq * stride_lse_seq + head * NUM_SPLITS + splits, mask=split_mask,
                  other=float("-inf"))
    weights = tl.exp(lse - tl.max(lse, 0))
    weights = tl.where(split_mask, weights, 0.0)
    partial = tl.load(PartialOut + seq * stride_po_seq + head * stride_po_head + splits[:, None] * stride_po_split
                      + dims[None, :], mask=split_mask[:, None], other=0.0)
    out = tl.sum(partial * weights[:, None], 0) / tl.sum(weights, 0)
    tl.store(Out + seq * stride_out_seq + head * stride_out_head + dims, out.to(Out.dtype.element_ty))
