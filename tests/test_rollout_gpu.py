"""GPU tests of the flashinfer backend and the CUDA-graph decode path (skipped without CUDA or flashinfer).

References: the plain-torch attention backend (in float32 on the same bf16 / fp8 cache contents) for single forwards;
the torch-backend engine on the same bf16 model for whole generations (bf16 numerics differ between kernels, so
generations are compared teacher-forced: agreement of greedy tokens with the reference's argmax, and log-prob
error); the CPU engine for the float32 torch backend on CUDA (token for token).
All tiny models use head_dim 128 so the JIT-compiled kernels are the ones the Qwen2.5 benchmark uses.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch
from test_rollout_gpu_cpu_parts import random_paged_batch

from opdgraph.models import load_decoder
from opdgraph.models.attention_backend import TorchReferenceBackend
from opdgraph.models.attention_metadata import PackedMetadata
from opdgraph.models.config import decoder_config_from_hf
from opdgraph.models.tiny_configs import tiny_config
from opdgraph.rollout import Request, RolloutEngine, SamplingParams

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
    pytest.mark.skipif(importlib.util.find_spec("flashinfer") is None, reason="needs flashinfer"),
]
HEADS, KV_HEADS, DIM = 8, 2, 128


def model_config(family="qwen2", **overrides):
    config = tiny_config(family)
    config.update(hidden_size=512, num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, head_dim=DIM,
                  intermediate_size=256, num_hidden_layers=2, initializer_range=0.05, **overrides)
    if family == "gemma3":
        config["layer_types"] = ["sliding_attention", "full_attention"]
    return config


def backend_for(family="qwen2", kv_dtype=torch.bfloat16, use_tensor_cores=None, **overrides):
    from opdgraph.kernels.flashinfer_attention import FlashInferBackend

    config = decoder_config_from_hf(model_config(family, **overrides))
    return FlashInferBackend(config, device="cuda", kv_dtype=kv_dtype, use_tensor_cores=use_tensor_cores)


CASES = {
    "decode": ([1, 1, 1, 1], [5, 16, 17, 40]),
    "prefill": ([37, 16, 1], [37, 16, 1]),
    "mixed": ([1, 9, 20, 1], [33, 9, 52, 16]),
}


def run_single_forward(backend, query_lens, kv_lens, kv_dtype, sliding_window, page_size=16, seed=0):
    torch.manual_seed(seed)
    meta, tables = random_paged_batch(query_lens, kv_lens, page_size, num_pages=64, seed=seed)
    meta = type(meta)(**{name: (value.cuda() if torch.is_tensor(value) else value)
                         for name, value in vars(meta).items()})
    cache = (torch.randn(2, 64, page_size, KV_HEADS, DIM, device="cuda")).to(kv_dtype)
    num_tokens = sum(query_lens)
    q = torch.randn(num_tokens, HEADS, DIM, device="cuda", dtype=torch.bfloat16)
    k, v = torch.randn(2, num_tokens, KV_HEADS, DIM, device="cuda", dtype=torch.bfloat16)
    expected = TorchReferenceBackend().paged(q.float(), k.to(kv_dtype).float(), v.to(kv_dtype).float(), meta,
                                             cache.float(), scale=backend.scale, sliding_window=sliding_window)
    actual = backend.paged(q, k, v, meta, cache, scale=backend.scale, sliding_window=sliding_window)
    return actual.float(), expected, cache, k, meta


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("use_tensor_cores", [True, False])
def test_backend_matches_torch_reference(case, use_tensor_cores):
    """flashinfer attention (plan arrays, GQA, scale, causal alignment, page boundaries, both decode kernels) or
    the K/V write would differ from the reference if wrong."""
    backend = backend_for(use_tensor_cores=use_tensor_cores)
    actual, expected, cache, k, meta = run_single_forward(backend, *CASES[case], torch.bfloat16, None)
    torch.testing.assert_close(actual, expected, atol=2e-2, rtol=2e-2)
    written = cache[0].view(-1, KV_HEADS, DIM)[meta.slot_mapping]
    torch.testing.assert_close(written, k, atol=0, rtol=0)


@pytest.mark.parametrize("case", sorted(CASES))
def test_backend_sliding_window(case):
    """Gemma-style sliding windows (window_left, one plan per window) and its attention scale would be wrong."""
    backend = backend_for("gemma3", sliding_window=6)
    assert backend.window_lefts == [-1, 5]
    for sliding_window in (6, None):  # a sliding layer and a global layer of the same forward
        actual, expected, *_ = run_single_forward(backend, *CASES[case], torch.bfloat16, sliding_window)
        torch.testing.assert_close(actual, expected, atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("case", sorted(CASES))
def test_backend_fp8_cache(case):
    """The float8 e4m3 cache (byte writes, bf16 queries against fp8 keys/values) would be misread."""
    backend = backend_for(kv_dtype=torch.float8_e4m3fn)
    actual, expected, cache, k, meta = run_single_forward(backend, *CASES[case], torch.float8_e4m3fn, None)
    torch.testing.assert_close(actual, expected, atol=3e-2, rtol=3e-2)
    written = cache[0].view(-1, KV_HEADS, DIM)[meta.slot_mapping].float()
    torch.testing.assert_close(written, k.to(torch.float8_e4m3fn).float(), atol=0, rtol=0)


# ------------------------------------------------------------------------------------------------ whole engine
PROMPTS = [[(7 * i + 3 * j) % 250 + 1 for j in range(length)] for i, length in enumerate([5, 17, 16, 33, 1, 40])]


def make_engine(model, attention, cuda_graphs=False, kv_dtype=None, page_size=16, max_num_seqs=32,
                decode_burst_steps=1, fused_kernels=False):
    return RolloutEngine(model, page_size=page_size, num_pages=128, max_num_seqs=max_num_seqs,
                         prefill_token_budget=64, device="cuda", kv_dtype=kv_dtype, attention=attention,
                         cuda_graphs=cuda_graphs, decode_burst_steps=decode_burst_steps, fused_kernels=fused_kernels)


@torch.no_grad()
def teacher_forced_logprobs(model, prompt, tokens):
    """Reference float32 log-softmax rows of prompt + tokens[:-1] (torch backend, packed forward, one sequence)."""
    sequence = prompt + tokens[:-1]
    ids = torch.tensor(sequence, device="cuda")
    meta = PackedMetadata(cu_seqlens=torch.tensor([0, len(sequence)], dtype=torch.int32, device="cuda"),
                          max_seqlen=len(sequence))
    hidden = model.forward_hidden(ids, torch.arange(len(sequence), device="cuda"), meta)
    return torch.log_softmax(model.logits(hidden[len(prompt) - 1:]), dim=-1)


def agreement(model, responses):
    """(fraction of tokens equal to the reference argmax, max |log-prob - reference log-prob|) over responses."""
    agree, total, max_error = 0, 0, 0.0
    for response in responses:
        reference = teacher_forced_logprobs(model, response.prompt_ids, response.token_ids)
        tokens = torch.tensor(response.token_ids, device="cuda")
        agree += int((reference.argmax(-1) == tokens).sum())
        total += len(tokens)
        reference_logprobs = reference.gather(1, tokens[:, None]).squeeze(1)
        error = (reference_logprobs - torch.tensor(response.logprobs, device="cuda")).abs().max()
        max_error = max(max_error, float(error))
    return agree / total, max_error


@pytest.mark.parametrize("family, cuda_graphs, kv_dtype", [
    ("qwen2", False, None), ("qwen2", True, None), ("qwen2", True, torch.float8_e4m3fn), ("gemma3", False, None),
])
def test_engine_greedy_agrees_with_torch_reference(family, cuda_graphs, kv_dtype):
    """Greedy generations through flashinfer (eager, graphs, fp8 cache, sliding windows) would drift from the
    model's own teacher-forced argmax and log-probs if any part of the GPU path were wrong."""
    extra = {"sliding_window": 6} if family == "gemma3" else {}
    model = load_decoder(model_config(family, **extra), dtype=torch.bfloat16, device="cuda", init_seed=3)
    requests = [Request(f"r{i}", prompt, SamplingParams(max_new_tokens=24, greedy=True))
                for i, prompt in enumerate(PROMPTS)]
    engine = make_engine(model, "flashinfer", cuda_graphs=cuda_graphs, kv_dtype=kv_dtype)
    responses = engine.generate(requests)
    rate, max_error = agreement(model, responses)
    print(f"\n{family} graphs={cuda_graphs} kv={kv_dtype}: greedy agreement {rate:.4f}, "
          f"max log-prob error {max_error:.4f}, gpu stats {engine.gpu_path.stats.graph_steps} graph steps")
    if cuda_graphs:
        assert engine.gpu_path.stats.graph_steps > 0
    # bf16 kernels round differently from the reference: near-ties may flip (a few percent of tokens).
    assert rate >= (0.8 if kv_dtype is not None else 0.9)
    assert max_error <= (0.5 if kv_dtype is not None else 0.1)


