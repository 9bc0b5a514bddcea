"""The supported model families, in one torch-free table that the planner and the runtime both read.

For each family: its HF `model_type` and causal-LM architecture name, the structural rules the decoder follows
(plain or (1 + w) RMSNorm, sandwich norms, q/k norm, which projections carry a bias, the activation key, embedding
scale, tied-embedding default, one RoPE or one per layer type, how sliding-window layers are chosen), the defaults
transformers fills in when a key is absent, and every HF config key a config of the family may hold.

The planner (opdgraph.model_shapes) reads shapes with these rules and defaults, the runtime (opdgraph.models.config)
builds the decoder from them, and opdgraph.model_config_check checks a config against the key lists, so `plan` and
`run` accept the same configs and agree on their shapes. The key lists and defaults were read from the
transformers config classes (5.17 and 5.24 define the same keys) and from the keys older configs carry;
tests/test_families.py checks them against the installed transformers, so they cannot drift apart silently.
"""

from __future__ import annotations

from types import MappingProxyType

import attrs

DERIVED = "derived"  # a default computed from other keys (head_dim = hidden_size // num_attention_heads, ...)
FULL_ATTENTION, SLIDING_ATTENTION = "full_attention", "sliding_attention"
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")
SUPPORTED_ACTIVATIONS = MappingProxyType({"silu": "silu", "gelu_pytorch_tanh": "gelu_tanh"})  # HF name -> ours


