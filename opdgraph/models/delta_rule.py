"""The gated delta rule in plain torch: the recurrence of a gated-DeltaNet (Qwen3.5 linear-attention) layer.

Per value head, a state S (key dim x value dim) is carried along the sequence. At token t, with decay a_t = exp(g_t)
(g_t <= 0), write strength b_t in (0, 1), key k_t (L2-normalised), value v_t and query q_t (L2-normalised, times
1 / sqrt(key dim)):

    S' = a_t S_{t-1}                       (forget)
    u_t = b_t (v_t - S'^T k_t)             (delta rule: write only what S' does not already predict for k_t)
    S_t = S' + k_t u_t^T
    o_t = S_t^T q_t

``recurrent_step`` is this one token at a time (decode). ``chunked`` computes the same outputs a chunk of C tokens at
once. Within a chunk starting from state S_0, with cumulative log-decays G_i = g_1 + ... + g_i:

    u_i = b_i (v_i - e^{G_i} S_0^T k_i - sum_{j<i} e^{G_i - G_j} (k_i . k_j) u_j)

which is the unit lower-triangular system (I + A) U = b (V - e^G K S_0), A_ij = b_i e^{G_i - G_j} (k_i . k_j) for
j < i. One triangular solve per chunk for both right-hand sides gives U = U_v - W S_0 (U_v and W depend on the chunk
alone), then

    O   = (e^G Q) S_0 + (Q K^T * e^{G_i - G_j}, j <= i) U
    S_C = e^{G_C} S_0 + (K * e^{G_C - G})^T U

so only the scan over chunks is sequential. ``chunked`` runs one sequence, chunk after chunk (its last chunk may be
shorter, nothing is padded): the readable reference. ``chunked_packed`` runs a packed batch of N sequences at once:
every sequence is padded to whole chunks, the chunk-local terms (U_v, W, the decayed scores, e^G Q, K e^{G_C - G},
e^{G_C}) of all chunks of all sequences come from one batched pass, the scan is one loop over the chunk index c
through the sequences that have a chunk c (a few small batched matmuls per index), and the outputs of all chunks
come from one more batched pass. A padding token has q = k = v = 0, beta = 0 and g = 0: its row of A and of the
right-hand side is zero (beta = 0), so its u is 0; its column of A is zero (k = 0), so it changes no other u; it
adds nothing to the state (k = 0, u = 0) and no decay (g = 0 leaves G, hence e^{G_C}, at the last real token's).
So a padded chunk gives exactly the unpadded chunk's state and outputs, and the padded outputs are dropped. Many
short sequences are scanned in groups (scan_groups), so neither their states nor their padding outgrow the tokens.
Everything runs in the inputs' dtype (float32 in the models) on whatever device they are on; it is the reference a
GPU kernel (flash-linear-attention's chunked gated delta rule) is tested against, and the path CPU runs take.

Shapes: one sequence, L tokens, H value heads: q, k [L, H, Dk], v [L, H, Dv], g, beta [L, H], state [H, Dk, Dv];
packed: T tokens in all, [T, ...] likewise, bounds the N + 1 sequence boundaries (cu_seqlens), states [N, H, Dk, Dv].
"""

from __future__ import annotations

import functools
import math

import torch

CHUNK_TOKENS = 64  # as flash-linear-attention's chunked kernels; any size gives the same outputs up to rounding
L2_EPS = 1e-6  # inside the rsqrt of the q/k normalisation, as the reference implementation


def l2_normalize(x: torch.Tensor) -> torch.Tensor:
    return x * torch.rsqrt((x * x).sum(-1, keepdim=True) + L2_EPS)


def recurrent_step(q, k, v, g, beta, state):
    """One token for a batch of B sequences: q, k [B, H, Dk], v [B, H, Dv], g, beta [B, H], state [B, H, Dk, Dv]
    -> (out [B, H, Dv], new state)."""
    state = state * g.exp()[..., None, None]
    predicted = torch.einsum("bhkv,bhk->bhv", state, k)
    update = (v - predicted) * beta[..., None]
    state = state + k[..., :, None] * update[..., None, :]
    return torch.einsum("bhkv,bhk->bhv", state, q), state