def test_graph_replay_matches_eager_and_recaptures_after_release():
    """Graph decode (padding, static buffers, re-plan before replay, sampling inside the graph), n > 1 with shared
    prefix pages, and a re-capture after release() would give wrong log-probs or unrepeatable samples if any
    buffer went stale."""
    model = load_decoder(model_config(), dtype=torch.bfloat16, device="cuda", init_seed=5)
    params = SamplingParams(max_new_tokens=20, temperature=1.0, top_p=0.9)
    requests = [Request(f"r{i}", prompt, params, n=2, seed=i) for i, prompt in enumerate(PROMPTS)]
    eager = make_engine(model, "flashinfer").generate(requests)
    graphed_engine = make_engine(model, "flashinfer", cuda_graphs=True)
    first = graphed_engine.generate(requests)
    graphed_engine.release()
    second = graphed_engine.generate(requests)
    assert graphed_engine.gpu_path.stats.num_captures >= 2 * len(graphed_engine.gpu_path.ladder)
    same_tokens = sum(a.token_ids == b.token_ids for a, b in zip(eager, first))
    _, eager_error = agreement(model, eager)
    _, graph_error = agreement(model, first)
    print(f"\nsampled n=2: {same_tokens}/{len(eager)} responses identical eager vs graph (split-kv order may "
          f"flip near-ties); max log-prob error eager {eager_error:.4f}, graph {graph_error:.4f}")
    assert [r.token_ids for r in first] == [r.token_ids for r in second]
    assert [r.logprobs for r in first] == [r.logprobs for r in second]
    assert graph_error <= 0.1 and eager_error <= 0.1


