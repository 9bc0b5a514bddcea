"""The rollout engine on a Qwen3.5 decoder: recurrent-state slots beside the KV pages (CPU, float32).

The reference is a naive loop that recomputes the whole sequence with the packed training forward (no cache, no
state carried) at every step and samples with the engine's sampler on the same counters; the engine's paged
prefill, state carried through decode, forks of a prompt's state for its n samples, chunked prefill and preemption
(state dropped, the context prefilled again) must give exactly its tokens. Greedy parity with transformers'
generate is in test_rollout_transformers_parity.py (every tiny family, this one included).
"""

from __future__ import annotations

import pytest
import torch
from rollout_toy_model import naive_generate

from opdgraph.models import load_decoder
from opdgraph.models.packing import pack
from opdgraph.models.tiny_configs import tiny_config
from opdgraph.rollout import Request, RolloutEngine, SamplingParams
from opdgraph.rollout import scheduler as scheduler_module
from opdgraph.rollout.state_slots import check_slot_accounting

PROMPTS = [[5, 1, 9, 4, 2, 7, 3], [11, 40], [8] * 13, [33], [2, 3, 5, 7, 11, 13, 17, 19, 23]]


class FullRecompute:
    """forward_full over our decoder: the naive loop's model."""

    def __init__(self, model):
        self.model = model

    @torch.no_grad()
    def forward_full(self, input_ids):
        ids, positions, meta = pack([input_ids.tolist()])
        return self.model.logits(self.model.forward_hidden(ids, positions, meta))


@pytest.fixture(scope="module")
def model():
    return load_decoder(tiny_config("qwen3_5"), dtype=torch.float32, init_seed=3)


def engine_for(model, **settings):
    settings = {"page_size": 4, "num_pages": 64, "max_num_seqs": 8, "prefill_token_budget": 16, **settings}
    return RolloutEngine(model, device="cpu", **settings)


def assert_naive(model, responses, requests):
    by_id = {request.request_id: request for request in requests}
    assert len(responses) == sum(request.n for request in requests)
    for response in responses:
        request = by_id[response.request_id]
        tokens, logprobs, reason, _ = naive_generate(FullRecompute(model), request.prompt_ids, request.params,
                                                     request.seed, response.sample_index)
        assert response.token_ids == tokens, (response.request_id, response.sample_index)
        assert response.finish_reason == reason
        torch.testing.assert_close(torch.tensor(response.logprobs), torch.tensor(logprobs), atol=1e-4, rtol=0)


PREEMPTING = {"page_size": 2, "num_pages": 14, "max_num_seqs": 6, "prefill_token_budget": 6}


@pytest.mark.parametrize("settings", [{}, {"prefill_token_budget": 3}, PREEMPTING],
                         ids=["roomy", "chunked-prefill", "preempting"])
def test_sampled_n3_matches_the_full_recompute(model, settings):
    """If this fails, the state is not carried through chunked prefill and decode, a fork's copy of the prompt's
    state is wrong or late, or a preempted sequence resumes from a stale state: tokens would differ."""
    params = SamplingParams(max_new_tokens=8, temperature=0.9, top_p=0.95)
    requests = [Request(f"r{i}", prompt, params, n=3, seed=10 + i) for i, prompt in enumerate(PROMPTS)]
    engine = engine_for(model, **settings)
    assert_naive(model, engine.generate(requests), requests)
    if "num_pages" in settings:
        assert engine.stats.preemptions > 0


def test_state_slots_are_accounted_after_every_step(model, monkeypatch):
    """If this fails, a slot leaks, is held twice or is freed while held, across forks, finishes and preemptions."""
    seen = []
    original = scheduler_module.Scheduler.update

    def checked(self, batch, tokens, logprobs):
        original(self, batch, tokens, logprobs)
        live = self.running + [sequence for sequence in self.waiting if sequence.state_slot >= 0]
        check_slot_accounting(self.state_slots, [sequence.state_slot for sequence in live])
        assert all(sequence.state_slot < 0 for sequence in self.waiting + self.finished)
        seen.append(len(live))

    monkeypatch.setattr(scheduler_module.Scheduler, "update", checked)
    params = SamplingParams(max_new_tokens=6, temperature=1.1)
    requests = [Request(f"r{i}", prompt, params, n=2, seed=i) for i, prompt in enumerate(PROMPTS)]
    engine = engine_for(model, page_size=2, num_pages=12, max_num_seqs=5, prefill_token_budget=5)
    engine.generate(requests)
    assert engine.stats.preemptions > 0 and max(seen) <= 5


