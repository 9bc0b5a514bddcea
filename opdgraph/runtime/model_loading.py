"""Loading a pipeline's models and tokenizers: where each model's files are (`model_source`), every tokenizer before
any weights (`load_tokenizers`, the student's compared with each teacher's), and the models themselves
(`load_models`; an `init_from` model starts from a copy of another, pruned to keep_layers).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from opdgraph.runtime.context import TORCH_DTYPES


def model_source(model_cfg, base_dir: Path, files: str = "weights") -> str | dict:
    """What `load_model` takes: an inline config dict, or a resolved path (pkg: paths name a file in a package; a
    Hub id is its snapshot folder in the Hub cache holding `files`, "tokenizer" or "weights", downloaded if needed:
    opdgraph.model_shapes.model_location, the rule `plan` follows too).

    A path to a config .json (e.g. the shipped real configs) means: that architecture, randomly initialised.
    """
    if model_cfg.config is not None:
        return dict(model_cfg.config)
    from opdgraph.model_shapes import model_location
    from opdgraph.models.errors import ModelLoadError

    path = model_location(model_cfg.path, str(base_dir), model_cfg.revision, files, ModelLoadError)
    if path.endswith(".json"):
        from opdgraph.model_config_check import read_config_file

        return read_config_file(path, ModelLoadError)
    return path

def load_tokenizers(models_cfg: dict, base_dir: Path, vocab_sizes: dict[str, int]) -> dict[str, Any]:
    """Every model's tokenizer, without its weights (an init_from model shares its source's), with the student's
    and each teacher's compared: a mismatch is reported in seconds, before any weights are read. `vocab_sizes` are
    the models' vocabularies from the plan's shapes."""
    from opdgraph.models.loading import load_tokenizer

    tokenizers = {name: load_tokenizer(model_source(model_cfg, base_dir, "tokenizer"), vocab_sizes[name])
                  for name, model_cfg in models_cfg.items() if model_cfg.init_from is None}
    for name in models_cfg:
        tokenizers.setdefault(name, tokenizers[_root(models_cfg, name)])
    student = next((name for name, model_cfg in models_cfg.items() if model_cfg.role == "student"), None)
    for name, model_cfg in models_cfg.items():
        if student is not None and model_cfg.role == "teacher":
            check_same_tokenizer(tokenizers[student], tokenizers[name], names=(student, name))
    return tokenizers


def load_models(models_cfg: dict, base_dir: Path, device: torch.device,
                tokenizers: dict[str, Any] | None = None) -> dict[str, tuple[Any, Any]]:
    """Load every model of the pipeline; `init_from` models start from a copy of another, pruned to keep_layers.
    `tokenizers` (from load_tokenizers) are used as they are; without them each is loaded beside its weights."""
    from opdgraph.models import load_decoder, prune_layers
    from opdgraph.models.loading import load_tokenizer

    tokenizers = tokenizers or {}
    loaded: dict[str, tuple[Any, Any]] = {}
    pending = dict(models_cfg)
    while pending:
        progressed = False
        for name, model_cfg in list(pending.items()):
            dtype = TORCH_DTYPES[model_cfg.dtype]
            if model_cfg.init_from is None:
                source = model_source(model_cfg, base_dir)
                model = load_decoder(source, dtype=dtype, device=device, init_seed=model_cfg.init_seed,
                                     init_device=model_cfg.init_device)
                tokenizer = tokenizers.get(name) or load_tokenizer(source, model.config.vocab_size)
                loaded[name] = (model, tokenizer)
                _note_ignored_keys(name, model.config.hf)
            elif model_cfg.init_from in loaded:
                source_model, tokenizer = loaded[model_cfg.init_from]
                tokenizer = tokenizers.get(name) or tokenizer  # its own chat options (load_tokenizers configured it)
                layers = model_cfg.keep_layers or list(range(source_model.config.num_layers))
                loaded[name] = (prune_layers(source_model, layers).to(dtype=dtype), tokenizer)
            else:
                continue
            del pending[name]
            progressed = True
        if not progressed:  # the config checks reject cycles and unknown names; this guards the loop
            raise RuntimeError(f"models {sorted(pending)} name an init_from that cannot be loaded")
    return loaded

def _root(models_cfg: dict, name: str) -> str:
    """The model whose files an init_from model comes from (its tokenizer is that model's)."""
    while models_cfg[name].init_from is not None:
        name = models_cfg[name].init_from
    return name

def _note_ignored_keys(name: str, hf_config: dict) -> None:
    from opdgraph.model_config_check import ignored_keys

    ignored = ignored_keys(hf_config)
    if ignored:
        print(f"note: [models.{name}] config keys accepted but ignored (metadata, or set by the pipeline and the "
              f"tokenizer instead): {', '.join(ignored)}")

def check_same_tokenizer(student_tokenizer, teacher_tokenizer, names: tuple[str, str] = ("student", "teacher")) -> None:
    """Distillation over the vocabulary needs one token <-> id mapping for both models."""
    from opdgraph.models.errors import ModelLoadError

    probe = "Hello, world! 12345 The quick brown fox; def f(x): return x**2\n"
    same = (student_tokenizer is teacher_tokenizer
            or student_tokenizer.encode(probe) == teacher_tokenizer.encode(probe))
    if not same:
        raise ModelLoadError(
            f"[models.{names[0]}] and [models.{names[1]}] have different tokenizers ({student_tokenizer.name!r} vs "
            f"{teacher_tokenizer.name!r}): full-vocabulary distillation needs one token <-> id mapping; pick a "
            "teacher of the student's family (checked before any weights were loaded)"
        )
