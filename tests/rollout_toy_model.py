"""A tiny plain-torch decoder that meets the rollout engine's model protocol, plus naive generation references.

The model (embeddings, RoPE, grouped-query attention, an MLP, RMSNorm) has two forwards that share only the
projections: ``forward_paged`` writes K/V into the paged cache through ``slot_mapping`` and attends over the pages in
``page_table``, like a real attention backend; ``forward_full`` recomputes a whole sequence with an ordinary causal
mask and no cache. The naive loops below regenerate from scratch with ``forward_full`` at every step, which is what
the engine's output is compared with.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from opdgraph.rollout.sampler import SamplingRows, sample_tokens


@dataclass
class ToyConfig:
    vocab_size: int = 61
    hidden_size: int = 32
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int = 2
    head_dim: int = 8
    rope_theta: float = 10000.0


class ToyDecoderLM(nn.Module):
    def __init__(self, config: ToyConfig | None = None, seed: int = 0, dtype: torch.dtype = torch.float32):
        super().__init__()
        self.config = config = config or ToyConfig()
        generator = torch.Generator().manual_seed(seed)

        def weight(*shape, scale=1.0):
            return nn.Parameter(torch.randn(*shape, generator=generator, dtype=dtype) * scale / shape[-1] ** 0.5)

        hidden, heads, kv_heads, head_dim = config.hidden_size, config.num_heads, config.num_kv_heads, config.head_dim
        self.embed = nn.Parameter(torch.randn(config.vocab_size, hidden, generator=generator, dtype=dtype))
        self.layers = nn.ModuleList()
        for _ in range(config.num_layers):
            layer = nn.Module()
            layer.q = weight(heads * head_dim, hidden)
            layer.k = weight(kv_heads * head_dim, hidden)
            layer.v = weight(kv_heads * head_dim, hidden)
            layer.o = weight(hidden, heads * head_dim)
            layer.up = weight(4 * hidden, hidden)
            layer.down = weight(hidden, 4 * hidden)
            self.layers.append(layer)
        # A large head scale spreads the logits so greedy decisions are far from ties.
        self.head = weight(config.vocab_size, hidden, scale=4.0)

    # ------------------------------------------------------------------------------------------- protocol
    def forward_paged(self, input_ids, positions, meta, kv_cache):
        x = self.embed[input_ids]
        query_lens = meta.query_lens.tolist()
        kv_lens = meta.kv_lens.tolist()
        starts = meta.cu_query_lens.tolist()
        page_size = meta.page_size
        for layer, cache in zip(self.layers, kv_cache):
            q, k, v = self._project(layer, x, positions)
            keys_flat = cache[0].view(-1, *cache.shape[-2:])
            values_flat = cache[1].view(-1, *cache.shape[-2:])
            keys_flat[meta.slot_mapping] = k.to(cache.dtype)
            values_flat[meta.slot_mapping] = v.to(cache.dtype)
            outputs = []
            for s, (query_len, kv_len) in enumerate(zip(query_lens, kv_lens)):
                pages = meta.page_table[s, : -(-kv_len // page_size)].long()
                context_k = cache[0][pages].reshape(-1, *cache.shape[-2:])[:kv_len].to(x.dtype)
                context_v = cache[1][pages].reshape(-1, *cache.shape[-2:])[:kv_len].to(x.dtype)
                query = q[starts[s] : starts[s] + query_len]
                query_positions = torch.arange(kv_len - query_len, kv_len)
                mask = torch.arange(kv_len)[None, :] <= query_positions[:, None]
                outputs.append(self._attend(query, context_k, context_v, mask))
            x = self._finish_layer(layer, x, torch.cat(outputs))
        return _rms_norm(x)

    def logits(self, hidden):
        return (hidden @ self.head.T).float()

    def allocate_kv_cache(self, num_pages, page_size, dtype=None, device=None):
        config = self.config
        shape = (2, num_pages, page_size, config.num_kv_heads, config.head_dim)
        dtype = dtype or self.embed.dtype
        return [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.num_layers)]

    def kv_bytes_per_token(self, dtype=None):
        config = self.config
        element = torch.empty((), dtype=dtype or self.embed.dtype).element_size()
        return 2 * config.num_layers * config.num_kv_heads * config.head_dim * element

    # ----------------------------------------------------------------------------------------- reference
    def forward_full(self, input_ids):
        """float32 logits [L, V] of one whole sequence, no cache."""
        x = self.embed[input_ids]
        positions = torch.arange(len(input_ids))
        mask = positions[None, :] <= positions[:, None]
        for layer in self.layers:
            q, k, v = self._project(layer, x, positions)
            x = self._finish_layer(layer, x, self._attend(q, k, v, mask))
        return self.logits(_rms_norm(x))

    # ------------------------------------------------------------------------------------------- pieces
    def _project(self, layer, x, positions):
        config = self.config
        h = _rms_norm(x)
        q = (h @ layer.q.T).view(-1, config.num_heads, config.head_dim)
        k = (h @ layer.k.T).view(-1, config.num_kv_heads, config.head_dim)
        v = (h @ layer.v.T).view(-1, config.num_kv_heads, config.head_dim)
        return self._rope(q, positions), self._rope(k, positions), v

    def _rope(self, x, positions):
        half = self.config.head_dim // 2
        frequencies = self.config.rope_theta ** (-torch.arange(half, dtype=torch.float64) / half)
        angles = positions.double()[:, None] * frequencies[None, :]
        cos, sin = angles.cos().to(x.dtype)[:, None, :], angles.sin().to(x.dtype)[:, None, :]
        first, second = x[..., :half], x[..., half:]
        return torch.cat([first * cos - second * sin, first * sin + second * cos], dim=-1)

    def _attend(self, q, k, v, mask):
        group = self.config.num_heads // self.config.num_kv_heads
        k = k.repeat_interleave(group, dim=1)
        v = v.repeat_interleave(group, dim=1)
        scores = torch.einsum("qhd,khd->hqk", q, k) / self.config.head_dim**0.5
        scores = scores.masked_fill(~mask[None], float("-inf"))
        return torch.einsum("hqk,khd->qhd", scores.softmax(dim=-1), v).reshape(q.shape[0], -1)

    def _finish_layer(self, layer, x, attention):
        x = x + attention @ layer.o.T
        return x + torch.nn.functional.gelu(_rms_norm(x) @ layer.up.T) @ layer.down.T


def _rms_norm(x):
    return x * torch.rsqrt(x.pow(2).mean(dim=-1, keepdim=True) + 1e-6)


# --------------------------------------------------------------------------------------------- naive loops
@torch.inference_mode()
def naive_generate(model, prompt, params, seed=0, sample_index=0):
    """Regenerate with a full recompute at every step; returns (tokens, raw logprobs, finish_reason, logits list).

    Sampling uses the engine's sampler on the same counters (seed, sample_index, position), so any difference from
    the engine comes from the paged forward, the scheduling or the bookkeeping, not from randomness.
    """
    tokens, logprobs, all_logits = [], [], []
    while True:
        logits = model.forward_full(torch.tensor(prompt + tokens))[-1:]
        all_logits.append(logits[0])
        token, logprob = sample_tokens(logits, single_row(params, seed, sample_index, len(tokens)))
        tokens.append(int(token))
        logprobs.append(float(logprob))
        if tokens[-1] in params.eos_token_ids:
            return tokens, logprobs, "eos", all_logits
        if tokens[-1] in params.stop_token_ids:
            return tokens, logprobs, "stop", all_logits
        if len(tokens) >= params.max_new_tokens:
            return tokens, logprobs, "length", all_logits


def single_row(params, seed, sample_index, position):
    """SamplingRows for one row of logits, built by hand (independent of the engine's batch builder)."""
    sampled = not params.greedy
    return SamplingRows(
        logit_rows=torch.zeros(1, dtype=torch.int64),
        seeds=torch.tensor([seed]),
        sample_indices=torch.tensor([sample_index]),
        positions=torch.tensor([position]),
        temperatures=torch.tensor([1.0 if params.greedy else params.temperature]),
        top_k=torch.tensor([params.top_k]),
        top_p=torch.tensor([params.top_p], dtype=torch.float32),
        min_p=torch.tensor([params.min_p], dtype=torch.float32),
        greedy=torch.tensor([params.greedy]),
        any_greedy=params.greedy,
        all_greedy=params.greedy,
        any_top_k=sampled and params.top_k > 0,
        any_top_p=sampled and params.top_p < 1,
        any_min_p=sampled and params.min_p > 0,
    )

