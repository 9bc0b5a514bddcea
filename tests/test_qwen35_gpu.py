"""GPU tests of the Qwen3.5 rollout: the flashinfer path, its CUDA-graph decode and decode bursts over hybrid models
(recurrent-state slots beside the KV pages), with either linear-attention core (skipped without CUDA).

References, as in test_rollout_gpu.py: a float32 model's engine on the torch paths (tokens and log-probs equal up to
kernel rounding), and for bfloat16 the model's own teacher-forced argmax and log-probs (bf16 kernels round
differently, so near-ties may flip a few tokens). Tiny models use head_dim 128 (flashinfer's kernels) and the
linear-attention widths fla's kernels take.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch
from test_rollout_gpu import PROMPTS, agreement

from opdgraph.kernels.fla_linear_attention import FlaLinearAttention, fla_import_problem
from opdgraph.models import load_decoder
from opdgraph.models.linear_attention_backend import TorchLinearAttention
from opdgraph.models.tiny_configs import tiny_config
from opdgraph.rollout import Request, RolloutEngine, SamplingParams

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]
needs_fla = pytest.mark.skipif(fla_import_problem() is not None, reason=str(fla_import_problem()))
needs_flashinfer = pytest.mark.skipif(importlib.util.find_spec("flashinfer") is None, reason="needs flashinfer")
CORES = {"torch": TorchLinearAttention, "fla": FlaLinearAttention}


def hybrid_model(dtype, core: str, seed: int = 3):
    config = tiny_config("qwen3_5")
    config.update(hidden_size=256, num_attention_heads=4, num_key_value_heads=2, head_dim=128,
                  intermediate_size=256, linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=64,
                  linear_value_head_dim=64, initializer_range=0.05)
    model = load_decoder(config, dtype=dtype, device="cuda", init_seed=seed)
    model.set_linear_attention_backend(CORES[core]())
    return model


def make_engine(model, **settings):
    settings = {"page_size": 16, "num_pages": 128, "max_num_seqs": 32, "prefill_token_budget": 64, **settings}
    return RolloutEngine(model, device="cuda", **settings)


def requests_for(params, n=1):
    return [Request(f"r{i}", prompt, params, n=n, seed=i) for i, prompt in enumerate(PROMPTS)]


@pytest.mark.parametrize("core", ["torch", pytest.param("fla", marks=needs_fla)])
def test_float32_bursts_on_cuda_give_the_cpu_engines_tokens(core):
    """If this fails, CUDA decode bursts (Triton paged decode, device-side state slots, the scratch slot) or the fla
    core carry a Qwen3.5 state differently from the CPU engine's per-step torch path. With the torch core the
    tokens are equal; fla's chunked kernel may round float32 dots through TF32, so there greedy tokens must agree
    until near-ties (most of each response) and log-probs on the common prefix stay close."""
    model = hybrid_model(torch.float32, core)
    params = SamplingParams(max_new_tokens=30, greedy=True)
    gpu = make_engine(model, decode_burst_steps=8).generate(requests_for(params, n=2))
    cpu_model = hybrid_model(torch.float32, "torch").cpu()
    cpu_model.load_state_dict(model.state_dict())
    cpu = RolloutEngine(cpu_model, page_size=16, num_pages=128, max_num_seqs=32, prefill_token_budget=64,
                        device="cpu").generate(requests_for(params, n=2))
    if core == "torch":
        assert [r.token_ids for r in gpu] == [r.token_ids for r in cpu]
    prefixes = []
    for ours, reference in zip(gpu, cpu):
        common = next((i for i, (a, b) in enumerate(zip(ours.token_ids, reference.token_ids)) if a != b),
                      len(reference.token_ids))
        prefixes.append(common / len(reference.token_ids))
        torch.testing.assert_close(torch.tensor(ours.logprobs[:common]), torch.tensor(reference.logprobs[:common]),
                                   atol=2e-3 if core == "torch" else 2e-2, rtol=0)
    print(f"\nfloat32 {core} core bursts vs CPU: mean common prefix {sum(prefixes) / len(prefixes):.3f}")
    assert sum(prefixes) / len(prefixes) >= 0.8


@needs_flashinfer
@pytest.mark.parametrize("core", ["torch", pytest.param("fla", marks=needs_fla)])
@pytest.mark.parametrize("burst_steps", [1, 16])
def test_flashinfer_graphs_and_bursts_cover_hybrid_models(core, burst_steps):
    """If this fails, the GPU rollout path refuses Qwen3.5, graphs or bursts never run for it, or they drift from
    the model's teacher-forced argmax (a state slot, the scratch slot or kv_lens in the captured graph is wrong)."""
    model = hybrid_model(torch.bfloat16, core)
    engine = make_engine(model, attention="flashinfer", cuda_graphs=True, decode_burst_steps=burst_steps)
    responses = engine.generate(requests_for(SamplingParams(max_new_tokens=40, greedy=True), n=2))
    rate, max_error = agreement(model, responses)
    stats = engine.gpu_path.stats
    print(f"\nqwen3.5 {core} core, bursts {burst_steps}: greedy agreement {rate:.4f}, max log-prob error "
          f"{max_error:.4f}, {stats.graph_steps} graph steps, {engine.stats.bursts} bursts")
    assert (engine.stats.bursts if burst_steps > 1 else stats.graph_steps) > 0
    assert rate >= 0.9 and max_error <= 0.15