def test_float32_torch_backend_on_cuda_matches_cpu():
    """The engine on CUDA (device tensors, host sync points) would diverge from the CPU engine token for token."""
    config = tiny_config("qwen2")
    requests = [Request(f"r{i}", [t % 250 for t in prompt], SamplingParams(max_new_tokens=12, greedy=True))
                for i, prompt in enumerate(PROMPTS)]
    results = {}
    for device in ("cpu", "cuda"):
        model = load_decoder(config, dtype=torch.float32, device=device, init_seed=1)
        engine = RolloutEngine(model, page_size=4, num_pages=128, max_num_seqs=8, prefill_token_budget=32,
                               device=device)
        results[device] = engine.generate(requests)
    for cpu, gpu in zip(results["cpu"], results["cuda"]):
        assert cpu.token_ids == gpu.token_ids
        torch.testing.assert_close(torch.tensor(gpu.logprobs), torch.tensor(cpu.logprobs), atol=1e-4, rtol=0)


def test_fused_sampler_matches_torch_sampler_at_full_vocabulary():
    """The Triton sampler at Qwen's 151936-token vocabulary (4 splits per SM, greedy and sampled rows) would pick
    other tokens than the torch sampler, or wrong log-probs, if its hashes, splits or merge were wrong on the GPU."""
    from opdgraph.kernels.sampling import sample_unfiltered
    from opdgraph.rollout.sampler import SamplingRows

    generator = torch.Generator(device="cuda").manual_seed(0)
    logits = torch.randn(128, 151936, device="cuda", generator=generator) * 3
    count = 128
    greedy = torch.arange(count, device="cuda") % 5 == 0
    rows = SamplingRows(
        logit_rows=torch.arange(count, device="cuda"), seeds=torch.arange(count, device="cuda") * 7919 + 2**40,
        sample_indices=torch.arange(count, device="cuda") % 3, positions=torch.arange(count, device="cuda") * 11,
        temperatures=torch.where(greedy, 1.0, 0.8).float(), top_k=torch.zeros(count, dtype=torch.int64,
                                                                               device="cuda"),
        top_p=torch.ones(count, device="cuda"), min_p=torch.zeros(count, device="cuda"), greedy=greedy,
        any_greedy=True, all_greedy=False, any_top_k=False, any_top_p=False, any_min_p=False)
    tokens, logprobs = sample_unfiltered(logits, rows)
    # The torch path of sample_tokens, called directly (sample_tokens itself would dispatch to the kernel on CUDA).
    from opdgraph.rollout import sampler

    scaled = logits / rows.temperatures[:, None]
    scores = scaled - sampler._log_race(rows, logits.shape[-1])
    expected = torch.where(greedy, logits.argmax(-1), scores.argmax(-1))
    expected_logprobs = torch.log_softmax(logits, -1).gather(1, expected[:, None]).squeeze(1)
    same = int((tokens == expected).sum())
    print(f"\nfused sampler: {same}/{count} tokens identical to the torch sampler")
    assert same >= count - 1  # a float32 logarithm differing by one ulp may flip an exact near-tie, nothing more
    torch.testing.assert_close(logprobs[tokens == expected], expected_logprobs[tokens == expected], atol=1e-4,
                               rtol=0)
    started, ended = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    started.record()
    for _ in range(10):
        sample_unfiltered(logits, rows)
    ended.record()
    torch.cuda.synchronize()
    print(f"fused sampler: {started.elapsed_time(ended) / 10:.3f} ms per call at 128 x 151936")


