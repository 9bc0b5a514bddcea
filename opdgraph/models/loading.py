"""load_model: one entry point from a model source (HF directory, GGUF file, or inline config dict) to
(DecoderLM, tokenizer).

Modules are built on the meta device and then either receive the checkpoint tensors directly (no throwaway random
init of a large model) or are materialised and seeded (inline configs).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from opdgraph.model_config_check import check_model_config, read_config_file
from opdgraph.models.checkpoint import read_safetensors_dir, state_dict_from_checkpoint, text_model_tensors
from opdgraph.models.config import decoder_config_from_hf
from opdgraph.models.decoder import DecoderLM
from opdgraph.models.errors import ModelLoadError
from opdgraph.models.gguf_checkpoint import read_gguf_checkpoint
from opdgraph.models.tokenizers import (ByteTokenizer, Tokenizer, load_tokenizer_from_dir,
                                        load_tokenizer_from_gguf)

SUPPORTED_DTYPES = (torch.float32, torch.bfloat16)


def _check_dtype(dtype: torch.dtype) -> None:
    if dtype not in SUPPORTED_DTYPES:
        raise ModelLoadError(f"dtype {dtype} is not supported; use torch.float32 or torch.bfloat16")


def _read_config_json(directory: Path) -> dict[str, Any]:
    path = directory / "config.json"
    if not path.exists():
        raise ModelLoadError(f"{directory}: no config.json (expected an HF model directory)")
    return read_config_file(str(path), ModelLoadError)


def _from_checkpoint(hf_config: dict, tensors: dict[str, torch.Tensor], where: str, dtype, device) -> DecoderLM:
    config = decoder_config_from_hf(hf_config, where)
    with torch.device("meta"):
        model = DecoderLM(config)
    tensors = text_model_tensors(tensors, hf_config, where)
    state = state_dict_from_checkpoint(model, tensors, where, dtype, device)
    model.load_state_dict(state, assign=True, strict=True)
    return model


INIT_DEVICES = ("cpu", "device")  # where random weights are drawn; see DecoderLM.reset_parameters


def build_random(hf_config: dict[str, Any], *, dtype: torch.dtype, device="cpu", init_seed: int = 0,
                 init_device: str = "cpu", where: str = "inline config") -> DecoderLM:
    """A freshly initialised model, seeded. init_device "cpu": the same seed and config give the same weights on any
    device; "device": drawn on `device` with the same distribution (fast for large models on a GPU)."""
    if init_device not in INIT_DEVICES:
        raise ModelLoadError(f"init_device must be one of {INIT_DEVICES}, got {init_device!r}")
    _check_dtype(dtype)
    config = decoder_config_from_hf(hf_config, where)
    with torch.device("meta"):
        model = DecoderLM(config)
    model = model.to_empty(device=device).to(dtype)
    model.reset_parameters(init_seed, on_device=init_device == "device")
    return model


def load_decoder(source: str | Path | dict, *, dtype: torch.dtype, device="cpu", init_seed: int = 0,
                 init_device: str = "cpu") -> DecoderLM:
    """The model alone (no tokenizer): for checkpoints saved without tokenizer files, and for tests.
    init_seed / init_device only matter for an inline config dict (random init, see build_random)."""
    _check_dtype(dtype)
    if isinstance(source, dict):
        return build_random(source, dtype=dtype, device=device, init_seed=init_seed, init_device=init_device)
    path = Path(source)
    if path.is_file() and path.suffix == ".gguf":
        hf_config, tensors = read_gguf_checkpoint(path)
        return _from_checkpoint(hf_config, tensors, str(path), dtype, device)
    if path.is_dir():
        hf_config = _read_config_json(path)
        check_model_config(hf_config, str(path / "config.json"), ModelLoadError)  # before any weight is read
        return _from_checkpoint(hf_config, read_safetensors_dir(path), str(path), dtype, device)
    raise ModelLoadError(f"{path}: model source must be an HF model directory, a .gguf file or an inline config "
                         f"dict ({'not found' if not path.exists() else 'unrecognised file'})")


def load_tokenizer(source: str | Path | dict, vocab_size: int) -> Tokenizer:
    """The tokenizer of a model source, without its weights (cheap: runs before any weights are read).
    `vocab_size` is the model's (from its config), which a byte tokenizer and the bounds check need."""
    if isinstance(source, dict):
        return ByteTokenizer(vocab_size)
    path = Path(source)
    if path.is_dir():
        tokenizer = load_tokenizer_from_dir(path, vocab_size)
    elif path.is_file() and path.suffix == ".gguf":
        tokenizer = load_tokenizer_from_gguf(path)
    else:
        raise ModelLoadError(f"{path}: model source must be an HF model directory, a .gguf file or an inline "
                             f"config dict ({'not found' if not path.exists() else 'unrecognised file'})")
    if tokenizer.vocab_size > vocab_size:
        raise ModelLoadError(f"{source}: tokenizer produces {tokenizer.vocab_size} ids but the model's vocab_size is "
                             f"{vocab_size}")
    return tokenizer


def load_model(source: str | Path | dict, *, dtype: torch.dtype, device="cpu",
               init_seed: int = 0, init_device: str = "cpu") -> tuple[DecoderLM, Tokenizer]:
    """(model, tokenizer) from an HF directory, a .gguf file, or an inline HF-style config dict (random init)."""
    model = load_decoder(source, dtype=dtype, device=device, init_seed=init_seed, init_device=init_device)
    return model, load_tokenizer(source, model.config.vocab_size)
