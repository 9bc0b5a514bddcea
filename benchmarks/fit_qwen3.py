"""Qwen3-4B student <- Qwen3-14B teacher on one 80 GB GPU: does the plan the fit search chose run, and does memory
follow the plan?

Steps: measure pinned host<->device bandwidth; re-plan pipelines/qwen3_4b_from_14b.toml with the measured PCIe rate
(the cost model's input); then for each variant (the search's own choice, and by default also the other runtime
path: teacher kept + optimizer state streamed from the host) run a few training steps through the real runtime
(`run_pipeline`) with random weights. Per plan step the script records torch.cuda.max_memory_allocated (peak stats
reset before each step, so each number is the peak while that step ran, everything live included) next to the
plan's predicted live bytes, and the measured seconds per step next to the predicted ones (and the prediction for
the fastest plan without offload, which needs more memory than the card has).

Random weights are drawn on the GPU directly (models.<name>.init_device = "device"; the CPU init of 19B
parameters takes minutes); prompts are ~500 bytes so every sequence is close to the plan's worst case (512 prompt +
512 new tokens). Not a test: prints a compact table, writes JSON (--out) with the card name; a failing variant is
reported, not fatal.

    python benchmarks/fit_qwen3.py --out fit_qwen3.json
"""

from __future__ import annotations

import argparse
import gc
import json
import tempfile
import time
import traceback
from pathlib import Path

import torch

PIPELINE = Path(__file__).resolve().parents[1] / "pipelines" / "qwen3_4b_from_14b.toml"
GIB = 1024**3


def pcie_bandwidth(device, num_bytes=2 * GIB, repeats=5) -> dict[str, float]:
    """GB/s of pinned host -> device and device -> host copies."""
    host = torch.empty(num_bytes, dtype=torch.uint8, pin_memory=True)
    on_device = torch.empty(num_bytes, dtype=torch.uint8, device=device)
    rates = {}
    for name, (destination, source) in {"h2d": (on_device, host), "d2h": (host, on_device)}.items():
        destination.copy_(source, non_blocking=True)
        torch.cuda.synchronize()
        started = time.perf_counter()
        for _ in range(repeats):
            destination.copy_(source, non_blocking=True)
        torch.cuda.synchronize()
        rates[name] = num_bytes * repeats / (time.perf_counter() - started) / 1e9
    return rates


def write_prompts(directory: Path, count: int = 64, length: int = 500) -> Path:
    words = "the quick brown fox jumps over a lazy dog while seven wizards quietly judge boxing matches".split()
    path = directory / "long_prompts.jsonl"
    with path.open("w") as handle:
        for index in range(count):
            text, position = f"Prompt {index}:", index
            while len(text) < length:
                text += " " + words[position % len(words)]
                position += 3
            handle.write(json.dumps({"prompt": text[:length]}) + "\n")
    return path


def measure_steps(executor_class, peaks: dict[str, int], seconds: dict[str, list[float]]):
    """Wrap PlanExecutor._run: reset the peak before each plan step, record the peak and time after it."""
    original = executor_class._run

    def measured(self, step, loop):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        started = time.perf_counter()
        original(self, step, loop)
        torch.cuda.synchronize()
        peaks[step.name] = max(peaks.get(step.name, 0), torch.cuda.max_memory_allocated())
        seconds.setdefault(step.name, []).append(time.perf_counter() - started)
    executor_class._run = measured
    return original


def run_variant(name: str, overrides: list[str], steps: int, work_dir: Path) -> dict:
    from opdgraph.config import load_pipeline
    from opdgraph.fit import fit_plan
    from opdgraph.runtime.executor import PlanExecutor
    from opdgraph.runtime.run import run_pipeline

    cfg = load_pipeline(str(PIPELINE), [*overrides, f"pipeline.num_steps={steps}", "log.progress=false",
                                        f"pipeline.output_dir={work_dir / name}"])
    fitted = fit_plan(cfg)
    plan = fitted.plan
    record = {"variant": name, "decisions": fitted.decisions.describe(), "fits": fitted.fits,
              "predicted_peak_gib": plan.peak_bytes / GIB, "predicted_step_seconds": plan.step_seconds,
              "no_offload_step_seconds": (plan.fit or {}).get("no_offload_step_seconds"),
              "no_offload_peak_gib": (plan.fit or {}).get("no_offload_peak_bytes", 0) / GIB}
    print(f"[{name}] {record['decisions']}: predicted peak {record['predicted_peak_gib']:.2f} GiB, "
          f"{plan.step_seconds:.2f} s/step", flush=True)
    peaks, seconds = {}, {}
    original = measure_steps(PlanExecutor, peaks, seconds)
    started = time.perf_counter()
    try:
        ctx = run_pipeline(fitted.cfg, plan)
        lines = (work_dir / name / "metrics.jsonl").read_text().splitlines()
        train = [json.loads(line) for line in lines if json.loads(line)["kind"] == "train"]
        record["step_seconds"] = [round(r["seconds"], 3) for r in train]
        record["losses"] = [r.get("loss") for r in train]
        del ctx
    except Exception as error:  # reported per variant; the other variants still run
        record["error"] = f"{type(error).__name__}: {error}"
        traceback.print_exc()
    finally:
        PlanExecutor._run = original
    record["wall_seconds"] = time.perf_counter() - started
    record["steps"] = [{"step": step.name, "predicted_gib": step.live_bytes / GIB,
                        "measured_gib": peaks.get(step.name, 0) / GIB,
                        "measured_seconds": sum(seconds.get(step.name, [])) / max(steps, 1),
                        "predicted_seconds": step.work.seconds} for step in plan.steps]
    measured_peak = max(peaks.values(), default=0) / GIB
    record["measured_peak_gib"] = measured_peak
    record["peak_ratio"] = measured_peak / record["predicted_peak_gib"] if measured_peak else None
    gc.collect()
    torch.cuda.empty_cache()
    getattr(torch._C, "_host_emptyCache", lambda: None)()  # pinned host blocks are cached too
    return record