def test_unfiltered_sampling_in_graphs_is_repeatable_and_accurate():
    """Temperature sampling without filters runs the fused kernel inside the captured graphs: after release() and a
    re-capture it must reproduce the same tokens, and its log-probs must match the teacher-forced reference."""
    model = load_decoder(model_config(), dtype=torch.bfloat16, device="cuda", init_seed=7)
    params = SamplingParams(max_new_tokens=20, temperature=1.0)
    requests = [Request(f"r{i}", prompt, params, n=2, seed=i) for i, prompt in enumerate(PROMPTS)]
    engine = make_engine(model, "flashinfer", cuda_graphs=True)
    first = engine.generate(requests)
    engine.release()
    second = engine.generate(requests)
    assert engine.gpu_path.stats.graph_steps > 0
    assert [r.token_ids for r in first] == [r.token_ids for r in second]
    _, error = agreement(model, first)
    print(f"\nunfiltered sampled graphs: max log-prob error {error:.4f}")
    assert error <= 0.1


@pytest.mark.parametrize("family, kv_dtype, fused", [
    ("qwen2", None, False), ("qwen2", torch.float8_e4m3fn, False), ("gemma3", None, False), ("qwen2", None, True),
    ("qwen3", None, True), ("gemma3", None, True), ("llama", torch.float8_e4m3fn, True),
])
def test_decode_bursts_agree_with_torch_reference(family, kv_dtype, fused):
    """Decode bursts (Triton paged decode inside replayed graphs, device-side state) would drift from the model's
    teacher-forced argmax and log-probs if a slot, a length, a page table row or the sampler counter were off."""
    extra = {"sliding_window": 6} if family == "gemma3" else {}
    model = load_decoder(model_config(family, **extra), dtype=torch.bfloat16, device="cuda", init_seed=3)
    requests = [Request(f"r{i}", prompt, SamplingParams(max_new_tokens=40, greedy=True))
                for i, prompt in enumerate(PROMPTS)]
    engine = make_engine(model, "flashinfer", cuda_graphs=True, kv_dtype=kv_dtype, decode_burst_steps=16,
                         fused_kernels=fused)
    responses = engine.generate(requests)
    assert not model.use_fused_decode_kernels  # only inside generate()
    rate, max_error = agreement(model, responses)
    print(f"\nbursts {family} kv={kv_dtype} fused={fused}: greedy agreement {rate:.4f}, max log-prob error {max_error:.4f}, "
          f"{engine.stats.bursts} bursts of {engine.stats.burst_steps} steps")
    assert engine.stats.bursts > 0
    assert rate >= (0.8 if kv_dtype is not None else 0.9)
    assert max_error <= (0.5 if kv_dtype is not None else 0.1)