@attrs.frozen(kw_only=True)
class Family:
    """One decoder family. A bias rule is True / False, or the name of the config key that switches it."""

    name: str  # llama | qwen2 | qwen3 | gemma3
    model_type: str  # HF model_type of the causal-LM config
    architecture: str  # the causal-LM class name config.json lists under "architectures"
    one_plus_norm: bool  # RMSNorm weight stored as w and applied as (1 + w) (Gemma); else plain w
    sandwich_norms: bool  # extra norms after attention and after the MLP (Gemma 3): 4 norms per layer, not 2
    qk_norm: bool  # RMSNorm over head_dim on q and k before RoPE
    qkv_bias: bool | str  # bias on the q/k/v projections
    o_bias: bool | str  # bias on the attention output projection
    mlp_bias: bool | str  # bias on gate/up/down
    activation_key: str  # the config key naming the MLP activation
    embedding_scale: bool  # embeddings times sqrt(hidden_size)
    rope_per_layer_type: bool  # sliding and full layers have RoPEs of their own (Gemma 3)
    sliding_windows: str  # none | max_window_layers (Qwen: use_sliding_window, layers from max_window_layers on)
    #                       | pattern (Gemma 3: layer_types, else every sliding_window_pattern-th layer is full)
    hidden_divisible_by_heads: bool  # transformers rejects hidden_size % num_attention_heads != 0 even with head_dim
    defaults: MappingProxyType  # what transformers uses when a key is absent (DERIVED: computed from other keys)
    nullable: frozenset[str]  # size keys transformers accepts as null (null then means DERIVED)
    keys: frozenset[str]  # every key this family's configs may hold, read or ignored

    def flag(self, rule: bool | str, config: dict) -> bool:
        """A bias rule applied to a config: the fixed value, or the config key's value (absent: False)."""
        return rule if isinstance(rule, bool) else bool(config.get(rule, False))

    def default(self, key: str, config: dict):
        """The value of `key` in `config`, or the family's default when it is absent or (where allowed) null."""
        value = config.get(key)
        if value is None:
            value = self.defaults.get(key) if key not in config else DERIVED
        if value == DERIVED:
            heads = config["num_attention_heads"]
            return {"head_dim": config["hidden_size"] // heads, "num_key_value_heads": heads}[key]
        return value


# HF metadata and generation settings a config may carry that change nothing in the decoder we build: the dtype
# comes from the pipeline, special tokens from the tokenizer, sampling from [rollout]. Accepted and ignored (listed
# in the run's notes). Older configs (transformers 4.x) also carry the generation defaults and legacy flags below.
IGNORED_KEYS = frozenset({
    "_name_or_path", "_commit_hash", "name_or_path", "transformers_version", "dtype", "torch_dtype", "use_cache",
    "cache_implementation", "output_attentions", "output_hidden_states", "return_dict", "torchscript",
    "chunk_size_feed_forward", "is_encoder_decoder", "is_decoder", "cross_attention_hidden_size",
    "add_cross_attention", "tie_encoder_decoder", "pruned_heads", "id2label", "label2id", "num_labels",
    "problem_type", "finetuning_task", "task_specific_params", "tokenizer_class", "prefix", "bos_token_id",
    "eos_token_id", "pad_token_id", "sep_token_id", "decoder_start_token_id", "tf_legacy_loss", "use_bfloat16",
    "attn_implementation", "gradient_checkpointing", "pretraining_tp",
    # transformers 4.x generation defaults, written into older config.json files
    "max_length", "min_length", "do_sample", "early_stopping", "num_beams", "temperature", "top_k", "top_p",
    "typical_p", "repetition_penalty", "length_penalty", "no_repeat_ngram_size", "encoder_no_repeat_ngram_size",
    "bad_words_ids", "num_return_sequences", "output_scores", "return_dict_in_generate", "forced_bos_token_id",
    "forced_eos_token_id", "remove_invalid_values", "exponential_decay_length_penalty", "suppress_tokens",
    "begin_suppress_tokens", "num_beam_groups", "diversity_penalty",
})
# Keys every family reads (shape, norm epsilon, initialisation, RoPE with its legacy spellings that transformers
# converts into rope_parameters, dropout that must be 0) plus the two identity keys.
_READ_BY_ALL = ("model_type", "architectures", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                "num_attention_heads", "num_key_value_heads", "max_position_embeddings", "rms_norm_eps",
                "initializer_range", "tie_word_embeddings", "rope_parameters", "rope_theta", "rope_scaling",
                "partial_rotary_factor", "attention_dropout")
_QWEN_SLIDING = ("layer_types", "max_window_layers", "sliding_window", "use_sliding_window")


def _keys(*family_keys: str) -> frozenset[str]:
    return frozenset(_READ_BY_ALL) | frozenset(family_keys) | IGNORED_KEYS


_DERIVED_HEADS = {"head_dim": DERIVED, "num_key_value_heads": DERIVED}
FAMILIES = {family.model_type: family for family in (
    Family(name="llama", model_type="llama", architecture="LlamaForCausalLM", one_plus_norm=False,
           sandwich_norms=False, qk_norm=False, qkv_bias="attention_bias", o_bias="attention_bias",
           mlp_bias="mlp_bias", activation_key="hidden_act", embedding_scale=False, rope_per_layer_type=False,
           sliding_windows="none", hidden_divisible_by_heads=True,
           nullable=frozenset({"head_dim", "num_key_value_heads"}),
           defaults=MappingProxyType({**_DERIVED_HEADS, "tie_word_embeddings": False, "hidden_act": "silu",
                                      "max_position_embeddings": 2048}),
           keys=_keys("hidden_act", "head_dim", "attention_bias", "mlp_bias")),
    Family(name="qwen2", model_type="qwen2", architecture="Qwen2ForCausalLM", one_plus_norm=False,
           sandwich_norms=False, qk_norm=False, qkv_bias=True, o_bias=False, mlp_bias=False,
           activation_key="hidden_act", embedding_scale=False, rope_per_layer_type=False,
           sliding_windows="max_window_layers", hidden_divisible_by_heads=False,
           nullable=frozenset({"num_key_value_heads"}),
           defaults=MappingProxyType({"head_dim": DERIVED, "num_key_value_heads": 32, "tie_word_embeddings": False,
                                      "hidden_act": "silu", "max_position_embeddings": 32768}),
           keys=_keys("hidden_act", "head_dim", *_QWEN_SLIDING)),  # Qwen2Config lacks head_dim; its modules read it
    Family(name="qwen3", model_type="qwen3", architecture="Qwen3ForCausalLM", one_plus_norm=False,
           sandwich_norms=False, qk_norm=True, qkv_bias="attention_bias", o_bias="attention_bias", mlp_bias=False,
           activation_key="hidden_act", embedding_scale=False, rope_per_layer_type=False,
           sliding_windows="max_window_layers", hidden_divisible_by_heads=False,
           nullable=frozenset({"num_key_value_heads"}),
           defaults=MappingProxyType({"head_dim": 128, "num_key_value_heads": 32, "tie_word_embeddings": False,
                                      "hidden_act": "silu", "max_position_embeddings": 32768}),
           keys=_keys("hidden_act", "head_dim", "attention_bias", *_QWEN_SLIDING)),
    Family(name="gemma3", model_type="gemma3_text", architecture="Gemma3ForCausalLM", one_plus_norm=True,
           sandwich_norms=True, qk_norm=True, qkv_bias="attention_bias", o_bias="attention_bias", mlp_bias=False,
           activation_key="hidden_activation", embedding_scale=True, rope_per_layer_type=True,
           sliding_windows="pattern", hidden_divisible_by_heads=True, nullable=frozenset(),
           defaults=MappingProxyType({"head_dim": 256, "num_key_value_heads": 4, "tie_word_embeddings": True,
                                      "hidden_activation": "gelu_pytorch_tanh", "max_position_embeddings": 131072,
                                      "sliding_window": 4096}),
           keys=_keys("hidden_activation", "head_dim", "attention_bias", "attn_logit_softcapping",
                      "final_logit_softcapping", "query_pre_attn_scalar", "layer_types", "sliding_window",
                      "sliding_window_pattern", "_sliding_window_pattern", "use_bidirectional_attention",
                      "rope_local_base_freq")),
)}
FAMILY_BY_NAME = {family.name: family for family in FAMILIES.values()}
SUPPORTED_ARCHITECTURES = tuple(sorted(family.architecture for family in FAMILIES.values()))

# Model types a user may reasonably try that neither plan nor run accepts, with the reason and what to do.
REJECTED_MODEL_TYPES = MappingProxyType({
    "mistral": "Mistral is not supported: its sliding-window attention on every layer is not mapped onto the "
               "decoder and no parity test covers it; a Mistral checkpoint without sliding_window has Llama's "
               "structure: convert its config to model_type \"llama\" (architectures [\"LlamaForCausalLM\"])",
    "gemma3": "the multimodal Gemma 3 (Gemma3ForConditionalGeneration) is not supported, only its text decoder: "
              "use the text_config part as a config of its own with model_type \"gemma3_text\" (architectures "
              "[\"Gemma3ForCausalLM\"]); a multimodal checkpoint's weights are not loaded",
})


def family_of(model_type: str) -> Family | None:
    return FAMILIES.get(model_type)

