"""DecoderConfig: the one frozen record that describes a decoder of any supported family.

Loading turns an HF-style config dict (config.json, an inline dict, or one synthesised from GGUF metadata) into a
``DecoderConfig``. Per-family differences become a handful of explicit options (norm style, q/k norm, biases,
embedding scale, sandwich norms, activation, per-layer sliding windows and RoPE), read from the family table
(opdgraph.families) that the planner reads too. Everything a config of these families can switch on either maps onto
one of those options or is rejected with an error naming the key, by opdgraph.model_config_check (the check `plan`
makes too), so the layers never meet a setting they would silently ignore.

The dict is first normalised by the matching transformers config class (it fills defaults, converts legacy
``rope_theta``/``rope_scaling``/``rope_local_base_freq`` keys into ``rope_parameters`` and derives ``layer_types``),
so our reading of a config is the same as the one the reference implementation makes.
"""

from __future__ import annotations

from typing import Any

import attrs

from opdgraph.families import (FAMILIES, FULL_ATTENTION, LINEAR_ATTENTION, SLIDING_ATTENTION, SUPPORTED_ACTIVATIONS,
                               SUPPORTED_ROPE_TYPES)
from opdgraph.model_config_check import check_model_config, text_part
from opdgraph.models.errors import ModelLoadError


@attrs.frozen(kw_only=True)
class RopeSpec:
    """Rotary embedding parameters of one kind of layer (Gemma 3 has two kinds, the others one)."""

    rope_type: str = attrs.field()  # default | linear | llama3
    theta: float = attrs.field()  # base of the inverse frequencies
    factor: float = 1.0  # linear / llama3 scaling factor
    low_freq_factor: float = 1.0  # llama3 only
    high_freq_factor: float = 4.0  # llama3 only
    original_max_position_embeddings: int = 8192  # llama3 only


@attrs.frozen(kw_only=True, eq=False)
class DecoderConfig:
    """Shape and per-family options of one decoder; ``hf`` keeps the HF dict it was read from."""

    family: str = attrs.field()  # qwen2 | qwen3 | llama | gemma3 | qwen3_5
    vocab_size: int = attrs.field()
    hidden_size: int = attrs.field()
    intermediate_size: int = attrs.field()
    num_layers: int = attrs.field()
    num_heads: int = attrs.field()
    num_kv_heads: int = attrs.field()
    head_dim: int = attrs.field()
    rms_norm_eps: float = attrs.field()
    tie_word_embeddings: bool = attrs.field()
    qkv_bias: bool = attrs.field()  # bias on q/k/v projections
    o_bias: bool = attrs.field()  # bias on the attention output projection
    mlp_bias: bool = attrs.field()  # bias on gate/up/down projections
    qk_norm: bool = attrs.field()  # RMSNorm over head_dim on q and k before RoPE (Qwen3, Gemma 3)
    one_plus_norm: bool = attrs.field()  # Gemma: norm weight is stored as w and applied as (1 + w)
    sandwich_norms: bool = attrs.field()  # Gemma 3: extra norms after attention and after the MLP
    embedding_scale: float | None = attrs.field()  # Gemma: embeddings times sqrt(hidden), rounded to the model dtype
    activation: str = attrs.field()  # silu | gelu_tanh
    attention_scale: float = attrs.field()  # softmax scale
    layer_types: tuple[str, ...] = attrs.field()  # FULL_ATTENTION / SLIDING_ATTENTION / LINEAR_ATTENTION per layer
    sliding_window: int | None = attrs.field()  # a sliding layer sees the last sliding_window positions (itself too)
    rope: dict[str, RopeSpec] = attrs.field()  # layer type -> RoPE of that layer type
    initializer_range: float = attrs.field()
    hf: dict[str, Any] = attrs.field()  # the HF-style dict as given (pruning updates layer counts in a copy)
    # Qwen3.5: attention output x sigmoid(gate), RoPE on the first rotary_dim dims of each head (0: all), and the
    # gated-DeltaNet layers' heads, head widths and causal conv kernel.
    attention_output_gate: bool = False
    rotary_dim: int = 0
    linear_num_key_heads: int = 0
    linear_num_value_heads: int = 0
    linear_key_head_dim: int = 0
    linear_value_head_dim: int = 0
    linear_conv_kernel: int = 0

    @property
    def rope_dim(self) -> int:
        """The dims of a head RoPE rotates."""
        return self.rotary_dim or self.head_dim

    @property
    def has_linear_attention(self) -> bool:
        return LINEAR_ATTENTION in self.layer_types

    @property
    def architecture(self) -> str:
        return FAMILIES[self.hf["model_type"]].architecture


def normalize_hf_config(hf: dict[str, Any], where: str) -> dict[str, Any]:
    """The dict as transformers reads it: defaults filled in, legacy RoPE keys converted, layer_types derived.
    `hf` has passed check_model_config, the check `plan` makes too."""
    import transformers
    from huggingface_hub.errors import StrictDataclassError  # transformers 5's typed config validation

    try:
        return transformers.AutoConfig.for_model(**hf).to_dict()
    except (TypeError, ValueError, StrictDataclassError) as error:
        raise ModelLoadError(f"{where}: invalid {hf['model_type']} config: {error}") from error


def _reject_if(condition: bool, where: str, key: str, value: Any, why: str) -> None:
    if condition:
        raise ModelLoadError(f"{where}: config key {key!r} = {value!r} is not supported: {why}")