@needs_fla
@needs_flashinfer
def test_fla_rollout_is_the_torch_cores_argmax_in_graphs():
    """If this fails, the fla core's prefill or decode step gives a bf16 rollout in graphs other tokens or log-probs
    than the torch core's model would (the reference: the fla rollout's tokens teacher-forced through the same
    weights on the torch core; near-ties may flip a few tokens, so tokens are not compared position by position
    between two free-running rollouts)."""
    fla_model = hybrid_model(torch.bfloat16, "fla")
    engine = make_engine(fla_model, attention="flashinfer", cuda_graphs=True, decode_burst_steps=16)
    responses = engine.generate(requests_for(SamplingParams(max_new_tokens=32, greedy=True)))
    rate, max_error = agreement(hybrid_model(torch.bfloat16, "torch"), responses)
    print(f"\nfla rollout vs the torch core's teacher-forced argmax: agreement {rate:.4f}, max log-prob error "
          f"{max_error:.4f}")
    assert rate >= 0.9 and max_error <= 0.15


@needs_fla
@pytest.mark.parametrize("lengths", [(2048,), (512,) * 4, (100, 37, 1000, 3, 908)])
def test_fla_no_grad_peak_is_covered_by_the_plan(lengths):
    """If this fails, teacher scoring of a Qwen3.5-0.8B-shaped linear-attention layer through fla's kernels peaks
    above the plan's forward workspace (sizing.fla_core_peak_bytes: the chunk states, the q/k/v copies, the chunk
    matrices), or the fla formula holds far more than the kernels allocate. The plan also counts the RoPE tables of
    the attention layers a real model has (this one-layer model builds none: 256 bytes per token over)."""
    import json
    import pathlib

    import opdgraph
    from opdgraph import sizing
    from opdgraph.model_shapes import shape_from_hf_config
    from opdgraph.models.packing import pack

    config = json.loads((pathlib.Path(opdgraph.__file__).parent / "model_configs" / "qwen3.5-0.8b-text.json")
                        .read_text())
    config.update(num_hidden_layers=1, layer_types=["linear_attention"], vocab_size=512)
    shape = shape_from_hf_config(config)
    model = load_decoder(config, dtype=torch.bfloat16, device="cuda", init_device="device")
    model.set_linear_attention_backend(FlaLinearAttention())
    tokens = sum(lengths)
    ids, positions, meta = pack([torch.randint(0, 512, (length,)).tolist() for length in lengths], "cuda")
    with torch.no_grad():
        model.forward_hidden(ids, positions, meta)  # compile and autotune outside the measurement
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        model.forward_hidden(ids, positions, meta)
        torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    planned = sizing.forward_workspace_bytes(shape, tokens, 2, fla_sequences=len(lengths))
    print(f"\nfla no-grad peak {lengths}: measured {peak / 2**20:.1f} MiB, plan {planned / 2**20:.1f} MiB")
    assert peak <= planned <= 1.5 * peak
