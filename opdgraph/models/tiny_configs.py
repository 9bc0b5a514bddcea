"""Tiny inline configs, one per family, for tests and CPU smoke runs (`load_model(tiny_config("qwen3"), ...)`).

They are small enough to run in milliseconds yet exercise every family option: GQA, q/k/v bias, tied and untied
embeddings, q/k norm, llama3 RoPE scaling with a frequency band that actually blends, and Gemma 3's sliding/global
layers with their own RoPE bases, linear scaling on global layers and a query_pre_attn_scalar unlike head_dim, and
Qwen3.5's gated-DeltaNet layers between gated full-attention layers with partial RoPE.
vocab_size 300 leaves room for the built-in byte tokenizer (263 ids).
"""

from __future__ import annotations

import copy
from typing import Any

_COMMON = {
    "vocab_size": 300,
    "hidden_size": 64,
    "intermediate_size": 96,
    "num_hidden_layers": 3,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 256,
    "rms_norm_eps": 1e-6,
    "bos_token_id": 256,
    "eos_token_id": 257,
    "pad_token_id": 258,
}

TINY_CONFIGS: dict[str, dict[str, Any]] = {
    "qwen2": {**_COMMON, "model_type": "qwen2", "architectures": ["Qwen2ForCausalLM"],
              "tie_word_embeddings": True, "rope_theta": 10000.0},
    "qwen2_untied": {**_COMMON, "model_type": "qwen2", "architectures": ["Qwen2ForCausalLM"],
                     "tie_word_embeddings": False, "rope_theta": 1000.0},
    "qwen3": {**_COMMON, "model_type": "qwen3", "architectures": ["Qwen3ForCausalLM"], "head_dim": 24,
              "tie_word_embeddings": False, "rope_theta": 10000.0},
    "llama": {**_COMMON, "model_type": "llama", "architectures": ["LlamaForCausalLM"], "tie_word_embeddings": False,
              "rope_theta": 10000.0,
              "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                               "original_max_position_embeddings": 64}},
    "gemma3": {**_COMMON, "model_type": "gemma3_text", "architectures": ["Gemma3ForCausalLM"], "head_dim": 16,
               "tie_word_embeddings": True, "hidden_activation": "gelu_pytorch_tanh", "query_pre_attn_scalar": 24,
               "sliding_window": 4, "layer_types": ["sliding_attention", "sliding_attention", "full_attention"],
               "rope_theta": 100000.0, "rope_local_base_freq": 10000.0,
               "rope_scaling": {"rope_type": "linear", "factor": 2.0}},
    # Qwen3.5: gated-DeltaNet layers around one gated full-attention layer, key and value head dims unlike each other
    # and unlike head_dim, 2 value heads per key head, half of head_dim rotated, the multimodal RoPE keys.
    "qwen3_5": {**_COMMON, "model_type": "qwen3_5_text", "architectures": ["Qwen3_5ForCausalLM"], "head_dim": 16,
                "tie_word_embeddings": False, "attn_output_gate": True,
                "layer_types": ["linear_attention", "full_attention", "linear_attention", "linear_attention"],
                "num_hidden_layers": 4, "linear_num_key_heads": 2, "linear_num_value_heads": 4,
                "linear_key_head_dim": 8, "linear_value_head_dim": 12, "linear_conv_kernel_dim": 4,
                "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5,
                                    "mrope_section": [1, 1, 2], "mrope_interleaved": True}},
}


def tiny_config(name: str) -> dict[str, Any]:
    """A fresh copy of the named tiny config (qwen2, qwen2_untied, qwen3, llama, gemma3, qwen3_5)."""
    return copy.deepcopy(TINY_CONFIGS[name])