def print_table(record: dict) -> None:
    print(f"\n== {record['variant']}: {record['decisions']}")
    print(f"  {'step':<24} {'pred GiB':>9} {'meas GiB':>9} {'meas/pred':>9} {'pred s':>8} {'meas s':>8}")
    for row in record["steps"]:
        ratio = row["measured_gib"] / row["predicted_gib"] if row["predicted_gib"] else 0
        print(f"  {row['step']:<24} {row['predicted_gib']:>9.2f} {row['measured_gib']:>9.2f} {ratio:>9.3f} "
              f"{row['predicted_seconds']:>8.3f} {row['measured_seconds']:>8.3f}")
    ratio = record.get("peak_ratio")
    print(f"  peak: predicted {record['predicted_peak_gib']:.2f} GiB, measured {record['measured_peak_gib']:.2f} GiB"
          + (f" ({ratio:.3f}x)" if ratio else ""))
    measured = record.get("step_seconds") or []
    steady = measured[1:] or measured
    print(f"  s/step: predicted {record['predicted_step_seconds']:.2f}, measured {measured} "
          f"(steady {sum(steady) / len(steady):.2f})" if steady else "  s/step: no step completed")
    if record.get("no_offload_step_seconds"):
        print(f"  without offload: predicted {record['no_offload_step_seconds']:.2f} s/step but needs "
              f"{record['no_offload_peak_gib']:.1f} GiB")
    if "error" in record:
        print(f"  FAILED: {record['error']}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="fit_qwen3.json")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--variants", default="chosen,keep+offload",
                        help="comma-separated: chosen (the search's choice), keep+offload, stream+keep, "
                             "offload+offload, nooffload (H200 only)")
    parser.add_argument("--time-limit", type=float, default=330.0,
                        help="skip variants that would start after this many seconds")
    args = parser.parse_args()
    device = torch.device("cuda")
    started = time.perf_counter()
    bandwidth = pcie_bandwidth(device)
    pcie = min(bandwidth.values())
    print(f"{torch.cuda.get_device_name(device)}: pinned PCIe h2d {bandwidth['h2d']:.1f} GB/s, "
          f"d2h {bandwidth['d2h']:.1f} GB/s (the plans below use {pcie:.1f})", flush=True)
    forced = {"chosen": [],
              "keep+offload": ['pipeline.fit.teacher_weights="keep"', 'pipeline.fit.optimizer_state="offload"'],
              "stream+keep": ['pipeline.fit.teacher_weights="stream"', 'pipeline.fit.optimizer_state="keep"'],
              "offload+offload": ['pipeline.fit.teacher_weights="offload"', 'pipeline.fit.optimizer_state="offload"'],
              # The plan as configured, no search: needs ~96 GiB, so only on a card that holds it (an H200).
              "nooffload": ["pipeline.memory_budget_gib=130", "pipeline.fit.enabled=false",
                            "backward.activation_checkpointing=true"]}
    results = {"device": torch.cuda.get_device_name(device), "torch": torch.__version__, "pcie_gbps": bandwidth,
               "variants": []}
    with tempfile.TemporaryDirectory() as temporary:
        work_dir = Path(temporary)
        prompts = write_prompts(work_dir)
        common = [f"pipeline.hardware.pcie_gbps={pcie:.1f}", f'data.train_files=["{prompts}"]',
                  'models.student.init_device="device"', 'models.teacher.init_device="device"']
        for name in args.variants.split(","):
            if time.perf_counter() - started > args.time_limit:
                results["variants"].append({"variant": name, "skipped": "time limit"})
                print(f"[{name}] skipped: past --time-limit", flush=True)
                continue
            results["variants"].append(run_variant(name, [*common, *forced[name]], args.steps, work_dir))
            Path(args.out).write_text(json.dumps(results, indent=1))
    for record in results["variants"]:
        if "skipped" not in record:
            print_table(record)
    print(f"\ntotal {time.perf_counter() - started:.0f} s; wrote {args.out}")


if __name__ == "__main__":
    main()
