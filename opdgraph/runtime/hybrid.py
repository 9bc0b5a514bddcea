"""A hybrid SFT + OPD pipeline at run time (stages/sft.py): the gold-field rule the prompt loader applies to every
row (opdgraph.data.gold_prefix), and the facts the rollout, the sft stage and the backward read.
"""

from __future__ import annotations

from opdgraph.data.gold_prefix import GoldField
from opdgraph.runtime.teachers import setting_location
from opdgraph.stages import named_settings


def _sft_stage(cfg) -> tuple[str, object] | None:
    """(name, Config) of the stage that publishes the `sft` run setting (stages/sft.py), or None."""
    return named_settings(cfg.stages, "run_settings").get("sft")


def gold_field(cfg, tokenizers: dict, *, required: bool = True) -> GoldField | None:
    """The rule that reads each row's gold solution with the student's tokenizer, or None without an sft stage
    (required: a row without the field is an error, else it has no gold)."""
    stage = _sft_stage(cfg)
    if stage is None:
        return None
    name, config = stage
    return GoldField(field=config.gold_prefix_field, tokenizer=tokenizers[cfg.model_with_role("student")],
                     stage=name, where=setting_location(cfg, f"{name}.gold_prefix_field"), required=required)


def sft_facts(cfg) -> dict:
    """`sft`: the stage's Config (rollout places its prefix schedule, the packing its normalisation);
    `sft_hidden_grads`: the buffers the backward scatters to the gold-prefix positions. Empty without one."""
    stage = _sft_stage(cfg)
    if stage is None:
        return {}
    name, config = stage
    return {"sft": config, "sft_hidden_grads": (f"{name}.hidden_grad",)}