def _rope_spec(params: dict[str, Any], key: str, where: str, partial_allowed: bool = False) -> RopeSpec:
    rope_type = params.get("rope_type", "default")
    _reject_if(
        rope_type not in SUPPORTED_ROPE_TYPES, where, f"{key}.rope_type", rope_type,
        f"supported rope types are {', '.join(SUPPORTED_ROPE_TYPES)}",
    )
    partial = params.get("partial_rotary_factor", 1.0)
    _reject_if(partial != 1.0 and not partial_allowed, where, f"{key}.partial_rotary_factor", partial,
               "only full rotary dims are supported")
    spec = {"rope_type": rope_type, "theta": float(params["rope_theta"])}
    if rope_type in ("linear", "llama3"):
        spec["factor"] = float(params["factor"])
    if rope_type == "llama3":
        spec["low_freq_factor"] = float(params["low_freq_factor"])
        spec["high_freq_factor"] = float(params["high_freq_factor"])
        spec["original_max_position_embeddings"] = int(params["original_max_position_embeddings"])
    return RopeSpec(**spec)


def decoder_config_from_hf(hf: dict[str, Any], where: str = "config") -> DecoderConfig:
    """Read an HF-style config dict; ``where`` names its origin (a file path or 'inline config') in errors. The
    keys, types, sizes and unsupported options were checked by check_model_config (the same check `plan` makes);
    what is read here is the normalised dict, in the family's terms (opdgraph.families)."""
    family = check_model_config(hf, where, ModelLoadError)
    hf = text_part(hf)  # a multimodal checkpoint's text model (model_config_check.MULTIMODAL_WRAPPERS)
    norm = normalize_hf_config(hf, where)
    activation = norm[family.activation_key]

    num_layers = int(norm["num_hidden_layers"])
    layer_types = tuple(norm.get("layer_types") or [FULL_ATTENTION] * num_layers)
    _reject_if(len(layer_types) != num_layers, where, "layer_types", list(layer_types),
               f"needs one entry per layer (num_hidden_layers={num_layers})")
    kinds = (FULL_ATTENTION, LINEAR_ATTENTION) if family.linear_attention else (FULL_ATTENTION, SLIDING_ATTENTION)
    for layer_type in layer_types:
        _reject_if(layer_type not in kinds, where, "layer_types", layer_type,
                   f"layer types must be {kinds[0]!r} or {kinds[1]!r}")
    sliding_window = norm.get("sliding_window") if SLIDING_ATTENTION in layer_types else None
    _reject_if(SLIDING_ATTENTION in layer_types and not sliding_window, where, "sliding_window", sliding_window,
               "sliding layers need a positive window")

    rope_parameters = norm["rope_parameters"]
    if family.rope_per_layer_type:
        rope = {kind: _rope_spec(rope_parameters[kind], f"rope_parameters.{kind}", where)
                for kind in (FULL_ATTENTION, SLIDING_ATTENTION)}
    else:
        shared = _rope_spec(rope_parameters, "rope_parameters", where, family.partial_rotary)
        rope = {FULL_ATTENTION: shared, SLIDING_ATTENTION: shared}

    num_heads = int(norm["num_attention_heads"])
    head_dim = int(norm.get("head_dim") or norm["hidden_size"] // num_heads)
    hidden_size = int(norm["hidden_size"])
    hybrid = {}
    if family.linear_attention:
        rotary_dim = int(head_dim * rope_parameters.get("partial_rotary_factor", 1.0))
        hybrid = dict(attention_output_gate=family.attention_output_gate,
                      rotary_dim=rotary_dim if rotary_dim != head_dim else 0,
                      linear_num_key_heads=int(norm["linear_num_key_heads"]),
                      linear_num_value_heads=int(norm["linear_num_value_heads"]),
                      linear_key_head_dim=int(norm["linear_key_head_dim"]),
                      linear_value_head_dim=int(norm["linear_value_head_dim"]),
                      linear_conv_kernel=int(norm["linear_conv_kernel_dim"]))
    return DecoderConfig(
        family=family.name,
        vocab_size=int(norm["vocab_size"]),
        hidden_size=hidden_size,
        intermediate_size=int(norm["intermediate_size"]),
        num_layers=num_layers,
        num_heads=num_heads,
        num_kv_heads=int(norm.get("num_key_value_heads") or num_heads),
        head_dim=head_dim,
        rms_norm_eps=float(norm["rms_norm_eps"]),
        tie_word_embeddings=bool(norm["tie_word_embeddings"]),
        # One bias rule per family, read from its transformers modules (families.py): Qwen2 always has q/k/v bias
        # and never an o bias; Llama, Qwen3 and Gemma 3 follow attention_bias for all four; only Llama has mlp_bias.
        qkv_bias=family.flag(family.qkv_bias, norm),
        o_bias=family.flag(family.o_bias, norm),
        mlp_bias=family.flag(family.mlp_bias, norm),
        qk_norm=family.qk_norm,
        one_plus_norm=family.one_plus_norm,
        sandwich_norms=family.sandwich_norms,
        embedding_scale=hidden_size**0.5 if family.embedding_scale else None,
        activation=SUPPORTED_ACTIVATIONS[activation],
        # Gemma scales the softmax by query_pre_attn_scalar, the others by head_dim
        attention_scale=float(norm.get("query_pre_attn_scalar") or head_dim) ** -0.5,
        layer_types=layer_types,
        sliding_window=int(sliding_window) if sliding_window else None,
        rope=rope,
        initializer_range=float(norm.get("initializer_range") or 0.02),
        hf=dict(hf),
        **hybrid,
    )