def chunked(q, k, v, g, beta, state=None, chunk_tokens: int = CHUNK_TOKENS):
    """One sequence (module docstring) -> (out [L, H, Dv], final state [H, Dk, Dv]); state None means zeros. The
    reference of ``chunked_packed``: one chunk body after another."""
    length, heads, key_dim = k.shape
    if state is None:
        state = q.new_zeros(heads, key_dim, v.shape[-1])
    outputs = []
    for start in range(0, length, chunk_tokens):
        stop = min(start + chunk_tokens, length)
        terms = chunk_terms(*(x[start:stop].transpose(0, 1) for x in (q, k, v, g, beta)))
        updates, next_state = through_state(terms, state)
        outputs.append(chunk_outputs(terms, state, updates).transpose(0, 1))
        state = next_state
    return torch.cat(outputs), state


def chunk_terms(q, k, v, g, beta):
    """What a chunk computes without its state, for any leading dims: q, k [..., C, Dk], v [..., C, Dv], g, beta
    [..., C] -> (U_v, W, scores, e^G Q, K e^{G_C - G}, e^{G_C}) of the module docstring."""
    size = q.shape[-2]
    cumulative = g.cumsum(-1)  # G_i
    gaps = cumulative[..., :, None] - cumulative[..., None, :]  # G_i - G_j
    causal = torch.ones(size, size, dtype=torch.bool, device=q.device).tril()
    # Decays e^{G_i - G_j} where j <= i; the masked entries (j > i) would overflow, so they become e^{-inf} = 0.
    decay = torch.where(causal, gaps, float("-inf")).exp()
    del gaps
    strictly_lower = ((k @ k.transpose(-1, -2)) * decay * beta[..., None]).tril(-1)  # A (the solve reads no diagonal)
    right = torch.cat((v * beta[..., None], k * (beta * cumulative.exp())[..., None]), dim=-1)
    solved = torch.linalg.solve_triangular(strictly_lower, right, upper=False, unitriangular=True)
    del strictly_lower, right
    own, through = solved.split((v.shape[-1], k.shape[-1]), dim=-1)  # U_v, W
    scores = (q @ k.transpose(-1, -2)) * decay
    to_end = (cumulative[..., -1:] - cumulative).exp()  # e^{G_C - G_j}
    return (own, through, scores, q * cumulative.exp()[..., None], k * to_end[..., None],
            cumulative[..., -1].exp())


def through_state(terms, state):
    """The sequential part of a chunk: its updates U = U_v - W S_0 and the state at its end."""
    own, through, _, _, k_to_end, end_decay = terms
    updates = own - through @ state
    return updates, state * end_decay[..., None, None] + k_to_end.transpose(-1, -2) @ updates


def chunk_outputs(terms, state, updates):
    """O = (e^G Q) S_0 + scores U of chunks whose entering states and updates are known."""
    return terms[3] @ state + terms[2] @ updates


class IndexCache:
    """Index tensors built from one packed batch's bounds (chunk layouts, conv rows), shared by the layers of one
    forward and its recomputation in backward. Owned by a backend (so by its model: no module-level cache holds
    device memory), it keeps the latest batch's entries only (those of the pieces its backward recomputes, `piece`,
    among them): `start(bounds)` drops them when another batch comes.
    They stay allocated until then: T x H int64 and a few T-long rows (4 MiB at 16k tokens and 32 heads; the pieces
    a backward recomputes, `piece`, as much again), which the plan does not list."""

    def __init__(self):
        self._bounds: tuple[int, ...] | None = None
        self._entries: dict = {}

    def start(self, bounds: tuple[int, ...]) -> "IndexCache":
        if bounds != self._bounds:
            self._bounds, self._entries = bounds, {}
        return self

    def piece(self, bounds: tuple[int, ...]) -> "IndexCache":
        """The cache of a piece of this batch (linear_attention_backend.PiecewiseRecompute): kept, like the other
        entries, until another batch comes."""
        return self.get(("piece", bounds), lambda: IndexCache().start(bounds))

    def get(self, key: tuple, build):
        if key not in self._entries:
            # Built as normal tensors even inside a rollout's inference_mode: a training forward over the same
            # bounds reuses them, and autograd cannot save inference tensors.
            with torch.inference_mode(False):
                self._entries[key] = build()
        return self._entries[key]


