"""End-to-end tests of RolloutEngine against the toy model's naive full-recompute generation (CPU, float32)."""

from __future__ import annotations

import pytest
import torch
from rollout_toy_model import ToyDecoderLM, naive_generate

from opdgraph.rollout import Request, RolloutEngine, SamplingParams

PROMPTS = [[5, 1, 9, 4, 2, 7, 3], [11, 40], [8] * 13, [33], [2, 3, 5, 7, 11, 13, 17, 19, 23]]
GREEDY = SamplingParams(max_new_tokens=9, greedy=True)
SAMPLED = [
    SamplingParams(max_new_tokens=8),
    SamplingParams(max_new_tokens=8, temperature=0.7, top_k=7),
    SamplingParams(max_new_tokens=8, temperature=1.3, top_p=0.8),
    SamplingParams(max_new_tokens=8, min_p=0.05, top_k=20, top_p=0.95),
]


@pytest.fixture(scope="module")
def model():
    return ToyDecoderLM(seed=0)


def make_engine(model, *, page_size=4, num_pages=64, max_num_seqs=16, prefill_token_budget=32):
    return RolloutEngine(
        model,
        page_size=page_size,
        num_pages=num_pages,
        max_num_seqs=max_num_seqs,
        prefill_token_budget=prefill_token_budget,
        device="cpu",
    )


def requests_for(prompts, params, n=1, seed_offset=0):
    return [Request(f"r{i}", prompt, params, n=n, seed=seed_offset + i) for i, prompt in enumerate(prompts)]


def assert_matches_naive(model, responses, requests, check_logprobs=True):
    by_id = {request.request_id: request for request in requests}
    assert len(responses) == sum(request.n for request in requests)
    for response in responses:
        request = by_id[response.request_id]
        tokens, logprobs, reason, _ = naive_generate(
            model, request.prompt_ids, request.params, request.seed, response.sample_index
        )
        assert response.token_ids == tokens, (response.request_id, response.sample_index)
        assert response.finish_reason == reason
        assert response.prompt_ids == request.prompt_ids
        if check_logprobs:
            torch.testing.assert_close(torch.tensor(response.logprobs), torch.tensor(logprobs), atol=1e-4, rtol=0)


@pytest.mark.parametrize("page_size, budget", [(1, 64), (4, 32), (16, 5), (3, 1)])
def test_greedy_matches_naive_full_recompute(model, page_size, budget):
    """Paged attention, slot mapping, page tables or chunked prefill would be wrong if greedy tokens diverged."""
    requests = requests_for(PROMPTS, GREEDY)
    engine = make_engine(model, page_size=page_size, num_pages=128, prefill_token_budget=budget)
    assert_matches_naive(model, engine.generate(requests), requests)
    assert engine.stats.preemptions == 0


def test_greedy_with_forced_preemption_matches_naive(model):
    """Preemption would lose, duplicate or misalign tokens if outputs under a tiny pool differed from naive."""
    requests = requests_for(PROMPTS, GREEDY, n=2)
    engine = make_engine(model, page_size=2, num_pages=12, prefill_token_budget=4)
    responses = engine.generate(requests)
    assert engine.stats.preemptions > 0
    assert sum(response.counters.num_preemptions for response in responses) > 0
    assert_matches_naive(model, responses, requests)


def test_greedy_n_samples_all_equal_naive(model):
    """Prefix sharing / copy-on-write would corrupt a sibling's cache if any of the n greedy samples diverged."""
    requests = requests_for(PROMPTS, GREEDY, n=3)
    responses = make_engine(model, page_size=4).generate(requests)
    expected_order = [(q.request_id, i) for q in requests for i in range(3)]
    assert [(r.request_id, r.sample_index) for r in responses] == expected_order
    assert_matches_naive(model, responses, requests)


@pytest.mark.parametrize("params", SAMPLED)
def test_sampled_matches_naive_sampled_loop(model, params):
    """The engine's tokens must equal a naive loop drawing from the same counters, with n > 1 and preemption."""
    requests = requests_for(PROMPTS, params, n=3, seed_offset=100)
    engine = make_engine(model, page_size=2, num_pages=14, max_num_seqs=6, prefill_token_budget=6)
    responses = engine.generate(requests)
    assert engine.stats.preemptions > 0
    assert_matches_naive(model, responses, requests)


