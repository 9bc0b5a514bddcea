"""Model shapes without weights: the numbers sizing and work estimates need, read from config.json or a GGUF header.

The planner never loads a tensor. It reads a model's shape from (in order of what a `[models.<name>]` entry says):
- an inline HF-style `config = {...}` dict,
- `path` to a config .json file, or to a model directory holding `config.json`,
- `path` to a .gguf file (header only; needs the optional `gguf` package, imported lazily),
- `path` = a Hugging Face Hub id `owner/name` (+ optional `revision`): its config.json from the Hub cache, downloaded
  when missing (opdgraph.hub),
and `pkg:<package>/<file>` names a file inside an installed Python package (found with importlib, never imported).
`model_location` is the one rule, shared with the runtime, that turns a model `path` into a file or directory.

Supported families: those of opdgraph.families (llama, qwen2, qwen3, gemma3 text, qwen3_5 text), the same table the
runtime builds from; every config is checked by opdgraph.model_config_check, the same check `run` makes, so a config
`plan` accepts is one `run` can build. `ModelShape.parameter_count` is the one place the parameter formula lives; it
matches the published counts (Qwen2.5-1.5B: 1,543,714,304; Qwen2.5-7B: 7,615,616,512) and transformers' Qwen3.5 models.
"""

from __future__ import annotations

from opdgraph.errors import OpdgraphError

import importlib.util
import os

import attrs

from opdgraph.families import FAMILY_BY_NAME, FULL_ATTENTION, LINEAR_ATTENTION, SLIDING_ATTENTION
from opdgraph.hub import hub_snapshot, looks_like_hub_id, snapshot_commit
from opdgraph.gguf_header import hf_config_from_gguf, open_gguf
from opdgraph.model_config_check import check_model_config, read_config_file, text_part