def cached(cache: IndexCache | None, key: tuple, build):
    """build() kept in `cache` under `key`; built afresh without a cache."""
    return build() if cache is None else cache.get(key, build)


def chunked_packed(q, k, v, g, beta, bounds: list[int], states=None, chunk_tokens: int = CHUNK_TOKENS,
                   keep_states: bool = True, cache: IndexCache | None = None):
    """N packed sequences (module docstring) -> (out [T, H, Dv], final states [N, H, Dk, Dv]); states None means
    zeros. No state crosses a boundary: each sequence's chunks scan from its own initial state. Consecutive
    sequences run together in groups (scan_groups), so at most max(16, chunks) states are scanned at once.
    keep_states False (training, teacher scoring): no final states (None), and none built past a sequence's end.
    cache: where the chunk layouts of these bounds are kept between calls (None: built each call)."""
    groups = scan_groups(tuple(bounds), chunk_tokens)
    if len(groups) == 1:
        return _chunked_group(q, k, v, g, beta, bounds, states, chunk_tokens, keep_states, cache)
    outputs, finals = [], []
    for first, last in groups:  # sequences first ... last - 1
        span = slice(bounds[first] - bounds[0], bounds[last] - bounds[0])
        out, final = _chunked_group(*(x[span] for x in (q, k, v, g, beta)), bounds[first:last + 1],
                                    None if states is None else states[first:last], chunk_tokens, keep_states, cache)
        outputs.append(out)
        finals.append(final)
    return torch.cat(outputs), torch.cat(finals) if keep_states else None


GROUP_SEQUENCES = 16  # a scan group may always hold this many sequences, short or not


@functools.lru_cache(maxsize=16)
def scan_groups(bounds: tuple[int, ...], chunk_tokens: int) -> list[tuple[int, int]]:
    """Consecutive sequences [first, last) scanned together: a group takes the next sequence while it keeps at most
    max(16, ceil(group tokens / C)) sequences. Every scanned sequence holds a state (H x Dk x Dv) and pads its last
    chunk, so this bounds both by the tokens: at most max(16, ceil(T / C)) states at once and fewer than
    T + 16 C padding tokens per group. Sequences of C tokens or more on average (and any 16) are one group."""
    groups, first, tokens = [], 0, 0
    for sequence in range(len(bounds) - 1):
        length = bounds[sequence + 1] - bounds[sequence]
        count = sequence - first + 1
        if count > max(GROUP_SEQUENCES, math.ceil((tokens + length) / chunk_tokens)):
            groups.append((first, sequence))
            first, tokens = sequence, 0
        tokens += length
    groups.append((first, len(bounds) - 1))
    return groups