def test_sampled_is_reproducible_across_batches_pools_and_preemption(model):
    """Seeded sampling would depend on scheduling if one request's tokens changed with its batch companions."""
    params = SamplingParams(max_new_tokens=10, temperature=0.9, top_p=0.9)
    target = Request("target", [4, 8, 15, 16, 23, 42], params, n=2, seed=7)
    others = requests_for(PROMPTS, params, n=2, seed_offset=50)
    alone = make_engine(model).generate([target])
    crowded = make_engine(model, max_num_seqs=4).generate(others[:2] + [target] + others[2:])
    tiny_engine = make_engine(model, page_size=1, num_pages=24, max_num_seqs=5, prefill_token_budget=2)
    tiny = tiny_engine.generate(others + [target])
    assert tiny_engine.stats.preemptions > 0

    def target_tokens(responses):
        return [(r.sample_index, r.token_ids, r.logprobs) for r in responses if r.request_id == "target"]

    reference = target_tokens(alone)
    assert reference[0][1] != reference[1][1], "two samples of a prompt must draw different randomness"
    for responses in (crowded, tiny):
        for got, want in zip(target_tokens(responses), reference):
            assert got[:2] == want[:2]
            torch.testing.assert_close(got[2], want[2], atol=1e-5, rtol=0)


def test_logprobs_are_raw_log_softmax_of_naive_logits(model):
    """Logprobs must be the student's unfiltered, temperature-1 log-probs, aligned with token_ids."""
    params = SamplingParams(max_new_tokens=6, temperature=0.5, top_k=4)
    request = Request("r", PROMPTS[0], params, n=2, seed=3)
    for response in make_engine(model, page_size=2, num_pages=9).generate([request]):
        _, _, _, naive_logits = naive_generate(model, request.prompt_ids, params, 3, response.sample_index)
        expected = torch.stack(
            [torch.log_softmax(logits.double(), -1)[token] for logits, token in zip(naive_logits, response.token_ids)]
        )
        torch.testing.assert_close(torch.tensor(response.logprobs, dtype=torch.float64), expected, atol=1e-4, rtol=0)
        assert len(response.logprobs) == len(response.token_ids)


def test_prefix_sharing_prefills_the_prompt_once(model):
    """n samples must prefill their prompt once (not n times) and give the same outputs as n separate requests."""
    prompt = list(range(3, 22))
    shared_engine, separate_engine = make_engine(model), make_engine(model)
    shared = shared_engine.generate([Request("a", prompt, GREEDY, n=3)])
    separate = separate_engine.generate([Request(f"a{i}", prompt, GREEDY) for i in range(3)])
    assert [r.token_ids for r in shared] == [r.token_ids for r in separate]
    assert shared_engine.stats.prefill_tokens == len(prompt)
    assert separate_engine.stats.prefill_tokens == 3 * len(prompt)
    assert shared_engine.stats.peak_pages_used < separate_engine.stats.peak_pages_used


def test_chunked_prefill_with_small_budget_gives_same_outputs(model):
    """A long prompt split over several forwards must give the same tokens and logprobs as one-shot prefill."""
    params = SamplingParams(max_new_tokens=5, temperature=0.8)
    requests = requests_for([list(range(1, 30)), [7, 7, 7]], params, n=2)
    big = make_engine(model, prefill_token_budget=64)
    small = make_engine(model, prefill_token_budget=3)
    big_responses, small_responses = big.generate(requests), small.generate(requests)
    assert small.stats.forwards >= 29 // 3 + 4 > big.stats.forwards
    for a, b in zip(big_responses, small_responses):
        assert a.token_ids == b.token_ids
        torch.testing.assert_close(a.logprobs, b.logprobs, atol=1e-5, rtol=0)


def test_stop_and_eos_tokens_end_responses(model):
    """EOS / stop ids must end the response with the right reason and be kept as its last token."""
    free_run, _, _, _ = naive_generate(model, PROMPTS[0], SamplingParams(max_new_tokens=12, greedy=True))
    eos, stop = free_run[3], free_run[5]
    first_eos, first_stop = free_run.index(eos), free_run.index(stop)
    both = SamplingParams(max_new_tokens=12, greedy=True, eos_token_ids=(eos,), stop_token_ids=(stop,))
    only_stop = SamplingParams(max_new_tokens=12, greedy=True, stop_token_ids=(stop,))
    responses = make_engine(model).generate([Request("both", PROMPTS[0], both), Request("stop", PROMPTS[0], only_stop)])
    expected_both = free_run[: min(first_eos, first_stop) + 1]
    assert responses[0].token_ids == expected_both
    assert responses[0].finish_reason == ("eos" if first_eos <= first_stop else "stop")
    assert responses[1].token_ids == free_run[: first_stop + 1] and responses[1].finish_reason == "stop"
    one = make_engine(model).generate([Request("one", PROMPTS[1], SamplingParams(max_new_tokens=1), n=2)])
    assert [len(r.token_ids) for r in one] == [1, 1] and {r.finish_reason for r in one} == {"length"}


