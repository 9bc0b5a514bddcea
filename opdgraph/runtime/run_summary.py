"""What a run tells the experiment trackers about itself besides its metrics: the resolved config and the plan.

- `resolved_config(cfg)`: the pipeline as `opdgraph config` resolves it (every value, defaults filled in), as nested
  plain values: `pipeline`, `models.<name>`, `data`, then each stage table with its `kind`. It is config.toml without
  the provenance comments.
- `plan_summary(plan)`: the numbers the text plan leads with: the peak and its step, the budget, the roofline time of
  a training step, what the fit search chose, the shape of a step (sequences, tokens, micro-batches, chunks), each
  model's parameter count, and per plan step its runs per training step, live memory, roofline time, TFLOP and GB
  moved. A compact dict, not the plan (plan.json holds that).
- `flat(values)`: nested values as dotted keys, for trackers whose parameters are one flat table (MLflow).

Torch-free, like the compiler whose output it summarises.
"""

from __future__ import annotations

from typing import Any

from opdgraph.config.strict import unstructure

GIB = 1024**3
STEP_FACTS = ("rollout.sequences", "rollout.num_pages", "train.tokens_per_step", "train.micro_batch_tokens",
              "train.num_micro_batches", "loss.chunk_tokens")


def resolved_config(cfg) -> dict[str, Any]:
    values: dict[str, Any] = {"pipeline": unstructure(cfg.pipeline),
                              "models": {name: unstructure(model) for name, model in cfg.models.items()},
                              "data": unstructure(cfg.data)}
    for name, stage in cfg.stages.items():
        values[name] = {"kind": stage.kind, **unstructure(stage.config)}
    return values


def _gib(size: float) -> float:
    return round(size / GIB, 4)


def plan_summary(plan) -> dict[str, Any]:
    summary: dict[str, Any] = {
        "peak_gib": _gib(plan.peak_bytes), "peak_step": plan.peak.step, "budget_gib": _gib(plan.budget_bytes),
        "within_budget": not plan.over_budget, "step_seconds": plan.step_seconds, "fused_training": plan.fused,
        "fit": plan.fit["described"] if plan.fit else "not searched (the plan fits as configured)",
        **{key: plan.facts[key] for key in STEP_FACTS if key in plan.facts},
        **{key: value for key, value in plan.facts.items() if key.endswith(".parameters")},
        "largest_at_peak_gib": {name: _gib(size) for name, size in plan.peak.contributors[:6]},
        "steps": {step.name: {"runs": step.repeats, "live_gib": _gib(step.live_bytes),
                              "roofline_seconds": step.work.seconds, "tflop": step.work.flops / 1e12,
                              "gb_moved": (step.work.device_bytes + step.work.pcie_bytes) / 1e9}
                  for step in plan.steps},
    }
    return summary


def flat(values: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"a": {"b": 1}} -> {"a.b": 1}; an empty table stays one value ({})."""
    out: dict[str, Any] = {}
    for key, value in values.items():
        if isinstance(value, dict) and value:
            out.update(flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out