# Fields only a hybrid (linear-attention) family sets; left out of facts() otherwise, so other families' plans keep
# exactly the facts they had.
HYBRID_FIELDS = ("layer_types", "linear_key_heads", "linear_value_heads", "linear_key_head_dim",
                 "linear_value_head_dim", "conv_kernel", "output_gate", "rotary_dim")


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
    # The kind of every layer (families.Family.layer_types; empty: unknown, all full attention but for Gemma 3's
    # two kinds). Hybrid families (Qwen3.5): the gated-DeltaNet layers' heads and widths, the attention output
    # gate, and how many dims of head_dim RoPE rotates (0: all).
    layer_types: tuple[str, ...] = ()
    linear_key_heads: int = 0
    linear_value_heads: int = 0
    linear_key_head_dim: int = 0
    linear_value_head_dim: int = 0
    conv_kernel: int = 0
    output_gate: bool = False
    rotary_dim: int = 0

    @property
    def linear_layers(self) -> int:
        """Gated-DeltaNet layers: a recurrent state per sequence, no KV cache."""
        return sum(kind == LINEAR_ATTENTION for kind in self.layer_types)

    @property
    def attention_kinds(self) -> frozenset[str]:
        """The softmax-attention kinds of the layers (full, sliding): one attention window and one RoPE each."""
        if not self.layer_types:
            return frozenset({FULL_ATTENTION, SLIDING_ATTENTION} if self.family == "gemma3" else {FULL_ATTENTION})
        return frozenset(self.layer_types) - {LINEAR_ATTENTION}

    @property
    def attention_layers(self) -> int:
        """Layers with softmax attention over a KV cache."""
        return self.layers - self.linear_layers

    @property
    def linear_key_dim(self) -> int:
        return self.linear_key_heads * self.linear_key_head_dim

    @property
    def linear_value_dim(self) -> int:
        return self.linear_value_heads * self.linear_value_head_dim

    @property
    def conv_dim(self) -> int:
        """Channels of the causal conv1d over q, k and v of a linear-attention layer."""
        return 2 * self.linear_key_dim + self.linear_value_dim

    @property
    def q_dim(self) -> int:
        return self.heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * self.head_dim

    @property
    def norms_per_layer(self) -> int:
        # Sandwich norms (Gemma 3): pre- and post- norms around both attention and MLP; else two pre-norms.
        return 4 if FAMILY_BY_NAME[self.family].sandwich_norms else 2

    def layer_linear_parameters(self) -> int:
        """Matmul weights of one full-attention layer: q (with the output gate: 2 q), k, v, o projections and the
        gated MLP (gate, up, down)."""
        q_out = self.q_dim * (2 if self.output_gate else 1)
        attention = self.hidden * (q_out + 2 * self.kv_dim) + self.q_dim * self.hidden
        return attention + 3 * self.hidden * self.intermediate

    def linear_layer_linear_parameters(self) -> int:
        """Matmul weights of one gated-DeltaNet layer: in_proj_qkv, in_proj_z, in_proj_b, in_proj_a, out_proj and the
        gated MLP."""
        projections = self.hidden * (self.conv_dim + self.linear_value_dim + 2 * self.linear_value_heads)
        return projections + self.linear_value_dim * self.hidden + 3 * self.hidden * self.intermediate

    def _full_layer_parameters(self) -> int:
        q_out = self.q_dim * (2 if self.output_gate else 1)
        biases = (q_out + 2 * self.kv_dim) * self.qkv_bias + self.hidden * self.o_bias
        biases += (2 * self.intermediate + self.hidden) * self.mlp_bias
        norms = self.norms_per_layer * self.hidden + (2 * self.head_dim if self.qk_norm else 0)
        return self.layer_linear_parameters() + biases + norms

    def _linear_layer_parameters(self) -> int:
        """+ the depthwise conv (conv_dim x kernel), dt_bias and A_log (one per value head), the gated norm (value
        head dim), the MLP's biases and the layer's two norms."""
        extra = self.conv_dim * self.conv_kernel + 2 * self.linear_value_heads + self.linear_value_head_dim
        biases = (2 * self.intermediate + self.hidden) * self.mlp_bias
        return self.linear_layer_linear_parameters() + extra + biases + self.norms_per_layer * self.hidden

    def all_layer_parameters(self) -> int:
        """The parameters of all layers together."""
        return (self.attention_layers * self._full_layer_parameters()
                + self.linear_layers * self._linear_layer_parameters())

    def layer_parameters(self) -> int:
        """All parameters of one layer: linear weights + biases + norm weights. A hybrid family's layers differ: the
        mean rounded up, so that layers x this stays within `layers` parameters of all_layer_parameters() (the
        root = P - L x layer of FSDP's units); largest_layer_parameters() is the one to stream."""
        return -(-self.all_layer_parameters() // self.layers)

    def largest_layer_parameters(self) -> int:
        kinds = [self._full_layer_parameters()] * bool(self.attention_layers)
        return max(kinds + [self._linear_layer_parameters()] * bool(self.linear_layers))

    def parameter_count(self) -> int:
        """embedding V*h + all layers + final norm h + (untied) lm_head V*h."""
        embedding = self.vocab * self.hidden
        lm_head = 0 if self.tied else self.vocab * self.hidden
        return embedding + self.all_layer_parameters() + self.hidden + lm_head

    def trunk_matmul_parameters(self) -> int:
        """Weights multiplied per token by the layers (the 'N' of 2N FLOPs per token, without the lm_head)."""
        return (self.attention_layers * self.layer_linear_parameters()
                + self.linear_layers * self.linear_layer_linear_parameters())

    def kv_bytes_per_token(self, dtype_bytes: int) -> int:
        """K and V of every attention layer for one token: layers * 2 * kv_heads * head_dim * dtype bytes (a
        linear-attention layer keeps a fixed-size state instead: recurrent_state_bytes_per_sequence)."""
        return self.attention_layers * 2 * self.kv_dim * dtype_bytes

    def recurrent_state_bytes_per_sequence(self, dtype_bytes: int) -> int:
        """What each linear-attention layer keeps per sequence slot in rollout: the conv window (kernel - 1 past
        inputs of conv_dim channels, model dtype) and the delta rule's state (value heads x key dim x value dim,
        float32). 0 for other families."""
        window = (self.conv_kernel - 1) * self.conv_dim * dtype_bytes
        state = self.linear_value_heads * self.linear_key_head_dim * self.linear_value_head_dim * 4
        return self.linear_layers * (window + state)

    def keep(self, layers: list[int]) -> "ModelShape":
        """The shape of a model pruned to these layers (init_from + keep_layers), their kinds kept."""
        kinds = tuple(self.layer_types[index] for index in layers) if self.layer_types else ()
        return attrs.evolve(self, layers=len(layers), layer_types=kinds)

    def facts(self) -> dict:
        """Flat description for plan facts and rendering (a hybrid family adds its linear-attention numbers)."""
        facts = attrs.asdict(self)
        del facts["layer_types"]
        if not self.linear_layers:
            facts = {key: value for key, value in facts.items() if key not in HYBRID_FIELDS}
        else:
            facts["linear_attention_layers"] = self.linear_layers
        return {**facts, "parameters": self.parameter_count()}


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


def shape_from_hf_config(config: dict, source: str = "config") -> ModelShape:
    """Read a ModelShape from an HF-style config dict, checked and defaulted exactly as the runtime reads it (a
    multimodal checkpoint's config: its text model's)."""
    family = check_model_config(config, source, ShapeError)
    config = text_part(config)
    hybrid = {}
    if family.linear_attention:
        head_dim = family.default("head_dim", config)
        hybrid = dict(linear_key_heads=family.default("linear_num_key_heads", config),
                      linear_value_heads=family.default("linear_num_value_heads", config),
                      linear_key_head_dim=family.default("linear_key_head_dim", config),
                      linear_value_head_dim=family.default("linear_value_head_dim", config),
                      conv_kernel=family.default("linear_conv_kernel_dim", config),
                      output_gate=family.attention_output_gate,
                      rotary_dim=int(head_dim * family.rotary_fraction(config)))
    return ModelShape(
        family=family.name,
        layers=config["num_hidden_layers"],
        hidden=config["hidden_size"],
        intermediate=config["intermediate_size"],
        heads=config["num_attention_heads"],
        kv_heads=family.default("num_key_value_heads", config),
        head_dim=family.default("head_dim", config),
        vocab=config["vocab_size"],
        tied=family.default("tie_word_embeddings", config),
        qkv_bias=family.flag(family.qkv_bias, config),
        o_bias=family.flag(family.o_bias, config),
        mlp_bias=family.flag(family.mlp_bias, config),
        qk_norm=family.qk_norm,
        max_positions=family.default("max_position_embeddings", config),
        layer_types=family.layer_types(config),
        **hybrid,
    )


def shape_from_gguf(path: str) -> ModelShape:
    """Read a ModelShape from a GGUF file's header (the tensors are memory-mapped, not read)."""
    return shape_from_hf_config(hf_config_from_gguf(open_gguf(path, ShapeError), path, ShapeError), path)


def model_location(path: str, base_dir: str, revision: str | None, files: str, error: type[Exception]) -> str:
    """A model `path` -> the file or directory to read, for plan and run alike. A path is a Hub id only when it
    does not exist locally (relative to base_dir), has the form owner/name and is not pkg:, .gguf or .json; its
    snapshot folder then holds `files` ("config", "tokenizer" or "weights", opdgraph.hub). `revision` is for Hub
    ids only."""
    real = resolve_path(path, base_dir)
    # A first folder that exists locally means a local path (a checkpoint not written yet, a typo): never the Hub.
    local_parent = os.path.isdir(os.path.join(base_dir, os.path.expanduser(path).split("/")[0]))
    if not path.startswith("pkg:") and not os.path.exists(real) and not local_parent and looks_like_hub_id(path):
        return hub_snapshot(path, revision, files, error, local=real)
    if revision is not None:
        found = "exists locally" if os.path.exists(real) else "is not of the Hub id form owner/name"
        raise error(f"revision = {revision!r} is set but path {path!r} {found} ({real}); revision applies to Hub "
                    "ids only: remove it, or name the model by its Hub id")
    return real


def hub_commit(path: str | None, base_dir: str, revision: str | None) -> str | None:
    """The commit a Hub-id model resolved to (None for local paths and inline configs)."""
    if path is None:
        return None
    return snapshot_commit(model_location(path, base_dir, revision, "config", ShapeError))


def shape_from_path(path: str, base_dir: str, revision: str | None = None) -> ModelShape:
    """A model `path` (config .json, model directory, .gguf, pkg:..., or Hub id) -> its ModelShape."""
    real = model_location(path, base_dir, revision, "config", ShapeError)
    if path.endswith(".gguf"):
        if not os.path.isfile(real):
            raise ShapeError(f"GGUF file not found: {path!r} (looked at {real})")
        return shape_from_gguf(real)
    config_file = os.path.join(real, "config.json") if os.path.isdir(real) else real
    if not os.path.isfile(config_file):
        raise ShapeError(f"no config.json at {path!r} (relative paths start at the pipeline file's directory; a "
                         f"Hub id such as Qwen/Qwen3-1.7B is one owner/name, looked up when no such local path exists)")
    return shape_from_hf_config(read_config_file(config_file, ShapeError), config_file)