def test_mixed_greedy_and_sampled_requests_share_forwards(model):
    """Per-row sampling settings would leak between requests if a mixed batch differed from naive per request."""
    settings = [GREEDY, *SAMPLED]
    requests = [Request(f"r{i}", p, params, n=2, seed=i) for i, (p, params) in enumerate(zip(PROMPTS, settings))]
    assert_matches_naive(model, make_engine(model, max_num_seqs=10).generate(requests), requests)


def test_release_then_generate_recreates_the_pool(model):
    """release() must drop the KV tensors and the next generate() must rebuild them and still be correct."""
    engine = make_engine(model)
    requests = requests_for(PROMPTS[:2], GREEDY)
    first = engine.generate(requests)
    assert engine.stats.kv_pool_created and engine.kv_cache is not None
    engine.generate(requests)
    assert not engine.stats.kv_pool_created
    engine.release()
    assert engine.kv_cache is None
    again = engine.generate(requests)
    assert engine.stats.kv_pool_created
    assert [r.token_ids for r in again] == [r.token_ids for r in first]
    assert engine.generate([]) == []


def test_stats_count_tokens_and_forwards(model):
    """Engine counters feed logs and benchmarks; they must add up to what was computed and returned."""
    requests = requests_for(PROMPTS, GREEDY, n=2)
    engine = make_engine(model)
    responses = engine.generate(requests)
    stats = engine.stats
    assert stats.prefill_tokens == sum(len(p) for p in PROMPTS)
    # Every generated token but the last of each response is fed back by one decode step.
    assert stats.decode_tokens == sum(len(r.token_ids) - 1 for r in responses)
    assert stats.generated_tokens == sum(len(r.token_ids) for r in responses)
    assert stats.forwards == GREEDY.max_new_tokens and stats.tokens_per_second > 0
    assert 0 < stats.peak_pages_used <= engine.num_pages


@pytest.mark.parametrize(
    "make_request, message",
    [
        (lambda: Request("big", [1] * 30, SamplingParams(max_new_tokens=20)), "raise kv_pool_tokens to at least 52"),
        (lambda: Request("wide", [1], SamplingParams(max_new_tokens=2), n=5), "raise max_num_seqs to at least 5"),
        (lambda: Request("t", [1], SamplingParams(max_new_tokens=2, temperature=0.0)), "temperature must be > 0"),
        (lambda: Request("p", [1], SamplingParams(max_new_tokens=2, top_p=0.0)), "top_p must be in (0, 1]"),
        (lambda: Request("m", [1], SamplingParams(max_new_tokens=2, min_p=1.0)), "min_p must be in [0, 1)"),
        (lambda: Request("k", [1], SamplingParams(max_new_tokens=2, top_k=-1)), "top_k must be an integer >= 0"),
        (lambda: Request("l", [1], SamplingParams(max_new_tokens=0)), "max_new_tokens must be an integer >= 1"),
        (lambda: Request("v", [1, 61], SamplingParams(max_new_tokens=2)), "prompt_ids[1] = 61"),
        (lambda: Request("e", [], SamplingParams(max_new_tokens=2)), "prompt_ids is empty"),
        (lambda: Request("s", [1], SamplingParams(max_new_tokens=2), seed=-1), "seed must be an integer"),
    ],
)
def test_bad_requests_raise_clear_errors(model, make_request, message):
    """Bad settings must be rejected up front with a message naming the setting to fix, never silently coerced."""
    engine = make_engine(model, page_size=4, num_pages=12, max_num_seqs=4)
    with pytest.raises(ValueError) as error:
        engine.generate([make_request()])
    assert message in str(error.value)


def test_greedy_ignores_temperature_and_duplicate_ids_are_rejected(model):
    """greedy=True must not require a valid temperature; two requests with one id must be refused."""
    engine = make_engine(model)
    engine.generate([Request("g", [1, 2], SamplingParams(max_new_tokens=2, greedy=True, temperature=0.0))])
    with pytest.raises(ValueError, match="appears twice"):
        engine.generate([Request("x", [1], GREEDY), Request("x", [2], GREEDY)])
    with pytest.raises(ValueError, match="prefill_token_budget must be an integer >= 1"):
        make_engine(model, prefill_token_budget=0)


def test_kv_dtype_reaches_the_cache(model):
    """kv_dtype must reach allocate_kv_cache (a lossless float64 cache must leave greedy outputs unchanged)."""
    engine = RolloutEngine(model, page_size=4, num_pages=64, max_num_seqs=8, prefill_token_budget=16, device="cpu",
                           kv_dtype=torch.float64)
    requests = requests_for(PROMPTS[:3], GREEDY)
    responses = engine.generate(requests)
    assert all(layer.dtype == torch.float64 for layer in engine.kv_cache)
    assert_matches_naive(model, responses, requests)
