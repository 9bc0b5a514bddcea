"""A GGUF file's header -> the HF-style config dict the decoder is built from; shared by `plan` and `run`.

The planner (model_shapes) and the loader (models.gguf_checkpoint) both read a GGUF model through
`hf_config_from_gguf`, so they accept the same files and see the same shape: only the llama architecture, with
every tensor name mapped onto an HF name, no rope_freqs tensor (llama3-style RoPE scaling) and no partial rotary
dims. Only the header is read (tensors are memory-mapped, never touched). The result is checked like any other model
config (opdgraph.model_config_check). Torch-free; the optional `gguf` package is imported lazily.
"""

from __future__ import annotations

import re
from typing import Any

from opdgraph.model_config_check import check_model_config

SUPPORTED_GGUF_ARCHITECTURES = ("llama",)
LAYER_TENSORS = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
GLOBAL_TENSORS = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
LAYER_TENSOR_NAME = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)")
COUNTED_ARRAYS = ("tokenizer.ggml.tokens", "tokenizer.ggml.merges", "tokenizer.ggml.token_type",
                  "tokenizer.ggml.scores")


def hf_tensor_name(gguf_name: str) -> str | None:
    """The HF name of a GGUF tensor of a llama model, or None when it has none."""
    if gguf_name.endswith(".weight") and gguf_name.removesuffix(".weight") in GLOBAL_TENSORS:
        return GLOBAL_TENSORS[gguf_name.removesuffix(".weight")] + ".weight"
    match = LAYER_TENSOR_NAME.fullmatch(gguf_name)
    if match and match.group(2) in LAYER_TENSORS:
        layer, kind, suffix = match.groups()
        return f"model.layers.{layer}.{LAYER_TENSORS[kind]}.{suffix}"
    return None


def open_gguf(path: str, error: type[Exception]):
    """A gguf.GGUFReader of `path`; a file that does not parse raises `error` naming it."""
    try:
        import gguf  # optional and torch-free; only GGUF paths need it
    except ImportError:
        raise error(f"{path}: reading a GGUF file needs the 'gguf' package (pip install gguf)") from None
    try:
        return gguf.GGUFReader(str(path))
    except Exception as problem:  # any parse failure of these bytes means the file is not a usable GGUF
        raise error(f"{path}: not a readable GGUF file (corrupt, truncated or not GGUF?): "
                    f"{type(problem).__name__}: {problem}") from None


def read_fields(reader) -> dict[str, Any]:
    """Header key -> value (the tokenizer's long arrays by their length only; transformers reads them itself)."""
    return {key: len(field.data) if key in COUNTED_ARRAYS else field.contents()
            for key, field in reader.fields.items()}


def hf_config_from_gguf(reader, where: str, error: type[Exception]) -> dict[str, Any]:
    """The HF-style config of a llama GGUF (raises `error` for anything the decoder cannot load)."""
    fields = read_fields(reader)
    by_name = {tensor.name: tensor for tensor in reader.tensors}
    arch = fields.get("general.architecture")
    if arch not in SUPPORTED_GGUF_ARCHITECTURES:
        raise error(f"{where}: unsupported GGUF architecture {arch!r}; supported: "
                    f"{', '.join(SUPPORTED_GGUF_ARCHITECTURES)} (loaded as LlamaForCausalLM); for other families "
                    f"use the HF checkpoint directory")
    if "rope_freqs.weight" in by_name:
        raise error(f"{where}: GGUF tensor rope_freqs.weight (llama3-style RoPE scaling) is not supported; load the "
                    "HF checkpoint directory instead")
    unknown = sorted(name for name in by_name if hf_tensor_name(name) is None)
    if unknown:
        raise error(f"{where}: unexpected GGUF tensors for a llama model: {', '.join(unknown)}")
    if "token_embd.weight" not in by_name:
        raise error(f"{where}: GGUF tensor token_embd.weight is missing")

    def field(name: str, default: Any = None, kind=int) -> Any:
        value = fields.get(f"{arch}.{name}", default)
        if value is None:
            raise error(f"{where}: GGUF metadata key {arch}.{name} is missing")
        try:
            return kind(value)
        except (TypeError, ValueError):
            raise error(f"{where}: GGUF metadata key {arch}.{name} = {value!r} is not a number") from None

    num_heads = field("attention.head_count")
    hidden = field("embedding_length")
    head_dim = field("attention.key_length", hidden // num_heads if num_heads > 0 else 0)
    rotary_dims = field("rope.dimension_count", head_dim)
    if rotary_dims != head_dim:
        raise error(f"{where}: GGUF key {arch}.rope.dimension_count={rotary_dims} differs from head_dim={head_dim}; "
                    "partial rotary embeddings are not supported")
    scaling_type = fields.get(f"{arch}.rope.scaling.type", "none")
    if scaling_type not in ("none", "linear"):
        raise error(f"{where}: GGUF key {arch}.rope.scaling.type={scaling_type!r} is not supported "
                    "(supported: none, linear)")
    config = {
        "model_type": "llama",
        "architectures": ["LlamaForCausalLM"],
        "vocab_size": field("vocab_size", int(by_name["token_embd.weight"].shape[-1])),
        "hidden_size": hidden,
        "intermediate_size": field("feed_forward_length"),
        "num_hidden_layers": field("block_count"),
        "num_attention_heads": num_heads,
        "num_key_value_heads": field("attention.head_count_kv", num_heads),
        "head_dim": head_dim,
        "rms_norm_eps": field("attention.layer_norm_rms_epsilon", kind=float),
        "max_position_embeddings": field("context_length"),
        "rope_theta": field("rope.freq_base", 10000.0, kind=float),
        "tie_word_embeddings": "output.weight" not in by_name,
        "hidden_act": "silu",
    }
    if scaling_type == "linear":
        config["rope_scaling"] = {"rope_type": "linear", "factor": field("rope.scaling.factor", kind=float)}
    for hf_key, gguf_key in (("bos_token_id", "bos_token_id"), ("eos_token_id", "eos_token_id"),
                             ("pad_token_id", "padding_token_id")):
        if f"tokenizer.ggml.{gguf_key}" in fields:
            config[hf_key] = int(fields[f"tokenizer.ggml.{gguf_key}"])
    check_model_config(config, where, error)  # before any tensor is read: sizes, heads, ...
    return config