def test_kv_pool_holds_pages_for_attention_layers_only(model):
    """If this fails, the linear-attention layers get KV pages (memory the plan does not hold) or no state pool."""
    engine = engine_for(model)
    engine.generate([Request("a", PROMPTS[0], SamplingParams(max_new_tokens=2, greedy=True))])
    tensors = [layer for layer in engine.kv_cache if isinstance(layer, torch.Tensor)]
    states = [layer for layer in engine.kv_cache if not isinstance(layer, torch.Tensor)]
    assert len(tensors) == 1 and len(states) == 3
    assert all(state.conv.shape[0] == state.recurrent.shape[0] == engine.max_num_seqs for state in states)
    assert states[0].recurrent.dtype == torch.float32


@pytest.mark.parametrize("settings", [{}, PREEMPTING], ids=["roomy", "preempting"])
def test_decode_bursts_give_the_per_step_tokens(model, settings):
    """If this fails, a decode burst feeds the linear layers' state slots wrongly (an idle row advancing its own
    state, the scratch slot missing, a fork's copy not made before the burst): tokens would differ from the naive
    loop's."""
    params = SamplingParams(max_new_tokens=9, temperature=0.9, top_p=0.95)
    requests = [Request(f"r{i}", prompt, params, n=2, seed=30 + i) for i, prompt in enumerate(PROMPTS)]
    engine = engine_for(model, decode_burst_steps=4, **settings)
    assert_naive(model, engine.generate(requests), requests)
    assert engine.stats.bursts > 0
    states = [layer for layer in engine.kv_cache if not isinstance(layer, torch.Tensor)]
    assert all(state.recurrent.shape[0] == engine.max_num_seqs + 1 for state in states)  # the scratch slot


def test_fused_kernels_are_left_out_with_a_note(model, capsys):
    """If this fails, asking for the fused rollout kernels (attention layers only) on a hybrid model either breaks
    generation or changes it silently."""
    engine = engine_for(model, fused_kernels=True)
    assert "cover attention layers only" in capsys.readouterr().out
    assert not engine.fused_kernels
    requests = [Request("a", PROMPTS[2], SamplingParams(max_new_tokens=5, greedy=True), n=2)]
    assert_naive(model, engine.generate(requests), requests)


def test_single_token_rows_take_the_sync_free_decode(model):
    """If this fails, the decode step of the linear layers (the one CUDA graphs capture) reads another state than
    the per-row loop, or a one-token prompt continues from its slot's stale state instead of zeros."""
    from opdgraph.models.attention_metadata import PagedMetadata
    from opdgraph.models.linear_attention_backend import TorchLinearAttention
    from opdgraph.models.linear_state import LinearLayerState

    layer = next(layer.linear_attn for layer in model.layers if hasattr(layer, "linear_attn"))
    dims, generator = layer.dims, torch.Generator().manual_seed(0)
    mixed = torch.randn(3, dims.conv_channels, generator=generator)
    decay, beta = -torch.rand(3, dims.value_heads, generator=generator), torch.rand(3, dims.value_heads)
    stale = LinearLayerState.allocate(4, dims, torch.float32, "cpu")
    stale.conv.normal_(generator=generator)
    stale.recurrent.normal_(generator=generator)
    results = []
    for pad in (False, True):  # a padded forward (one row of two tokens) takes the per-row loop
        state = LinearLayerState(stale.conv.clone(), stale.recurrent.clone())
        lens = [1, 1, 1] + ([2] if pad else [])
        starts = [5, 0, 8] + ([0] if pad else [])
        rows = torch.cat([mixed, torch.zeros(2, dims.conv_channels)]) if pad else mixed
        row_decay = torch.cat([decay, torch.zeros(2, dims.value_heads)]) if pad else decay
        row_beta = torch.cat([beta, torch.zeros(2, dims.value_heads)]) if pad else beta
        query = torch.tensor(lens, dtype=torch.int32)
        meta = PagedMetadata(query_lens=query, cu_query_lens=torch.cat([query.new_zeros(1), query.cumsum(0)]).int(),
                             kv_lens=query + torch.tensor(starts, dtype=torch.int32), page_table=torch.zeros(4, 1),
                             slot_mapping=torch.zeros(len(rows), dtype=torch.int64), page_size=4,
                             state_slots=torch.tensor([0, 1, 2, 3][: len(lens)]))
        out = TorchLinearAttention().paged(rows, layer.conv1d.weight, row_decay, row_beta, dims, meta=meta,
                                           state=state)
        results.append((out[:3], state.conv[:3], state.recurrent[:3]))
    for single, looped in zip(*results):
        torch.testing.assert_close(single, looped, rtol=1e-6, atol=1e-6)
