"""Read a llama-architecture GGUF file into an HF-style config dict and HF-named float32 tensors.

Quantised tensors are dequantised with the ``gguf`` package. llama.cpp's converter reorders the rows of q and k
inside each head (HF's rotate-half RoPE pairs dim i with i + D/2; llama.cpp pairs 2i with 2i + 1); we undo that so
the weights are the ones the HF checkpoint had. Only what this decoder can run is accepted; anything else (another
architecture, RoPE scaling stored as a rope_freqs tensor, partial rotary dims, unknown tensors) is an error.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np
import torch

from opdgraph.models.errors import ModelLoadError

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


def undo_rope_permutation(weight: np.ndarray, num_heads: int) -> np.ndarray:
    """Inverse of llama.cpp's per-head row reorder of q/k projections ([heads * D, hidden] rows)."""
    rows = weight.shape[0]
    return weight.reshape(num_heads, rows // num_heads // 2, 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def _read_fields(reader: Any) -> dict[str, Any]:
    values = {}
    for key, field in reader.fields.items():
        if key in ("tokenizer.ggml.tokens", "tokenizer.ggml.merges", "tokenizer.ggml.token_type",
                   "tokenizer.ggml.scores"):
            values[key] = len(field.data)  # only the count is needed here; transformers builds the tokenizer
            continue
        values[key] = field.contents()
    return values


def special_token_ids(path: str | Path) -> dict[str, int]:
    """The file's own special-token ids, {"bos" | "eos" | "padding": id}, for the keys it has."""
    from gguf import GGUFReader

    fields = GGUFReader(str(path)).fields
    return {name: int(fields[f"tokenizer.ggml.{name}_token_id"].contents())
            for name in ("bos", "eos", "padding") if f"tokenizer.ggml.{name}_token_id" in fields}


def _hf_config(fields: dict[str, Any], has_output: bool, embedding_rows: int, where: str) -> dict[str, Any]:
    arch = fields.get("general.architecture")
    if arch not in SUPPORTED_GGUF_ARCHITECTURES:
        raise ModelLoadError(f"{where}: unsupported GGUF architecture {arch!r}; supported: "
                             f"{', '.join(SUPPORTED_GGUF_ARCHITECTURES)} (loaded as LlamaForCausalLM)")

    def field(name: str, default: Any = None) -> Any:
        value = fields.get(f"{arch}.{name}", default)
        if value is None:
            raise ModelLoadError(f"{where}: GGUF metadata key {arch}.{name} is missing")
        return value

    num_heads = int(field("attention.head_count"))
    hidden = int(field("embedding_length"))
    head_dim = int(field("attention.key_length", hidden // num_heads))
    rotary_dims = int(field("rope.dimension_count", head_dim))
    if rotary_dims != head_dim:
        raise ModelLoadError(f"{where}: GGUF key {arch}.rope.dimension_count={rotary_dims} differs from head_dim="
                             f"{head_dim}; partial rotary embeddings are not supported")
    scaling_type = fields.get(f"{arch}.rope.scaling.type", "none")
    if scaling_type not in ("none", "linear"):
        raise ModelLoadError(f"{where}: GGUF key {arch}.rope.scaling.type={scaling_type!r} is not supported "
                             "(supported: none, linear)")
    config = {
        "model_type": "llama",
        "architectures": ["LlamaForCausalLM"],
        "vocab_size": int(fields.get(f"{arch}.vocab_size", embedding_rows)),
        "hidden_size": hidden,
        "intermediate_size": int(field("feed_forward_length")),
        "num_hidden_layers": int(field("block_count")),
        "num_attention_heads": num_heads,
        "num_key_value_heads": int(field("attention.head_count_kv", num_heads)),
        "head_dim": head_dim,
        "rms_norm_eps": float(field("attention.layer_norm_rms_epsilon")),
        "max_position_embeddings": int(field("context_length")),
        "rope_theta": float(field("rope.freq_base", 10000.0)),
        "tie_word_embeddings": not has_output,
        "hidden_act": "silu",
    }
    if scaling_type == "linear":
        config["rope_scaling"] = {"rope_type": "linear", "factor": float(field("rope.scaling.factor"))}
    for hf_key, gguf_key in (("bos_token_id", "bos_token_id"), ("eos_token_id", "eos_token_id"),
                             ("pad_token_id", "padding_token_id")):
        if f"tokenizer.ggml.{gguf_key}" in fields:
            config[hf_key] = int(fields[f"tokenizer.ggml.{gguf_key}"])
    return config


def _hf_tensor_name(gguf_name: str) -> str | None:
    if gguf_name.endswith(".weight") and gguf_name.removesuffix(".weight") in GLOBAL_TENSORS:
        return GLOBAL_TENSORS[gguf_name.removesuffix(".weight")] + ".weight"
    match = LAYER_TENSOR_NAME.fullmatch(gguf_name)
    if match and match.group(2) in LAYER_TENSORS:
        layer, kind, suffix = match.groups()
        return f"model.layers.{layer}.{LAYER_TENSORS[kind]}.{suffix}"
    return None


def read_gguf_checkpoint(path: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(HF-style config dict, float32 tensors keyed by HF names) of a llama-architecture GGUF file."""
    import gguf

    where = str(path)
    try:
        reader = gguf.GGUFReader(path)
    except (ValueError, OSError, KeyError) as error:
        raise ModelLoadError(f"{where}: not a readable GGUF file (corrupt or truncated?): {error}") from error
    fields = _read_fields(reader)
    by_name = {tensor.name: tensor for tensor in reader.tensors}
    if "rope_freqs.weight" in by_name:
        raise ModelLoadError(f"{where}: GGUF tensor rope_freqs.weight (llama3-style RoPE scaling) is not supported; "
                             "load the HF checkpoint directory instead")
    unknown = sorted(name for name in by_name if _hf_tensor_name(name) is None)
    if unknown:
        raise ModelLoadError(f"{where}: unexpected GGUF tensors for a llama model: {', '.join(unknown)}")
    if "token_embd.weight" not in by_name:
        raise ModelLoadError(f"{where}: GGUF tensor token_embd.weight is missing")
    config = _hf_config(fields, "output.weight" in by_name, int(by_name["token_embd.weight"].shape[-1]), where)

    tensors = {}
    for name, tensor in by_name.items():
        try:
            values = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
        except NotImplementedError as error:
            raise ModelLoadError(f"{where}: tensor {name}: {error}") from error
        values = np.asarray(values, dtype=np.float32).reshape([int(n) for n in reversed(tensor.shape)])
        if ".attn_q." in name:
            values = undo_rope_permutation(values, config["num_attention_heads"])
        elif ".attn_k." in name:
            values = undo_rope_permutation(values, config["num_key_value_heads"])
        tensors[_hf_tensor_name(name)] = torch.from_numpy(np.array(values, dtype=np.float32))  # owned, writable
    return config, tensors