def _chunked_group(q, k, v, g, beta, bounds: list[int], states, chunk_tokens: int, keep_states: bool,
                   cache: IndexCache | None):
    """chunked_packed of one scan group: every chunk at once, then the scan over the chunk index."""
    length, heads, key_dim = k.shape
    value_dim = v.shape[-1]
    layout = cached(cache, ("chunk_layout", tuple(bounds), chunk_tokens, heads, q.device),
                    lambda: ChunkLayout(list(bounds), chunk_tokens, heads, q.device))
    size = layout.chunk_tokens
    if states is None and keep_states:
        states = q.new_zeros(len(bounds) - 1, heads, key_dim, value_dim)
    if layout.chunks == 0:
        return q.new_zeros(0, heads, value_dim), states

    def padded(x):  # [T, H, ...] -> [M, H, C, ...], zeros where no token is; contiguous, so matmuls copy nothing
        rows = x.new_zeros(layout.chunks * heads * size, *x.shape[2:])
        rows.index_copy_(0, layout.destination, x.flatten(0, 1))  # in place: autograd records it, no clone
        return rows.view(layout.chunks, heads, size, *x.shape[2:])

    terms = chunk_terms(*(padded(x) for x in (q, k, v, g, beta)))
    # Sequences by falling chunk count: those with a chunk c lead. None: zeros (U = U_v, no state term).
    state = None if states is None else states.index_select(0, layout.order)
    outputs, finished = [], []
    # One split per term, not a slice per step: a split's backward is one cat, a slice's a zero-filled whole term.
    by_step = zip(*(term.split(layout.counts) for term in terms))
    for count, following, (own, through, scores, q_decayed, k_to_end, end_decay) in zip(
            layout.counts, [*layout.counts[1:], 0], by_step):
        if state is not None and count < state.shape[0]:  # the tail's sequences have no chunk c: states final
            finished.append(state[count:])
            state = state[:count]
        # The outputs here, not after the scan: a no-grad forward never holds every chunk's entering state.
        if state is None:
            update = own
            outputs.append(scores @ update)
        else:
            update = own - through @ state
            outputs.append(q_decayed @ state + scores @ update)
        carried = count if keep_states else following  # the states a later chunk (or the caller) reads
        if carried:
            written = k_to_end[:carried].transpose(-1, -2) @ update[:carried]
            state = written if state is None else state[:carried] * end_decay[:carried, :, None, None] + written
        else:
            state = None
    del terms, by_step, own, through, scores, q_decayed, k_to_end, end_decay, update
    final = None
    if keep_states:
        finished.append(state)
        final = torch.cat(finished[::-1]).index_select(0, layout.rank)
    out = torch.cat(outputs)  # [M, H, C, Dv]
    del outputs
    return out.view(-1, value_dim).index_select(0, layout.destination).view(length, heads, value_dim), final


class ChunkLayout:
    """Where each (token, head) of a packed batch sits among the padded chunks [M, H, C] (host-side numbers, one
    index copy to the device).

    Sequences are ranked by falling chunk count (stable), and chunks are stored chunk index first: chunk c of every
    sequence that has one, in rank order, then chunk c + 1's (counts[c] of them, a split per chunk index). So the
    sequences with a chunk c are always the first counts[c] of the ranking and the scan slices instead of gathering.
    """

    def __init__(self, bounds: list[int], chunk_tokens: int, heads: int, device):
        lengths = [end - start for start, end in zip(bounds[:-1], bounds[1:])]
        self.chunk_tokens = chunk_tokens
        chunk_counts = [math.ceil(length / self.chunk_tokens) for length in lengths]
        order = sorted(range(len(lengths)), key=lambda sequence: -chunk_counts[sequence])
        rank = [0] * len(lengths)
        for position, sequence in enumerate(order):
            rank[sequence] = position
        self.counts = [sum(count > c for count in chunk_counts) for c in range(max(chunk_counts, default=0))]
        self.chunks = sum(self.counts)
        sequence = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths, dtype=torch.long))
        local = torch.arange(bounds[-1] - bounds[0]) - (torch.tensor(bounds[:-1]) - bounds[0])[sequence]
        offsets = torch.tensor([sum(self.counts[:c]) for c in range(len(self.counts))] + [0], dtype=torch.long)
        row = offsets[local // self.chunk_tokens] + torch.tensor(rank, dtype=torch.long)[sequence]
        head = torch.arange(heads)
        self.destination = (((row[:, None] * heads + head) * self.chunk_tokens
                             + (local % self.chunk_tokens)[:, None]).flatten().to(device))  # [T x H] rows
        self.order = torch.tensor(order, dtype=torch.long).to(device)
        self.rank = torch.tensor(rank, dtype=torch.long).to(device)
