"""The training-forward variants that benchmarks/step.py --variants measures side by side (issue 19's training part).

Each variant is how both models' packed forwards run (the student's forward + backward and the teacher's scoring
forward); the rest of the step is the same code:

- before:  torch layer kernels, K/V heads repeated to the query heads before FlashAttention (the path measured in
           benchmarks/results/step_h200.json: torch 2.11's varlen_attn has no enable_gqa);
- torch:   torch layer kernels, grouped-query K/V native (the aten flash kernels; kernels/varlen_attention.py);
- liger:   Liger-Kernel's fused norms, residual add, RoPE and gated activation (models.<name>.kernels = "liger",
           what "auto" picks on CUDA), native GQA;
- compile: torch layer kernels, native GQA, every decoder layer under torch.compile(dynamic=True) (regional
           compilation: one graph per layer code, the packed length symbolic). Benchmark only: the plan's activation
           sizing assumes what the eager Functions save, and Inductor's partitioner decides its own saves (the
           memory table beside shows what it keeps).

A variant is applied to a built run context (``apply``): layer kernels through the config override (so the run's
own selection code runs), the attention backend and compilation on the models directly.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Variant:
    name: str
    kernels: str  # models.<name>.kernels for both models
    repeat_kv: bool = False
    compile: bool = False

    def overrides(self, model_names: tuple[str, ...]) -> tuple[str, ...]:
        return tuple(f"models.{name}.kernels={self.kernels}" for name in model_names)


VARIANTS = {variant.name: variant for variant in (
    Variant("before", kernels="torch", repeat_kv=True),
    Variant("torch", kernels="torch"),
    Variant("liger", kernels="liger"),
    Variant("compile", kernels="torch", compile=True),
)}


def parse(names: str) -> list[Variant]:
    unknown = [name for name in names.split(",") if name not in VARIANTS]
    if unknown:
        raise SystemExit(f"unknown variant(s) {', '.join(unknown)}; choose from {', '.join(VARIANTS)}")
    return [VARIANTS[name] for name in names.split(",")]


def apply(variant: Variant, models) -> None:
    """Attention backend and compilation of `variant` on each model (layer kernels come from the overrides)."""
    from opdgraph.kernels.varlen_attention import VarlenFlashBackend

    for model in models:
        if model.device.type == "cuda":
            model.set_attention_backend(VarlenFlashBackend(repeat_kv=variant.repeat_kv))
        for layer in model.layers:
            if variant.compile:
                layer.compile(dynamic=True)
            else:  # models are reused across variants: drop an earlier variant's compilation
                layer._compiled_call_impl = None


# Issue 19's shape B targets, as multiples of the roofline floor.
TARGETS = {"student": 1.6, "teacher": 1.35, "step": 1.5}
TRAINING_PEAK_STEP = "loss"  # the plan step where the student's activations peak


def summary(row: dict) -> dict:
    """Seconds, floors and their ratios of one variant's row of step.py, and its training peak (measured / planned)."""
    stage, floors = row["stage_seconds"], row["floor"]["floor_seconds"]
    measured = [step for step in row["raw"]["steps"] if not step["warmup"]] or row["raw"]["steps"]
    result = {
        "student_fwd_bwd_s": stage["student_fwd"] + stage["backward"],
        "student_floor_s": floors["student_fwd"] + floors["backward"],
        "teacher_s": stage["teacher"], "teacher_floor_s": floors["teacher"],
        "step_s": row["seconds_per_step"], "step_floor_s": row["floor"]["floor_step_seconds"],
        "training_peak_gib": max(step["plan_step_peak_gib"].get(TRAINING_PEAK_STEP, 0.0) for step in measured),
        "training_peak_planned_gib": row["raw"]["predicted_step_gib"].get(TRAINING_PEAK_STEP),
        "layer_kernels": row["raw"].get("layer_kernels"), "repeat_kv": row["raw"].get("repeat_kv"),
        # a sanity check, not a comparison: each variant starts from the weights the earlier ones trained (lr 1e-6)
        "loss": measured[-1]["loss"],
    }
    for key in TARGETS:
        result[f"{key}_x_floor"] = result[f"{key}_fwd_bwd_s" if key == "student" else f"{key}_s"] / \
            result[f"{key}_floor_s"]
    return result


def print_summary(report: dict) -> dict:
    """The variants side by side (rows of step.py named 'opdgraph <shape> [<variant>]'); returns the summaries."""
    summaries = {}
    print(f"\ntraining-forward variants: seconds per step and x floor (targets: student forward + backward <= "
          f"{TARGETS['student']}x, teacher <= {TARGETS['teacher']}x, step <= {TARGETS['step']}x)")
    print(f"{'run':<24}{'student f+b':>12}{'x floor':>8}{'teacher':>9}{'x floor':>8}{'step':>8}{'x floor':>8}"
          f"{'train peak GiB meas/plan':>26}{'loss':>9}  kernels student/teacher")
    for label, row in report["rows"].items():
        if "[" not in label:
            continue
        if "stage_seconds" not in row:
            print(f"{label:<24}  failed: {row.get('error')}")
            continue
        s = summaries[label] = summary(row)
        planned = s["training_peak_planned_gib"]
        print(f"{label:<24}{s['student_fwd_bwd_s']:>12.3f}{s['student_x_floor']:>8.2f}{s['teacher_s']:>9.3f}"
              f"{s['teacher_x_floor']:>8.2f}{s['step_s']:>8.2f}{s['step_x_floor']:>8.2f}"
              f"{s['training_peak_gib']:>15.2f} / {planned if planned is None else round(planned, 2)!s:<8}"
              f"{s['loss']:>9.4f}"
              f"  {s['layer_kernels']['student']}/{s['layer_kernels']['teacher']}"
              f"{', K/V repeated' if s['repeat_kv'] else ''}")
    return summaries
