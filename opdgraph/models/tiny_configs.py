"""Tiny inline configs, one per family, for tests and CPU smoke runs (`load_model(tiny_config("qwen3"), ...)`).

They are small enough to run in milliseconds yet exercise every family option: GQA, q/k/v bias, tied and untied
embeddings, q/k norm, llama3 RoPE scaling with a frequency band that actually blends, and Gemma 3's sliding/global
layers with their own RoPE bases, linear scaling on global layers and a query_pre_attn_scalar unlike head_dim.
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
}


def tiny_config(name: str) -> dict[str, Any]:
    """A fresh copy of the named tiny config (qwen2, qwen2_untied, qwen3, llama, gemma3)."""
    return copy.deepcopy(TINY_CONFIGS[name])
