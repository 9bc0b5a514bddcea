"""The supported model families, in one torch-free table that the planner and the runtime both read.

For each family: its HF `model_type` and causal-LM architecture name, the structural rules the decoder follows
(plain or (1 + w) RMSNorm, sandwich norms, q/k norm, which projections carry a bias, the activation key, embedding
scale, tied-embedding default, one RoPE or one per layer type, how sliding-window layers are chosen, and for the
hybrid Qwen3.5 its gated-DeltaNet linear-attention layers, gated attention output and partial RoPE), the defaults
transformers fills in when a key is absent, and every HF config key a config of the family may hold. A multimodal
checkpoint whose text model is a family (Qwen3.5's qwen3_5) is a MultimodalWrapper: its text config and text weights
are read, its vision tower ignored.

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
LINEAR_ATTENTION = "linear_attention"  # a gated-DeltaNet layer (Qwen3.5): recurrent state, no KV cache
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")
SUPPORTED_ACTIVATIONS = MappingProxyType({"silu": "silu", "gelu_pytorch_tanh": "gelu_tanh"})  # HF name -> ours


@attrs.frozen(kw_only=True)
class Family:
    """One decoder family. A bias rule is True / False, or the name of the config key that switches it."""

    name: str  # llama | qwen2 | qwen3 | gemma3 | qwen3_5
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
    # Hybrid families (Qwen3.5): gated-DeltaNet linear-attention layers between full-attention ones, chosen by
    # layer_types, else every full_attention_interval-th layer is full; sized by the linear_* keys.
    linear_attention: bool = False
    attention_output_gate: bool = False  # q_proj also yields a per-channel gate: attention out x sigmoid(gate)
    partial_rotary: bool = False  # RoPE may rotate only the first partial_rotary_factor of head_dim
    ignored: frozenset[str] = frozenset()  # family keys that change nothing we build (listed like IGNORED_KEYS)

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

    def layer_types(self, config: dict) -> tuple[str, ...]:
        """Per layer FULL / SLIDING / LINEAR_ATTENTION as the decoder builds it (transformers' rules, which derive
        the normalised config's layer_types the runtime reads; tests/test_families.py compares): layer_types where
        the config has them, else by the family's rule: hybrid families' every full_attention_interval-th layer
        (1-based) is full, the rest linear; Gemma 3's every sliding_window_pattern-th (default 6) is full, the rest
        sliding; Qwen2/3's layers from max_window_layers (default 28) on slide when use_sliding_window is set and
        sliding_window (default 4096) is not null. They decide the attention windows (flashinfer's wrappers) and
        the RoPE tables a forward builds."""
        layers = config["num_hidden_layers"]
        if config.get("layer_types") is not None:
            return tuple(config["layer_types"])
        if self.linear_attention:
            interval = self.default("full_attention_interval", config)
            return tuple(FULL_ATTENTION if (index + 1) % interval == 0 else LINEAR_ATTENTION
                         for index in range(layers))
        if self.sliding_windows == "pattern":
            pattern = config.get("sliding_window_pattern", 6)
            return tuple(SLIDING_ATTENTION if (index + 1) % pattern else FULL_ATTENTION for index in range(layers))
        if self.sliding_windows == "max_window_layers" and config.get("use_sliding_window", False) \
                and config.get("sliding_window", 4096) is not None:
            first = config.get("max_window_layers", 28)
            return tuple(SLIDING_ATTENTION if index >= first else FULL_ATTENTION for index in range(layers))
        return (FULL_ATTENTION,) * layers

    def rotary_fraction(self, config: dict) -> float:
        """The part of head_dim RoPE rotates: partial_rotary_factor inside rope_parameters, else the top-level key
        (transformers moves it there), else the family's default (1: all of it)."""
        rope = config.get("rope_parameters")
        if isinstance(rope, dict) and "partial_rotary_factor" in rope:
            return rope["partial_rotary_factor"]
        return config.get("partial_rotary_factor", self.defaults.get("partial_rotary_factor", 1.0))


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
QWEN3_5_TEXT = "qwen3_5_text"
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
_QWEN3_5_LINEAR = ("linear_conv_kernel_dim", "linear_key_head_dim", "linear_value_head_dim", "linear_num_key_heads",
                   "linear_num_value_heads")
# Keys of published Qwen3.5 text configs that change nothing we build: the multi-token-prediction head (mtp.* tensors,
# not loaded) and the dtype inference engines keep the recurrent state in (ours keeps it in float32).
_QWEN3_5_IGNORED = frozenset({"mtp_num_hidden_layers", "mtp_use_dedicated_embeddings", "mamba_ssm_dtype"})
FAMILIES[QWEN3_5_TEXT] = Family(
    name="qwen3_5", model_type=QWEN3_5_TEXT, architecture="Qwen3_5ForCausalLM", one_plus_norm=True,
    sandwich_norms=False, qk_norm=True, qkv_bias="attention_bias", o_bias="attention_bias", mlp_bias=False,
    activation_key="hidden_act", embedding_scale=False, rope_per_layer_type=False, sliding_windows="none",
    hidden_divisible_by_heads=False, nullable=frozenset(), linear_attention=True, attention_output_gate=True,
    partial_rotary=True, ignored=_QWEN3_5_IGNORED,
    defaults=MappingProxyType({"head_dim": 256, "num_key_value_heads": 4, "tie_word_embeddings": False,
                               "hidden_act": "silu", "max_position_embeddings": 32768, "partial_rotary_factor": 0.25,
                               "full_attention_interval": 4, "linear_conv_kernel_dim": 4, "linear_key_head_dim": 128,
                               "linear_value_head_dim": 128, "linear_num_key_heads": 16,
                               "linear_num_value_heads": 32}),
    keys=_keys("hidden_act", "head_dim", "attention_bias", "layer_types", "full_attention_interval",
               "attn_output_gate", "mlp_only_layers", *_QWEN3_5_LINEAR, *_QWEN3_5_IGNORED))
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
    "qwen3_5_moe": "Qwen3.5 MoE is not supported, only the dense Qwen3.5 text models (model_type "
                   "\"qwen3_5_text\", or a \"qwen3_5\" checkpoint, whose text model is loaded)",
    "qwen3_5_moe_text": "Qwen3.5 MoE is not supported, only the dense Qwen3.5 text models (model_type "
                        "\"qwen3_5_text\")",
})


