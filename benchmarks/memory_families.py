"""Predicted vs measured device memory per plan step, one student <- teacher pair per supported family.

Each pair runs `opdgraph run --record-memory` for a few steps at one shape (bf16, fused loop, no activation
checkpointing, 64 prompts x 2 samples, up to 512 prompt + 1024 new tokens, micro_batch_tokens 16384, chunk 1024;
real configs, random weights drawn on the device) and reads the run's memory.json. Output: a JSON list of rows
(pair, plan_step, predicted_gib, measured_gib) and a text table with the ratio and the bound of the memory issue
(every step within 5% of measured, never under by more than 3%).

    python benchmarks/memory_families.py --out benchmarks/results/memory_families_h200.json [--pairs qwen25,gemma3]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = "pkg:opdgraph/model_configs"
PAIRS = {  # name -> (student config, teacher config)
    "qwen25": ("qwen2.5-1.5b-instruct", "qwen2.5-7b-instruct"),
    "qwen3": ("qwen3-4b", "qwen3-14b"),
    "llama32": ("llama-3.2-1b-instruct", "llama-3.2-3b-instruct"),
    "gemma3": ("gemma-3-1b-it", "gemma-3-4b-it-text"),
    "qwen35": ("qwen3.5-0.8b-text", "qwen3.5-4b-text"),
}
SHAPE = {"data.prompts_per_step": 64, "data.samples_per_prompt": 2, "data.max_prompt_tokens": 512,
         "rollout.max_new_tokens": 1024, "rollout.max_num_seqs": 128, "teacher_score.micro_batch_tokens": 16384,
         "loss.chunk_tokens": 1024, "backward.activation_checkpointing": False}
WITHIN, UNDER = 0.05, 0.03  # the memory issue's bounds: |pred - meas| <= 5% of meas, pred >= 0.97 meas


def _overrides(student: str, teacher: str, steps: int, out_dir: Path, budget_gib: float) -> list[str]:
    values = {"models.student.path": f'"{CONFIGS}/{student}.json"', "models.teacher.path": f'"{CONFIGS}/{teacher}.json"',
              "models.student.init_device": '"device"', "models.teacher.init_device": '"device"',
              "pipeline.num_steps": steps, "pipeline.device": '"cuda"', "pipeline.memory_budget_gib": budget_gib,
              "pipeline.output_dir": json.dumps(str(out_dir)),
              **{key: str(value).lower() if isinstance(value, bool) else value for key, value in SHAPE.items()}}
    return [arg for key, value in values.items() for arg in ("--set", f"{key}={value}")]


def _pipeline(scratch: Path) -> Path:
    """The shipped Qwen2.5 pipeline without its [checkpoint] table (a 4B student's checkpoint is ~60 GB of disk and
    minutes of writing, and checkpointing is not what this measures), its data file named by absolute path."""
    text = (ROOT / "pipelines" / "qwen25_1b5_from_7b.toml").read_text()
    start = text.index("[checkpoint]")
    end = text.index("\n[", start)
    text = text[:start] + text[end + 1:]
    text = text.replace('"data/tiny_train.jsonl"', json.dumps(str(ROOT / "pipelines" / "data" / "tiny_train.jsonl")))
    path = scratch / "memory_pipeline.toml"
    path.write_text(text)
    return path


def run_pair(name: str, steps: int, scratch: Path, budget_gib: float) -> list[dict]:
    student, teacher = PAIRS[name]
    out_dir = scratch / name
    shutil.rmtree(out_dir, ignore_errors=True)
    scratch.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "opdgraph", "run", str(_pipeline(scratch)),
               "--record-memory", *_overrides(student, teacher, steps, out_dir, budget_gib)]
    started = time.perf_counter()
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        print(f"{name}: exit {done.returncode} after {seconds:.0f} s\n{done.stderr[-3000:]}", flush=True)
        return []
    rows = json.loads((out_dir / "memory.json").read_text())
    pair = f"{student} <- {teacher}"
    print(f"{pair}: {seconds:.0f} s", flush=True)
    return [{"pair": pair, "plan_step": row["step"], "predicted_gib": round(row["predicted_gib"], 3),
             "measured_gib": None if row["measured_gib"] is None else round(row["measured_gib"], 3)}
            for row in rows]


def table(rows: list[dict]) -> str:
    lines = [f"{'pair':<48}{'plan step':<30}{'pred GiB':>9}{'meas GiB':>9}{'pred/meas':>10}  bound"]
    for row in rows:
        measured = row["measured_gib"]
        if not measured:
            continue
        ratio = row["predicted_gib"] / measured
        inside = abs(ratio - 1) <= WITHIN and ratio >= 1 - UNDER
        lines.append(f"{row['pair']:<48}{row['plan_step']:<30}{row['predicted_gib']:>9.2f}{measured:>9.2f}"
                     f"{ratio:>10.3f}  {'ok' if inside else 'OUT'}")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--pairs", default=",".join(PAIRS), help="comma-separated subset of " + ", ".join(PAIRS))
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--budget-gib", type=float, default=139.0)
    parser.add_argument("--scratch", default="/tmp/memory_families")
    parser.add_argument("--out", required=True, help="JSON rows; the text table goes beside it (.txt)")
    args = parser.parse_args()
    rows: list[dict] = []
    for name in args.pairs.split(","):
        rows += run_pair(name, args.steps, Path(args.scratch), args.budget_gib)
        Path(args.out).write_text(json.dumps(rows, indent=2) + "\n")  # after each pair: a timeout keeps the rest
    text = table(rows)
    Path(args.out).with_suffix(".txt").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
