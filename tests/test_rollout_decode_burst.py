"""Decode bursts (many device decode steps per host round trip) give exactly the per-step engine's responses.

The real decoder (tiny configs, float32, CPU) runs the same requests through an engine with decode_burst_steps=1
and with bursts; tokens, log-probs, finish reasons and counters must agree, through forks (n > 1 sharing prompt
pages), EOS and stop tokens mid-burst, mixed max_new_tokens, sampling filters, a pool small enough to preempt, and
the Triton decode kernel (interpreted on CPU) in place of the torch attention.
"""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is first imported

from opdgraph.models import load_model
from opdgraph.models.tiny_configs import tiny_config
from opdgraph.rollout import Request, RolloutEngine, SamplingParams


@pytest.fixture(scope="module", params=["qwen2", "gemma3"])
def model(request):
    loaded = load_model(tiny_config(request.param), dtype=torch.float32)
    return loaded[0] if isinstance(loaded, tuple) else loaded


def _requests():
    prompts = [[5, 1, 9, 4, 2, 7, 3], [11, 40], [8] * 13, [33], [2, 3, 5, 7, 11, 13, 17, 19, 23]]
    params = [
        SamplingParams(max_new_tokens=19, greedy=True),
        SamplingParams(max_new_tokens=7),
        SamplingParams(max_new_tokens=23, temperature=0.7, top_k=7),
        SamplingParams(max_new_tokens=16, temperature=1.3, top_p=0.8, stop_token_ids=(17, 40, 99)),
        SamplingParams(max_new_tokens=30, eos_token_ids=tuple(range(0, 300, 9))),
    ]
    return [Request(f"r{i}", prompt, p, n=1 + i % 3, seed=100 + i) for i, (prompt, p) in
            enumerate(zip(prompts, params))]


def _generate(model, burst_steps, *, num_pages=128, page_size=4, max_num_seqs=16, requests=None):
    engine = RolloutEngine(model, page_size=page_size, num_pages=num_pages, max_num_seqs=max_num_seqs,
                           prefill_token_budget=16, device="cpu", decode_burst_steps=burst_steps)
    return engine.generate(requests or _requests()), engine.stats


def _key(response):
    return (response.request_id, response.sample_index, response.token_ids, response.finish_reason,
            response.counters.num_generated_tokens)


@pytest.mark.parametrize("burst_steps", [2, 8])
def test_bursts_equal_per_step_engine(model, burst_steps):
    """Bursts would change tokens if the device state advanced wrongly (positions, sampler counters, slots), if a
    fork's copy-on-write page were skipped, or if the host did not truncate at EOS / stop tokens inside a burst."""
    reference, _ = _generate(model, 1)
    responses, stats = _generate(model, burst_steps)
    assert stats.bursts > 0 and stats.burst_steps > stats.bursts
    assert [_key(r) for r in responses] == [_key(r) for r in reference]
    for got, want in zip(responses, reference):
        torch.testing.assert_close(torch.tensor(got.logprobs), torch.tensor(want.logprobs), rtol=0, atol=1e-5)
    assert {r.finish_reason for r in reference} >= {"length", "eos"}


def test_bursts_shrink_instead_of_preempting(model):
    """Under a pool too small for long bursts, bursts shrink and the engine still returns the per-step responses
    (a burst that reserved pages it cannot have, or a lost preempted sequence, would break this)."""
    reference, _ = _generate(model, 1, num_pages=24, page_size=2, max_num_seqs=6)
    responses, stats = _generate(model, 16, num_pages=24, page_size=2, max_num_seqs=6)
    assert stats.bursts > 0 and stats.preemptions > 0
    assert [_key(r) for r in responses] == [_key(r) for r in reference]


@pytest.mark.parametrize("settings", [{}, {"kv_heads_per_program": 0, "num_splits": 3, "merge_in_kernel": True}],
                         ids=["default", "all-heads-merge-in-kernel"])
def test_triton_decode_kernel_in_bursts(model, settings, monkeypatch):
    """The Triton paged-decode kernel (CPU interpreter) drives bursts to the same tokens as the torch reference
    (Gemma 3: sliding and global layers; a request subset keeps the interpreter fast), also launched with several
    kv heads per program and the in-kernel merge (the backend's arrival counters reused across layers and steps)."""
    if model.config.sliding_window is None:
        pytest.skip("one family is enough here: the kernel tests cover the rest")
    if torch.cuda.is_available():
        pytest.skip("the GPU engine test covers the kernel on CUDA")
    pytest.importorskip("triton")
    from opdgraph.kernels import paged_decode_attention

    if not paged_decode_attention.supports(model.config.num_heads, model.config.num_kv_heads,
                                           model.config.head_dim):
        pytest.skip("head_dim not supported by the kernel")
    monkeypatch.setattr(paged_decode_attention, "DEFAULT_SETTINGS", paged_decode_attention.LaunchSettings(**settings))
    engine = RolloutEngine(model, page_size=4, num_pages=128, max_num_seqs=16, prefill_token_budget=16,
                           device="cpu", decode_burst_steps=4)
    engine.burst.attention = paged_decode_attention.TritonDecodeBackend(
        num_kv_heads=model.config.num_kv_heads, max_context=32, device=torch.device("cpu"))
    requests = _requests()[2:4]
    reference, _ = _generate(model, 1, requests=requests)
    responses = engine.generate(requests)
    assert engine.stats.bursts > 0
    assert [_key(r) for r in responses] == [_key(r) for r in reference]


def test_burst_state_kernels_in_bursts(model):
    """The bookkeeping kernels (kernels/burst_state.py: slots, lengths, recording and advancing the state; the GPU
    engine's choice with fused kernels) drive bursts to the per-step engine's tokens, through forks, EOS and stop
    tokens, and rows running out of steps mid-burst."""
    if torch.cuda.is_available():
        pytest.skip("the GPU engine tests cover the kernels on CUDA")
    pytest.importorskip("triton")
    engine = RolloutEngine(model, page_size=4, num_pages=128, max_num_seqs=16, prefill_token_budget=16,
                           device="cpu", decode_burst_steps=8)
    engine.burst.fused_state = True
    reference, _ = _generate(model, 1)
    responses = engine.generate(_requests())
    assert engine.stats.bursts > 0
    assert [_key(r) for r in responses] == [_key(r) for r in reference]
    for got, want in zip(responses, reference):
        torch.testing.assert_close(torch.tensor(got.logprobs), torch.tensor(want.logprobs), rtol=0, atol=1e-5)


def test_row_whose_share_ends_on_a_page_boundary(model):
    """A row that has used its share keeps its position at the end of its pages; when that lands exactly on a page
    boundary and the row has the most pages, its idle steps index one column past its page list (found in review:
    an out-of-bounds page-table read). Tokens must still equal the per-step engine's."""
    requests = [Request("a", [3] * 62, SamplingParams(max_new_tokens=3, greedy=True), seed=1),
                Request("b", [5] * 5, SamplingParams(max_new_tokens=20, greedy=True), seed=2)]
    reference, _ = _generate(model, 1, requests=requests, num_pages=64)
    responses, stats = _generate(model, 4, requests=requests, num_pages=64)
    assert stats.bursts > 0
    assert [_key(r) for r in responses] == [_key(r) for r in reference]