@attrs.frozen(kw_only=True)
class MultimodalWrapper:
    """A multimodal checkpoint whose text model is one of the families: its config nests the text config, its
    weights the text model under a prefix; the vision tower (and its config) is ignored with a note."""

    model_type: str
    architecture: str
    text_model_type: str  # the family the text config is read as
    text_key: str  # where the text config sits
    text_weight_prefix: str  # checkpoint prefix of the text model's tensors (model.<this>.layers.0...)
    ignored_weight_prefixes: tuple[str, ...]  # the vision tower and multi-token-prediction head: not loaded
    keys: frozenset[str]  # every top-level key the wrapper's config may hold


MULTIMODAL_WRAPPERS = {wrapper.model_type: wrapper for wrapper in (
    MultimodalWrapper(model_type="qwen3_5", architecture="Qwen3_5ForConditionalGeneration",
                      text_model_type=QWEN3_5_TEXT, text_key="text_config",
                      text_weight_prefix="model.language_model.", ignored_weight_prefixes=("model.visual.", "mtp."),
                      keys=frozenset({"model_type", "architectures", "text_config", "vision_config", "image_token_id",
                                      "video_token_id", "vision_start_token_id", "vision_end_token_id",
                                      "tie_word_embeddings"}) | IGNORED_KEYS),
)}


def family_of(model_type: str) -> Family | None:
    return FAMILIES.get(model_type)