def test_decode_burst_graphs_equal_eager_bursts_and_survive_release():
    """Replayed burst graphs must give exactly what the same burst steps give run eagerly (same kernels), and again
    after release() re-allocates the KV pool and re-captures: sampled, n = 2 with copy-on-write of shared pages."""
    model = load_decoder(model_config(), dtype=torch.bfloat16, device="cuda", init_seed=5)
    params = SamplingParams(max_new_tokens=37, temperature=1.0, top_p=0.9)
    requests = [Request(f"r{i}", prompt, params, n=2, seed=i) for i, prompt in enumerate(PROMPTS)]
    eager = make_engine(model, "flashinfer", cuda_graphs=False, decode_burst_steps=8,
                        fused_kernels=True).generate(requests)
    engine = make_engine(model, "flashinfer", cuda_graphs=True, decode_burst_steps=8, fused_kernels=True)
    first = engine.generate(requests)
    engine.release()
    second = engine.generate(requests)
    assert engine.burst.num_captures >= 2
    assert [r.token_ids for r in first] == [r.token_ids for r in eager] == [r.token_ids for r in second]
    assert [r.logprobs for r in first] == [r.logprobs for r in second]
    _, error = agreement(model, first)
    assert error <= 0.1


def test_eager_bursts_without_the_flashinfer_path_agree_with_torch_reference():
    """The eval engine's configuration (torch attention for prefill, eager decode bursts through the Triton kernel,
    no graphs, no flashinfer workspace) would drift from the teacher-forced reference if its logits, slots or
    lengths were wrong."""
    model = load_decoder(model_config(), dtype=torch.bfloat16, device="cuda", init_seed=3)
    requests = [Request(f"r{i}", prompt, SamplingParams(max_new_tokens=40, greedy=True))
                for i, prompt in enumerate(PROMPTS)]
    engine = make_engine(model, "torch", decode_burst_steps=16)
    assert engine.gpu_path is None and engine.burst is not None
    rate, max_error = agreement(model, engine.generate(requests))
    print(f"\neager bursts, torch prefill: greedy agreement {rate:.4f}, max log-prob error {max_error:.4f}")
    assert engine.stats.bursts > 0
    assert rate >= 0.9 and max_error <= 0.1


@pytest.mark.parametrize("settings", [dict(kv_heads_per_program=0, num_splits=3), dict(head_major=True, block_n=64,
                                                                                      num_stages=3),
                                      dict(num_splits=1), dict(kv_heads_per_program=0, num_splits=4,
                                                               merge_in_kernel=True)],
                         ids=["all-heads-3-splits", "head-major-64", "one-split", "all-heads-merge-in-kernel"])
def test_decode_bursts_with_packed_gate_up_and_launch_settings(settings, monkeypatch):
    """The variants benchmarks/decode_variants.py measures (gate/up as one matmul over packed parameters, the burst
    state kernels, other decode-attention launch layouts) would drift from the teacher-forced reference if a half
    of the stacked projection, a slot or a block-diagonal query were wrong."""
    from opdgraph.kernels import paged_decode_attention as kernel

    monkeypatch.setattr(kernel, "DEFAULT_SETTINGS", kernel.LaunchSettings(**settings))
    model = load_decoder(model_config(), dtype=torch.bfloat16, device="cuda", init_seed=3)
    model.pack_gate_up()
    requests = [Request(f"r{i}", prompt, SamplingParams(max_new_tokens=40, greedy=True))
                for i, prompt in enumerate(PROMPTS)]
    engine = make_engine(model, "flashinfer", cuda_graphs=True, decode_burst_steps=16, fused_kernels=True)
    responses = engine.generate(requests)
    assert engine.stacked_gate_up_layers == len(model.layers) and engine.burst.fused_state
    rate, max_error = agreement(model, responses)
    print(f"\nbursts {settings} packed gate/up: greedy agreement {rate:.4f}, max log-prob error {max_error:.4f}")
    assert engine.stats.bursts > 0
    assert rate >= 0.9 and max_error <= 0.1
