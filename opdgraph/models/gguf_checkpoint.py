"""Read a llama-architecture GGUF file into an HF-style config dict and HF-named float32 tensors.

Quantised tensors are dequantised with the ``gguf`` package. llama.cpp's converter reorders the rows of q and k
inside each head (HF's rotate-half RoPE pairs dim i with i + D/2; llama.cpp pairs 2i with 2i + 1); we undo that so
the weights are the ones the HF checkpoint had. Only what this decoder can run is accepted; anything else (another
architecture, RoPE scaling stored as a rope_freqs tensor, partial rotary dims, unknown tensors) is an error.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from opdgraph.gguf_header import hf_config_from_gguf, hf_tensor_name, open_gguf
from opdgraph.models.errors import ModelLoadError


def undo_rope_permutation(weight: np.ndarray, num_heads: int) -> np.ndarray:
    """Inverse of llama.cpp's per-head row reorder of q/k projections ([heads * D, hidden] rows)."""
    rows = weight.shape[0]
    return weight.reshape(num_heads, rows // num_heads // 2, 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def special_token_ids(path: str | Path) -> dict[str, int]:
    """The file's own special-token ids, {"bos" | "eos" | "padding": id}, for the keys it has."""
    from gguf import GGUFReader

    fields = GGUFReader(str(path)).fields
    return {name: int(fields[f"tokenizer.ggml.{name}_token_id"].contents())
            for name in ("bos", "eos", "padding") if f"tokenizer.ggml.{name}_token_id" in fields}


def read_gguf_checkpoint(path: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(HF-style config dict, float32 tensors keyed by HF names) of a llama-architecture GGUF file."""
    import gguf

    where = str(path)
    reader = open_gguf(where, ModelLoadError)
    config = hf_config_from_gguf(reader, where, ModelLoadError)
    by_name = {tensor.name: tensor for tensor in reader.tensors}

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
        tensors[hf_tensor_name(name)] = torch.from_numpy(np.array(values, dtype=np.float32))  # owned, writable
    return config, tensors
