"""Checkpoint IO in Hugging Face format: read safetensors (single file or sharded), validate names and shapes, save.

Our parameter names are HF names without the leading ``model.`` (``lm_head.weight`` keeps its name), so mapping is
one prefix. Loading checks the whole set at once and reports every missing, unexpected and mis-shaped tensor in one
error. A saved directory (config.json + model.safetensors [+ tokenizer files]) loads back in
``transformers.AutoModelForCausalLM.from_pretrained`` with identical logits.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from opdgraph.models.errors import ModelLoadError

SINGLE_FILE = "model.safetensors"
SHARD_INDEX = "model.safetensors.index.json"
# Derived buffers some older checkpoints carry; they hold nothing the config does not already determine.
DERIVED_SUFFIXES = ("rotary_emb.inv_freq",)


def hf_name(our_name: str) -> str:
    return our_name if our_name.startswith("lm_head.") else f"model.{our_name}"


def our_name(name_in_checkpoint: str) -> str:
    return name_in_checkpoint.removeprefix("model.")


def read_safetensors_dir(directory: Path) -> dict[str, torch.Tensor]:
    """All tensors of an HF model directory, keyed by their HF names."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    index_path, single_path = directory / SHARD_INDEX, directory / SINGLE_FILE
    if index_path.exists():
        try:
            weight_map = json.loads(index_path.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as error:
            raise ModelLoadError(f"{index_path}: not a valid shard index (needs a 'weight_map' object): {error}")
        shard_files = sorted(set(weight_map.values()))
        missing = [name for name in shard_files if not (directory / name).exists()]
        if missing:
            raise ModelLoadError(f"{index_path}: shard file(s) listed in weight_map are missing: {', '.join(missing)}")
    elif single_path.exists():
        shard_files, weight_map = [SINGLE_FILE], None
    else:
        found = sorted(path.name for path in directory.iterdir())
        raise ModelLoadError(
            f"{directory}: no {SINGLE_FILE} or {SHARD_INDEX} (only safetensors checkpoints are supported); "
            f"found: {', '.join(found) or 'nothing'}"
        )

    tensors: dict[str, torch.Tensor] = {}
    for shard in shard_files:
        try:
            shard_tensors = load_file(directory / shard)
        except (SafetensorError, OSError, ValueError) as error:
            raise ModelLoadError(f"{directory / shard}: cannot read safetensors file (corrupt or truncated?): "
                                 f"{error}") from error
        if weight_map is not None:
            strays = sorted(name for name in shard_tensors if weight_map.get(name) != shard)
            if strays:
                raise ModelLoadError(f"{directory / shard}: tensors not assigned to this shard by {SHARD_INDEX}: "
                                     f"{', '.join(strays)}")
        tensors.update(shard_tensors)
    if weight_map is not None:
        absent = sorted(set(weight_map) - set(tensors))
        if absent:
            raise ModelLoadError(f"{index_path}: tensors listed in weight_map but absent from their shards: "
                                 f"{', '.join(absent)}")
    return tensors


def text_model_tensors(tensors: dict[str, torch.Tensor], hf_config: dict, where: str) -> dict[str, torch.Tensor]:
    """The tensors of the text model we build. A multimodal checkpoint (families.MULTIMODAL_WRAPPERS: Qwen3.5) keeps
    its text model under a prefix (model.language_model.) and a vision tower and multi-token-prediction head beside
    it: the prefix is mapped to ours and the others are left out, with a note. A text-only Qwen3.5 checkpoint may
    carry the mtp.* head too (transformers' causal LM skips it as well)."""
    from opdgraph.model_config_check import multimodal_wrapper

    wrapper = multimodal_wrapper(hf_config)
    if wrapper is None and hf_config.get("model_type") != "qwen3_5_text":
        return tensors
    ignored_prefixes = wrapper.ignored_weight_prefixes if wrapper is not None else ("mtp.",)
    kept, ignored = {}, []
    for name, tensor in tensors.items():
        if name.startswith(ignored_prefixes):
            ignored.append(name)
        elif wrapper is not None and name.startswith(wrapper.text_weight_prefix):
            kept["model." + name[len(wrapper.text_weight_prefix):]] = tensor
        else:
            kept[name] = tensor
    if wrapper is not None or ignored:
        parts = sorted({name.split(".")[0] + "." + name.split(".")[1] if name.startswith("model.") else
                        name.split(".")[0] for name in ignored})
        what = f"a multimodal {wrapper.model_type} checkpoint: its text model is loaded; " if wrapper else ""
        names = ", ".join(f"{part}*" for part in parts) or "none"
        print(f"note: {where}: {what}{len(ignored)} tensors ({names}: the vision tower and the multi-token-prediction "
              f"head) are not loaded")
    return kept


def state_dict_from_checkpoint(model: torch.nn.Module, tensors: dict[str, torch.Tensor], where: str,
                               dtype: torch.dtype, device: torch.device | str) -> dict[str, torch.Tensor]:
    """Validate checkpoint tensors (HF names) against the model and return them as our state dict in dtype/device."""
    expected = {hf_name(name): parameter.shape for name, parameter in model.state_dict().items()}
    tensors = {name: tensor for name, tensor in tensors.items() if not name.endswith(DERIVED_SUFFIXES)}
    if model.config.tie_word_embeddings and "lm_head.weight" in tensors and "lm_head.weight" not in expected:
        # Some tied checkpoints store the shared matrix twice; accept it only if it really is the same matrix.
        head = tensors.pop("lm_head.weight")
        embedding = tensors.get("model.embed_tokens.weight")
        if embedding is not None and not torch.equal(head, embedding):
            raise ModelLoadError(f"{where}: config has tie_word_embeddings=true but lm_head.weight differs from "
                                 "model.embed_tokens.weight; set tie_word_embeddings=false in config.json")
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    mismatched = [f"{name}: checkpoint {tuple(tensors[name].shape)}, config expects {tuple(shape)}"
                  for name, shape in expected.items() if name in tensors and tensors[name].shape != shape]
    problems = []
    if missing:
        problems.append(f"missing tensors: {', '.join(missing)}")
    if unexpected:
        problems.append(f"unexpected tensors: {', '.join(unexpected)}")
    if mismatched:
        problems.append(f"shape mismatch: {'; '.join(mismatched)}")
    if problems:
        raise ModelLoadError(f"{where}: checkpoint does not match the config ({model.config.architecture}): "
                             + " | ".join(problems))
    return {our_name(name): tensor.to(device=device, dtype=dtype) for name, tensor in tensors.items()}


def save_pretrained(model: torch.nn.Module, directory: str | Path, tokenizer=None) -> Path:
    """Write config.json, model.safetensors and (when given and able) tokenizer files in HF format."""
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    config = dict(model.config.hf)
    config["architectures"] = [model.config.architecture]
    config["dtype"] = str(model.dtype).removeprefix("torch.")
    config.pop("torch_dtype", None)
    (directory / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    tensors = {hf_name(name): tensor.detach().contiguous().cpu() for name, tensor in model.state_dict().items()}
    save_file(tensors, directory / SINGLE_FILE, metadata={"format": "pt"})
    if tokenizer is not None:
        tokenizer.save(directory)
    return directory
