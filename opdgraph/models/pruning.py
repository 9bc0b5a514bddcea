"""prune_layers: a copy of a decoder keeping a chosen subset of its layers, used to initialise a student from a
teacher. The copy owns fresh tensors (training the student never touches the teacher) and its config, HF dict
included, describes the smaller model so it saves and reloads as such.
"""

from __future__ import annotations

import attrs
import torch

from opdgraph.models.config import SLIDING_ATTENTION
from opdgraph.models.decoder import DecoderLM


def prune_layers(model: DecoderLM, keep_layers: list[int]) -> DecoderLM:
    """A new DecoderLM with layers `keep_layers` (in that order) of `model`; embeddings, norms, head are copied."""
    num_layers = model.config.num_layers
    bad = [index for index in keep_layers if not 0 <= index < num_layers]
    if not keep_layers or bad or len(set(keep_layers)) != len(keep_layers):
        raise ValueError(f"keep_layers={keep_layers} must be a non-empty list of distinct layer indices in "
                         f"0..{num_layers - 1}")
    layer_types = tuple(model.config.layer_types[index] for index in keep_layers)
    hf = dict(model.config.hf)
    hf["num_hidden_layers"] = len(keep_layers)
    # The sliding pattern of Gemma 3 and Qwen (sliding_window_pattern / max_window_layers) is positional; after
    # pruning only an explicit list still says which kept layer slides.
    if model.config.family != "llama":
        hf["layer_types"] = list(layer_types)
    if SLIDING_ATTENTION in layer_types and model.config.family in ("qwen2", "qwen3"):
        hf["use_sliding_window"] = True
    config = attrs.evolve(model.config, num_layers=len(keep_layers), layer_types=layer_types, hf=hf)

    new_index = {old: new for new, old in enumerate(keep_layers)}
    state = {}
    for name, tensor in model.state_dict().items():
        if name.startswith("layers."):
            _, old, rest = name.split(".", 2)
            if int(old) not in new_index:
                continue
            name = f"layers.{new_index[int(old)]}.{rest}"
        state[name] = tensor.detach().clone()
    with torch.device("meta"):
        pruned = DecoderLM(config)
    pruned.load_state_dict(state, assign=True, strict=True)
    pruned.set_attention_backend(model.backend)
    return pruned
