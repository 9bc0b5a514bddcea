"""The checks a run makes before any weights are read (`check_startup`: the device, the linear-attention core and the
loss kernel it can run, every model's tokenizer, every prompt row, the chat templates' agreement), so their errors
come in seconds, and `opdgraph run --check` (`check_run`), which makes them and the run directory's checks, then
stops.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from opdgraph.planned_paths import has_linear_layers
from opdgraph.runtime.chat_templates import (
    check_template_agreement,
    configure_chat_templates,
)
from opdgraph.runtime.config_record import config_record
from opdgraph.runtime.context import pick_device
from opdgraph.runtime.reporters import check_reporters
from opdgraph.runtime.model_loading import load_tokenizers
from opdgraph.runtime.run_directory import RunRequest, open_run_directory
from opdgraph.stages import named_settings, stage_module


def _load_prompts(cfg, files: list[str], tokenizers: dict, *, gold_required: bool = True):
    from opdgraph.config.paths import data_file_path
    from opdgraph.data import load_prompt_set
    from opdgraph.runtime.hybrid import gold_field
    from opdgraph.runtime.teachers import routing, teacher_prompt_rules

    data = cfg.data
    return load_prompt_set([data_file_path(cfg.base_dir, f) for f in files],
                           tokenizer=tokenizers[cfg.model_with_role("student")],
                           prompt_field=data.prompt_field, answer_field=data.answer_field,
                           system_prompt=data.system_prompt, max_prompt_tokens=data.max_prompt_tokens,
                           on_bad_row=data.on_bad_row, teacher_prompts=teacher_prompt_rules(cfg, tokenizers),
                           routing=routing(cfg), gold=gold_field(cfg, tokenizers, required=gold_required))

@dataclass(frozen=True)
class Startup:
    """What the checks that need no weights produce: the device, the tokenizers and the prompt sets."""

    device: torch.device
    tokenizers: dict[str, Any]
    train_prompts: Any
    eval_prompts: Any

def check_startup(cfg) -> Startup:
    """Every check that needs no weights, before any weights are read (so its errors come in seconds, not after
    minutes of loading): the device (and the linear-attention core, loss and layer kernels it can run), the student's
    and the teacher's tokenizers, every row of every prompt file.
    `opdgraph run --check` stops here."""
    from opdgraph.models.layer_kernels import check_layer_kernels

    check_reporters(cfg)  # a tracker named in [log] report_to whose package is missing
    device = pick_device(cfg.pipeline.device)
    if has_linear_layers(cfg):  # Qwen3.5: the linear-attention core it can run
        from opdgraph.kernels.fla_linear_attention import linear_backend_problem

        linear_backend_problem(device)  # a DeviceError where the core the plan sizes cannot run here
    for name, stage in cfg.stages.items():  # what each stage needs of the device (the loss: its kernel)
        check = getattr(stage_module(stage.kind), "check_device", None)
        if check is not None:
            check(name, stage.config, device)
    for name, model in cfg.models.items():
        check_layer_kernels(model.kernels, device, where=f"models.{name}.kernels")
    tokenizers = load_tokenizers(cfg.models, Path(cfg.base_dir),
                                 {name: shape.vocab for name, shape in cfg.shapes.items()})
    tokenizers = configure_chat_templates(cfg, tokenizers)  # each model's template file and variables
    train_prompts = _load_prompts(cfg, cfg.data.train_files, tokenizers)
    check_template_agreement(cfg, tokenizers, train_prompts)
    print(f"train prompts: {train_prompts.summary.describe()}")
    settings = {key: value for key, (_, value) in named_settings(cfg.stages, "run_settings").items()}
    eval_files = (settings["eval_files"] or cfg.data.eval_files) if "eval_files" in settings else []
    # An eval row may lack the gold field: eval's accuracy with the gold prefix grades the rows that have one.
    eval_prompts = _load_prompts(cfg, eval_files, tokenizers, gold_required=False) if eval_files else None
    return Startup(device=device, tokenizers=tokenizers, train_prompts=train_prompts, eval_prompts=eval_prompts)

def check_run(cfg, *, resume: Path | None = None, restart: bool = False, allow_config_change: bool = False,
              take_over_lock: bool = False) -> Startup:
    """`opdgraph run --check`: every check a run makes before it trains (the run directory and its lock, the
    checkpoint and config changes of a resume, the device, the tokenizers, every prompt row), then stop. Nothing is
    written: the lock is released and a directory this check created is removed again."""
    import os

    request = RunRequest(resume=Path(resume) if resume is not None else None, restart=restart,
                         allow_config_change=allow_config_change, take_over_lock=take_over_lock)
    holds_directory = os.environ.get("RANK", "0") == "0"  # under torchrun rank 0 alone holds it, as in a run
    directory = open_run_directory(cfg, request, config_record=config_record(cfg)) if holds_directory else None
    try:
        return check_startup(cfg)
    finally:
        if directory is not None:
            directory.close()
