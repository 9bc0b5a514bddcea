"""The figures and tables of benchmarks/step.py: a shape's measured seconds against its floor, and the printouts.

summarize reduces run_ours' steps to median seconds per stage group (STAGE_GROUPS: plan steps summed), throughput,
MFU and the fraction of the roofline floor; print_table prints every row beside TRL's, print_memory_table the
predicted and measured peaks of each variant.
"""

from __future__ import annotations

import statistics
from dataclasses import asdict

from step_pipeline import StepShape

STAGE_GROUPS = {"rollout": ("rollout.prefill", "rollout.decode"), "teacher": ("teacher_score",),
                "student_fwd": ("loss.student_forward",), "loss": ("loss",), "backward": ("backward",),
                "optimizer": ("step",)}
MEMORY_STEPS = ("rollout.decode", "loss")  # the KV pool's phase and the training peak


def summarize(shape: StepShape, ours: dict, floor: dict, hardware: dict) -> dict:
    measured = [step for step in ours["steps"] if not step["warmup"]] or ours["steps"]
    stage = {group: statistics.median(sum(step["stages"].get(name, 0.0) for name in names) for step in measured)
             for group, names in STAGE_GROUPS.items()}
    seconds = statistics.median(step["seconds"] for step in measured)
    mfu = {group: floor["flops"][group] / stage[group] / hardware["matmul_flops"]
           for group in ("teacher", "student_fwd", "loss", "backward") if stage[group] > 0}
    compute = [g for g in mfu]
    compute_seconds = sum(stage[g] for g in compute)
    summary = {"shape": asdict(shape), "seconds_per_step": seconds, "stage_seconds": stage,
               "tokens_per_s": shape.tokens / seconds, "response_tokens_per_s": shape.sequences
               * shape.response_tokens / seconds, "mfu_vs_measured_matmul": mfu,
               "compute_mfu_vs_measured_matmul": sum(floor["flops"][g] for g in compute) / compute_seconds
               / hardware["matmul_flops"] if compute_seconds else None,
               "floor": floor, "fraction_of_floor": floor["floor_step_seconds"] / seconds,
               "peak_gib": max((step["peak_gib"] or 0) for step in ours["steps"])}
    if hardware["nominal_bf16_flops"]:
        summary["compute_mfu_vs_nominal_peak"] = (sum(floor["flops"][g] for g in compute) / compute_seconds
                                                  / hardware["nominal_bf16_flops"]) if compute_seconds else None
    return summary


def print_table(report: dict) -> None:
    hardware = report["hardware"]
    print(f"\n{hardware['device']}, torch {hardware['torch']}: measured matmul "
          f"{hardware['matmul_flops'] / 1e12:.0f} TFLOP/s, copy {hardware['copy_bytes_per_s'] / 1e9:.0f} GB/s")
    columns = ("rollout", "teacher", "student_fwd", "loss", "backward", "optimizer")
    header = f"{'run':<26}{'s/step':>8}" + "".join(f"{c:>12}" for c in columns) + f"{'tok/s':>9}{'MFU':>6}"
    print(header + f"{'floor s':>9}{'floor%':>8}")
    print("-" * (len(header) + 17))
    for name, row in report["rows"].items():
        if "error" in row or "skipped" in row:
            print(f"{name:<26}  {row.get('skipped') and 'skipped: ' + row['skipped'] or 'failed: ' + row['error']}")
            continue
        stages = row.get("stage_seconds", {})
        cells = "".join(f"{stages[c]:>12.3f}" if c in stages else f"{'-':>12}" for c in columns)
        mfu = row.get("compute_mfu_vs_measured_matmul")
        floor = row.get("floor", {}).get("floor_step_seconds")
        fraction = row.get("fraction_of_floor")
        mfu_text = f"{100 * mfu:.0f}%" if mfu else "-"
        floor_text = f"{floor:.2f}" if floor else "-"
        fraction_text = f"{100 * fraction:.0f}%" if fraction else "-"
        print(f"{name:<26}{row['seconds_per_step']:>8.2f}{cells}{row['tokens_per_s']:>9.0f}{mfu_text:>6}"
              f"{floor_text:>9}{fraction_text:>8}")
    for name, row in report["rows"].items():
        if "floor" in row:
            floors = row["floor"]["floor_seconds"]
            print(f"floor {name}: " + ", ".join(f"{k} {v:.3f}" for k, v in floors.items()))
    ours, trl = report["rows"].get("opdgraph A", {}), report["rows"].get("TRL A", {})
    if "seconds_per_step" in ours and "seconds_per_step" in trl:
        print(f"shape A: opdgraph {trl['seconds_per_step'] / ours['seconds_per_step']:.2f}x TRL's s/step "
              f"(rollout {trl['stage_seconds']['rollout'] / ours['stage_seconds']['rollout']:.2f}x, rest "
              f"{trl['other_seconds'] / (ours['seconds_per_step'] - ours['stage_seconds']['rollout']):.2f}x)")
    print("MFU = FLOPs of teacher + student forward + loss + backward / their seconds / measured matmul rate;"
          " floor% = roofline floor / measured s/step")


def print_memory_table(report: dict) -> None:
    """Predicted vs measured peak per variant (measured steps only: a kept buffer exists from its first use on)."""
    print(f"\npeak memory, GiB, predicted / measured (torch.cuda.max_memory_allocated per plan step, measured steps)")
    print(f"{'run':<26}{'peak pred':>10}{'peak meas':>10}{'meas/pred':>10}"
          + "".join(f"{name + ' pred/meas':>26}" for name in MEMORY_STEPS))
    for name, row in report["rows"].items():
        raw = row.get("raw")
        if raw is None:
            print(f"{name:<26}  {row.get('error') or row.get('skipped')}")
            continue
        measured = [step["plan_step_peak_gib"] for step in raw["steps"] if not step["warmup"]] or \
            [step["plan_step_peak_gib"] for step in raw["steps"]]
        per_step = {key: max(m.get(key, 0.0) for m in measured) for key in raw["predicted_step_gib"]}
        peak = max(per_step.values(), default=0.0)
        ratio = f"{peak / raw['predicted_peak_gib']:.3f}" if peak else "-"
        cells = "".join(f"{raw['predicted_step_gib'][key]:>17.2f} / {per_step.get(key, 0.0):<6.2f}"
                        for key in MEMORY_STEPS)
        print(f"{name:<26}{raw['predicted_peak_gib']:>10.2f}{peak:>10.2f}{ratio:>10}{cells}")
