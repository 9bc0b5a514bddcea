"""Model shapes without weights: the numbers sizing and work estimates need, read from config.json or a GGUF header.

The planner never loads a tensor. It reads a model's shape from (in order of what a `[models.<name>]` entry says):
- an inline HF-style `config = {...}` dict,
- `path` to a config .json file, or to a model directory holding `config.json`,
- `path` to a .gguf file (header only; needs the optional `gguf` package, imported lazily),
- `path` = a Hugging Face Hub id `owner/name` (+ optional `revision`): its config.json from the Hub cache, downloaded
  when missing (opdgraph.hub),
and `pkg:<package>/<file>` names a file inside an installed Python package (found with importlib, never imported).
`model_location` is the one rule, shared with the runtime, that turns a model `path` into a file or directory.

Supported families: those of opdgraph.families (llama, qwen2, qwen3, gemma3 text), the same table the runtime builds
from; every config is checked by opdgraph.model_config_check, the same check `run` makes, so a config `plan` accepts
is one `run` can build. `ModelShape.parameter_count` is the one place the parameter formula lives; it matches the
published counts (Qwen2.5-1.5B: 1,543,714,304; Qwen2.5-7B: 7,615,616,512).
"""

from __future__ import annotations

from opdgraph.errors import OpdgraphError

import importlib.util
import os

import attrs

from opdgraph.families import FAMILY_BY_NAME
from opdgraph.hub import hub_snapshot, looks_like_hub_id, snapshot_commit
from opdgraph.gguf_header import hf_config_from_gguf, open_gguf
from opdgraph.model_config_check import check_model_config, read_config_file


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
        # Sandwich norms (Gemma 3): pre- and post- norms around both attention and MLP; else two pre-norms.
        return 4 if FAMILY_BY_NAME[self.family].sandwich_norms else 2

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


def shape_from_hf_config(config: dict, source: str = "config") -> ModelShape:
    """Read a ModelShape from an HF-style config dict, checked and defaulted exactly as the runtime reads it."""
    family = check_model_config(config, source, ShapeError)
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
